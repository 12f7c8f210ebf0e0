//! Tier 2 (DESIGN.md, Testing): the VMM's own paths on real KVM, exercised
//! by tiny guests built from source in `guests`. Where /dev/kvm
//! cannot be opened, every test here is reported as skipped, with the
//! reason; none passes without running.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use guests::{Format, Program};
use libtest_mimic::Arguments;
use vessel_tests::harness::{gate, in_child, trial, CHILD_ENV};
use vessel_tests::{
    boot_guest, boot_kernel, kvm_unavailable, parse_report, start_guest, wait_until, BootOptions, TempDir,
};
use vmm::{DeviceManagerError, ExitReason, SlotError, VmmAction, VmmActionError, VmmData};

type TestResult = anyhow::Result<()>;

const MIB: u64 = 1 << 20;

fn initrd_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// Boots the report guest and checks everything it says against what the
/// VMM was asked to set up.
fn check_report(format: Format, vcpus: u8) -> TestResult {
    let initrd = initrd_bytes(300_000);
    let cmdline = "console=ttyS0 vessel.test=report quiet";
    let opts = BootOptions { vcpus, cmdline: cmdline.into(), initrd: Some(initrd.clone()), ..Default::default() };
    let run = boot_guest(Program::Report, format, &opts)?;
    let r = parse_report(&run.console).with_context(|| format!("console:\n{}", run.console))?;
    let ctx = || format!("console:\n{}", run.console);

    ensure!(run.exit == ExitReason::Reset, "guest ended with {:?}; {}", run.exit, ctx());
    ensure!(r.done, "guest did not finish its report; {}", ctx());
    let want_boot = if format == Format::Pvh { "pvh" } else { "linux64" };
    ensure!(r.boot == want_boot, "entered via {:?}, want {want_boot}", r.boot);
    ensure!(r.cmdline == cmdline, "guest saw cmdline {:?}", r.cmdline);

    let mem = opts.mem_mib * MIB;
    let want_map: Vec<(u64, u64, u32)> =
        boot::layout::memory_map(mem).iter().map(|e| (e.addr, e.size, e.kind)).collect();
    ensure!(r.e820 == want_map, "memory map {:x?}, want {want_map:x?}", r.e820);

    let (addr, size) = r.initrd;
    ensure!(size == initrd.len() as u64, "initrd size {size}, want {}", initrd.len());
    ensure!(addr % 4096 == 0 && addr >= MIB && addr + size <= mem, "initrd placed at {addr:#x}");
    let sum = initrd.iter().fold(0u64, |a, b| a.wrapping_add(u64::from(*b)));
    ensure!(r.initrd_sum == sum, "initrd byte sum {:#x}, want {sum:#x}", r.initrd_sum);

    ensure!(r.rsdp == boot::layout::ACPI_START, "RSDP at {:#x}", r.rsdp);
    ensure!(r.bad_checksums.is_empty(), "ACPI checksums failed: {:?}", r.bad_checksums);
    let ids: Vec<u64> = (0..u64::from(vcpus)).collect();
    ensure!(r.madt_lapics == ids, "MADT local APICs {:?}, want {ids:?}", r.madt_lapics);
    ensure!(r.madt_ioapic == Some((u64::from(vcpus), boot::layout::IOAPIC_ADDR)), "MADT IOAPIC {:x?}", r.madt_ioapic);
    let mut up = r.cpus_up.clone();
    up.sort_unstable();
    ensure!(up == ids[1..], "APs that came up: {up:?}, want {:?}; {}", &ids[1..], ctx());
    if vcpus > 1 {
        ensure!(r.smp == Some(u64::from(vcpus) - 1), "guest counted {:?} APs", r.smp);
    }

    ensure!(r.pio == 0xff, "unclaimed port read {:#x}, want 0xff", r.pio);
    ensure!(r.mmio == 0xffff_ffff, "unclaimed MMIO read {:#x}, want 0xffffffff", r.mmio);
    let bsp = &run.stats.vcpus[0];
    ensure!(bsp.mmio_read >= 1 && bsp.mmio_write >= 1, "vCPU 0 MMIO exits: {bsp:?}");
    ensure!(bsp.io_in >= 1, "vCPU 0 port reads: {bsp:?}");
    let tx = run.stats.serial_tx_bytes;
    ensure!(tx == run.console.len() as u64, "{tx} serial bytes counted, {} received", run.console.len());
    let io_out: u64 = run.stats.vcpus.iter().map(|v| v.io_out).sum();
    ensure!(io_out >= tx, "{io_out} port writes in all < {tx} serial bytes");
    ensure!(run.stats.vcpus.len() == usize::from(vcpus), "stats for {} vCPUs", run.stats.vcpus.len());
    ensure!(run.stats.boot_time.is_some(), "the guest's boot-timer write was not recorded");
    ensure!(run.stats.mem_size == mem && run.stats.mem_resident > 0, "memory stats {:?}", run.stats);
    Ok(())
}

fn hello(format: Format) -> TestResult {
    let run = boot_guest(Program::Hello, format, &BootOptions::default())?;
    ensure!(run.console == "vessel test guest: hello\n", "console {:?}", run.console);
    ensure!(run.exit == ExitReason::Reset, "guest ended with {:?}", run.exit);
    let boot = run.stats.boot_time.context("no boot-timer write recorded")?;
    ensure!(boot <= run.stats.uptime, "boot time {boot:?} after uptime {:?}", run.stats.uptime);
    Ok(())
}

