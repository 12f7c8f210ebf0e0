//! `vessel sandbox run`: one container in a fresh sandbox, its output on
//! our stdout and stderr, its exit status ours. Everything it does is a
//! call into the sandbox API (runtime-api); this file parses, forwards
//! streams and prints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use runtime_api::sandbox::STREAM_TIMEOUT;
use runtime_api::{ContainerConfig, HypervisorKind, Sandbox, SandboxConfig, Store};

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// The guest image directory (`vessel image build --out DIR`): DIR/kernel
    /// and DIR/initrd.img (default: one built in the cache directory on
    /// first use).
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,
    /// The container's root filesystem, an ext4 image (`vessel image rootfs`
    /// or `vessel image demo-rootfs`), which the container writes to; a copy
    /// of the demo busybox root if not given.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// The hypervisor: builtin (vessel's own VMM; needs hardware
    /// virtualization) or qemu-tcg (default: chosen for this host).
    #[arg(long)]
    hypervisor: Option<HypervisorKind>,
    /// The container's hostname.
    #[arg(long, default_value = "vessel")]
    hostname: String,
    /// Give the container our stdin (without it, its stdin is /dev/null).
    #[arg(short, long)]
    interactive: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where sandboxes keep their state unless `--root` says otherwise: the
/// system's state root for root, a private one under the temporary
/// directory for others.
pub(crate) fn default_store() -> Store {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        Store::new(runtime_api::state::DEFAULT_ROOT)
    } else {
        Store::new(std::env::temp_dir().join(format!("vessel-{uid}")))
    }
}

pub(crate) fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let began = Instant::now();
    let scratch = Scratch(resources::cache::temp_name(&std::env::temp_dir(), "vessel-sandbox"));
    std::fs::create_dir_all(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
    let rootfs = match &args.rootfs {
        Some(path) => path.clone(),
        None => {
            // The container writes to its root: each run gets its own copy
            // of the cached demo image.
            let image = scratch.0.join("rootfs.ext4");
            let cached = resources::rootfs::cached_demo_rootfs().context("the demo root filesystem")?;
            std::fs::copy(&cached, &image).with_context(|| format!("copying {}", cached.display()))?;
            image
        }
    };

    let id =
        scratch.0.file_name().map_or("run".into(), |n| n.to_string_lossy().trim_start_matches('.').replace(".tmp", ""));
    let command: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let mut container = ContainerConfig::new("run", rootfs, &command);
    container.hostname = Some(args.hostname.clone());
    container.process.stdin = args.interactive;
    let mut config = SandboxConfig::new(id, crate::guest_image(args.image.as_deref())?);
    config.hypervisor = args.hypervisor;
    config.vcpus = args.cpus;
    config.memory_mib = args.mem;
    config.containers.push(container);

    let mut sandbox = Sandbox::create(&default_store(), config, None)?;
    let ready_after = began.elapsed();
    let io = sandbox.take_io("run")?;
    // Streams are accepted in threads: the agent dials them while the
    // container starts.
    let out = io.stdout.collect_into(std::io::stdout(), STREAM_TIMEOUT);
    let err = io.stderr.map(|s| s.collect_into(std::io::stderr(), STREAM_TIMEOUT));
    if let Some(stdin) = io.stdin {
        std::thread::spawn(move || {
            if let Ok(mut conn) = stdin.accept(STREAM_TIMEOUT) {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
            }
        });
    }
    let started = Instant::now();
    sandbox.start()?;
    let status = sandbox.wait_process("run", "", None)?;
    let ran = started.elapsed();
    for stream in std::iter::once(out).chain(err) {
        let _ = stream.join();
    }
    let kind = sandbox.state().hypervisor;
    let version = sandbox.guest_details().agent_version.clone();
    sandbox.stop(false)?;
    sandbox.delete()?;
    eprintln!(
        "vessel: sandbox ready in {:.2} s (agent {version}, {kind}); container exited {status} after {:.2} s",
        ready_after.as_secs_f64(),
        ran.as_secs_f64()
    );
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(255)))
}
