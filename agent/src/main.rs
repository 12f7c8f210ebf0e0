//! `vessel-agent`: as PID 1 in a guest, the sandbox agent; on the host,
//! `vessel-agent --listen PATH --host-prefix PREFIX` runs the same
//! container logic behind a Unix socket.

use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::cgroup::CgroupRoot;
use agent::container::{Config, Containers};
use agent::link::HostLink;
use agent::reaper::Reaper;
use agent::service::Service;
use agent::{guest, launch};
use agent_proto::link::{ready_line, DEFAULT_PORT, HOST_CID};

const USAGE: &str = "usage: vessel-agent (as a guest's PID 1, no arguments)
       vessel-agent --listen PATH --host-prefix PREFIX [--port N] [--cgroup-root DIR] [--run-dir DIR]";

fn log(message: &str) {
    let _ = writeln!(std::io::stderr(), "vessel-agent: {message}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(launch::LAUNCH_ARG) {
        launch::helper_main();
    }
    // SAFETY: getpid takes no arguments.
    if unsafe { libc::getpid() } == 1 {
        guest_main();
    }
    match host_main(&args) {
        Ok(()) => {}
        Err(e) => {
            log(&e);
            std::process::exit(2);
        }
    }
}

fn serve(listener: OwnedFd, service: Service) -> Result<agent_proto::ttrpc::Server, String> {
    let service = agent_proto::agent_ttrpc::create_agent(Arc::new(service));
    // ttrpc takes a raw descriptor and never closes it: it becomes the
    // server's only once the server runs, and is closed here (by
    // `listener`'s drop) if it does not, so that a retry can bind again.
    let mut server = agent_proto::ttrpc::Server::new()
        .add_listener(listener.as_raw_fd())
        .map_err(|e| format!("ttrpc listener: {e}"))?
        .register_service(service)
        // WaitProcess blocks a thread per waiting process, up to
        // MAX_BLOCKED_WAITS of them.
        .set_thread_count_max(agent::service::THREADS);
    server.start().map_err(|e| format!("starting the ttrpc server: {e}"))?;
    let _ = listener.into_raw_fd();
    Ok(server)
}

