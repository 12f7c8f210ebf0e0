//! Helpers shared by vessel's integration test tiers: capability checks that
//! explain a skip, booting a bundled test guest in-process, and parsing
//! what the report guest prints.

pub mod agent;
pub mod harness;
pub mod netns;
pub mod pattern;
pub mod tier3;
pub mod virtiofsd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use guests::{Format, Program};
use vmm::{
    BootSourceConfig, ConsoleOutput, DeviceConfig, ExitReason, MachineConfig, PrebootAction, VmStats, Vmm, VmmHandle,
};

/// Why KVM tests cannot run on this machine, or None if they can.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vessel-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` inside it.
    pub fn write(&self, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, bytes)?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A console that collects what the guest writes.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How to boot a test guest.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// vCPUs.
    pub vcpus: u8,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// Initrd contents, if any.
    pub initrd: Option<Vec<u8>>,
    /// Seccomp on.
    pub seccomp: bool,
    /// Empty virtio-mmio slots for hotplug.
    pub hotplug_slots: u8,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self { vcpus: 1, mem_mib: 64, cmdline: String::new(), initrd: None, seccomp: true, hotplug_slots: 0 }
    }
}

/// What a guest run left behind.
#[derive(Debug)]
pub struct GuestRun {
    /// Serial console output.
    pub console: String,
    /// How it ended.
    pub exit: ExitReason,
    /// Counters at the end.
    pub stats: VmStats,
}

/// The longest a tiny guest may take before the test calls it hung.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A guest started in this process; dropping it stops the VM.
pub struct RunningGuest {
    /// The VM.
    pub handle: VmmHandle,
    /// What it has written to its console so far.
    pub console: Console,
    _dir: Option<TempDir>,
}

/// Starts a bundled guest in this process.
pub fn start_guest(program: Program, format: Format, opts: &BootOptions) -> anyhow::Result<RunningGuest> {
    let dir = TempDir::new("guest")?;
    let kernel = dir.write(guests::file_name(program, format), guests::image(program, format))?;
    let initrd = opts.initrd.as_ref().map(|b| dir.write("initrd", b)).transpose()?;
    let mut guest = start_kernel(&kernel, initrd, opts)?;
    guest._dir = Some(dir);
    Ok(guest)
}

/// Starts `kernel` in this process.
pub fn start_kernel(kernel: &Path, initrd: Option<PathBuf>, opts: &BootOptions) -> anyhow::Result<RunningGuest> {
    start(kernel, initrd, opts, &[])
}

/// Starts `kernel` in this process with virtio `devices` (initrd from opts ignored).
pub fn start_kernel_with(kernel: &Path, opts: &BootOptions, devices: &[DeviceConfig]) -> anyhow::Result<RunningGuest> {
    start(kernel, None, opts, devices)
}

/// Starts `kernel` with the initrd file `initrd` and virtio `devices`.
pub fn start_kernel_with_initrd(
    kernel: &Path,
    initrd: &Path,
    opts: &BootOptions,
    devices: &[DeviceConfig],
) -> anyhow::Result<RunningGuest> {
    start(kernel, Some(initrd.to_path_buf()), opts, devices)
}

fn start(
    kernel: &Path,
    initrd: Option<PathBuf>,
    opts: &BootOptions,
    devices: &[DeviceConfig],
) -> anyhow::Result<RunningGuest> {
    let console = Console::default();
    let mut vmm = Vmm::new();
    vmm.handle(PrebootAction::ConfigureMachine(MachineConfig {
        vcpus: opts.vcpus,
        mem_mib: opts.mem_mib,
        seccomp: opts.seccomp,
        hotplug_slots: opts.hotplug_slots,
    }))?;
    vmm.handle(PrebootAction::ConfigureBootSource(BootSourceConfig {
        kernel: kernel.to_path_buf(),
        initrd,
        cmdline: opts.cmdline.clone(),
    }))?;
    vmm.handle(PrebootAction::ConfigureConsole(ConsoleOutput::Writer(Box::new(console.clone()))))?;
    for device in devices {
        vmm.handle(PrebootAction::AddDevice(device.clone()))?;
    }
    let handle = vmm.start()?;
    Ok(RunningGuest { handle, console, _dir: None })
}

impl RunningGuest {
    /// Waits for the guest to end by itself (at most `GUEST_TIMEOUT`).
    pub fn finish(self) -> anyhow::Result<GuestRun> {
        let counters = self.handle.counters();
        let console = self.console;
        let exit = self
            .handle
            .wait_timeout(GUEST_TIMEOUT)
            .with_context(|| format!("guest did not end within {GUEST_TIMEOUT:?}; console:\n{}", console.text()))?;
        Ok(GuestRun { console: console.text(), exit, stats: counters.snapshot() })
    }
}

/// Boots a bundled guest in this process and waits for it to end.
pub fn boot_guest(program: Program, format: Format, opts: &BootOptions) -> anyhow::Result<GuestRun> {
    start_guest(program, format, opts)?.finish()
}

