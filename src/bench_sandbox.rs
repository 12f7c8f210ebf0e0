//! `vessel bench sandbox`: a sandbox's cold start through the sandbox API,
//! step by step (create, start to the container's first output byte, stop,
//! delete), the same from the factory's cache (a VM booted and paused
//! ahead of time, refilled between runs), and the host memory an idle
//! sandbox costs. A benchmark that
//! prints figures, never a pass/fail test.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use runtime_api::sandbox::STREAM_TIMEOUT;
use runtime_api::{ContainerConfig, HypervisorKind, Sandbox, SandboxConfig, Store};

#[derive(Args, Debug)]
pub(crate) struct SandboxBenchArgs {
    /// Cold starts to time.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The container's root, an ext4 image (default: the demo busybox root).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// The guest image directory (default: the one in the cache directory).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The hypervisor (default: chosen for this host).
    #[arg(long)]
    hypervisor: Option<HypervisorKind>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
}

/// A process's resident memory in bytes (VmRSS), or 0 if unreadable.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// min / median / max of `values`.
pub(crate) fn spread(values: Vec<f64>) -> String {
    spread_with(values, 1)
}

/// min / median / max of `values`, with `decimals` decimals.
pub(crate) fn spread_with(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_by(f64::total_cmp);
    match values.as_slice() {
        [] => "-".into(),
        v => format!("{:.d$} / {:.d$} / {:.d$}", v[0], v[v.len() / 2], v[v.len() - 1], d = decimals),
    }
}

pub(crate) fn run(args: &SandboxBenchArgs) -> anyhow::Result<()> {
    let image = crate::guest_image(args.image.as_deref())?;
    let scratch = resources::cache::temp_name(&std::env::temp_dir(), "vessel-bench-sandbox");
    std::fs::create_dir_all(&scratch)?;
    let store = Store::new(scratch.join("state"));
    let outcome = (|| {
        let root_source = match &args.rootfs {
            Some(path) => path.clone(),
            None => resources::rootfs::cached_demo_rootfs().context("the demo root filesystem")?,
        };
        let config = |id: &str, command: &[&str]| -> anyhow::Result<SandboxConfig> {
            let root = scratch.join(format!("{id}.ext4"));
            std::fs::copy(&root_source, &root).with_context(|| format!("copying {}", root_source.display()))?;
            let mut config = SandboxConfig::new(id, &image);
            config.hypervisor = args.hypervisor;
            config.memory_mib = args.memory;
            config.containers.push(ContainerConfig::new(id, root, command));
            Ok(config)
        };
        let kind = std::cell::Cell::new(None);
        let time_runs = |factory: Option<&runtime_api::Factory>| -> anyhow::Result<[Vec<f64>; 4]> {
            let (mut create, mut first, mut stop, mut delete) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..args.runs {
                if let Some(factory) = factory {
                    // Each run takes a VM paused ahead of time.
                    factory.wait_filled(Duration::from_secs(300))?;
                }
                let id = format!("bench{i}");
                let config = config(&id, &["echo", "ready"])?;
                let began = Instant::now();
                let mut sandbox = Sandbox::create(&store, config, factory)?;
                let created = began.elapsed();
                kind.set(Some(sandbox.state().hypervisor));
                let io = sandbox.take_io(&id)?;
                let started = Instant::now();
                let out = std::thread::spawn(move || -> anyhow::Result<Duration> {
                    let mut conn = io.stdout.accept(STREAM_TIMEOUT)?;
                    let mut byte = [0u8; 1];
                    conn.read_exact(&mut byte)?;
                    Ok(started.elapsed())
                });
                sandbox.start()?;
                let to_output = out.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;
                sandbox.wait_process(&id, "", Some(Duration::from_secs(60)))?;
                let stopping = Instant::now();
                sandbox.stop(false)?;
                let stopped = stopping.elapsed();
                let deleting = Instant::now();
                sandbox.delete()?;
                create.push(ms(created));
                first.push(ms(to_output));
                stop.push(ms(stopped));
                delete.push(ms(deleting.elapsed()));
            }
            Ok([create, first, stop, delete])
        };
        let [create, first, stop, delete] = time_runs(None)?;
        let shown = kind.get().map_or("-".into(), |k: HypervisorKind| k.to_string());
        println!("sandbox cold start, {shown}, {} runs (min / median / max, ms):", args.runs);
        println!("  create (VM boot to agent, container created)   {}", spread(create));
        println!("  start to the container's first output byte    {}", spread(first));
        println!("  stop                                           {}", spread(stop));
        println!("  delete                                         {}", spread(delete));

        let mut cache = runtime_api::CacheConfig::for_sandbox(&config("cache", &["true"])?);
        cache.hypervisor = kind.get().unwrap_or_else(HypervisorKind::detect);
        let factory = runtime_api::Factory::cache(&store, cache, 1)?;
        let [create, first, stop, delete] = time_runs(Some(&factory))?;
        drop(factory);
        println!("sandbox from the factory's cache (a paused VM), {shown}, {} runs (ms):", args.runs);
        println!("  create (resume, identity, root hot-plugged)    {}", spread(create));
        println!("  start to the container's first output byte    {}", spread(first));
        println!("  stop                                           {}", spread(stop));
        println!("  delete                                         {}", spread(delete));

        // An idle sandbox: one container sleeping.
        let ours_before = rss(std::process::id());
        let mut sandbox = Sandbox::create(&store, config("idle", &["sleep", "1000"])?, None)?;
        sandbox.start()?;
        std::thread::sleep(Duration::from_secs(2));
        let ours = rss(std::process::id()).saturating_sub(ours_before);
        let vm = sandbox.state().vm_pid.map(rss);
        let guest = args.memory << 20;
        println!("idle sandbox, host memory (guest memory {} MiB):", args.memory);
        match vm {
            Some(qemu) => {
                println!("  QEMU (the guest's touched pages included)     {:.1} MiB", qemu as f64 / 1048576.0)
            }
            None => println!("  (the VM runs in this process)"),
        }
        println!("  this process's growth (backends, the VMM)     {:.1} MiB", ours as f64 / 1048576.0);
        if vm.is_none() {
            println!("  guest memory configured                       {:.1} MiB", guest as f64 / 1048576.0);
        }
        sandbox.stop(true)?;
        sandbox.delete()?;
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}
