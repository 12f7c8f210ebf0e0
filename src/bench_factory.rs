//! `vessel bench factory`: a cold boot against a restore from a template,
//! side by side in one run, with the tiny counting guest: time to the
//! guest's first output, clones made per second on one core, and the host
//! memory each VM costs. A benchmark that prints figures, never a
//! pass/fail test.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use guests::{Format, Program};
use vmm::snapshot::{RestoreConfig, Template};
use vmm::{BootSourceConfig, ConsoleOutput, MachineConfig, PrebootAction, Vmm, VmmAction, VmmHandle};

use crate::bench_sandbox::{ms, spread_with};

#[derive(Args, Debug)]
pub(crate) struct FactoryBenchArgs {
    /// Boots and restores timed to first output.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Clones made from one template, one after another, for the rate.
    #[arg(long, default_value_t = 100)]
    clones: usize,
    /// VMs of each kind alive at once for the memory comparison.
    #[arg(long, default_value_t = 16)]
    vms: usize,
    /// MiB of initrd each VM of the memory comparison holds in RAM (as a
    /// booted guest holds its kernel and initramfs).
    #[arg(long, default_value_t = 32)]
    resident_mib: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
}

/// How long a VM may take to print.
const WAIT: Duration = Duration::from_secs(10);

/// Boots the counting guest in `kernel` (with `initrd` in memory).
fn cold_boot(kernel: &Path, initrd: Option<&Path>, mem: u64) -> anyhow::Result<VmmHandle> {
    let mut vmm = Vmm::new();
    vmm.handle(PrebootAction::ConfigureMachine(MachineConfig { mem_mib: mem, ..MachineConfig::default() }))?;
    vmm.handle(PrebootAction::ConfigureBootSource(BootSourceConfig {
        kernel: kernel.to_path_buf(),
        initrd: initrd.map(Path::to_path_buf),
        cmdline: String::new(),
    }))?;
    vmm.handle(PrebootAction::ConfigureConsole(ConsoleOutput::Discard))?;
    Ok(vmm.start()?)
}

fn restore(template: &Template, paused: bool) -> anyhow::Result<VmmHandle> {
    Ok(template.restore(RestoreConfig { console: ConsoleOutput::Discard, paused, ..RestoreConfig::default() })?)
}

/// Waits for the VM's first serial byte; the time from its start.
fn first_output(vm: &VmmHandle) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(d) = vm.counters().first_output() {
            return Ok(d);
        }
        ensure!(Instant::now() < deadline, "the guest printed nothing within {WAIT:?}");
        std::hint::spin_loop();
    }
}