/// The full error chain, as the CLI prints it.
fn chain(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// Boots `kernel` (with `opts`) expecting a start error that mentions `want`.
fn expect_start_error(
    kernel: &std::path::Path,
    initrd: Option<std::path::PathBuf>,
    opts: &BootOptions,
    want: &str,
) -> TestResult {
    match boot_kernel(kernel, initrd, opts) {
        Ok(run) => anyhow::bail!("booted ({:?}) instead of failing with {want:?}", run.exit),
        Err(e) => {
            let msg = chain(&e);
            ensure!(msg.contains(want), "error {msg:?} does not say {want:?}");
            Ok(())
        }
    }
}

fn bad_kernels() -> TestResult {
    let dir = TempDir::new("bad-kernel")?;
    let opts = BootOptions::default();
    let elf = guests::image(Program::Hello, Format::Linux64Elf);
    let bz = guests::image(Program::Hello, Format::BzImage);

    expect_start_error(&dir.path().join("missing"), None, &opts, "cannot open the kernel image")?;
    let tiny = dir.write("tiny", &elf[..10])?;
    expect_start_error(&tiny, None, &opts, "truncated: 10 bytes")?;
    let cut = dir.write("cut", &elf[..elf.len().min(200)])?;
    expect_start_error(&cut, None, &opts, "truncated")?;
    let garbage = dir.write("garbage", &[0x5a; 8192])?;
    expect_start_error(&garbage, None, &opts, "neither an ELF file nor a bzImage")?;

    let mut arm = elf.to_vec();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let arm = dir.write("arm.elf", &arm)?;
    expect_start_error(&arm, None, &opts, "not an x86_64 kernel")?;
    let mut elf32 = elf.to_vec();
    elf32[4] = 1; // ELFCLASS32
    let elf32 = dir.write("elf32", &elf32)?;
    expect_start_error(&elf32, None, &opts, "not an x86_64 kernel")?;
    let mut bz32 = bz.to_vec();
    bz32[0x236..0x238].copy_from_slice(&0u16.to_le_bytes()); // no XLF_KERNEL_64
    let bz32 = dir.write("bz32", &bz32)?;
    expect_start_error(&bz32, None, &opts, "has no 64-bit entry point")?;
    let mut bz_cut = bz.to_vec();
    bz_cut.truncate(0x300);
    bz_cut[0x1f1] = 30; // claims 30 setup sectors the file does not have
    let bz_cut = dir.write("bzcut", &bz_cut)?;
    expect_start_error(&bz_cut, None, &opts, "cannot load the kernel image")?;
    Ok(())
}

fn bad_machine_and_boot_source() -> TestResult {
    let dir = TempDir::new("bad-config")?;
    let kernel = dir.write("k", guests::image(Program::Hello, Format::Pvh))?;
    let base = BootOptions::default();
    expect_start_error(&kernel, None, &BootOptions { mem_mib: 0, ..base.clone() }, "memory size must be at least")?;
    expect_start_error(&kernel, None, &BootOptions { vcpus: 0, ..base.clone() }, "vCPU count must be at least 1")?;
    expect_start_error(&kernel, None, &BootOptions { vcpus: 255, ..base.clone() }, "at most 254")?;
    expect_start_error(&kernel, None, &BootOptions { mem_mib: 1 << 30, ..base.clone() }, "the host has only")?;
    let big = dir.write("initrd", &vec![0u8; 20 << 20])?;
    expect_start_error(
        &kernel,
        Some(big),
        &BootOptions { mem_mib: 16, ..base.clone() },
        "does not fit in guest memory",
    )?;
    expect_start_error(&kernel, Some(dir.path().join("no-initrd")), &base, "cannot open the initrd")?;
    let long = BootOptions { cmdline: "x".repeat(5000), ..base.clone() };
    expect_start_error(&kernel, None, &long, "command line is 5000 bytes")?;
    let nul = BootOptions { cmdline: "a\0b".into(), ..base };
    expect_start_error(&kernel, None, &nul, "NUL byte")?;
    Ok(())
}

/// The in-process virtio-mmio transport against a tiny guest driver: it
/// finds the device from the command line, negotiates VERSION_1, sets up a
/// queue, posts a buffer, notifies (ioeventfd) and takes the interrupt
/// (irqfd through the IOAPIC) — virtio-rng fills the buffer.
fn virtio_mmio_rng(format: Format) -> TestResult {
    let dir = TempDir::new("virtio")?;
    let kernel = dir.write(guests::file_name(Program::Virtio, format), guests::image(Program::Virtio, format))?;
    let guest = vessel_tests::start_kernel_with(&kernel, &BootOptions::default(), &[vmm::DeviceConfig::Rng])?;
    let run = guest.finish()?;
    let c = &run.console;
    let line = |prefix: &str| c.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    ensure!(run.exit == ExitReason::Reset, "ended with {:?}; console:\n{c}", run.exit);
    ensure!(!c.contains("virtio: error") && !c.contains("exception") && c.contains("\ndone"), "console:\n{c}");
    ensure!(
        line("virtio: magic").as_deref()
            == Some("virtio: magic 0x0000000074726976 version 0x0000000000000002 device 0x0000000000000004"),
        "console:\n{c}"
    );
    ensure!(line("virtio: status").as_deref() == Some("virtio: status 0x000000000000000f"), "console:\n{c}");
    ensure!(
        line("virtio: irq").as_deref() == Some("virtio: irq 0x0000000000000001 isr 0x0000000000000001"),
        "the interrupt did not arrive once; console:\n{c}"
    );
    ensure!(
        line("virtio: used").as_deref()
            == Some("virtio: used idx 0x0000000000000001 id 0x0000000000000000 len 0x0000000000000040"),
        "console:\n{c}"
    );
    ensure!(
        line("virtio: reset status").as_deref() == Some("virtio: reset status 0x0000000000000000"),
        "console:\n{c}"
    );
    let data = line("virtio: data").unwrap_or_default();
    ensure!(!data.is_empty() && !data.contains("0x0000000000000000 0x0000000000000000"), "no entropy: {data}");
    let irq_exits: u64 = run.stats.vcpus.iter().map(|v| v.mmio_write).sum();
    ensure!(irq_exits > 0, "no MMIO exits at all? {:?}", run.stats);
    let rng = run.stats.devices.iter().find(|d| d.name == "rng").context("no rng in the stats")?;
    ensure!(
        rng.counters.contains(&("requests", 1)) && rng.counters.contains(&("bytes", 64)),
        "rng counters {:?}",
        rng.counters
    );
    Ok(())
}

/// The lines of `text` that the guest has finished (the one it was
/// writing when stopped is left out).
fn complete_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop();
    lines
}

