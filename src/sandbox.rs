//! `vessel sandbox run`, the older form of `vessel run` (which it calls),
//! with the demo busybox root by default; and where sandboxes live unless
//! `--root` says otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use runtime_api::{HypervisorKind, Store};

use crate::lifecycle::SandboxArgs;

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// The guest image directory (`vessel image build --out DIR`): DIR/kernel
    /// and DIR/initrd.img (default: one built in the cache directory on
    /// first use).
    #[arg(long, visible_alias = "guest-image", value_name = "DIR")]
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

/// `sandbox run` is `vessel run` with the demo root by default: a fresh
/// copy of it (the container writes to its root), removed afterwards.
pub(crate) fn run(store: &Store, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let mut copy = None;
    let rootfs = match &args.rootfs {
        Some(path) => path.clone(),
        None => {
            let cached = resources::rootfs::cached_demo_rootfs().context("the demo root filesystem")?;
            let image = resources::cache::temp_name(&std::env::temp_dir(), "vessel-demo-root");
            // create_new: a name planted in the shared temp directory is
            // refused, never written through.
            let copied = std::fs::File::open(&cached).and_then(|mut from| {
                use std::os::unix::fs::OpenOptionsExt;
                let mut to = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&image)?;
                std::io::copy(&mut from, &mut to)
            });
            copied.with_context(|| format!("copying {}", cached.display()))?;
            copy = Some(image.clone());
            image
        }
    };
    let sandbox = SandboxArgs {
        id: None,
        image: args.image.clone(),
        hypervisor: args.hypervisor,
        cpus: args.cpus,
        memory: args.mem,
        hostname: Some(args.hostname.clone()),
        net: None,
        volumes: Vec::new(),
        hotplug_slots: 2,
        factory: false,
        rootfs,
        command: args.command.clone(),
    };
    let outcome = crate::lifecycle::run(store, &sandbox, args.interactive, false, true);
    if let Some(copy) = copy {
        let _ = std::fs::remove_file(copy);
    }
    outcome
}
