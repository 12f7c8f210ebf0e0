//! Tier 3 (DESIGN.md, Testing): a real Linux guest under QEMU TCG.
//!
//! The guest is the distribution's cloud kernel (or `$VESSEL_TEST_KERNEL`,
//! with its modules in `$VESSEL_TEST_KERNEL_MODULES`) with a test
//! initramfs from `resources::test_image`, booted on QEMU's `microvm`
//! machine with the TCG accelerator: our KVM host cannot run a stock
//! kernel, TCG can. Tests add devices with extra QEMU arguments (QEMU's
//! own, or vhost-user ones backed by our device code); the guest's init
//! prints a result line that [`boot_linux_tcg`] parses.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use resources::kernel::{self, Kernel};
use resources::test_image::{self, INIT_MARKER, RESULT_MARKER, VALUE_MARKER};

pub use runtime_api::qemu::{vhost_user_device_args, vhost_user_fs_args, Qemu, TcgMachine, BASE_CMDLINE, QEMU};

/// The virtio modules a test image loads for virtio-mmio devices: the
/// transport (its dependencies virtio_ring and virtio come with it).
pub const VIRTIO_MMIO: &str = "virtio_mmio";

/// How to boot a Linux guest under QEMU TCG, and how long to let it run.
#[derive(Clone, Debug)]
pub struct LinuxOptions {
    /// The guest: kernel, initrd, vCPUs, memory, command line, devices.
    pub machine: TcgMachine,
    /// How long the guest may run before QEMU is killed.
    pub timeout: Duration,
    /// Set it to kill QEMU early (a test whose host side already failed).
    pub abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LinuxOptions {
    /// One vCPU, 256 MiB, no devices, a 120 s timeout.
    pub fn new(kernel: &Path, initrd: &Path) -> Self {
        Self {
            machine: TcgMachine {
                kernel: kernel.to_path_buf(),
                initrd: initrd.to_path_buf(),
                vcpus: 1,
                mem_mib: 256,
                cmdline: String::new(),
                vhost_user: false,
                extra_args: Vec::new(),
            },
            timeout: Duration::from_secs(120),
            abort: Default::default(),
        }
    }
}

/// The guest test's verdict, from its `VESSEL-TEST-RESULT:` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It printed `ok` and nothing failed.
    Ok,
    /// The first failure it printed, with its reason.
    Fail(String),
    /// It printed no result.
    Missing,
}

/// What a tier-3 guest run left behind.
#[derive(Debug)]
pub struct LinuxRun {
    /// The serial console, `\r` removed.
    pub console: String,
    /// What QEMU printed on stderr.
    pub stderr: String,
    /// The guest test's verdict.
    pub verdict: Verdict,
    /// `VESSEL-VALUE: <key> <value>` lines, in order.
    pub values: Vec<(String, String)>,
    /// Whether QEMU was killed at the timeout.
    pub timed_out: bool,
    /// QEMU's exit status (None if it had to be killed).
    pub exit: Option<ExitStatus>,
    /// Time from starting QEMU to the init marker on the console.
    pub init_after: Option<Duration>,
    /// The guest's uptime when init printed its marker.
    pub guest_uptime_at_init: Option<f64>,
    /// Time from starting QEMU to its end.
    pub elapsed: Duration,
}

impl LinuxRun {
    /// The first value printed under `key`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The first value printed under `key`, or an error showing the console.
    pub fn expect_value(&self, key: &str) -> anyhow::Result<&str> {
        self.value(key).with_context(|| format!("the guest printed no value {key:?}{}", self.context()))
    }

    /// Ok if QEMU ended by itself and the guest test printed `ok` and no
    /// failure; else an error with the reason and the end of the console.
    pub fn ensure_ok(&self) -> anyhow::Result<()> {
        if self.timed_out {
            bail!("the guest did not finish in time{}", self.context());
        }
        match &self.verdict {
            Verdict::Ok => Ok(()),
            Verdict::Fail(why) => bail!("the guest test failed: {why}{}", self.context()),
            Verdict::Missing => {
                bail!("the guest printed no result (QEMU exited with {:?}){}", self.exit, self.context())
            }
        }
    }

    /// The last lines of the console and QEMU's stderr, for error messages.
    pub fn context(&self) -> String {
        const LINES: usize = 60;
        let lines: Vec<&str> = self.console.lines().collect();
        let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
        let mut s = format!("\n--- console (last {LINES} lines) ---\n{tail}\n");
        if !self.stderr.trim().is_empty() {
            s.push_str(&format!("--- QEMU stderr ---\n{}\n", self.stderr.trim_end()));
        }
        s
    }
}