/// Runs a guest that never ends until `enough` holds for its console, then
/// stops it; returns its finished lines and whether it had written the
/// boot-timer byte.
fn run_until(guest: vessel_tests::RunningGuest, enough: impl Fn(&str) -> bool) -> anyhow::Result<(Vec<String>, bool)> {
    let console = guest.console.clone();
    let reached = wait_until(Duration::from_secs(20), || enough(&console.text()));
    ensure!(reached, "the guest did not get far enough; console:\n{}", console.text());
    let boot_timer = guest.handle.boot_time().is_some();
    guest.handle.request(VmmAction::Stop)?;
    let exit = guest.handle.wait();
    ensure!(exit == ExitReason::Stopped, "ended with {exit:?}; console:\n{}", console.text());
    let lines = complete_lines(&console.text()).into_iter().map(str::to_owned).collect();
    Ok((lines, boot_timer))
}

/// The count guest prints its banner, then `count 0x...` lines numbered
/// 1, 2, 3... with no gap: the counter it keeps in memory goes up by one
/// a line.
fn count_guest_prints_consecutive_counts(format: Format) -> TestResult {
    let guest = start_guest(Program::Count, format, &BootOptions::default())?;
    let counts = |text: &str| complete_lines(text).iter().filter(|l| l.starts_with("count ")).count();
    let (lines, boot_timer) = run_until(guest, |text| counts(text) >= 20)?;
    ensure!(boot_timer, "no boot-timer byte; lines {lines:?}");
    ensure!(lines.first().map(String::as_str) == Some("vessel test guest: count"), "first lines {lines:?}");
    ensure!(lines.len() > 20, "{} lines: {lines:?}", lines.len());
    for (n, line) in (1u64..).zip(&lines[1..]) {
        ensure!(*line == format!("count {n:#018x}"), "line {n} is {line:?}; console:\n{}", lines.join("\n"));
    }
    Ok(())
}

/// The virtio guest with `virtio.repeat` keeps the device: the same buffer
/// offered again and again, each answered with the used index one higher
/// and fresh random bytes from virtio-rng.
fn virtio_repeat_offers_the_buffer_again_and_again(format: Format) -> TestResult {
    let dir = TempDir::new("virtio-repeat")?;
    let kernel = dir.write(guests::file_name(Program::Virtio, format), guests::image(Program::Virtio, format))?;
    let opts = BootOptions { cmdline: "virtio.repeat".into(), ..Default::default() };
    let guest = vessel_tests::start_kernel_with(&kernel, &opts, &[vmm::DeviceConfig::Rng])?;
    let counters = guest.handle.counters();
    let again = |text: &str| complete_lines(text).iter().filter(|l| l.starts_with("virtio: again ")).count();
    let (lines, _) = run_until(guest, |text| again(text) >= 6)?;
    let c = lines.join("\n");
    let has = |want: &str| lines.iter().any(|l| l == want);
    ensure!(
        has("virtio: irq 0x0000000000000001 isr 0x0000000000000001")
            && has("virtio: used idx 0x0000000000000001 id 0x0000000000000000 len 0x0000000000000040"),
        "the first request went wrong; console:\n{c}"
    );
    ensure!(
        !lines.iter().any(|l| l.starts_with("virtio: reset") || l.contains("error") || l == "done"),
        "the device was let go; console:\n{c}"
    );
    let mut data = Vec::new();
    for (idx, line) in (2u64..).zip(lines.iter().filter(|l| l.starts_with("virtio: again "))) {
        let fields: Vec<&str> = line.split(' ').collect();
        let ["virtio:", "again", "idx", got, "data", bytes] = fields.as_slice() else {
            anyhow::bail!("malformed line {line:?}");
        };
        ensure!(*got == format!("{idx:#018x}"), "used idx {got} where {idx:#018x} was due; console:\n{c}");
        ensure!(bytes.len() == 18 && bytes.starts_with("0x"), "data {bytes:?} in {line:?}");
        data.push(bytes.to_string());
    }
    ensure!(data.len() >= 6, "{} again lines; console:\n{c}", data.len());
    ensure!(data.windows(2).all(|w| w[0] != w[1]), "the data did not change: {data:?}");
    let rng = counters.snapshot().devices.into_iter().find(|d| d.name == "rng").context("no rng in the stats")?;
    let requests = rng.counters.iter().find(|(name, _)| *name == "requests").map(|(_, n)| *n);
    ensure!(
        requests.is_some_and(|n| n > data.len() as u64),
        "the device served {requests:?} requests for {} again lines",
        data.len()
    );
    Ok(())
}

