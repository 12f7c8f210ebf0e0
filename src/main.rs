//! The `vessel` command line.

mod bench;
mod bench_blk;
mod bench_factory;
mod bench_fs;
mod bench_sandbox;
mod factory;
mod lifecycle;
mod sandbox;
mod serve;
mod startup;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::VsockConfig;
use vmm::{BootSourceConfig, ConsoleOutput, DeviceConfig, ExitReason, MachineConfig, PrebootAction, Vmm};

#[derive(Parser, Debug)]
#[command(name = "vessel", version, about = "Containers in KVM microVMs: a VMM and a sandbox runtime in one binary")]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// The options every command takes.
#[derive(Args, Debug)]
struct GlobalArgs {
    /// Where sandboxes keep their state, lock, sockets and logs (default:
    /// /run/vessel for root, $TMPDIR/vessel-UID for others).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// What to log to stderr: error, warn, info, debug or trace, or
    /// per-crate directives as RUST_LOG takes them (default: RUST_LOG, else
    /// warn).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log lines as text, or as JSON objects for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `vessel vm ...`, parsed on its own (see [`parse`]).
#[derive(Parser, Debug)]
#[command(name = "vessel vm", bin_name = "vessel vm", about = "Boot or restore a VM in the foreground")]
struct VmCli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: VmCommand,
}