/// Boots `kernel` in this process and waits for it to end.
pub fn boot_kernel(kernel: &Path, initrd: Option<PathBuf>, opts: &BootOptions) -> anyhow::Result<GuestRun> {
    start_kernel(kernel, initrd, opts)?.finish()
}

/// Polls `cond` every millisecond for up to `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// What the report guest printed, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// "pvh" or "linux64".
    pub boot: String,
    /// The command line it found.
    pub cmdline: String,
    /// (addr, size, type) per memory map entry.
    pub e820: Vec<(u64, u64, u32)>,
    /// (addr, size) of the initrd.
    pub initrd: (u64, u64),
    /// Wrapping byte sum of the initrd.
    pub initrd_sum: u64,
    /// RSDP address.
    pub rsdp: u64,
    /// APIC IDs of the MADT's enabled local APICs.
    pub madt_lapics: Vec<u64>,
    /// (id, address) of the MADT's IOAPIC.
    pub madt_ioapic: Option<(u64, u64)>,
    /// APIC IDs of the application processors that came up.
    pub cpus_up: Vec<u64>,
    /// The count of APs the guest saw come up.
    pub smp: Option<u64>,
    /// Value read from an unclaimed port.
    pub pio: u64,
    /// Value read from unclaimed MMIO.
    pub mmio: u64,
    /// Tables whose checksum failed.
    pub bad_checksums: Vec<String>,
    /// Whether it printed `done`.
    pub done: bool,
}

fn hex(s: &str) -> anyhow::Result<u64> {
    let digits = s.strip_prefix("0x").with_context(|| format!("{s:?} is not 0x-prefixed"))?;
    u64::from_str_radix(digits, 16).with_context(|| format!("{s:?} is not hex"))
}

/// Parses the report guest's console output.
pub fn parse_report(console: &str) -> anyhow::Result<Report> {
    let mut r = Report::default();
    for line in console.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(id) = line.strip_prefix("cpu ").and_then(|l| l.strip_suffix(" up")) {
            r.cpus_up.push(hex(id)?);
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            match line {
                "done" => r.done = true,
                "" => {}
                _ => bail!("unexpected report line {line:?}"),
            }
            continue;
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        let fields: Vec<&str> = value.split_whitespace().collect();
        match (key, fields.as_slice()) {
            ("boot", [kind]) => r.boot = kind.to_string(),
            ("cmdline", _) => r.cmdline = value.to_string(),
            ("e820", [a, s, t]) => r.e820.push((hex(a)?, hex(s)?, u32::try_from(hex(t)?)?)),
            ("initrd", [a, s]) => r.initrd = (hex(a)?, hex(s)?),
            ("initrd-sum", [v]) => r.initrd_sum = hex(v)?,
            ("rsdp", [v]) => r.rsdp = hex(v)?,
            ("madt", ["lapic", id]) => r.madt_lapics.push(hex(id)?),
            ("madt", ["ioapic", id, addr]) => r.madt_ioapic = Some((hex(id)?, hex(addr)?)),
            ("madt", ["none"]) => {}
            ("acpi", ["bad", "checksum", sig]) => r.bad_checksums.push(sig.to_string()),
            ("smp", [n]) => r.smp = Some(hex(n)?),
            ("pio", [v]) => r.pio = hex(v)?,
            ("mmio", [v]) => r.mmio = hex(v)?,
            _ => bail!("unexpected report line {line:?}"),
        }
    }
    Ok(r)
}

/// The processes whose command line mentions `path` (a sandbox's QEMU
/// names its sockets under the sandbox's state root), as `PID: cmdline`.
pub fn processes_mentioning(path: &Path) -> anyhow::Result<Vec<String>> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_report() {
        let text = "boot: linux64\ncmdline: a b=c\ne820: 0x0000000000000000 0x000000000009fc00 0x0000000000000001\n\
                    initrd: 0x0000000003fff000 0x0000000000000010\ninitrd-sum: 0x0000000000000078\n\
                    rsdp: 0x00000000000e0000\nmadt: lapic 0x0000000000000000\nmadt: lapic 0x0000000000000001\n\
                    madt: ioapic 0x0000000000000002 0x00000000fec00000\ncpu 0x0000000000000001 up\n\
                    smp: 0x0000000000000001\npio: 0x00000000000000ff\nmmio: 0x00000000ffffffff\ndone\n";
        let r = parse_report(text).unwrap();
        assert_eq!(r.boot, "linux64");
        assert_eq!(r.cmdline, "a b=c");
        assert_eq!(r.e820, vec![(0, 0x9fc00, 1)]);
        assert_eq!(r.initrd, (0x3fff000, 0x10));
        assert_eq!(r.madt_lapics, vec![0, 1]);
        assert_eq!(r.madt_ioapic, Some((2, 0xfec0_0000)));
        assert_eq!((r.cpus_up.clone(), r.smp), (vec![1], Some(1)));
        assert_eq!((r.pio, r.mmio, r.done), (0xff, 0xffff_ffff, true));
        assert!(parse_report("madt: lapic zz\n").is_err());
        assert!(parse_report("garbage: 1 2 3 4\n").is_err());
    }
}