/// `virtio.repeat` counts only as a whole word: `virtio.repeated` leaves
/// the guest doing one request and its reset, as without it.
fn virtio_repeat_is_a_whole_word() -> TestResult {
    let opts = BootOptions { cmdline: "virtio.repeated".into(), ..Default::default() };
    let dir = TempDir::new("virtio-word")?;
    let kernel = dir.write("virtio.elf", guests::image(Program::Virtio, Format::Pvh))?;
    let run = vessel_tests::start_kernel_with(&kernel, &opts, &[vmm::DeviceConfig::Rng])?.finish()?;
    let c = &run.console;
    ensure!(run.exit == ExitReason::Reset, "ended with {:?}; console:\n{c}", run.exit);
    ensure!(c.contains("\nvirtio: reset status 0x0000000000000000\ndone\n") && !c.contains("again"), "console:\n{c}");
    Ok(())
}

/// The control API on a running guest: pause stops every vCPU where it is,
/// resume lets it go on, stop ends the VM, and a stopped VM refuses actions.
fn pause_resume_stop() -> TestResult {
    let opts = BootOptions { vcpus: 2, ..Default::default() };
    let guest = start_guest(Program::Spin, Format::Linux64Elf, &opts)?;
    let h = &guest.handle;
    let spins = || h.stats().vcpus[0].io_out;
    ensure!(wait_until(Duration::from_secs(10), || spins() > 1000), "the guest never spun: {:?}", h.stats());
    ensure!(guest.console.text() == "vessel test guest: spin\n", "console {:?}", guest.console.text());

    ensure!(h.request(VmmAction::Pause)? == VmmData::Empty, "pause answered oddly");
    let paused_at = spins();
    std::thread::sleep(Duration::from_millis(50));
    ensure!(spins() == paused_at, "the guest ran while paused: {paused_at} -> {}", spins());
    let VmmData::Stats(stats) = h.request(VmmAction::GetStats)? else { anyhow::bail!("GetStats returned no stats") };
    ensure!(stats.vcpus[0].io_out == paused_at && stats.boot_time.is_some(), "stats while paused: {stats:?}");
    // vCPU 1 sits in KVM_RUN waiting for a SIPI that never comes: only the
    // kick signal gets it out to park.
    ensure!(stats.vcpus[1].interrupted >= 1, "vCPU 1 was not kicked out of KVM_RUN: {stats:?}");
    // Pausing twice is harmless.
    h.request(VmmAction::Pause)?;

    h.request(VmmAction::Resume)?;
    ensure!(
        wait_until(Duration::from_secs(10), || spins() > paused_at + 1000),
        "the guest did not run again after resume"
    );
    h.request(VmmAction::Stop)?;
    ensure!(matches!(h.request(VmmAction::GetStats), Err(VmmActionError::NotRunning)), "a stopped VM took an action");
    let exit = guest.handle.wait();
    ensure!(exit == ExitReason::Stopped, "ended with {exit:?}");
    Ok(())
}

/// Stopping a paused VM works too (the vCPUs are parked, not in KVM_RUN).
fn stop_while_paused() -> TestResult {
    let guest = start_guest(Program::Spin, Format::Pvh, &BootOptions::default())?;
    let h = &guest.handle;
    ensure!(wait_until(Duration::from_secs(10), || h.stats().boot_time.is_some()), "the guest never started");
    h.request(VmmAction::Pause)?;
    h.request(VmmAction::Stop)?;
    let exit = guest.handle.wait();
    ensure!(exit == ExitReason::Stopped, "ended with {exit:?}");
    Ok(())
}

