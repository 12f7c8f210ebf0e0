//! Detached sandboxes: `vessel create` starts one host process per sandbox
//! that owns its VM (`vessel __own`), and the other commands reach the
//! sandbox through the sandbox API's fetch (the agent, over the sandbox's
//! vsock socket) or, for what only the owner can do, through the owner's
//! control socket in the sandbox's directory.
//!
//! Each sandbox has one container with the sandbox's ID. Its output goes
//! to `<root>/.scratch/<id>/output.log`; `vessel logs ID` prints it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use runtime_api::sandbox::STREAM_TIMEOUT;
use runtime_api::state::SandboxPhase;
use runtime_api::{
    ContainerConfig, DiskConfig, DiskMount, HypervisorKind, ProcessConfig, Sandbox, SandboxConfig, Store, VolumeConfig,
};

/// The owner's control socket, in the sandbox's directory.
const CONTROL_SOCKET: &str = "control.sock";

/// What `create` and `run` take.
#[derive(Args, Debug, Clone)]
pub(crate) struct SandboxArgs {
    /// The sandbox's ID (default: a fresh one).
    #[arg(long)]
    pub(crate) id: Option<String>,
    /// The guest image directory (`vessel image build --out DIR`; default:
    /// one built in the cache directory on first use).
    #[arg(long, visible_alias = "guest-image", value_name = "DIR")]
    pub(crate) image: Option<PathBuf>,
    /// The hypervisor: builtin or qemu-tcg (default: chosen for this host).
    #[arg(long)]
    pub(crate) hypervisor: Option<HypervisorKind>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub(crate) cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub(crate) memory: u64,
    /// The container's hostname (default: vessel).
    #[arg(long)]
    pub(crate) hostname: Option<String>,
    /// Join the network namespace NETNS (`/var/run/netns/NAME`, as a CNI
    /// plugin leaves it): the guest takes its eth0's MAC, addresses and
    /// routes.
    #[arg(long, value_name = "NETNS")]
    pub(crate) net: Option<PathBuf>,
    /// Devices reserved for hot-plugging (disks and the roots of containers
    /// created later); each costs a little host memory while unused.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub(crate) hotplug_slots: u8,
    /// Give the container HOST at GUEST: a disk image (ext4), attached and
    /// mounted, or a directory, shared live; `:ro` makes it read-only
    /// (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub(crate) volumes: Vec<String>,
    /// Take a booted, paused VM from the factory's cache (`vessel factory
    /// init --cache`) if one is ready, or restore one from its template
    /// (`--template`), rather than boot one; the root is then an image (a
    /// directory is packed into one).
    #[arg(long)]
    pub(crate) factory: bool,
    /// The container's root: an ext4 image (used in place, written to), a
    /// directory (shared live through virtio-fs when run as root with
    /// virtiofsd, else packed into a fresh image) or an OCI image layout
    /// (packed).
    pub(crate) rootfs: PathBuf,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    pub(crate) command: Vec<String>,
}

/// The scratch directory of sandbox `id`: its packed root and its output,
/// kept while the sandbox lives.
fn scratch(store: &Store, id: &str) -> PathBuf {
    store.root().join(".scratch").join(id)
}

/// Makes `dir` (and its parents) 0700, whatever the umask.
fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// A fresh sandbox ID.
fn fresh_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("vessel-{}-{nanos:08x}", std::process::id())
}

/// Whether directories can be shared into sandboxes (virtio-fs): the
/// shared directory is made of bind mounts, which need root, and served by
/// virtiofsd.
fn can_share() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && runtime_api::shared_fs::find_virtiofsd().is_ok()
}

/// The container's root: a directory as it is where it can be shared
/// (`share`), else an ext4 image: `rootfs` itself, or a fresh image of a
/// directory or OCI layout in `scratch`.
fn container_root(rootfs: &Path, scratch: &Path, share: bool) -> anyhow::Result<PathBuf> {
    if share && rootfs.is_dir() && !resources::oci::is_layout(rootfs) {
        let real = rootfs.canonicalize().with_context(|| format!("the root {}", rootfs.display()))?;
        return Ok(real);
    }
    root_image(rootfs, scratch)
}

/// The container's root as an ext4 image: `rootfs` itself, or a fresh
/// image of a directory or OCI layout in `scratch`.
fn root_image(rootfs: &Path, scratch: &Path) -> anyhow::Result<PathBuf> {
    if rootfs.is_file() {
        return Ok(rootfs.to_path_buf());
    }
    if !rootfs.is_dir() {
        bail!("the root {} is neither an ext4 image nor a directory", rootfs.display());
    }
    let image = scratch.join("rootfs.ext4");
    let _progress =
        resources::progress::Step::start(&format!("vessel: packing {} into an ext4 image", rootfs.display()));
    if resources::oci::is_layout(rootfs) {
        resources::oci::build_image(rootfs, &image, None, scratch)
            .with_context(|| format!("making an image of the OCI layout {}", rootfs.display()))?;
    } else {
        resources::rootfs::build_ext4(rootfs, &image, None)?;
    }
    Ok(image)
}

