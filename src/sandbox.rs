//! `vessel sandbox run`: one container in a fresh sandbox VM, its output
//! on our stdout and stderr, its exit status ours.
//!
//! The VM is the QEMU TCG fallback (DESIGN.md): the guest image from
//! `vessel image build`, our vsock backend as the agent's link and our blk
//! backend holding the container's root, both over vhost-user. This is the
//! path for hosts without usable hardware KVM, and the one our development
//! machines can run; the sandbox API (runtime-api) is where the same flow
//! will get the in-process VMM.

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use agent_proto::agent::{
    ContainerRequest, CreateContainerRequest, Empty, Rootfs, Stdio as StdioPorts, WaitProcessRequest,
};
use agent_proto::agent_ttrpc::AgentClient;
use agent_proto::spec::{spec_json, SpecOptions};
use agent_proto::{link, ttrpc};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::vhost_user;
use devices::virtio::vsock::{Vsock, VsockConfig};
use runtime_api::qemu::{vhost_user_device_args, Qemu, TcgMachine, QEMU};

/// The disk serial the container's root is found by.
const ROOT_SERIAL: &str = "rootfs";
const GUEST_CID: u64 = 3;
const STDIN_PORT: u32 = 2000;
const STDOUT_PORT: u32 = 2001;
const STDERR_PORT: u32 = 2002;
/// How long the guest may take to boot to its agent under TCG.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// The guest image directory (`vessel image build --out DIR`): DIR/kernel and DIR/initrd.img.
    #[arg(long, default_value = "target/guest-image")]
    image: PathBuf,
    /// The container's root filesystem, an ext4 image (`vessel image rootfs`
    /// or `vessel image demo-rootfs`), which the container writes to; a copy
    /// of the demo busybox root if not given.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
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

pub(crate) fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let kernel = args.image.join(resources::guest_image::KERNEL_FILE);
    let initrd = args.image.join(resources::guest_image::INITRD_FILE);
    for file in [&kernel, &initrd] {
        if !file.is_file() {
            bail!(
                "{} is missing: build the guest image with `vessel image build --out {}`",
                file.display(),
                args.image.display()
            );
        }
    }
    let dir = Scratch(resources::cache::temp_name(&std::env::temp_dir(), "vessel-sandbox"));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let start = Instant::now();

    let rootfs = match &args.rootfs {
        Some(path) => path.clone(),
        None => {
            // The container writes to its root: each run gets its own copy
            // of the cached demo image.
            let image = dir.0.join("rootfs.ext4");
            let cached = resources::rootfs::cached_demo_rootfs().context("the demo root filesystem")?;
            std::fs::copy(&cached, &image).with_context(|| format!("copying {}", cached.display()))?;
            image
        }
    };

    // The devices, over vhost-user, each served by a thread until QEMU goes.
    let uds = dir.0.join("vsock.sock");
    let (vsock, _) = Vsock::new(&VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() })?;
    let vsock_socket = dir.0.join("vhost-vsock.sock");
    vhost_user::spawn("vsock", Box::new(vsock), &vsock_socket)?;
    let (blk, _) = Block::open(&BlockConfig { path: rootfs.clone(), read_only: false, id: Some(ROOT_SERIAL.into()) })
        .with_context(|| format!("opening {}", rootfs.display()))?;
    let blk_socket = dir.0.join("vhost-blk.sock");
    vhost_user::spawn("blk", Box::new(blk), &blk_socket)?;

    // The host's ends of what the agent dials.
    let ready = UnixListener::bind(link::port_path(&uds, link::DEFAULT_PORT))?;
    let stdout = UnixListener::bind(link::port_path(&uds, STDOUT_PORT))?;
    let stderr = UnixListener::bind(link::port_path(&uds, STDERR_PORT))?;
    if args.interactive {
        let stdin = UnixListener::bind(link::port_path(&uds, STDIN_PORT))?;
        // Our stdin to the container's, until our end-of-file.
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = stdin.accept() {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
            }
        });
    }

    let mut extra_args = vhost_user_device_args(&vsock_socket, "vhost-user-vsock-device");
    extra_args.extend(vhost_user_device_args(&blk_socket, "vhost-user-blk"));
    extra_args.extend(["-device".into(), "virtio-rng-device".into()]);
    let machine = TcgMachine {
        kernel,
        initrd,
        vcpus: 1,
        mem_mib: args.mem,
        cmdline: "quiet".into(),
        vhost_user: true,
        extra_args,
    };
    let console_path = dir.0.join("console.log");
    let console = std::fs::File::create(&console_path)?;
    let qemu = Qemu(
        Command::new(QEMU)
            .args(machine.args())
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .with_context(|| format!("starting {QEMU} (the TCG fallback needs it: install qemu-system-x86)"))?,
    );

    let mut qemu = qemu;
    let mut qemu_exited = || !matches!(qemu.0.try_wait(), Ok(None));
    let outcome = drive(args, &uds, &ready, stdout, stderr, start, &mut qemu_exited);
    if outcome.is_err() {
        let log = std::fs::read_to_string(&console_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        eprintln!("vessel: the guest's console ended with:\n{}", tail.join("\n"));
    }
    // DestroySandbox powered the guest off; give QEMU a moment to see it.
    // After a failure it was never sent: QEMU is killed at once (drop).
    if outcome.is_ok() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(qemu.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(qemu);
    outcome
}

/// Copies the one connection `listener` gets to `out`, in a thread.
fn forward(listener: UnixListener, mut out: impl Write + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    })
}