/// Waits until the VM has printed `bytes` serial bytes.
fn printed(vm: &VmmHandle, bytes: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while vm.stats().serial_tx_bytes < bytes {
        ensure!(Instant::now() < deadline, "the guest printed under {bytes} bytes within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// (Pss, private) bytes of this process now.
fn memory() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").context("cannot read /proc/self/smaps_rollup")?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Ok((field("Pss:"), field("Private_Clean:") + field("Private_Dirty:")))
}

/// Snapshots a counting guest booted from `kernel` once it has printed a
/// few lines, into `dir`.
fn make_template(kernel: &Path, initrd: Option<&Path>, mem: u64, dir: &Path) -> anyhow::Result<()> {
    let vm = cold_boot(kernel, initrd, mem)?;
    printed(&vm, 200)?;
    vm.request(VmmAction::Pause)?;
    vm.request(VmmAction::Snapshot(dir.to_path_buf()))?;
    Ok(())
}

/// Per-VM host memory of `vms` VMs made by `make`, each left running
/// until it has printed, as (Pss, private) per VM.
fn per_vm(vms: usize, mut make: impl FnMut() -> anyhow::Result<VmmHandle>) -> anyhow::Result<(f64, f64)> {
    let (pss0, private0) = memory()?;
    let mut alive = Vec::with_capacity(vms);
    for _ in 0..vms {
        alive.push(make()?);
    }
    for vm in &alive {
        printed(vm, 200)?;
    }
    let (pss1, private1) = memory()?;
    let mib = |before: u64, after: u64| after.saturating_sub(before) as f64 / vms as f64 / f64::from(1 << 20);
    Ok((mib(pss0, pss1), mib(private0, private1)))
}

pub(crate) fn run(args: &FactoryBenchArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0 && args.clones > 0 && args.vms > 0, "--runs, --clones and --vms must be at least 1");
    let dir = tempfile_dir()?;
    let kernel = dir.join("count-pvh.elf");
    std::fs::write(&kernel, guests::image(Program::Count, Format::Pvh))?;
    println!(
        "vessel bench factory: the counting guest (PVH), 1 vCPU, {} MiB; times are min / median / max in ms",
        args.mem
    );

    let (mut cold, mut returned) = (Vec::with_capacity(args.runs), Vec::with_capacity(args.runs));
    for _ in 0..args.runs {
        let t = Instant::now();
        let vm = cold_boot(&kernel, None, args.mem)?;
        returned.push(ms(t.elapsed()));
        cold.push(ms(first_output(&vm)?));
    }
    println!("cold boot -> first output:        {}  ({} runs)", spread_with(cold, 3), args.runs);
    println!("  of which start() returning:     {}", spread_with(returned, 3));

    let snap = dir.join("template");
    make_template(&kernel, None, args.mem, &snap)?;
    let t = Instant::now();
    let template = Template::load(&snap)?;
    println!("template load (once):             {:.3}", ms(t.elapsed()));
    let (mut restored, mut returned) = (Vec::with_capacity(args.runs), Vec::with_capacity(args.runs));
    for _ in 0..args.runs {
        let t = Instant::now();
        let vm = restore(&template, false)?;
        returned.push(ms(t.elapsed()));
        restored.push(ms(first_output(&vm)?));
    }
    println!("restore -> first output:          {}  ({} runs)", spread_with(restored, 3), args.runs);
    println!("  of which restore() returning:   {}", spread_with(returned, 3));

    // Clones made one after another on this thread, kept paused (so
    // their guests take no CPU from the making), then dropped.
    let t = Instant::now();
    let clones = (0..args.clones).map(|_| restore(&template, true)).collect::<anyhow::Result<Vec<_>>>()?;
    let made = t.elapsed();
    let t = Instant::now();
    drop(clones);
    let dropped = t.elapsed();
    println!(
        "clones from one template:         {:.0} per second on one core ({} in {:.1} ms; dropping them {:.1} ms)",
        args.clones as f64 / made.as_secs_f64(),
        args.clones,
        ms(made),
        ms(dropped)
    );
    drop(template);

    // Memory: VMs holding `resident_mib` of initrd, as a booted guest
    // holds its kernel and initramfs.
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, pseudo_random(args.resident_mib << 20))?;
    let (cold_pss, cold_private) = per_vm(args.vms, || cold_boot(&kernel, Some(&initrd), args.mem))?;
    let snap = dir.join("template-resident");
    make_template(&kernel, Some(&initrd), args.mem, &snap)?;
    let template = Template::load(&snap)?;
    let (clone_pss, clone_private) = per_vm(args.vms, || restore(&template, false))?;
    println!("host memory per VM, {} alive at once, each with {} MiB of initrd in RAM:", args.vms, args.resident_mib);
    println!("  cold boot:  Pss {cold_pss:.2} MiB, private {cold_private:.2} MiB");
    println!(
        "  clone:      Pss {clone_pss:.2} MiB, private {clone_private:.2} MiB ({:.1}% of a cold VM's Pss; the \
         template's file is in the page cache once, for all clones)",
        100.0 * clone_pss / cold_pss.max(f64::MIN_POSITIVE)
    );
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(())
}

/// A fresh directory under the temporary directory.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vessel-bench-factory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// `len` bytes no page of which is all zero (a snapshot skips those).
fn pseudo_random(len: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