/// A `-v HOST:GUEST[:ro]` volume: the disk and its mount.
#[derive(Debug, PartialEq)]
pub(crate) struct Volume {
    pub(crate) host: PathBuf,
    pub(crate) guest: String,
    pub(crate) read_only: bool,
}

/// Parses `HOST:GUEST[:ro]`. HOST must be a disk image (a regular file or
/// a block device); GUEST an absolute path.
pub(crate) fn parse_volume(spec: &str) -> anyhow::Result<Volume> {
    let (rest, read_only) = match spec.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (spec.strip_suffix(":rw").unwrap_or(spec), false),
    };
    let Some((host, guest)) = rest.split_once(':') else {
        bail!("the volume {spec:?} is not HOST:GUEST[:ro]");
    };
    if host.is_empty() || !guest.starts_with('/') || guest.contains(':') {
        bail!("the volume {spec:?} is not HOST:GUEST[:ro] with GUEST an absolute path");
    }
    if Path::new(guest).components().any(|c| c == std::path::Component::ParentDir) {
        bail!("the volume {spec:?} has '..' in its guest path");
    }
    let given = Path::new(host);
    if given.components().any(|c| c == std::path::Component::ParentDir) {
        bail!("the volume {spec:?} has '..' in its host path");
    }
    let host = given.canonicalize().with_context(|| format!("the volume's host side {host:?}"))?;
    let kind = std::fs::metadata(&host)?.file_type();
    if kind.is_dir() {
        // Shared live: the real path, not one through a symlink.
        let absolute = std::env::current_dir()?.join(given);
        if absolute != host {
            bail!("the volume {spec:?} goes through a symlink (to {}); give the real path", host.display());
        }
    } else if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        bail!("the volume {spec:?} is neither a directory, a disk image file nor a block device");
    }
    Ok(Volume { host, guest: guest.to_string(), read_only })
}

fn sandbox_config(args: &SandboxArgs, id: &str, root: PathBuf) -> anyhow::Result<SandboxConfig> {
    let command: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let mut config = SandboxConfig::new(id, crate::guest_image(args.image.as_deref())?);
    config.hypervisor = args.hypervisor;
    config.vcpus = args.cpus;
    config.memory_mib = args.memory;
    config.hotplug_slots = args.hotplug_slots;
    config.network = args.net.clone().map(|netns| runtime_api::NetworkConfig { netns, interface: "eth0".into() });
    let mut container = ContainerConfig::new(id, root, &command);
    container.hostname = args.hostname.clone();
    for (n, spec) in args.volumes.iter().enumerate() {
        let volume = parse_volume(spec)?;
        if volume.host.is_dir() {
            if !can_share() {
                bail!(
                    "the volume {spec:?} is a directory, which needs virtio-fs: run as root, with virtiofsd installed"
                );
            }
            let (source, destination) = (volume.host, volume.guest);
            container.volumes.push(VolumeConfig { source, destination, read_only: volume.read_only });
            continue;
        }
        let serial = format!("vol-{n}");
        config.disks.push(DiskConfig { path: volume.host, serial: serial.clone(), read_only: volume.read_only });
        container.disks.push(DiskMount {
            serial,
            destination: volume.guest,
            fstype: "ext4".into(),
            read_only: volume.read_only,
        });
    }
    // Detached sandboxes keep a shared directory for containers created
    // later with a directory root.
    config.shared_fs = can_share();
    config.containers.push(container);
    Ok(config)
}