fn drive(
    args: &RunArgs,
    uds: &Path,
    ready: &UnixListener,
    stdout: UnixListener,
    stderr: UnixListener,
    start: Instant,
    qemu_exited: &mut dyn FnMut() -> bool,
) -> anyhow::Result<ExitCode> {
    let ready_path = link::port_path(uds, link::DEFAULT_PORT);
    let gone = || qemu_exited().then(|| "QEMU exited first".to_string());
    let version = link::accept_ready(ready, &ready_path, READY_TIMEOUT.saturating_sub(start.elapsed()), gone)?;
    let ready_after = start.elapsed();
    let client = AgentClient::new(
        ttrpc::Client::new(link::connect_hybrid(uds, link::DEFAULT_PORT)?.into_raw_fd())
            .map_err(|e| anyhow!("connecting to the agent: {e}"))?,
    );
    let ctx = || ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64);
    let rpc = |e: ttrpc::Error| anyhow!(agent_proto::error_message(&e));

    let command: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let spec = spec_json(&command, &SpecOptions { hostname: Some(args.hostname.clone()), ..Default::default() });
    let mut root = Rootfs::new();
    root.set_disk_serial(ROOT_SERIAL.into());
    let out = forward(stdout, std::io::stdout());
    let err = forward(stderr, std::io::stderr());
    let create = CreateContainerRequest {
        container_id: "run".into(),
        oci_spec_json: spec,
        rootfs: Some(root).into(),
        stdio: Some(StdioPorts {
            stdin_port: if args.interactive { STDIN_PORT } else { 0 },
            stdout_port: STDOUT_PORT,
            stderr_port: STDERR_PORT,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let created = Instant::now();
    client.create_container(ctx(), &create).map_err(rpc)?;
    client
        .start_container(ctx(), &ContainerRequest { container_id: "run".into(), ..Default::default() })
        .map_err(rpc)?;
    // No timeout: the container runs as long as it runs.
    let wait = WaitProcessRequest { container_id: "run".into(), ..Default::default() };
    let status = client.wait_process(ttrpc::context::with_timeout(0), &wait).map_err(rpc)?.status;
    let ran = created.elapsed();
    let _ = out.join();
    let _ = err.join();
    let _ = client.remove_container(ctx(), &ContainerRequest { container_id: "run".into(), ..Default::default() });
    let _ = client.destroy_sandbox(ctx(), &Empty::new());
    eprintln!(
        "vessel: sandbox ready in {:.2} s (agent {version}, QEMU TCG); container exited {status} after {:.2} s",
        ready_after.as_secs_f64(),
        ran.as_secs_f64()
    );
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(255)))
}