/// Dials the host and says the agent is ready, retrying while the host's
/// side is not there yet: quickly at first, then once a second, for as
/// long as `patience` allows (None: for ever, as a guest's PID 1 has
/// nothing better to do). Returns the connection, which stays open.
fn announce(link: &HostLink, port: u32, patience: Option<Duration>) -> Result<std::fs::File, String> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    let mut told = false;
    loop {
        let last = match link.dial(port) {
            Ok(fd) => {
                let mut stream = std::fs::File::from(fd);
                return stream
                    .write_all(ready_line(env!("CARGO_PKG_VERSION")).as_bytes())
                    .map(|()| stream)
                    .map_err(|e| format!("writing the ready line: {e}"));
            }
            Err(e) => e.to_string(),
        };
        if patience.is_some_and(|p| start.elapsed() > p) {
            return Err(format!("could not reach the host: {last}"));
        }
        if !told && start.elapsed() > Duration::from_secs(5) {
            log(&format!("still trying to reach the host: {last}"));
            told = true;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// The shortest and longest waits between two announcements when links
/// keep ending soon after they are made.
const RELINK_MIN: Duration = Duration::from_millis(20);
const RELINK_MAX: Duration = Duration::from_secs(2);
/// A link that lasted this long ended for a new reason: dial again at once.
const RELINK_RESET: Duration = Duration::from_secs(10);

/// Waits until the link `stream` ends; says how. The host sends nothing
/// on it: it holds it open for as long as it holds the VM.
fn link_end(mut stream: std::fs::File) -> String {
    let mut buf = [0u8; 64];
    loop {
        match std::io::Read::read(&mut stream, &mut buf) {
            Ok(0) => return "the host closed it".into(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return e.to_string(),
        }
    }
}

/// Holds the link to the host for as long as the guest runs: announces
/// the agent, waits until the connection ends, and announces it again.
/// A VM restored from a snapshot has its vsock transport reset (every
/// connection ends with ECONNRESET) and a new host on the other side; the
/// agent's dialing again is how that host learns the agent is there. The
/// ttrpc listener is untouched: the host connects to it anew. Links that
/// keep ending at once are redialed after a wait that doubles from
/// [`RELINK_MIN`] up to [`RELINK_MAX`].
fn hold_link(link: &HostLink, port: u32, on_first: impl FnOnce()) -> ! {
    let mut on_first = Some(on_first);
    let mut wait = RELINK_MIN;
    loop {
        let stream = match announce(link, port, None) {
            Ok(stream) => stream,
            Err(e) => {
                log(&e);
                std::thread::sleep(RELINK_MAX);
                continue;
            }
        };
        if let Some(f) = on_first.take() {
            f();
        }
        let since = Instant::now();
        let how = link_end(stream);
        if since.elapsed() > RELINK_RESET {
            wait = RELINK_MIN;
        }
        log(&format!("the link to the host ended ({how}); dialing again"));
        std::thread::sleep(wait);
        wait = (wait * 2).min(RELINK_MAX);
    }
}

fn guest_main() -> ! {
    let mut ok = true;
    let mut step = |what: &str, r: Result<String, guest::GuestError>| match r {
        Ok(detail) if detail.is_empty() => {}
        Ok(detail) => log(&format!("{what}: {detail}")),
        Err(e) => {
            ok = false;
            log(&format!("{what} failed: {}", agent::container::error_chain(&e)));
        }
    };
    step("leaving the initramfs", guest::leave_initramfs().map(|()| String::new()));
    step("mounts", guest::mount_filesystems().map(|()| String::new()));
    step("modules", guest::load_modules().map(|m| format!("loaded {}", m.len())));
    step("entropy", guest::seed_entropy().map(|n| format!("{n} bytes from /dev/hwrng")));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let port = match guest::cmdline_port(&cmdline) {
        Ok(p) => p.unwrap_or(DEFAULT_PORT),
        Err(e) => {
            log(&format!("{e}; using port {DEFAULT_PORT}"));
            DEFAULT_PORT
        }
    };
    let reaper = Reaper::start();
    let cgroups = match CgroupRoot::new(std::path::Path::new(guest::CGROUP_DIR)) {
        Ok(root) => Some(root),
        Err(e) => {
            log(&format!("no container cgroups: {}", agent::container::error_chain(&e)));
            None
        }
    };
    let link = HostLink::Vsock { cid: HOST_CID };
    // Not current_exe(): after leaving the initramfs it names a deleted file;
    // /proc/self/exe still execs it.
    let self_exe = PathBuf::from("/proc/self/exe");
    let config = Config { link: link.clone(), cgroups, run_dir: PathBuf::from("/run/vessel"), self_exe };
    let containers = Arc::new(Containers::new(config, reaper));
    // Listen first, then tell the host: it connects only once told.
    let _server = loop {
        let served = agent::link::vsock_listen(port).and_then(|fd| {
            let service = Service {
                containers: containers.clone(),
                guest: true,
                ready_after_boot_ms: guest::uptime_ms(),
                blocked_waits: Default::default(),
            };
            serve(fd, service).map_err(std::io::Error::other)
        });
        match served {
            Ok(server) => break server,
            Err(e) => {
                log(&format!("cannot serve on vsock port {port}: {e}; retrying"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    hold_link(&link, port, || {
        log(&format!("ready after {} ms{}", guest::uptime_ms(), if ok { "" } else { " (with errors above)" }))
    })
}

fn host_main(args: &[String]) -> Result<(), String> {
    let mut listen = None;
    let mut prefix = None;
    let mut port = DEFAULT_PORT;
    let mut cgroup_root = None;
    let mut run_dir = std::env::temp_dir().join(format!("vessel-agent-{}", std::process::id()));
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--listen" => listen = Some(PathBuf::from(value()?)),
            "--host-prefix" => prefix = Some(PathBuf::from(value()?)),
            "--port" => {
                let v = value()?;
                port = v.parse().map_err(|_| format!("--port {v:?} is not a port number"))?;
            }
            "--cgroup-root" => cgroup_root = Some(PathBuf::from(value()?)),
            "--run-dir" => run_dir = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let (Some(listen), Some(prefix)) = (listen, prefix) else {
        return Err(format!("not PID 1, so --listen and --host-prefix are needed\n{USAGE}"));
    };
    let cgroups =
        cgroup_root.map(|dir| CgroupRoot::new(&dir)).transpose().map_err(|e| agent::container::error_chain(&e))?;
    let reaper = Reaper::start();
    let link = HostLink::Unix { prefix };
    let self_exe = std::env::current_exe().map_err(|e| format!("finding our own binary: {e}"))?;
    let containers = Arc::new(Containers::new(Config { link: link.clone(), cgroups, run_dir, self_exe }, reaper));
    let listener = UnixListener::bind(&listen).map_err(|e| format!("listening on {}: {e}", listen.display()))?;
    let service = Service { containers, guest: false, ready_after_boot_ms: 0, blocked_waits: Default::default() };
    let _server = serve(OwnedFd::from(listener), service)?;
    // On the host the announcement is made once; its connection is kept.
    let _link = announce(&link, port, Some(Duration::from_secs(30)))?;
    loop {
        std::thread::park();
    }
}