/// `vessel create`: starts the owner process and waits until it says the
/// sandbox is created; prints the ID.
pub(crate) fn create(store: &Store, args: &SandboxArgs) -> anyhow::Result<ExitCode> {
    sweep(store);
    let id = args.id.clone().unwrap_or_else(fresh_id);
    runtime_api::config::validate_id(&id)?;
    let scratch = scratch(store, &id);
    if store.dir(&id)?.exists() && !store.abandoned(&id) {
        bail!("a sandbox with ID {id:?} exists already");
    }
    make_private_dir(&scratch)?;
    let made = (|| {
        let root = container_root(&args.rootfs, &scratch, can_share() && !args.factory)?;
        let mut config = sandbox_config(args, &id, root)?;
        let from_template = args.factory && crate::factory::has_template(store);
        if args.factory {
            // A cached or restored VM has no shared directory.
            config.shared_fs = false;
        }
        if args.factory && !from_template {
            if crate::factory::claim(store, &config)? {
                return anyhow::Ok(());
            }
            tracing::info!(id, "no cached VM is ready; booting one cold");
        }
        let config = serde_json::to_string(&config)?;
        let log = std::fs::File::create(scratch.join("owner.log"))?;
        let mut owner = Command::new(std::env::current_exe()?)
            .arg("--root")
            .arg(store.root())
            .args(["__own", &config])
            .args(from_template.then_some("--template"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting the sandbox's owner process")?;
        let mut line = String::new();
        BufReader::new(owner.stdout.take().context("the owner's stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = owner.wait();
            let log = std::fs::read_to_string(scratch.join("owner.log")).unwrap_or_default();
            bail!("{}", log.trim().lines().last().unwrap_or("the owner process ended without a word"));
        }
        anyhow::Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&scratch);
        return Err(e);
    }
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

/// `vessel __own CONFIG`: creates the sandbox, says `ready`, collects the
/// container's output, and serves the control socket until the sandbox is
/// stopped.
pub(crate) fn own(store: &Store, config: &str, template: bool) -> anyhow::Result<ExitCode> {
    let config: SandboxConfig = serde_json::from_str(config).context("the sandbox config")?;
    // Detached from the terminal and its signals.
    // SAFETY: setsid has no preconditions; it fails harmlessly if this
    // process leads a group already.
    unsafe { libc::setsid() };
    let factory = if template { crate::factory::template(store)? } else { None };
    let sandbox = Sandbox::create(store, config, factory.as_ref())?;
    serve_owner(store, sandbox, || {
        println!("ready");
        std::io::stdout().flush()
    })
}

/// The owner's work once sandbox `sandbox` exists (made by `__own`, or
/// taken from the factory by a cached VM's owner): collects its
/// container's output, calls `ready` once the control socket listens, and
/// serves that socket until the sandbox is stopped.
pub(crate) fn serve_owner(
    store: &Store,
    mut sandbox: Sandbox,
    ready: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<ExitCode> {
    let id = sandbox.id().to_string();
    let mut streams = collect_output(&mut sandbox, &scratch(store, &id), &id)?;
    let control = store.dir(&id)?.join(CONTROL_SOCKET);
    let listener =
        devices::host_socket::bind_private(&control).with_context(|| format!("listening on {}", control.display()))?;
    ready()?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if !devices::host_socket::peer_is_same_user(&conn).unwrap_or(false) {
            continue;
        }
        let mut line = String::new();
        let mut reader = BufReader::new(conn.try_clone()?);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let chain = |e: runtime_api::SandboxError| runtime_api::error_chain(&e).replace('\n', " ");
        let reply = match line.trim() {
            create if create.starts_with("create-container ") => {
                match serde_json::from_str::<ContainerConfig>(&create["create-container ".len()..]) {
                    Ok(container) => {
                        let cid = container.id.clone();
                        sandbox.create_container(container).map_err(chain).and_then(|()| {
                            let collected = collect_output(&mut sandbox, &scratch(store, &id), &cid);
                            collected.map(|s| streams.extend(s)).map_err(|e| format!("{e:#}"))
                        })
                    }
                    Err(e) => Err(format!("the container config: {e}")),
                }
            }
            "stop" => sandbox.stop(false).map_err(|e| runtime_api::error_chain(&e).replace('\n', " ")),
            "stop --force" => sandbox.stop(true).map_err(|e| runtime_api::error_chain(&e).replace('\n', " ")),
            "pause" => sandbox.pause().map_err(|e| runtime_api::error_chain(&e).replace('\n', " ")),
            "resume" => sandbox.resume().map_err(|e| runtime_api::error_chain(&e).replace('\n', " ")),
            add if add.starts_with("add-interface ") => {
                match serde_json::from_str::<runtime_api::NetworkConfig>(&add["add-interface ".len()..]) {
                    Ok(network) => sandbox.add_interface(&network).map(drop).map_err(chain),
                    Err(e) => Err(format!("the network config: {e}")),
                }
            }
            remove if remove.starts_with("remove-interface ") => {
                sandbox.remove_interface(&remove["remove-interface ".len()..]).map_err(chain)
            }
            add if add.starts_with("add-disk ") => {
                match serde_json::from_str::<DiskConfig>(&add["add-disk ".len()..]) {
                    Ok(disk) => sandbox.add_disk(&disk).map_err(chain),
                    Err(e) => Err(format!("the disk: {e}")),
                }
            }
            other => Err(format!("unknown control request {other:?}")),
        };
        let answer = match reply {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error {e}\n"),
        };
        let mut conn = conn;
        let _ = conn.write_all(answer.as_bytes());
        if sandbox.state().phase == SandboxPhase::Stopped {
            break;
        }
    }
    let _ = devices::host_socket::remove_socket(&control);
    for stream in streams {
        let _ = stream.join();
    }
    Ok(ExitCode::SUCCESS)
}

/// The log a container's output goes to, in the sandbox's scratch
/// directory: `output.log` for the sandbox's own container, else
/// `<container>.log`.
fn output_log(scratch: &Path, sandbox: &str, container: &str) -> PathBuf {
    if container == sandbox {
        scratch.join("output.log")
    } else {
        scratch.join(format!("{container}.log"))
    }
}

type Stream = std::thread::JoinHandle<Result<(), runtime_api::agent::AgentError>>;

/// Collects container `container`'s stdout and stderr into its log.
fn collect_output(sandbox: &mut Sandbox, scratch: &Path, container: &str) -> anyhow::Result<Vec<Stream>> {
    let output = std::fs::File::create(output_log(scratch, sandbox.id(), container))?;
    let io = sandbox.take_io(container)?;
    let mut streams = vec![io.stdout.collect_into(output.try_clone()?, STREAM_TIMEOUT)];
    streams.extend(io.stderr.map(|s| s.collect_into(output, STREAM_TIMEOUT)));
    Ok(streams)
}

/// `vessel network ...` and `vessel device ...`.
pub(crate) enum DeviceOp {
    AddInterface {
        netns: PathBuf,
        interface: String,
    },
    RemoveInterface {
        name: String,
    },
    ListInterfaces,
    Routes,
    /// Hot-plug `file`; with `mount`, mount it in a container (the
    /// sandbox's own by default) at a path.
    AddDisk {
        file: PathBuf,
        serial: Option<String>,
        read_only: bool,
        mount: Option<(Option<String>, String)>,
    },
}

pub(crate) fn device_op(store: &Store, sandbox: &str, op: DeviceOp) -> anyhow::Result<ExitCode> {
    match op {
        // Hotplug is the owner's to do.
        DeviceOp::AddInterface { netns, interface } => {
            let network = runtime_api::NetworkConfig { netns, interface };
            control(store, sandbox, &format!("add-interface {}", serde_json::to_string(&network)?))?;
        }
        DeviceOp::RemoveInterface { name } => control(store, sandbox, &format!("remove-interface {name}"))?,
        DeviceOp::AddDisk { file, serial, read_only, mount } => {
            // A destination the agent would refuse is refused before the
            // disk takes a hotplug slot for good.
            if let Some((_, destination)) = &mount {
                let plain = Path::new(destination).components().all(|c| c != std::path::Component::ParentDir);
                if !destination.starts_with('/') || destination == "/" || !plain {
                    bail!("--path {destination:?} is not an absolute path below / without '..'");
                }
            }
            let path = file.canonicalize().with_context(|| format!("the disk image {}", file.display()))?;
            let serial = match serial {
                Some(serial) => serial,
                None => {
                    // The first vol-N no disk of the sandbox has.
                    let used: Vec<String> = store.load(sandbox)?.devices.into_iter().map(|d| d.serial).collect();
                    (0..).map(|n| format!("vol-{n}")).find(|s| !used.contains(s)).context("no free serial")?
                }
            };
            let disk = DiskConfig { path, serial: serial.clone(), read_only };
            control(store, sandbox, &format!("add-disk {}", serde_json::to_string(&disk)?))?;
            if let Some((container, destination)) = mount {
                let container = container.unwrap_or_else(|| sandbox.to_string());
                let mount = DiskMount { serial, destination, fstype: "ext4".into(), read_only };
                Sandbox::fetch(store, sandbox)?.mount_disk(&container, &mount)?;
            }
        }
        DeviceOp::ListInterfaces => {
            let interfaces = Sandbox::fetch(store, sandbox)?.list_interfaces()?;
            println!("{:<12} {:<18} {:<6} {:<4} ADDRESSES", "NAME", "MAC", "MTU", "UP");
            for i in interfaces.interfaces {
                let addresses: Vec<String> =
                    i.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
                println!(
                    "{:<12} {:<18} {:<6} {:<4} {}",
                    shown(&i.name),
                    shown(&i.hw_addr),
                    i.mtu,
                    i.up,
                    shown(&addresses.join(" "))
                );
            }
        }
        DeviceOp::Routes => {
            let routes = Sandbox::fetch(store, sandbox)?.list_routes()?;
            println!("{:<20} {:<16} {:<12} SOURCE", "DESTINATION", "GATEWAY", "DEVICE");
            for r in routes.routes {
                println!(
                    "{:<20} {:<16} {:<12} {}",
                    shown(&r.dest),
                    shown(&r.gateway),
                    shown(&r.device),
                    shown(&r.source)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `vessel container ...`: more containers in a detached sandbox.
pub(crate) enum ContainerOp {
    Create { container: String, hostname: Option<String>, disks: Vec<String>, rootfs: PathBuf, command: Vec<String> },
    Start { container: String },
    Exec { container: String, command: Vec<String> },
    Kill { container: String, signal: u32, all: bool },
    Delete { container: String },
    Logs { container: String },
    List,
}

pub(crate) fn container_op(store: &Store, sandbox: &str, op: ContainerOp) -> anyhow::Result<ExitCode> {
    match op {
        ContainerOp::Create { container, hostname, disks, rootfs, command } => {
            runtime_api::config::validate_id(&container)?;
            let scratch = scratch(store, sandbox);
            let packed = scratch.join(&container);
            make_private_dir(&packed)?;
            let shared = store.load(sandbox)?.config.shared_fs;
            let root = container_root(&rootfs, &packed, shared)?;
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let mut config = ContainerConfig::new(&container, root, &args);
            config.hostname = hostname;
            for disk in disks {
                let (serial, path) =
                    disk.split_once(':').with_context(|| format!("--disk {disk:?} is not SERIAL:PATH"))?;
                config.disks.push(runtime_api::DiskMount {
                    serial: serial.into(),
                    destination: path.into(),
                    fstype: "ext4".into(),
                    read_only: false,
                });
            }
            // Its root disk is hot-plugged, which only the owner can do.
            control(store, sandbox, &format!("create-container {}", serde_json::to_string(&config)?))?;
        }
        ContainerOp::Start { container } => Sandbox::fetch(store, sandbox)?.start_container(&container)?,
        ContainerOp::Kill { container, signal, all } => {
            Sandbox::fetch(store, sandbox)?.kill_container(&container, signal, all)?
        }
        ContainerOp::Delete { container } => {
            let mut handle = Sandbox::fetch(store, sandbox)?;
            if handle.state().containers.len() == 1 {
                bail!("{container:?} is the sandbox's last container: delete the sandbox instead");
            }
            handle.delete_container(&container)?;
            let _ = std::fs::remove_dir_all(scratch(store, sandbox).join(&container));
        }
        ContainerOp::Logs { container } => {
            let log = output_log(&scratch(store, sandbox), sandbox, &container);
            let text =
                std::fs::read(&log).with_context(|| format!("no output of {container:?} at {}", log.display()))?;
            std::io::stdout().write_all(&text)?;
        }
        ContainerOp::List => {
            let status = Sandbox::fetch(store, sandbox)?.status()?;
            println!("{:<24} {:<8} EXIT", "CONTAINER", "STATE");
            for c in status.containers {
                let exit = c.exit_code.map_or("-".into(), |c| c.to_string());
                println!("{:<24} {:<8} {exit}", c.id, c.phase.to_string());
            }
        }
        ContainerOp::Exec { container, command } => {
            let mut handle = Sandbox::fetch(store, sandbox)?;
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let (exec_id, io) = handle.enter_container(&container, &ProcessConfig::new(&args))?;
            let foreground = crate::terminal::Foreground::attach(store, sandbox, &container, &exec_id, io, false)?;
            let status = handle.wait_process(&container, &exec_id, None);
            foreground.finish();
            return Ok(ExitCode::from(u8::try_from(status?).unwrap_or(255)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends `request` to sandbox `id`'s owner and waits for its answer.
fn control(store: &Store, id: &str, request: &str) -> anyhow::Result<()> {
    let path = store.dir(id)?.join(CONTROL_SOCKET);
    let mut conn = UnixStream::connect(&path)
        .with_context(|| format!("sandbox {id:?} has no owner answering on {}", path.display()))?;
    conn.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer)?;
    match answer.trim().strip_prefix("error ") {
        Some(error) => bail!("{error}"),
        None if answer.trim() == "ok" => Ok(()),
        None => bail!("the owner of sandbox {id:?} answered {answer:?}"),
    }
}

/// How listings print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns, for people.
    Table,
    /// JSON, for programs.
    Json,
}

/// `text` from the guest (a process's command line, a user name, an
/// interface), safe to print on a terminal: control characters, which
/// could move the cursor or retitle the window, become `?`.
fn shown(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A byte count for people: 1.5 MiB.
fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The sandbox commands that work on one sandbox.
pub(crate) enum Op {
    Start,
    Status,
    Ps { format: Format },
    Stats { format: Format },
    Update { cpus: Option<f64>, memory: Option<u64>, pids: Option<u64> },
    Pause,
    Resume,
    Logs,
    Kill { signal: u32, all: bool },
    Exec { command: Vec<String>, interactive: bool, tty: bool },
    Delete { force: bool },
}

pub(crate) fn run_op(store: &Store, id: &str, op: Op) -> anyhow::Result<ExitCode> {
    match op {
        Op::Pause => control(store, id, "pause")?,
        Op::Resume => control(store, id, "resume")?,
        Op::Logs => {
            let log = scratch(store, id).join("output.log");
            let text =
                std::fs::read(&log).with_context(|| format!("no output of sandbox {id:?} at {}", log.display()))?;
            std::io::stdout().write_all(&text)?;
        }
        Op::Delete { force } => {
            if store.abandoned(id) {
                Sandbox::delete_by_id(store, id, force)?;
                let _ = std::fs::remove_dir_all(scratch(store, id));
                return Ok(ExitCode::SUCCESS);
            }
            // An unreadable state is for a forced delete to clean up.
            let state = match store.load(id) {
                Ok(state) => Some(state),
                Err(e) if force => {
                    tracing::warn!(error = %e, "deleting a sandbox whose state cannot be read");
                    None
                }
                Err(e) => return Err(e.into()),
            };
            if state.is_some_and(|s| s.phase != SandboxPhase::Stopped) {
                let request = if force { "stop --force" } else { "stop" };
                if let Err(e) = control(store, id, request) {
                    // No owner answering: a dead sandbox, which only a
                    // forced delete takes (delete_by_id says so).
                    tracing::debug!(error = %e, "the owner did not stop the sandbox");
                }
            }
            Sandbox::delete_by_id(store, id, force)?;
            let _ = std::fs::remove_dir_all(scratch(store, id));
        }
        Op::Start => Sandbox::fetch(store, id)?.start()?,
        Op::Status => {
            // A stopped or dead sandbox has no agent to ask: its state file
            // says what there is to say.
            let summary = Sandbox::summary(store, id)?;
            let live = summary.owner_alive && summary.status.phase != SandboxPhase::Stopped;
            let status = if live { Sandbox::fetch(store, id)?.status()? } else { summary.status.clone() };
            let state = store.load(id)?;
            let vm_pid = state.vm_pid.map_or("-".into(), |p| p.to_string());
            println!(
                "sandbox {} {} ({}) owner pid {} vm pid {vm_pid} created {}",
                status.id,
                shown_state(&summary),
                status.hypervisor,
                state.owner_pid,
                created_ago(status.created_unix_ms)
            );
            for c in &status.containers {
                let exit = c.exit_code.map_or("-".into(), |c| c.to_string());
                let pid = c.pid.map_or("-".into(), |p| p.to_string());
                let started = c.started_unix_ms.map_or("-".into(), created_ago);
                println!("container {} {} exit {exit} pid {pid} started {started}", c.id, c.phase);
            }
        }
        Op::Ps { format } => {
            let processes = Sandbox::fetch(store, id)?.process_list(id)?;
            match format {
                Format::Json => {
                    let items: Vec<serde_json::Value> = processes
                        .iter()
                        .map(|p| {
                            serde_json::json!({"pid": p.pid, "ns_pid": p.ns_pid, "uid": p.uid, "user": p.user, "command": p.command})
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&items)?);
                }
                Format::Table => {
                    println!("{:>8} {:>8} {:<10} COMMAND", "PID", "NS-PID", "USER");
                    for p in processes {
                        println!("{:>8} {:>8} {:<10} {}", p.pid, p.ns_pid, shown(&p.user), shown(&p.command));
                    }
                }
            }
        }
        Op::Stats { format } => {
            let stats = Sandbox::fetch(store, id)?.stats()?;
            match format {
                Format::Json => {
                    let containers: Vec<serde_json::Value> = stats
                        .containers
                        .iter()
                        .map(|(c, s)| {
                            serde_json::json!({
                                "id": c, "cpu_usage_usec": s.cpu_usage_usec, "memory_usage": s.memory_usage,
                                "memory_limit": s.memory_limit, "pids_current": s.pids_current, "pids_limit": s.pids_limit,
                                "io_read_bytes": s.io_read_bytes, "io_write_bytes": s.io_write_bytes,
                            })
                        })
                        .collect();
                    let vm = serde_json::json!({
                        "uptime_ms": stats.vm.uptime.as_millis() as u64, "memory_bytes": stats.vm.memory_bytes,
                        "memory_resident_bytes": stats.vm.memory_resident_bytes, "vcpu_exits": stats.vm.vcpu_exits,
                    });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({"vm": vm, "containers": containers}))?
                    );
                }
                Format::Table => {
                    let resident = stats.vm.memory_resident_bytes.map_or("-".into(), human);
                    println!(
                        "VM: up {:.1} s, memory {}, resident on the host {resident}",
                        stats.vm.uptime.as_secs_f64(),
                        human(stats.vm.memory_bytes)
                    );
                    println!("{:<24} {:>12} {:>12} {:>12} {:>6}", "CONTAINER", "CPU", "MEMORY", "LIMIT", "PIDS");
                    for (container, s) in stats.containers {
                        let limit = if s.memory_limit == 0 { "none".into() } else { human(s.memory_limit) };
                        let cpu = format!("{:.2} s", s.cpu_usage_usec as f64 / 1e6);
                        println!(
                            "{container:<24} {cpu:>12} {:>12} {limit:>12} {:>6}",
                            human(s.memory_usage),
                            s.pids_current
                        );
                    }
                }
            }
        }
        Op::Update { cpus, memory, pids } => {
            use runtime_api::Limit;
            let mut resources = runtime_api::Resources::default();
            if let Some(cpus) = cpus {
                if !(cpus > 0.0 && cpus <= 1024.0) {
                    bail!("--cpus {cpus} is not between 0 and 1024");
                }
                resources.cpu_quota_us = Some(Limit::Value(((cpus * 100_000.0) as u64, 100_000)));
            }
            resources.memory_bytes = memory.map(|m| if m == 0 { Limit::Max } else { Limit::Value(m << 20) });
            resources.pids = pids.map(|p| if p == 0 { Limit::Max } else { Limit::Value(p) });
            if resources.is_empty() {
                bail!("nothing to update: give --cpus, --memory or --pids");
            }
            Sandbox::fetch(store, id)?.update_container(id, resources)?;
        }
        Op::Kill { signal, all } => Sandbox::fetch(store, id)?.kill_container(id, signal, all)?,
        Op::Exec { command, interactive, tty } => {
            let mut sandbox = Sandbox::fetch(store, id)?;
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let mut process = ProcessConfig::new(&args);
            process.stdin = interactive;
            process.terminal = tty;
            process.console_size = if tty { crate::terminal::window_size() } else { None };
            let (exec_id, io) = sandbox.enter_container(id, &process)?;
            let raw = if tty { crate::terminal::RawMode::enter() } else { None };
            let foreground = crate::terminal::Foreground::attach(store, id, id, &exec_id, io, tty)?;
            let status = sandbox.wait_process(id, &exec_id, None);
            foreground.finish();
            drop(raw);
            return Ok(ExitCode::from(u8::try_from(status?).unwrap_or(255)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A sandbox's state as `list` shows it: "dead" when the process that
/// owned a live one is gone.
fn shown_state(s: &runtime_api::sandbox::SandboxSummary) -> String {
    if s.owner_alive || s.status.phase == SandboxPhase::Stopped {
        s.status.phase.to_string()
    } else {
        "dead".into()
    }
}

/// How long ago `unix_ms` was, as people say it ("5s ago", "3m ago").
fn created_ago(unix_ms: u64) -> String {
    let now = runtime_api::state::now_unix_ms();
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `vessel list`: every sandbox, dead ones marked.
pub(crate) fn list(store: &Store, json: bool) -> anyhow::Result<ExitCode> {
    // One sandbox whose state cannot be read is listed as such, with the
    // reason; it hides none of the others.
    let mut all = Vec::new();
    for id in store.ids()? {
        match Sandbox::summary(store, &id) {
            Ok(summary) => all.push(Ok(summary)),
            // Being created, or deleted, as we look.
            Err(runtime_api::SandboxError::State(runtime_api::state::StateError::NotFound(_))) => {}
            Err(e) => all.push(Err((id, runtime_api::error_chain(&e).replace('\n', " ")))),
        }
    }
    if json {
        let items: Vec<serde_json::Value> = all
            .iter()
            .map(|s| match s {
                Ok(s) => serde_json::json!({
                    "id": s.status.id,
                    "state": shown_state(s),
                    "hypervisor": s.status.hypervisor.name(),
                    "containers": s.status.containers.len(),
                    "created_unix_ms": s.status.created_unix_ms,
                }),
                Err((id, error)) => serde_json::json!({ "id": id, "state": "unreadable", "error": error }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        println!("{:<32} {:<10} {:<10} {:<10} CREATED", "ID", "STATE", "HYPERVISOR", "CONTAINERS");
        for s in &all {
            match s {
                Ok(s) => println!(
                    "{:<32} {:<10} {:<10} {:<10} {}",
                    s.status.id,
                    shown_state(s),
                    s.status.hypervisor.name(),
                    s.status.containers.len(),
                    created_ago(s.status.created_unix_ms)
                ),
                Err((id, error)) => println!("{id:<32} unreadable ({error})"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The annotation that marks a sandbox of `vessel run`: once its process
/// is gone, a sandbox it did not stop is swept.
const RUN_ANNOTATION: &str = "vessel.cli/run";

/// Removes what dead `vessel run` processes left (their sandboxes; their
/// QEMU died with them) and scratch directories of sandboxes that do not
/// exist.
fn sweep(store: &Store) {
    let Ok(all) = Sandbox::list(store) else { return };
    for s in all.iter().filter(|s| !s.owner_alive) {
        // A run's sandbox whose process died before it was stopped, or
        // before an `--rm` could delete it.
        let stopped = s.status.phase == SandboxPhase::Stopped;
        let left = store
            .load(&s.status.id)
            .is_ok_and(|state| state.config.annotations.get(RUN_ANNOTATION).is_some_and(|how| !stopped || how == "rm"));
        if left {
            match Sandbox::delete_by_id(store, &s.status.id, true) {
                Ok(()) => tracing::info!(id = %s.status.id, "swept the sandbox of a dead vessel run"),
                Err(e) => tracing::warn!(id = %s.status.id, error = %e, "cannot sweep a dead vessel run's sandbox"),
            }
        }
    }
    let Ok(scratches) = std::fs::read_dir(store.root().join(".scratch")) else { return };
    for entry in scratches.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        // A scratch directory being made by a create or run right now has
        // its owner's lock file soon; one a minute old without a sandbox
        // is left over.
        let old =
            entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 60));
        if old && store.dir(&id).is_ok_and(|d| !d.exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `vessel run`: create, start, wait and stop in the foreground (and
/// delete, with `--rm`); the container's output is ours, and so is its
/// exit status.
pub(crate) fn run(
    store: &Store,
    args: &SandboxArgs,
    interactive: bool,
    tty: bool,
    remove: bool,
) -> anyhow::Result<ExitCode> {
    sweep(store);
    let from_template = args.factory && crate::factory::has_template(store);
    if args.factory && !from_template && (interactive || tty) {
        bail!("--factory takes no -i or -t: a cached VM's owner collects the container's output");
    }
    let id = args.id.clone().unwrap_or_else(fresh_id);
    let scratch = scratch(store, &id);
    make_private_dir(&scratch)?;
    let outcome = (|| {
        let root = container_root(&args.rootfs, &scratch, can_share() && !args.factory)?;
        let mut config = sandbox_config(args, &id, root)?;
        // A foreground run makes no containers later: a shared directory
        // only if its own container needs one (create sees to that).
        config.shared_fs = false;
        config.annotations.insert(RUN_ANNOTATION.into(), if remove { "rm" } else { "keep" }.into());
        if args.factory && !from_template {
            if crate::factory::claim(store, &config)? {
                return run_claimed(store, &id, &scratch, remove);
            }
            tracing::info!(id, "no cached VM is ready; booting one cold");
        }
        config.containers[0].process.stdin = interactive;
        config.containers[0].process.terminal = tty;
        config.containers[0].process.console_size = if tty { crate::terminal::window_size() } else { None };
        // A template's VM is restored here, in the foreground process.
        let factory = if from_template { crate::factory::template(store)? } else { None };
        let mut sandbox = Sandbox::create(store, config, factory.as_ref())?;
        let io = sandbox.take_io(&id)?;
        let raw = if tty { crate::terminal::RawMode::enter() } else { None };
        let foreground = crate::terminal::Foreground::attach(store, &id, &id, "", io, tty)?;
        sandbox.start()?;
        let status = sandbox.wait_process(&id, "", None);
        foreground.finish();
        drop(raw);
        let status = status?;
        sandbox.stop(false)?;
        if remove {
            sandbox.delete()?;
        }
        anyhow::Ok(status)
    })();
    // Without --rm a stopped sandbox stays, with its packed root, until
    // `vessel delete`; a failed run leaves nothing either way.
    if remove || outcome.is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let status = outcome?;
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(255)))
}

/// The rest of `vessel run` for a sandbox a cached VM's owner made: start
/// it, copy its output log to our stdout as it grows, wait for its exit,
/// stop it through the owner (and delete it, with `remove`).
fn run_claimed(store: &Store, id: &str, scratch: &Path, remove: bool) -> anyhow::Result<i32> {
    use std::io::Read;
    let mut sandbox = Sandbox::fetch(store, id)?;
    sandbox.start()?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = output_log(scratch, id, id);
    let copier = {
        let done = done.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut file = std::fs::File::open(&log)?;
            let mut out = std::io::stdout();
            let mut buf = [0u8; 16 * 1024];
            // After the exit, until the log has not grown for a while (the
            // owner's collector may still be writing the last bytes).
            let mut quiet = 0;
            loop {
                let n = file.read(&mut buf)?;
                if n > 0 {
                    out.write_all(&buf[..n])?;
                    out.flush()?;
                    quiet = 0;
                    continue;
                }
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    quiet += 1;
                    if quiet > 10 {
                        return Ok(());
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let status = sandbox.wait_process(id, "", None);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let copied = copier.join();
    let status = status?;
    drop(sandbox);
    control(store, id, "stop")?;
    if remove {
        Sandbox::delete_by_id(store, id, false)?;
    }
    match copied {
        Ok(Ok(())) => Ok(status),
        Ok(Err(e)) => Err(anyhow::Error::from(e).context("copying the container's output")),
        Err(_) => bail!("the output copier panicked"),
    }
}

/// A signal by name (`TERM`, `SIGKILL`) or number.
pub(crate) fn parse_signal(text: &str) -> Result<u32, String> {
    if let Ok(n) = text.parse::<u32>() {
        return Ok(n);
    }
    let name = text.trim_start_matches("SIG");
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        _ => return Err(format!("unknown signal {text:?}")),
    };
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_loses_its_control_characters() {
        assert_eq!(shown("sleep 1000"), "sleep 1000");
        assert_eq!(shown("evil\x1b]0;owned\x07\nname"), "evil?]0;owned??name");
    }

    #[test]
    fn volumes_are_disk_images_at_absolute_paths() {
        let dir = std::env::temp_dir().join(format!("vessel-volume-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("data.img");
        std::fs::write(&image, b"").unwrap();
        let spec = |s: &str| format!("{}{s}", image.display());
        let v = parse_volume(&spec(":/data:ro")).unwrap();
        assert_eq!(v, Volume { host: image.canonicalize().unwrap(), guest: "/data".into(), read_only: true });
        assert!(!parse_volume(&spec(":/data")).unwrap().read_only);
        assert!(!parse_volume(&spec(":/data:rw")).unwrap().read_only);
        // A directory is shared live, by its real path only.
        let real = dir.canonicalize().unwrap();
        let v = parse_volume(&format!("{}:/data", real.display())).unwrap();
        assert_eq!(v.host, real);
        std::os::unix::fs::symlink(&real, dir.join("link")).unwrap();
        for (bad, why) in [
            (spec(""), "not HOST:GUEST"),
            (spec(":data"), "absolute path"),
            (spec(":/data/../etc"), "'..' in its guest path"),
            (
                format!("{}/../{}:/data", real.display(), real.file_name().unwrap().to_string_lossy()),
                "'..' in its host",
            ),
            (format!("{}:/data", real.join("link").display()), "symlink"),
            ("/no/such/file:/data".into(), "host side"),
            ("/dev/null:/data".into(), "neither a directory"),
        ] {
            let err = format!("{:#}", parse_volume(&bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(64 << 20), "64.0 MiB");
    }
}
