//! `vessel bench`: launch latency and memory overhead, vessel against QEMU
//! microvm booting the same tiny guest, in one run. A benchmark that prints
//! figures, never a pass/fail test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use vmm::{BootSourceConfig, ConsoleOutput, ExitReason, MachineConfig, PrebootAction, Vmm};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Launches per measurement.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Guest memory in MiB, for vessel and QEMU alike.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// The QEMU binary to compare with.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Skip the QEMU side.
    #[arg(long)]
    no_qemu: bool,
}

/// One process launch: spawn to first console byte, spawn to exit.
struct Launch {
    first_byte: Duration,
    exit: Duration,
    stderr: String,
}

/// Spawns `cmd` with stdout piped and times its first byte and its exit,
/// which must have status `want_status`.
fn time_launch(cmd: &mut Command, want_status: i32) -> anyhow::Result<Launch> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot spawn {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut byte = [0u8; 1];
    let n = stdout.read(&mut byte).context("read child stdout")?;
    let first_byte = t0.elapsed();
    if n == 0 {
        let status = child.wait()?;
        let mut err = String::new();
        child.stderr.take().map(|mut e| e.read_to_string(&mut err));
        bail!("{cmd:?} printed nothing ({status}): {err}");
    }
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest)?;
    let status = child.wait()?;
    let exit = t0.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    if status.code() != Some(want_status) {
        bail!("{cmd:?} failed ({status}): {stderr}");
    }
    Ok(Launch { first_byte, exit, stderr })
}

/// min / median / max of a sample, in milliseconds.
struct Summary {
    min: f64,
    median: f64,
    max: f64,
}

fn summarize(samples: &[f64]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 { s[s.len() / 2] } else { (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0 };
    Summary { min: s[0], median, max: s[s.len() - 1] }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(label: &str, unit: &str, s: &Summary) {
    println!("  {label:<44} min {:>9.3}  median {:>9.3}  max {:>9.3} {unit}", s.min, s.median, s.max);
}

fn stat_value(stderr: &str, key: &str) -> Option<u64> {
    stderr.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')?.trim().parse().ok())
}

pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("vessel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel = dir.join(guests::file_name(guests::Program::Hello, guests::Format::Pvh));
    std::fs::write(&kernel, guests::image(guests::Program::Hello, guests::Format::Pvh))?;
    let spin = dir.join(guests::file_name(guests::Program::Spin, guests::Format::Pvh));
    std::fs::write(&spin, guests::image(guests::Program::Spin, guests::Format::Pvh))?;
    let result = run_in(args, &kernel);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(args: &BenchArgs, kernel: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the vessel binary")?;
    println!(
        "vessel bench: {} launches each, guest {} ({} MiB, 1 vCPU)",
        args.runs,
        kernel.file_name().unwrap_or_default().to_string_lossy(),
        args.mem
    );

    // (a) vessel as a process.
    let mut first = Vec::new();
    let mut exit = Vec::new();
    let mut overhead = Vec::new();
    for _ in 0..args.runs {
        let launch = time_launch(
            Command::new(&exe).args(["vm", "boot", "--stats", "--mem", &args.mem.to_string(), "--kernel"]).arg(kernel),
            0,
        )?;
        first.push(ms(launch.first_byte));
        exit.push(ms(launch.exit));
        let o = stat_value(&launch.stderr, "vmm_overhead").context("vessel printed no vmm_overhead")?;
        overhead.push(o as f64 / (1024.0 * 1024.0));
    }
    let vessel_first = summarize(&first);
    println!("vessel (process):");
    row("spawn -> first serial byte", "ms", &vessel_first);
    row("spawn -> process exit", "ms", &summarize(&exit));
    row("memory overhead (peak RSS - guest resident)", "MiB", &summarize(&overhead));
    let (running, anonymous) = running_overhead(&exe, &kernel.with_file_name("spin-pvh.elf"), args)?;
    row("memory overhead while running (RSS - guest)", "MiB", &summarize(&running));
    row("  of it anonymous (not shared code)", "MiB", &summarize(&anonymous));

    // (b) vessel in-process: start() to the boot-timer write.
    let mut start_to_timer = Vec::new();
    let mut start_call = Vec::new();
    for _ in 0..args.runs {
        let (call, timer) = in_process_launch(kernel, args.mem)?;
        start_call.push(ms(call));
        start_to_timer.push(ms(timer));
    }
    println!("vessel (in-process, library):");
    row("start() call returns", "ms", &summarize(&start_call));
    row("start() -> guest boot-timer write", "ms", &summarize(&start_to_timer));
    console_burst(args.runs)?;

    if args.no_qemu {
        println!("qemu: skipped (--no-qemu)");
        return Ok(());
    }
    let mut first = Vec::new();
    let mut exit = Vec::new();
    for _ in 0..args.runs {
        let launch = time_launch(&mut qemu_command(&args.qemu, kernel, args.mem), QEMU_DEBUG_EXIT_STATUS)?;
        first.push(ms(launch.first_byte));
        exit.push(ms(launch.exit));
    }
    let qemu_first = summarize(&first);
    println!("qemu microvm (process):");
    row("spawn -> first serial byte", "ms", &qemu_first);
    row("spawn -> process exit", "ms", &summarize(&exit));
    println!(
        "ratio vessel/qemu, median spawn -> first serial byte: {:.3} (target < 0.06)",
        vessel_first.median / qemu_first.median
    );
    Ok(())
}

/// The memory a running `vm boot` holds beyond its guest's: RSS minus the
/// guest memory's resident pages, and the anonymous part of RSS (the rest
/// is vessel's code and read-only data, shared with every vessel process),
/// read from /proc 200 ms after the spin guest started, `args.runs` times.
fn running_overhead(exe: &Path, spin: &Path, args: &BenchArgs) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let (mut overhead, mut anonymous) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let mut child = Command::new(exe)
            .args(["vm", "boot", "--mem", &args.mem.to_string(), "--kernel"])
            .arg(spin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot spawn vessel")?;
        std::thread::sleep(Duration::from_millis(200));
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id()));
        let _ = child.kill();
        let _ = child.wait();
        let smaps = smaps.context("cannot read the running vessel's smaps")?;
        let (mut rss, mut guest, mut anon, mut in_guest) = (0, 0, 0, false);
        for line in smaps.lines() {
            if line.split_whitespace().next().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
                in_guest = line.contains("vessel-guest-ram");
            } else if let Some(kib) = line.strip_prefix("Rss:").and_then(kib_value) {
                rss += kib;
                if in_guest {
                    guest += kib;
                }
            } else if let Some(kib) = line.strip_prefix("Anonymous:").and_then(kib_value) {
                anon += kib;
            }
        }
        overhead.push(mib(rss - guest));
        anonymous.push(mib(anon));
    }
    Ok((overhead, anonymous))
}