/// Parses the markers on a console.
pub fn parse_console(console: &str) -> (Verdict, Vec<(String, String)>, Option<f64>) {
    let mut ok = false;
    let mut fail = None;
    let mut values = Vec::new();
    let mut uptime = None;
    // Kernel messages may share a line with what init prints, so markers
    // are looked for anywhere in a line.
    for line in console.lines() {
        if let Some(rest) = line.find(RESULT_MARKER).map(|i| line[i + RESULT_MARKER.len()..].trim()) {
            if rest == "ok" {
                ok = true;
            } else if fail.is_none() {
                fail = Some(rest.strip_prefix("fail").unwrap_or(rest).trim().to_string());
            }
        } else if let Some(rest) = line.find(VALUE_MARKER).map(|i| line[i + VALUE_MARKER.len()..].trim()) {
            let (key, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            values.push((key.to_string(), value.trim().to_string()));
        } else if let Some(rest) = line.find(INIT_MARKER).map(|i| line[i + INIT_MARKER.len()..].trim()) {
            uptime = uptime.or_else(|| rest.strip_prefix("uptime")?.trim().parse().ok());
        }
    }
    let verdict = match (fail, ok) {
        (Some(why), _) => Verdict::Fail(why),
        (None, true) => Verdict::Ok,
        (None, false) => Verdict::Missing,
    };
    (verdict, values, uptime)
}

/// Boots Linux under QEMU TCG with `opts`, collects the serial console
/// until QEMU exits (the guest powers off, or panics) or `opts.timeout`
/// passes (QEMU is killed and the console so far returned), and parses the
/// guest test's result.
pub fn boot_linux_tcg(opts: &LinuxOptions) -> anyhow::Result<LinuxRun> {
    let start = Instant::now();
    let child = Command::new(QEMU)
        .args(opts.machine.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {QEMU}"))?;
    let mut qemu = Qemu(child);
    let mut stdout = qemu.0.stdout.take().context("QEMU's stdout")?;
    let mut stderr = qemu.0.stderr.take().context("QEMU's stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });

    let deadline = start + opts.timeout;
    let mut raw = Vec::new();
    let mut init_after = None;
    let mut timed_out = false;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok((at, chunk)) => {
                raw.extend_from_slice(&chunk);
                if init_after.is_none() && contains(&raw, INIT_MARKER.as_bytes()) {
                    init_after = Some(at - start);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let aborted = opts.abort.load(std::sync::atomic::Ordering::Relaxed);
                if aborted || Instant::now() >= deadline {
                    timed_out = true;
                    let _ = qemu.0.kill();
                    break;
                }
            }
        }
    }
    let exit = qemu.0.wait().ok().filter(|_| !timed_out);
    let elapsed = start.elapsed();
    drop(qemu);
    let stderr = err_reader.join().unwrap_or_default();
    let console = String::from_utf8_lossy(&raw).replace('\r', "");
    let (verdict, values, guest_uptime_at_init) = parse_console(&console);
    Ok(LinuxRun { console, stderr, verdict, values, timed_out, exit, init_after, guest_uptime_at_init, elapsed })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The kernel tier-3 tests boot: `$VESSEL_TEST_KERNEL` (modules from
/// `$VESSEL_TEST_KERNEL_MODULES`) if set, else the distribution's cloud
/// kernel from the cache (fetched on first use). Asked once per process.
pub fn test_kernel() -> anyhow::Result<Kernel> {
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    let found = KERNEL.get_or_init(|| {
        let env = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let found = match env("VESSEL_TEST_KERNEL") {
            Some(image) => Kernel::from_files(&image, env("VESSEL_TEST_KERNEL_MODULES").as_deref())
                .with_context(|| format!("$VESSEL_TEST_KERNEL={}", image.display())),
            None => resources::cache::dir()
                .map_err(anyhow::Error::from)
                .and_then(|cache| Ok(kernel::distro_kernel(&cache, kernel::DEBIAN_CLOUD_KERNEL)?)),
        };
        found.map_err(|e| format!("{e:#}"))
    });
    found.clone().map_err(anyhow::Error::msg)
}

/// Why tier-3 tests cannot run here (no QEMU with the microvm machine, no
/// static busybox, no kernel to be had), or None if they can.
pub fn qemu_tcg_unavailable() -> Option<String> {
    match Command::new(QEMU).args(["-machine", "help"]).stdin(Stdio::null()).output() {
        Err(e) => return Some(format!("{QEMU} cannot be run ({e}); install qemu-system-x86")),
        Ok(out) if !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("microvm ")) => {
            return Some(format!("{QEMU} has no microvm machine"));
        }
        Ok(_) => {}
    }
    if let Err(e) = test_image::find_busybox() {
        return Some(e.to_string());
    }
    test_kernel().err().map(|e| format!("no guest kernel: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let console = "[    1.7] Run /init as init process\nVESSEL-INIT: uptime 1.80\n\
                       VESSEL-VALUE: disk-sha256 abc def\n[ 2.0] virtio_blk virtio0: x VESSEL-VALUE: size 42\n\
                       VESSEL-TEST-RESULT: ok\n";
        let (verdict, values, uptime) = parse_console(console);
        assert_eq!(verdict, Verdict::Ok);
        assert_eq!(values, [("disk-sha256".into(), "abc def".into()), ("size".into(), "42".into())]);
        assert_eq!(uptime, Some(1.8));
        let (verdict, _, _) =
            parse_console("VESSEL-TEST-RESULT: fail insmod x\nVESSEL-TEST-RESULT: ok\nVESSEL-TEST-RESULT: fail y\n");
        assert_eq!(verdict, Verdict::Fail("insmod x".into()));
        assert_eq!(parse_console("Kernel panic\n").0, Verdict::Missing);
    }
}