/// Hotplug on a running VM: devices go into the reserved empty slots in
/// order, a full set of slots says so, a detached slot takes a new device,
/// and the guest keeps running throughout.
fn hotplug_attach_and_detach() -> TestResult {
    let opts = BootOptions { hotplug_slots: 2, ..Default::default() };
    let guest = start_guest(Program::Spin, Format::Pvh, &opts)?;
    let h = &guest.handle;
    ensure!(wait_until(Duration::from_secs(10), || h.stats().boot_time.is_some()), "the guest never started");
    let attach = |d| h.request(VmmAction::AttachDevice(d));
    ensure!(
        attach(vmm::DeviceConfig::Rng)? == VmmData::Attached { slot: 0, addr: 0xd000_0000, irq: 5 },
        "first attach"
    );
    ensure!(
        attach(vmm::DeviceConfig::Rng)? == VmmData::Attached { slot: 1, addr: 0xd000_1000, irq: 6 },
        "second attach"
    );
    let full = attach(vmm::DeviceConfig::Rng);
    ensure!(
        matches!(full, Err(VmmActionError::Attach(DeviceManagerError::Slot(SlotError::NoFreeSlot)))),
        "a third device found a slot: {full:?}"
    );
    h.request(VmmAction::DetachDevice(0))?;
    let twice = h.request(VmmAction::DetachDevice(0));
    ensure!(
        matches!(twice, Err(VmmActionError::Detach(DeviceManagerError::Slot(SlotError::NoSuchSlot(0))))),
        "detached twice: {twice:?}"
    );
    ensure!(attach(vmm::DeviceConfig::Rng)? == VmmData::Attached { slot: 0, addr: 0xd000_0000, irq: 5 }, "reattach");
    let dir = TempDir::new("hotplug")?;
    let missing = vmm::DeviceConfig::Block(devices::virtio::block::BlockConfig {
        path: dir.path().join("missing.img"),
        read_only: false,
        id: None,
        direct: false,
    });
    h.request(VmmAction::DetachDevice(1))?;
    match attach(missing) {
        Err(VmmActionError::Attach(DeviceManagerError::Backend(vmm::BackendError::Block(
            devices::virtio::block::BlockError::Open(path, _),
        )))) if path.ends_with("missing.img") => {}
        other => anyhow::bail!("attaching a missing disk gave {other:?}"),
    }
    // The failed attach left slot 1 empty for the next device.
    ensure!(
        attach(vmm::DeviceConfig::Rng)? == VmmData::Attached { slot: 1, addr: 0xd000_1000, irq: 6 },
        "after a failure"
    );
    // Devices that open a file or bind a socket: their backends are made
    // on this (the requesting) thread, since the event loop's seccomp
    // filter allows neither; the VM would end with a refusal otherwise.
    let disk = dir.write("disk.img", &[0u8; 4096])?;
    for device in [
        vmm::DeviceConfig::Block(devices::virtio::block::BlockConfig {
            path: disk,
            read_only: false,
            id: None,
            direct: false,
        }),
        vmm::DeviceConfig::Vsock(devices::virtio::vsock::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("vsock.sock"),
        }),
    ] {
        h.request(VmmAction::DetachDevice(1))?;
        ensure!(attach(device)? == VmmData::Attached { slot: 1, addr: 0xd000_1000, irq: 6 }, "a disk or vsock device");
    }
    let before = h.stats().vcpus[0].io_out;
    ensure!(wait_until(Duration::from_secs(10), || h.stats().vcpus[0].io_out > before + 100), "the guest stopped");
    Ok(())
}

/// A shared directory served by a real virtiofsd, with the config-space
/// tag `tag` if given.
fn virtiofsd(dir: &TempDir, tag: Option<&str>) -> anyhow::Result<vessel_tests::virtiofsd::Virtiofsd> {
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared)?;
    vessel_tests::virtiofsd::Virtiofsd::start(dir.path(), &shared, tag)
}

/// A virtio-fs device on the daemon's socket, with tag `tag`.
fn fs_device(socket: std::path::PathBuf, tag: &str) -> vmm::DeviceConfig {
    use devices::virtio::vhost_user_frontend::{VhostUserConfig, VhostUserDevice};
    vmm::DeviceConfig::VhostUser(VhostUserConfig {
        socket,
        device: VhostUserDevice::Fs { tag: tag.into(), request_queues: 1, queue_size: 128 },
    })
}

/// What the virtio guest printed about a virtio-fs device (tag `tag` in
/// its config space) and what the device's counters say: the daemon's
/// FUSE_INIT reply in the guest's buffer and the used ring prove that the
/// memory table, the rings, the kick and the call all reached it.
/// `protocol` is the protocol features both sides should use.
fn check_virtio_fs_run(
    run: &vessel_tests::GuestRun,
    daemon: &vessel_tests::virtiofsd::Virtiofsd,
    tag: &str,
    protocol: u64,
) -> TestResult {
    let c = &run.console;
    let ctx = || format!("console:\n{c}\nvirtiofsd:\n{}", daemon.log_text());
    let line = |prefix: &str| c.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    let hex = |prefix: &str, field: usize| -> anyhow::Result<u64> {
        let l = line(prefix).with_context(|| format!("no {prefix:?} line; {}", ctx()))?;
        let word = l[prefix.len()..].split_whitespace().nth(field).context("short line")?;
        Ok(u64::from_str_radix(word.trim_start_matches("0x"), 16)?)
    };
    ensure!(run.exit == ExitReason::Reset, "ended with {:?}; {}", run.exit, ctx());
    ensure!(!c.contains("virtio: error") && !c.contains("exception") && c.contains("\ndone"), "{}", ctx());
    ensure!(line("virtio: magic").is_some_and(|l| l.ends_with("device 0x000000000000001a")), "{}", ctx());
    ensure!(
        line("virtio: fs tag") == Some(format!("virtio: fs tag {tag} request queues 0x0000000000000001")),
        "the config space did not carry the tag; {}",
        ctx()
    );
    ensure!(line("virtio: status").as_deref() == Some("virtio: status 0x000000000000000f"), "{}", ctx());
    ensure!(hex("virtio: irq", 2)? & 1 == 1, "no used-buffer interrupt; {}", ctx());
    // The reply: fuse_out_header (len, error 0, our unique 0x5a), then
    // fuse_init_out (major 7, the daemon's minor).
    let (used_idx, used_len) = (hex("virtio: used idx", 0)?, hex("virtio: used idx", 4)?);
    ensure!(used_idx == 1, "the daemon did not use the request; {}", ctx());
    let header = hex("virtio: data", 0)?;
    ensure!(header == used_len && used_len >= 16 + 24, "reply header {header:#x}, used len {used_len:#x}; {}", ctx());
    ensure!(hex("virtio: data", 1)? == 0x5a, "the reply is not for our request; {}", ctx());
    let init = hex("virtio: fs init", 0)?;
    ensure!(init & 0xffff_ffff == 7 && init >> 32 >= 27, "FUSE_INIT answered {init:#x}; {}", ctx());
    ensure!(line("virtio: reset status").as_deref() == Some("virtio: reset status 0x0000000000000000"), "{}", ctx());

    let name = format!("vhost-user {}", daemon.socket.display());
    let dev = run.stats.devices.iter().find(|d| d.name == name).context("no vhost-user device in the stats")?;
    let counter = |n: &str| dev.counters.iter().find(|(k, _)| *k == n).map(|(_, v)| *v).unwrap_or(0);
    ensure!(counter("daemon_features") & (1 << 32) != 0, "daemon features {:#x}", counter("daemon_features"));
    ensure!(counter("protocol_features") == protocol, "protocol features {:?}, want {protocol:#x}", dev.counters);
    ensure!(counter("acked_features") == (1 << 32) | (1 << 30), "acked {:#x}", counter("acked_features"));
    ensure!(counter("mem_regions") == 1 && counter("rings_started") == 2, "counters {:?}", dev.counters);
    ensure!(counter("activations") == 1 && counter("calls") >= 1, "counters {:?}", dev.counters);
    ensure!(counter("errors") == 0, "counters {:?}; {}", dev.counters, ctx());
    Ok(())
}