fn kib_value(field: &str) -> Option<u64> {
    field.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The host side of a 4 KiB console burst (64 lines of 64 bytes), as the
/// guest sends it: a byte per data-register write, the line status read
/// before each. Into a file, through the UART model with its batched
/// output, against the per-byte `write` the console made before batching.
/// (The guest's PIO exits, one per byte either way, are not in it.)
fn console_burst(runs: usize) -> anyhow::Result<()> {
    use devices::legacy::{EventFdTrigger, SerialConsole};
    use devices::BusDevice;
    let path = std::env::temp_dir().join(format!("vessel-bench-console-{}", std::process::id()));
    let burst: Vec<u8> = (0..64).flat_map(|_| (0..63).map(|i| b'a' + (i % 26) as u8).chain([b'\n'])).collect();
    let (mut per_byte, mut batched) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut file = std::fs::File::create(&path)?;
        let t = Instant::now();
        for b in &burst {
            std::io::Write::write_all(&mut file, std::slice::from_ref(b))?;
        }
        per_byte.push(t.elapsed().as_secs_f64() * 1e6);
        let irq = EventFdTrigger(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
        let notify = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
        let (mut uart, _, _) = SerialConsole::new(irq, Box::new(std::fs::File::create(&path)?), Some(notify));
        let mut lsr = [0u8];
        let t = Instant::now();
        for b in &burst {
            uart.read(5, &mut lsr);
            uart.write(0, std::slice::from_ref(b));
        }
        uart.flush_output();
        batched.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    println!("console, a 4 KiB burst of 64-byte lines into a file (host side):");
    row("a write per byte (before batching)", "us", &summarize(&per_byte));
    row("the UART, batched at newlines", "us", &summarize(&batched));
    Ok(())
}

/// QEMU's exit status when the guest writes 0 to isa-debug-exit: (0 << 1) | 1.
const QEMU_DEBUG_EXIT_STATUS: i32 = 1;

/// QEMU microvm booting the same PVH guest with the console on stdout;
/// the guest's write to port 0xf4 (isa-debug-exit) ends QEMU.
fn qemu_command(qemu: &str, kernel: &Path, mem: u64) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        &format!("{mem}M"),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ])
    .arg(kernel);
    cmd
}

/// Boots the guest in this process; returns how long `start` took and the
/// time from `start` to the guest's boot-timer write.
fn in_process_launch(kernel: &Path, mem: u64) -> anyhow::Result<(Duration, Duration)> {
    let mut vmm = Vmm::new();
    vmm.handle(PrebootAction::ConfigureMachine(MachineConfig {
        vcpus: 1,
        mem_mib: mem,
        seccomp: true,
        hotplug_slots: 0,
    }))?;
    vmm.handle(PrebootAction::ConfigureBootSource(BootSourceConfig {
        kernel: PathBuf::from(kernel),
        initrd: None,
        cmdline: String::new(),
    }))?;
    vmm.handle(PrebootAction::ConfigureConsole(ConsoleOutput::Discard))?;
    let t0 = Instant::now();
    let handle = vmm.start()?;
    let call = t0.elapsed();
    let counters = handle.counters();
    match handle.wait() {
        ExitReason::Reset => {}
        other => bail!("the bench guest ended with {other:?}, expected a reset"),
    }
    let timer = counters.boot_time().context("the guest never wrote the boot timer")?;
    Ok((call, timer))
}