/// Parses the command line. `vessel vm ...` starts a VM, where a tenth of
/// a millisecond shows in the launch time: it is parsed by the `vm`
/// subcommand's own parser, a small part of the whole command line's,
/// which takes about 0.3 ms to build here. Any other command line
/// (`vessel --log-level debug vm ...` too) goes through the whole one.
fn parse() -> Cli {
    if std::env::args_os().nth(1).is_some_and(|first| first == "vm") {
        let vm = VmCli::parse_from(std::env::args_os().skip(1));
        return Cli { global: vm.global, command: Command::Vm(vm.command) };
    }
    Cli::parse()
}

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line of text an event.
    Text,
    /// One JSON object an event.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run virtual machines directly.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Benchmarks (they print figures; they are not tests).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build guest images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Serve a device backend to another VMM, or hot-plug one into a sandbox.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Run containers in sandbox VMs.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Run a command in a container in a fresh sandbox, in the foreground:
    /// its output and exit status are ours; the sandbox goes when it ends.
    Run {
        /// Give the container our stdin.
        #[arg(short, long)]
        interactive: bool,
        /// Give the container a terminal (ours in raw mode meanwhile,
        /// window-size changes forwarded).
        #[arg(short, long)]
        tty: bool,
        /// Delete the sandbox when the container exits (without it, the
        /// stopped sandbox stays until `vessel delete`).
        #[arg(long)]
        rm: bool,
        #[command(flatten)]
        sandbox: lifecycle::SandboxArgs,
    },
    /// Create a sandbox with one container (not started), owned by a
    /// detached host process; prints its ID.
    Create(lifecycle::SandboxArgs),
    /// Start a created sandbox's container.
    Start { id: String },
    /// The sandbox's and its container's state and exit code.
    Status { id: String },
    /// The container's processes.
    Ps {
        id: String,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: lifecycle::Format,
    },
    /// The VM's and the container's figures.
    Stats {
        id: String,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: lifecycle::Format,
    },
    /// Change the container's limits.
    Update {
        id: String,
        /// CPUs' worth of time (cpu.max), e.g. 0.5.
        #[arg(long)]
        cpus: Option<f64>,
        /// Memory limit in MiB (0: none).
        #[arg(long)]
        memory: Option<u64>,
        /// Process limit (0: none).
        #[arg(long)]
        pids: Option<u64>,
    },
    /// Pause every vCPU of the sandbox.
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume { id: String },
    /// What the container wrote.
    Logs { id: String },
    /// Run a command in the sandbox's running container; its output and
    /// exit status are ours.
    Exec {
        /// Give the process our stdin.
        #[arg(short, long)]
        interactive: bool,
        /// Give the process a terminal.
        #[arg(short, long)]
        tty: bool,
        id: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Send a signal to the container's first process (default TERM).
    Kill {
        id: String,
        #[arg(value_parser = lifecycle::parse_signal, default_value = "TERM")]
        signal: u32,
        /// Signal every process in the container.
        #[arg(long)]
        all: bool,
    },
    /// Stop and delete a sandbox; --force also takes one whose owner died.
    Delete {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Every sandbox, dead ones marked.
    List {
        /// table or json.
        #[arg(long, default_value = "table")]
        format: lifecycle::Format,
    },
    /// More containers in a detached sandbox.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// A detached sandbox's network interfaces and routes.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// The owner process of a detached sandbox (started by `create`).
    #[command(name = "__own", hide = true)]
    Own {
        config: String,
        /// Restore the VM from the factory's template.
        #[arg(long)]
        template: bool,
    },
    /// The cache of booted, paused sandbox VMs that `create --factory` and
    /// `run --factory` take from.
    #[command(subcommand)]
    Factory(FactoryCommand),
    /// The owner process of a cached VM (started by `factory init`).
    #[command(name = "__cached", hide = true)]
    Cached,
    /// Write the bundled test guests (tiny kernels used by tests) to a directory.
    Guests {
        /// Directory to write them to (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum FactoryCommand {
    /// Boot N sandbox VMs and keep them paused, each held by a process of
    /// its own, until a create or run with --factory takes one; or make a
    /// VM template (builtin only) that each such create restores from.
    Init(factory::InitArgs),
    /// The template, or the cache and each cached VM: state, age, owner
    /// and VM PIDs.
    Status,
    /// End every cached VM (or remove the template) and remove what the
    /// factory keeps.
    Destroy,
}

#[derive(Subcommand, Debug)]
enum NetworkCommand {
    /// Add the veth INTERFACE of the network namespace NETNS (a CNI's
    /// result): a NIC is hot-plugged and takes its identity.
    Add {
        sandbox: String,
        /// The namespace's file (/var/run/netns/NAME).
        #[arg(long)]
        netns: PathBuf,
        /// The veth in it.
        #[arg(long, default_value = "eth0")]
        interface: String,
    },
    /// Remove an interface that `network add` added.
    Remove { sandbox: String, name: String },
    /// The guest's interfaces.
    List { sandbox: String },
    /// The guest's routes.
    Routes { sandbox: String },
}

#[derive(Subcommand, Debug)]
enum ContainerCommand {
    /// Create a container in a running sandbox (its root is hot-plugged).
    Create {
        sandbox: String,
        /// The container's ID.
        #[arg(long)]
        id: String,
        /// Its hostname.
        #[arg(long)]
        hostname: Option<String>,
        /// Mount the sandbox's ext4 disk with this serial (`vessel device
        /// add`) at PATH in the container (repeatable).
        #[arg(long, value_name = "SERIAL:PATH")]
        disk: Vec<String>,
        /// Its root: an ext4 image, a directory or an OCI image layout.
        rootfs: PathBuf,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Start a created container.
    Start { sandbox: String, container: String },
    /// Run a command in a running container.
    Exec {
        sandbox: String,
        container: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Send a signal to a container (default TERM).
    Kill {
        sandbox: String,
        container: String,
        #[arg(value_parser = lifecycle::parse_signal, default_value = "TERM")]
        signal: u32,
        /// Every process in the container.
        #[arg(long)]
        all: bool,
    },
    /// Delete a stopped container.
    Delete { sandbox: String, container: String },
    /// What a container wrote.
    Logs { sandbox: String, container: String },
    /// The sandbox's containers.
    List { sandbox: String },
}

#[derive(Subcommand, Debug)]
enum SandboxCommand {
    /// Run one command in a container in a fresh sandbox VM (QEMU TCG with
    /// our devices over vhost-user); its output is ours, and so is its
    /// exit status.
    Run(sandbox::RunArgs),
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Boot a kernel with the serial console on stdout; exit when the guest does.
    Boot(Box<BootArgs>),
    /// Resume a VM from a snapshot (`vm boot --snapshot`); exit when the
    /// guest does, as `vm boot`.
    Restore(RestoreArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct RestoreArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// The vsock device's host socket, instead of the one saved.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// Turn the seccomp filters off (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Print the VM's counters to stderr when it ends, as key=value lines.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// A container root filesystem: an ext4 image of a directory or of an
    /// OCI image layout (skopeo/umoci output).
    Rootfs {
        /// The directory, or OCI image layout, to pack.
        #[arg(long)]
        from: PathBuf,
        /// The image to write.
        #[arg(long)]
        out: PathBuf,
        /// Image size in MiB (default: the contents plus 25% and 16 MiB).
        #[arg(long)]
        size_mib: Option<u64>,
    },
    /// A demo root filesystem around the host's static busybox, as ext4.
    DemoRootfs {
        /// The image to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// A sandbox guest's boot files: DIR/kernel and DIR/initrd.img, an
    /// initramfs with the agent as /init and the kernel modules it loads.
    Build(BuildArgs),
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// Directory to write `kernel` and `initrd.img` to (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The kernel, a bzImage (default: the distribution's cloud kernel,
    /// fetched with apt-get and cached).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The modules directory of --kernel (its /lib/modules/RELEASE).
    #[arg(long, value_name = "DIR", requires = "kernel")]
    modules: Option<PathBuf>,
    /// The agent, a static x86_64 executable (default: vessel-agent next to
    /// this vessel binary).
    #[arg(long, value_name = "FILE")]
    agent: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Launch time and memory overhead, side by side with QEMU microvm.
    Launch(bench::BenchArgs),
    /// virtio-blk 4 KiB reads through the backend against host pread.
    Blk(bench_blk::BlkBenchArgs),
    /// A sandbox's cold start step by step, and an idle sandbox's host memory.
    Sandbox(bench_sandbox::SandboxBenchArgs),
    /// virtio-fs against ext4 images: a container's start with a large
    /// root, and reading a large file in the guest.
    Fs(bench_fs::FsBenchArgs),
    /// A cold boot against restores from a snapshot template: time to the
    /// guest's first output, clones per second, host memory per VM.
    Factory(bench_factory::FactoryBenchArgs),
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Hot-plug a block device file into a detached sandbox, and mount it
    /// at --path in a container that runs; containers created later can
    /// mount it too (`container create --disk SERIAL:PATH`).
    Add {
        sandbox: String,
        /// The disk image.
        #[arg(long)]
        block: PathBuf,
        /// The serial the guest sees (at most 20 bytes; default: the first
        /// free `vol-N`).
        #[arg(long)]
        serial: Option<String>,
        /// Attach and mount it read-only.
        #[arg(long)]
        read_only: bool,
        /// Mount it (ext4) at this path in the container.
        #[arg(long, value_name = "GUESTPATH")]
        path: Option<String>,
        /// The container to mount it in (default: the sandbox's own).
        #[arg(long, requires = "path")]
        container: Option<String>,
    },
    /// Serve a virtio device over vhost-user in the foreground, until the
    /// frontend disconnects or SIGTERM.
    #[command(subcommand)]
    Serve(serve::ServeCommand),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct BootArgs {
    /// Kernel image: ELF vmlinux (PVH entry used when present) or bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = vmm::config::DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Turn the seccomp filters off (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Reserve this many empty virtio-mmio slots for devices attached later.
    #[arg(long, default_value_t = 0)]
    pub hotplug_slots: u8,
    /// Give the guest a virtio-rng device.
    #[arg(long)]
    pub rng: bool,
    /// Give the guest a virtio-blk disk backed by this file (repeatable).
    #[arg(long)]
    pub disk: Vec<PathBuf>,
    /// Give the guest a read-only virtio-blk disk backed by this file (repeatable).
    #[arg(long)]
    pub ro_disk: Vec<PathBuf>,
    /// Open this disk (one of --disk or --ro-disk) with O_DIRECT, bypassing
    /// the host's page cache (repeatable).
    #[arg(long, value_name = "FILE")]
    pub direct: Vec<PathBuf>,
    /// Give the guest a network card on this TAP device (created if missing).
    #[arg(long)]
    pub tap: Option<String>,
    /// The guest's MAC address for --tap.
    #[arg(long, value_parser = serve::parse_mac, default_value = "52:54:00:12:34:56")]
    pub mac: [u8; 6],
    /// Give the guest a vsock device with this context ID (needs --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    pub vsock_cid: Option<u64>,
    /// The host side of the vsock device: a Unix socket path (see README).
    #[arg(long, requires = "vsock_cid")]
    pub vsock_uds: Option<PathBuf>,
    /// Print the VM's counters to stderr when it ends, as key=value lines.
    #[arg(long)]
    pub stats: bool,
    /// Pause the VM this many milliseconds after it starts, write a
    /// snapshot to --snapshot, and exit 0.
    #[arg(long, value_name = "MS", requires = "snapshot")]
    pub pause_after: Option<u64>,
    /// Where --pause-after writes the snapshot (a directory).
    #[arg(long, value_name = "DIR", requires = "pause_after")]
    pub snapshot: Option<PathBuf>,
}

/// Installs the one tracing subscriber: events to stderr, at the levels
/// `--log-level` or `RUST_LOG` names (`info`, `runtime_api=debug,warn`,
/// ...), warnings and errors only by default, as text or JSON. `log`
/// records from dependencies arrive too.
fn init_logging(level: Option<&str>, format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let spec = level.map(str::to_string).or_else(|| std::env::var("RUST_LOG").ok());
    let filter = match spec {
        Some(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("vessel: ignoring the log level {spec:?}: {e}");
            Targets::new().with_default(LevelFilter::WARN)
        }),
        None => Targets::new().with_default(LevelFilter::WARN),
    };
    // Colours only for a person at a terminal, not for a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
    let json =
        (format == LogFormat::Json).then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr));
    if let Err(e) = tracing_subscriber::registry().with(text).with(json).with(filter).try_init() {
        eprintln!("vessel: cannot install the log subscriber: {e}");
    }
}

fn main() -> ExitCode {
    let cli = parse();
    init_logging(cli.global.log_level.as_deref(), cli.global.log_format);
    let result = match cli.command {
        Command::Vm(VmCommand::Boot(args)) => boot(&args),
        Command::Vm(VmCommand::Restore(args)) => restore(&args),
        Command::Bench(BenchCommand::Launch(args)) => bench::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Blk(args)) => bench_blk::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Sandbox(args)) => bench_sandbox::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Fs(args)) => bench_fs::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Factory(args)) => bench_factory::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Device(DeviceCommand::Serve(cmd)) => serve::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Guests { out } => write_guests(&out).map(|()| ExitCode::SUCCESS),
        Command::Image(cmd) => image(cmd).map(|()| ExitCode::SUCCESS),
        Command::Sandbox(SandboxCommand::Run(args)) => sandbox::run(&store(&cli.global.root), &args),
        Command::Run { interactive, tty, rm, sandbox } => {
            lifecycle::run(&store(&cli.global.root), &sandbox, interactive, tty, rm)
        }
        Command::Create(args) => lifecycle::create(&store(&cli.global.root), &args),
        Command::Container(command) => {
            use lifecycle::ContainerOp as Op;
            let (sandbox, op) = match command {
                ContainerCommand::Create { sandbox, id, hostname, disk, rootfs, command } => {
                    (sandbox, Op::Create { container: id, hostname, disks: disk, rootfs, command })
                }
                ContainerCommand::Start { sandbox, container } => (sandbox, Op::Start { container }),
                ContainerCommand::Exec { sandbox, container, command } => (sandbox, Op::Exec { container, command }),
                ContainerCommand::Kill { sandbox, container, signal, all } => {
                    (sandbox, Op::Kill { container, signal, all })
                }
                ContainerCommand::Delete { sandbox, container } => (sandbox, Op::Delete { container }),
                ContainerCommand::Logs { sandbox, container } => (sandbox, Op::Logs { container }),
                ContainerCommand::List { sandbox } => (sandbox, Op::List),
            };
            lifecycle::container_op(&store(&cli.global.root), &sandbox, op)
        }
        Command::Network(command) => {
            use lifecycle::DeviceOp as Op;
            let (sandbox, op) = match command {
                NetworkCommand::Add { sandbox, netns, interface } => (sandbox, Op::AddInterface { netns, interface }),
                NetworkCommand::Remove { sandbox, name } => (sandbox, Op::RemoveInterface { name }),
                NetworkCommand::List { sandbox } => (sandbox, Op::ListInterfaces),
                NetworkCommand::Routes { sandbox } => (sandbox, Op::Routes),
            };
            lifecycle::device_op(&store(&cli.global.root), &sandbox, op)
        }
        Command::Device(DeviceCommand::Add { sandbox, block, serial, read_only, path, container }) => {
            let mount = path.map(|p| (container, p));
            let op = lifecycle::DeviceOp::AddDisk { file: block, serial, read_only, mount };
            lifecycle::device_op(&store(&cli.global.root), &sandbox, op)
        }
        Command::Own { config, template } => lifecycle::own(&store(&cli.global.root), &config, template),
        Command::List { format } => lifecycle::list(&store(&cli.global.root), format == lifecycle::Format::Json),
        Command::Start { id } => lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Start),
        Command::Status { id } => lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Status),
        Command::Ps { id, format } => lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Ps { format }),
        Command::Stats { id, format } => {
            lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Stats { format })
        }
        Command::Cached => factory::own_cached(&store(&cli.global.root)),
        Command::Factory(FactoryCommand::Init(args)) => factory::init(&store(&cli.global.root), &args),
        Command::Factory(FactoryCommand::Status) => factory::status(&store(&cli.global.root)),
        Command::Factory(FactoryCommand::Destroy) => factory::destroy(&store(&cli.global.root)),
        Command::Update { id, cpus, memory, pids } => {
            lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Update { cpus, memory, pids })
        }
        Command::Pause { id } => lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Pause),
        Command::Resume { id } => lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Resume),
        Command::Logs { id } => lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Logs),
        Command::Exec { interactive, tty, id, command } => {
            lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Exec { command, interactive, tty })
        }
        Command::Kill { id, signal, all } => {
            lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Kill { signal, all })
        }
        Command::Delete { id, force } => {
            lifecycle::run_op(&store(&cli.global.root), &id, lifecycle::Op::Delete { force })
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("vessel: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// The sandbox store: `--root`, or the default for this user.
fn store(root: &Option<PathBuf>) -> runtime_api::Store {
    match root {
        Some(root) => runtime_api::Store::new(root),
        None => sandbox::default_store(),
    }
}

fn image(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Rootfs { from, out, size_mib } => {
            let size = size_mib.map(|m| m << 20);
            if resources::oci::is_layout(&from) {
                // An OCI image layout: its layers, unpacked, are the rootfs.
                resources::oci::build_image(&from, &out, size, &std::env::temp_dir())?;
            } else {
                resources::rootfs::build_ext4(&from, &out, size)?;
            }
            println!("{}", out.display());
        }
        ImageCommand::DemoRootfs { out } => {
            resources::rootfs::demo_rootfs(&out)?;
            println!("{}", out.display());
        }
        ImageCommand::Build(args) => {
            for line in image_build(&args)? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// `vessel image build`: progress on stderr, the written files on stdout.
fn image_build(args: &BuildArgs) -> anyhow::Result<Vec<String>> {
    use resources::{guest_image, kernel};

    // The agent first: a wrong one fails before any download.
    let agent_path = match &args.agent {
        Some(path) => path.clone(),
        None => default_agent()?,
    };
    let agent = guest_image::read_agent(&agent_path)?;
    eprintln!("vessel: [1/4] agent {} ({} bytes)", agent_path.display(), agent.len());

    let kernel = match &args.kernel {
        Some(image) => kernel::Kernel::from_files(image, args.modules.as_deref())?,
        None => {
            let cache = resources::cache::dir()?;
            eprintln!(
                "vessel: [2/4] kernel {}: fetching the package with apt-get unless cached in {}",
                kernel::DEBIAN_CLOUD_KERNEL,
                cache.join("kernels").display()
            );
            kernel::distro_kernel(&cache, kernel::DEBIAN_CLOUD_KERNEL)?
        }
    };
    let from = kernel.package.as_ref().map(|p| format!(" from {} {}", p.name, p.version)).unwrap_or_default();
    let release = kernel.release.as_deref().unwrap_or("release unknown");
    eprintln!("vessel: [2/4] kernel {} ({release}{from})", kernel.image.display());

    eprintln!("vessel: [3/4] collecting the kernel modules: {}", guest_image::AGENT_MODULES.join(", "));
    let modules = guest_image::agent_modules(&kernel)?;
    let load = guest_image::modules_load(&modules);
    let built_in = if modules.builtin.is_empty() { "none".to_string() } else { modules.builtin.join(", ") };
    eprintln!("vessel: [3/4] modules to load: {}; built in: {built_in}", load.lines().collect::<Vec<_>>().join(" "));

    eprintln!("vessel: [4/4] writing the image");
    let initrd = guest_image::build_agent_initramfs(agent, &modules)?.to_bytes();
    let written = guest_image::write_guest_image(&args.out, &kernel.image, &initrd)?;
    let mut lines = Vec::new();
    for path in [&written.kernel, &written.initrd] {
        let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        lines.push(format!("{} {size} bytes", path.display()));
    }
    Ok(lines)
}

/// The guest image a sandbox boots: `explicit` as given, or the one in
/// the cache directory, built there on first use (and again when the
/// agent next to this vessel is newer than it), with progress on stderr.
pub(crate) fn guest_image(explicit: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let dir = resources::cache::dir()?.join("guest-image");
    let initrd = dir.join(resources::guest_image::INITRD_FILE);
    let kernel = dir.join(resources::guest_image::KERNEL_FILE);
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let agent = default_agent()?;
    let fresh = kernel.is_file() && modified(&initrd).is_some_and(|built| modified(&agent).is_some_and(|a| a <= built));
    if !fresh {
        eprintln!("vessel: building the guest image in {} (once)", dir.display());
        let args = BuildArgs { out: dir.clone(), kernel: None, modules: None, agent: Some(agent) };
        image_build(&args)?;
    }
    Ok(dir)
}

/// `vessel-agent` next to the running vessel binary, where cargo builds it.
fn default_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot tell where the vessel binary is")?;
    let agent = exe.with_file_name("vessel-agent");
    anyhow::ensure!(
        agent.is_file(),
        "no agent at {}: build it with `cargo build -p agent` (it lands next to vessel), or pass --agent FILE",
        agent.display()
    );
    Ok(agent)
}

fn write_guests(out: &std::path::Path) -> anyhow::Result<()> {
    for path in guests::write_all(out).with_context(|| format!("cannot write guests to {}", out.display()))? {
        println!("{}", path.display());
    }
    Ok(())
}

fn boot(args: &BootArgs) -> anyhow::Result<ExitCode> {
    let mut vmm = Vmm::new();
    vmm.handle(PrebootAction::ConfigureMachine(MachineConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        seccomp: !args.no_seccomp,
        hotplug_slots: args.hotplug_slots,
    }))?;
    vmm.handle(PrebootAction::ConfigureBootSource(BootSourceConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
    }))?;
    // Devices in slot order: the rng, the disks as given, the network card, vsock.
    if args.rng {
        vmm.handle(PrebootAction::AddDevice(DeviceConfig::Rng))?;
    }
    let disks = args.disk.iter().map(|p| (p, false)).chain(args.ro_disk.iter().map(|p| (p, true)));
    if let Some(stray) = args.direct.iter().find(|d| !args.disk.contains(d) && !args.ro_disk.contains(d)) {
        anyhow::bail!("--direct {} names no disk: give it as --disk or --ro-disk too", stray.display());
    }
    for (path, read_only) in disks {
        let config = BlockConfig { path: path.clone(), read_only, id: None, direct: args.direct.contains(path) };
        vmm.handle(PrebootAction::AddDevice(DeviceConfig::Block(config)))?;
    }
    if let Some(tap) = args.tap.clone() {
        vmm.handle(PrebootAction::AddDevice(DeviceConfig::Net(NetConfig { tap, mac: args.mac })))?;
    }
    if let (Some(guest_cid), Some(uds_path)) = (args.vsock_cid, args.vsock_uds.clone()) {
        vmm.handle(PrebootAction::AddDevice(DeviceConfig::Vsock(VsockConfig { guest_cid, uds_path })))?;
    }
    let console = args.console.clone().map_or(ConsoleOutput::Stdout, ConsoleOutput::File);
    vmm.handle(PrebootAction::ConfigureConsole(console))?;
    let handle = vmm.start()?;
    startup::drop_startup_pages();
    if !args.no_seccomp {
        vmm::seccomp::install(vmm::seccomp::ThreadKind::Control)?;
    }
    if let (Some(ms), Some(dir)) = (args.pause_after, &args.snapshot) {
        return snapshot_after(handle, std::time::Duration::from_millis(ms), dir);
    }
    report_end(handle, args.stats)
}

/// Lets the VM run for `after`, pauses it, writes its snapshot to `dir`
/// and stops it. A guest that ends before is an error: there is nothing
/// to snapshot.
fn snapshot_after(
    mut handle: vmm::VmmHandle,
    after: std::time::Duration,
    dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    std::thread::sleep(after);
    if let Some(reason) = handle.try_wait() {
        anyhow::bail!("the guest ended ({reason:?}) before the snapshot was due");
    }
    handle.request(vmm::VmmAction::Pause).context("cannot pause the VM")?;
    handle.request(vmm::VmmAction::Snapshot(dir.to_path_buf())).context("cannot snapshot the VM")?;
    eprintln!("vessel: snapshot of the VM after {} ms written to {}", after.as_millis(), dir.display());
    Ok(ExitCode::SUCCESS)
}

fn restore(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let config = vmm::snapshot::RestoreConfig {
        console: args.console.clone().map_or(ConsoleOutput::Stdout, ConsoleOutput::File),
        vsock_uds: args.vsock_uds.clone(),
        seccomp: !args.no_seccomp,
        paused: false,
    };
    let handle = vmm::snapshot::restore(&args.dir, config)?;
    startup::drop_startup_pages();
    if !args.no_seccomp {
        vmm::seccomp::install(vmm::seccomp::ThreadKind::Control)?;
    }
    report_end(handle, args.stats)
}

/// Waits for the VM's end, says how it ended and, with `stats`, prints
/// its final counters. Exit status: failure when the VM failed.
fn report_end(handle: vmm::VmmHandle, print: bool) -> anyhow::Result<ExitCode> {
    let counters = handle.counters();
    let reason = handle.wait();
    let stats = counters.snapshot();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let boot_time = stats.boot_time.map_or_else(|| "not reached".to_string(), |d| format!("{:.3} ms", ms(d)));
    let how = match &reason {
        ExitReason::Reset => "reset the machine".to_string(),
        ExitReason::Shutdown => "shut down".to_string(),
        ExitReason::Stopped => "was stopped".to_string(),
        // The whole chain, printed once here at the edge.
        ExitReason::Error(e) => format!("failed: {:#}", anyhow::Error::new(e.clone())),
    };
    eprintln!(
        "vessel: guest {how} after {:.3} ms; boot timer: {boot_time}; {} serial bytes",
        ms(stats.uptime),
        stats.serial_tx_bytes
    );
    if print {
        print_stats(&stats);
    }
    Ok(if matches!(reason, ExitReason::Error(_)) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn print_stats(stats: &vmm::VmStats) {
    let max_rss = peak_rss_bytes();
    eprintln!("uptime_us={}", stats.uptime.as_micros());
    if let Some(b) = stats.boot_time {
        eprintln!("boot_time_us={}", b.as_micros());
    }
    if let Some(f) = stats.first_output {
        eprintln!("first_output_us={}", f.as_micros());
    }
    eprintln!("serial_tx_bytes={}", stats.serial_tx_bytes);
    eprintln!("mem_size={}", stats.mem_size);
    eprintln!("mem_resident={}", stats.mem_resident);
    eprintln!("peak_rss={max_rss}");
    eprintln!("vmm_overhead={}", max_rss.saturating_sub(stats.mem_resident));

    for d in &stats.devices {
        let counters: Vec<String> = d.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!("device {}: {}", d.name, counters.join(" "));
    }
    for (i, v) in stats.vcpus.iter().enumerate() {
        eprintln!(
            "vcpu{i}_exits io_in={} io_out={} mmio_read={} mmio_write={} hlt={} shutdown={} interrupted={} other={}",
            v.io_in, v.io_out, v.mmio_read, v.mmio_write, v.hlt, v.shutdown, v.interrupted, v.other
        );
    }
}

/// Peak resident set size of this process (getrusage; no file access, so
/// it works under the control thread's seccomp filter).
pub(crate) fn peak_rss_bytes() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes only into the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: zero-initialised and filled by a successful getrusage.
    let usage = unsafe { usage.assume_init() };
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}