/// Protocol features used with virtiofsd: MQ and REPLY_ACK, and CONFIG
/// when it has a tag.
const VIRTIOFSD_PROTOCOL: u64 = 0x9;
const VIRTIOFSD_PROTOCOL_WITH_CONFIG: u64 = 0x209;

/// A virtio-fs device on a real `virtiofsd`, present at boot: the VMM as
/// vhost-user frontend. The virtio guest finds device 26, reads the tag
/// from the config space (the daemon's, through GET_CONFIG, when it has
/// `--tag`; else the one the VMM was configured with), sets up the
/// high-priority and the request queue, and sends FUSE_INIT. Runs in a
/// child process (see `in_child`).
fn virtio_fs_on_virtiofsd(daemon_tag: Option<&str>) -> TestResult {
    let dir = TempDir::new("virtiofs")?;
    let daemon = virtiofsd(&dir, daemon_tag)?;
    let format = Format::Pvh;
    let kernel = dir.write(guests::file_name(Program::Virtio, format), guests::image(Program::Virtio, format))?;
    let fs = fs_device(daemon.socket.clone(), "vessel-fs");
    let guest = vessel_tests::start_kernel_with(&kernel, &BootOptions::default(), &[fs])?;
    let run = guest.finish()?;
    let protocol = if daemon_tag.is_some() { VIRTIOFSD_PROTOCOL_WITH_CONFIG } else { VIRTIOFSD_PROTOCOL };
    check_virtio_fs_run(&run, &daemon, daemon_tag.unwrap_or("vessel-fs"), protocol)
}

/// A vhost-user device goes into an empty hotplug slot like any other: the
/// daemon is reached from the event loop thread, under its seccomp
/// filter, and the virtio guest, which waits at the empty slot, drives it
/// as it does a boot-time one (the event loop must leave the kicks to the
/// daemon). A socket nobody listens on is an attach error; detaching a
/// vhost-user device frees its slot while the guest runs on. Runs in a
/// child process (see `in_child`).
fn virtio_fs_hotplug() -> TestResult {
    use devices::virtio::vhost_user_frontend::FrontendError;
    let dir = TempDir::new("virtiofs-hotplug")?;
    let daemon = virtiofsd(&dir, Some("hot"))?;
    let opts = BootOptions { hotplug_slots: 1, ..Default::default() };
    // The guest's default window and GSI are the first slot's.
    let guest = start_guest(Program::Virtio, Format::Pvh, &opts)?;
    let h = &guest.handle;
    let nobody = h.request(VmmAction::AttachDevice(fs_device(dir.path().join("nobody.sock"), "hot")));
    ensure!(
        matches!(
            nobody,
            Err(VmmActionError::Attach(DeviceManagerError::Backend(vmm::BackendError::VhostUser(
                FrontendError::Connect(..)
            ))))
        ),
        "attaching to a socket nobody listens on gave {nobody:?}"
    );
    let attached = h.request(VmmAction::AttachDevice(fs_device(daemon.socket.clone(), "hot")))?;
    ensure!(
        attached == VmmData::Attached { slot: 0, addr: 0xd000_0000, irq: 5 },
        "attached as {attached:?}; virtiofsd:\n{}",
        daemon.log_text()
    );
    let run = guest.finish()?;
    check_virtio_fs_run(&run, &daemon, "hot", VIRTIOFSD_PROTOCOL_WITH_CONFIG)?;

    // Detaching: virtiofsd serves one connection, so a second daemon.
    let second = TempDir::new("virtiofs-detach")?;
    let daemon = virtiofsd(&second, None)?;
    let guest = start_guest(Program::Spin, Format::Pvh, &opts)?;
    let h = &guest.handle;
    ensure!(wait_until(Duration::from_secs(10), || h.stats().boot_time.is_some()), "the guest never started");
    h.request(VmmAction::AttachDevice(fs_device(daemon.socket.clone(), "gone")))?;
    h.request(VmmAction::DetachDevice(0))?;
    ensure!(attach_rng(h)? == VmmData::Attached { slot: 0, addr: 0xd000_0000, irq: 5 }, "the slot was not free again");
    let before = h.stats().vcpus[0].io_out;
    ensure!(wait_until(Duration::from_secs(10), || h.stats().vcpus[0].io_out > before + 100), "the guest stopped");
    Ok(())
}

fn attach_rng(h: &vmm::VmmHandle) -> anyhow::Result<VmmData> {
    Ok(h.request(VmmAction::AttachDevice(vmm::DeviceConfig::Rng))?)
}

/// Runs in a child process (see `seccomp_refuses_forbidden_syscall`): a thread
/// with the vCPU filter does what vCPU threads do, then makes a syscall no
/// vCPU thread needs. The filter must kill the process with its report.
fn seccomp_child() -> TestResult {
    std::thread::spawn(|| {
        vmm::seccomp::install(vmm::seccomp::ThreadKind::Vcpu).expect("install vCPU filter");
        println!("filter installed");
        // SAFETY: socket(2) with constant arguments; the filter refuses it.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        println!("socket() returned {fd}: the filter let it through");
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?;
    Ok(())
}

/// Runs in a child process (see `vsock_reset_mid_connection`), because a
/// refused syscall ends the whole process: the virtio guest drives a vsock
/// device, takes a host's connection request in its receive buffer, then
/// resets the device with that connection open. The reset runs on the vCPU
/// thread, under the vCPU filter; the VM must run on to the guest's end.
fn vsock_reset_child() -> TestResult {
    let dir = TempDir::new("vsock-reset")?;
    let format = Format::Pvh;
    let kernel = dir.write(guests::file_name(Program::Virtio, format), guests::image(Program::Virtio, format))?;
    let uds = dir.path().join("vsock.sock");
    let vsock = vmm::DeviceConfig::Vsock(devices::virtio::vsock::VsockConfig { guest_cid: 3, uds_path: uds.clone() });
    let guest = vessel_tests::start_kernel_with(&kernel, &BootOptions::default(), &[vsock])?;
    let mut host = UnixStream::connect(&uds).context("connecting to the vsock socket")?;
    host.write_all(b"CONNECT 1234\n")?;
    let run = guest.finish()?;
    let c = &run.console;
    let line = |prefix: &str| c.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    ensure!(run.exit == ExitReason::Reset, "ended with {:?}; console:\n{c}", run.exit);
    ensure!(!c.contains("virtio: error") && !c.contains("exception") && c.contains("\ndone"), "console:\n{c}");
    ensure!(line("virtio: magic").is_some_and(|l| l.ends_with("device 0x0000000000000013")), "console:\n{c}");
    // The receive buffer holds the connection request: 44 header bytes,
    // from CID 2 to CID 3.
    ensure!(
        line("virtio: used").as_deref()
            == Some("virtio: used idx 0x0000000000000001 id 0x0000000000000000 len 0x000000000000002c"),
        "no connection request reached the guest; console:\n{c}"
    );
    ensure!(
        line("virtio: data").as_deref() == Some("virtio: data 0x0000000000000002 0x0000000000000003"),
        "console:\n{c}"
    );
    ensure!(
        line("virtio: reset status").as_deref() == Some("virtio: reset status 0x0000000000000000"),
        "console:\n{c}"
    );
    println!("the VM ran on after the vsock reset");
    Ok(())
}

fn vsock_reset_mid_connection() -> TestResult {
    let out = Command::new(std::env::current_exe()?)
        .args([VSOCK_RESET_CHILD, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stdout.contains("the VM ran on after the vsock reset"),
        "child ended with {:?}; stdout: {stdout}; stderr: {stderr}",
        out.status
    );
    Ok(())
}

/// Runs in a child process (see `abort_is_not_a_seccomp_refusal`):
/// a thread under the vCPU filter aborts, as a panic does in release
/// builds (`panic = "abort"`).
fn abort_child() -> TestResult {
    std::thread::spawn(|| {
        vmm::seccomp::install(vmm::seccomp::ThreadKind::Vcpu).expect("install vCPU filter");
        println!("filter installed");
        std::process::abort();
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?;
    Ok(())
}

fn abort_is_not_a_seccomp_refusal() -> TestResult {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(std::env::current_exe()?)
        .args([ABORT_CHILD, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stdout.contains("filter installed"), "child never installed the filter: {stdout} {stderr}");
    ensure!(!stderr.contains("seccomp refused"), "the abort was reported as a seccomp refusal: {stderr}");
    ensure!(out.status.signal() == Some(libc::SIGABRT), "child ended with {:?}; stderr: {stderr}", out.status);
    Ok(())
}

const FS_DAEMON_CONFIG_CHILD: &str = "virtio_fs_daemon_config_child_process";
const FS_VMM_CONFIG_CHILD: &str = "virtio_fs_vmm_config_child_process";
const FS_HOTPLUG_CHILD: &str = "virtio_fs_hotplug_child_process";
const ABORT_CHILD: &str = "abort_child_process";
const VSOCK_RESET_CHILD: &str = "vsock_reset_child_process";
const SECCOMP_CHILD: &str = "seccomp_child_process";

fn seccomp_refuses_forbidden_syscall() -> TestResult {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([SECCOMP_CHILD, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stdout.contains("filter installed"), "child never installed the filter: {stdout} {stderr}");
    ensure!(!stdout.contains("the filter let it through"), "socket() was allowed: {stdout}");
    ensure!(
        out.status.code() == Some(vmm::seccomp::SIGSYS_EXIT_CODE),
        "child ended with {:?}, want exit code {}; stderr: {stderr}",
        out.status,
        vmm::seccomp::SIGSYS_EXIT_CODE
    );
    let want = format!("seccomp refused syscall {}", libc::SYS_socket);
    ensure!(stderr.contains(&want), "stderr {stderr:?} does not say {want:?}");
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    if std::env::var_os(CHILD_ENV).is_some() {
        let children = vec![
            trial(SECCOMP_CHILD, seccomp_child),
            trial(VSOCK_RESET_CHILD, vsock_reset_child),
            trial(ABORT_CHILD, abort_child),
            trial(FS_DAEMON_CONFIG_CHILD, || virtio_fs_on_virtiofsd(Some("from-daemon"))),
            trial(FS_VMM_CONFIG_CHILD, || virtio_fs_on_virtiofsd(None)),
            trial(FS_HOTPLUG_CHILD, virtio_fs_hotplug),
        ];
        libtest_mimic::run(&args, children).exit();
    }

    let kvm_trials = vec![
        trial("report_pvh_1_vcpu", || check_report(Format::Pvh, 1)),
        trial("report_linux64_elf_1_vcpu", || check_report(Format::Linux64Elf, 1)),
        trial("report_bzimage_1_vcpu", || check_report(Format::BzImage, 1)),
        trial("report_pvh_2_vcpus", || check_report(Format::Pvh, 2)),
        trial("report_linux64_elf_2_vcpus", || check_report(Format::Linux64Elf, 2)),
        trial("report_bzimage_4_vcpus", || check_report(Format::BzImage, 4)),
        trial("report_pvh_4_vcpus", || check_report(Format::Pvh, 4)),
        trial("hello_pvh", || hello(Format::Pvh)),
        trial("hello_linux64_elf", || hello(Format::Linux64Elf)),
        trial("hello_bzimage", || hello(Format::BzImage)),
        trial("virtio_mmio_rng_pvh", || virtio_mmio_rng(Format::Pvh)),
        trial("virtio_mmio_rng_linux64_elf", || virtio_mmio_rng(Format::Linux64Elf)),
        trial("virtio_mmio_rng_bzimage", || virtio_mmio_rng(Format::BzImage)),
        trial("count_guest_prints_consecutive_counts_pvh", || count_guest_prints_consecutive_counts(Format::Pvh)),
        trial("count_guest_prints_consecutive_counts_linux64_elf", || {
            count_guest_prints_consecutive_counts(Format::Linux64Elf)
        }),
        trial("count_guest_prints_consecutive_counts_bzimage", || {
            count_guest_prints_consecutive_counts(Format::BzImage)
        }),
        trial("virtio_repeat_offers_the_buffer_again_and_again_pvh", || {
            virtio_repeat_offers_the_buffer_again_and_again(Format::Pvh)
        }),
        trial("virtio_repeat_offers_the_buffer_again_and_again_linux64_elf", || {
            virtio_repeat_offers_the_buffer_again_and_again(Format::Linux64Elf)
        }),
        trial("virtio_repeat_offers_the_buffer_again_and_again_bzimage", || {
            virtio_repeat_offers_the_buffer_again_and_again(Format::BzImage)
        }),
        trial("virtio_repeat_is_a_whole_word", virtio_repeat_is_a_whole_word),
        trial("a_vsock_reset_mid_connection_leaves_the_vm_running", vsock_reset_mid_connection),
        trial("pause_resume_stop", pause_resume_stop),
        trial("stop_while_paused", stop_while_paused),
        trial("hotplug_attach_and_detach", hotplug_attach_and_detach),
        trial("bad_kernels_get_clear_errors", bad_kernels),
        trial("bad_machine_and_boot_source_get_clear_errors", bad_machine_and_boot_source),
    ];
    let mut trials = vec![
        trial("seccomp_refuses_forbidden_syscall_on_vcpu_thread", seccomp_refuses_forbidden_syscall),
        trial(
            "an_abort_on_a_vcpu_thread_is_reported_as_an_abort_not_a_seccomp_refusal",
            abort_is_not_a_seccomp_refusal,
        ),
    ];
    trials.extend(gate(kvm_unavailable(), kvm_trials));
    let virtiofsd_trials = vec![
        trial("virtio_fs_on_virtiofsd_with_the_daemons_config_space", || in_child(FS_DAEMON_CONFIG_CHILD)),
        trial("virtio_fs_on_virtiofsd_with_a_config_space_of_the_vmms", || in_child(FS_VMM_CONFIG_CHILD)),
        trial("virtio_fs_is_hot_plugged_into_an_empty_slot", || in_child(FS_HOTPLUG_CHILD)),
    ];
    let virtiofsd_missing = vessel_tests::virtiofsd::binary().err();
    trials.extend(gate(kvm_unavailable().or(virtiofsd_missing), virtiofsd_trials));
    libtest_mimic::run(&args, trials).exit();
}
