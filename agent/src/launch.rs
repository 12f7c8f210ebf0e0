//! Launching a container process.
//!
//! The agent is multi-threaded (its ttrpc server), and `unshare`/`setns`
//! of a mount namespace, `pivot_root` and most of what happens between
//! `fork` and `exec` are unsafe there. So the agent re-executes itself as
//! a single-threaded helper, `vessel-agent __launch`, with:
//! - fd 0, 1, 2: the process's stdio (pipes, a terminal, or /dev/null);
//! - fd 3: a pipe carrying the [`Launch`] as JSON, read to its end;
//! - fd 4: the sync socket (a stream socketpair) to the agent;
//! - fd 5, for an exec: a pidfd of the container's first process, whose
//!   namespaces it joins (never looked up by PID, which can be reused).
//!
//! The helper enters or creates the namespaces, then forks the process
//! (which, for a new PID namespace, becomes its PID 1) and reports on the
//! sync socket, one line each:
//! 1. helper: `pid <pid>` (the process as the agent sees it), or `error <why>`;
//! 2. process, once set up (mounts, `pivot_root`, user, cwd...): `ready`
//!    or `error <why>`;
//! 3. the agent writes one byte to let the process `exec`; the socket is
//!    close-on-exec, so a successful exec reads as end-of-file and a
//!    failed one as `error <why>`.
//!
//! The helper then waits for the process and exits with its exit code, or
//! 128 + the signal that killed it, which is what the agent reports.

use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::caps::{self, CapSets};
use crate::seccomp::Filter;

/// The helper's argument (argv[1]).
pub const LAUNCH_ARG: &str = "__launch";
/// The fd the [`Launch`] arrives on.
pub const CONFIG_FD: i32 = 3;
/// The fd of the sync socket.
pub const SYNC_FD: i32 = 4;
/// For an exec: the fd of a pidfd of the container's first process.
pub const PIDFD_FD: i32 = 5;

/// `PATH` when the process's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the helper is asked to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    /// A container's first process, or a process joining it.
    pub kind: Kind,
    /// The process itself.
    pub process: ProcessConfig,
}

/// Which kind of process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Kind {
    /// The container's first process: new namespaces and its root.
    Init(InitConfig),
    /// A process entering the namespaces of the first process, `init_pid`
    /// (named in messages; the pidfd on [`PIDFD_FD`] is what is joined).
    Exec {
        /// The container's first process, as the agent sees it.
        init_pid: i32,
    },
}

/// A namespace kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Namespace {
    /// Mounts.
    Mount,
    /// PIDs.
    Pid,
    /// Hostname.
    Uts,
    /// System V IPC and POSIX message queues.
    Ipc,
    /// Network.
    Net,
    /// The cgroup root.
    Cgroup,
}

impl Namespace {
    fn clone_flag(self) -> libc::c_int {
        match self {
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Net => libc::CLONE_NEWNET,
            Namespace::Cgroup => libc::CLONE_NEWCGROUP,
        }
    }

    /// The name under `/proc/<pid>/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            Namespace::Mount => "mnt",
            Namespace::Pid => "pid",
            Namespace::Uts => "uts",
            Namespace::Ipc => "ipc",
            Namespace::Net => "net",
            Namespace::Cgroup => "cgroup",
        }
    }
}

/// The first process's namespaces and filesystem.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitConfig {
    /// The container's root directory, as the agent sees it.
    pub rootfs: PathBuf,
    /// Namespaces created for the container.
    pub new_namespaces: Vec<Namespace>,
    /// Existing namespaces the container joins (the spec gave a path).
    pub join_namespaces: Vec<(Namespace, PathBuf)>,
    /// Mounts, in order, relative to the root.
    pub mounts: Vec<MountConfig>,
    /// Default device nodes to bind from the agent's /dev when the
    /// container's /dev is a fresh tmpfs.
    pub default_devices: bool,
    /// The hostname (needs a new UTS namespace).
    pub hostname: Option<String>,
    /// Paths hidden from the container.
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
    /// Remount the root read-only.
    pub root_readonly: bool,
}

/// One mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountConfig {
    /// An absolute path inside the container, without `..`.
    pub destination: PathBuf,
    /// The filesystem type; empty for a bind mount.
    pub fstype: String,
    /// The source (a device, a path for a bind mount, or a name).
    pub source: PathBuf,
    /// `MS_*` flags.
    pub flags: u64,
    /// Filesystem-specific options (`mode=755,size=65536k`).
    pub data: String,
}

/// How the process runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessConfig {
    /// argv; never empty.
    pub args: Vec<String>,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// The working directory inside the container.
    pub cwd: PathBuf,
    /// User ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// The file mode creation mask.
    pub umask: Option<u32>,
    /// `(RLIMIT_* number, soft, hard)`.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// The process has a terminal (its stdio is a pty's slave side).
    pub terminal: bool,
    /// The terminal's size at start (rows, columns), from the spec's
    /// `consoleSize`.
    #[serde(default)]
    pub console_size: Option<(u16, u16)>,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privileges: bool,
    /// The capability sets the process gets.
    #[serde(default)]
    pub caps: CapSets,
    /// The container's seccomp filter, installed last.
    #[serde(default)]
    pub seccomp: Option<Filter>,
}

impl ProcessConfig {
    /// The program path: argv[0] if it has a `/`, else looked up in the
    /// process's `PATH` the way a shell would (run inside the container's
    /// root, after `pivot_root`).
    fn program(&self) -> Result<PathBuf, String> {
        let name = self.args.first().ok_or("the process has no args")?;
        if name.contains('/') {
            return Ok(PathBuf::from(name));
        }
        let path = self.env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| format!("{name:?} not found in PATH {path:?}"))
    }
}

fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a valid NUL-terminated path; access() only reads it.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// What a mount target is, when it has to be made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    Dir,
    File,
}

/// Opens (O_PATH) `inside`, an absolute path in the container's root
/// `root`, resolved as if `root` were `/`: a symlink in the image, absolute
/// or climbing with `..`, stays inside it (openat2 RESOLVE_IN_ROOT). What
/// is missing is made, as directories and a last component of kind `made`.
/// The container's image decides every component here, so nothing may be
/// created or mounted on outside its root.
fn open_in_root(root: &OwnedFd, inside: &Path, made: Made) -> Result<OwnedFd, String> {
    let parts: Vec<&OsStr> =
        inside.components().filter_map(|c| if let Component::Normal(p) = c { Some(p) } else { None }).collect();
    let mut at = resolve_in_root(root, Path::new("."))?.ok_or("the container's root is gone")?;
    for (i, part) in parts.iter().enumerate() {
        let path: PathBuf = parts[..=i].iter().collect();
        if let Some(fd) = resolve_in_root(root, &path)? {
            at = fd;
            continue;
        }
        let name = CString::new(part.as_bytes()).map_err(|_| format!("{} has a NUL byte", inside.display()))?;
        let last = i + 1 == parts.len();
        let r = if last && made == Made::File {
            // SAFETY: a valid directory fd and NUL-terminated name; O_EXCL
            // with O_NOFOLLOW creates a new file there and follows nothing.
            let fd = unsafe {
                libc::openat(
                    at.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd >= 0 {
                // SAFETY: a descriptor openat just returned.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            fd.min(0)
        } else {
            // SAFETY: a valid directory fd and NUL-terminated name.
            unsafe { libc::mkdirat(at.as_raw_fd(), name.as_ptr(), 0o755) }
        };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(errno(format_args!("creating {} in the container's root", path.display())));
        }
        // Still missing after EEXIST: a symlink to nothing in the root.
        at = resolve_in_root(root, &path)?.ok_or_else(|| {
            format!("{} is a symlink to nothing inside the container's root", Path::new("/").join(&path).display())
        })?;
    }
    Ok(at)
}

/// `path` under `root`, resolved inside it (O_PATH); None if it is not there.
fn resolve_in_root(root: &OwnedFd, path: &Path) -> Result<Option<OwnedFd>, String> {
    let path_c = cstring(path)?;
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid directory fd, NUL-terminated path and open_how of the
    // size given.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, root.as_raw_fd(), path_c.as_ptr(), &how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(errno(format_args!("resolving {} in the container's root", path.display()))),
        };
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// The path through which a mount reaches what `fd` was opened on.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether a path is absolute and has no `..` (so joining it to a root
/// cannot climb out of it lexically).
pub fn is_clean_absolute(path: &Path) -> bool {
    path.is_absolute() && !path.components().any(|c| c == Component::ParentDir)
}

/// The helper's main: never returns.
pub fn helper_main() -> ! {
    // SAFETY: SYNC_FD was set up by the agent for this process and is
    // owned by nothing else here.
    let mut sync = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    let launch = match read_config() {
        Ok(launch) => launch,
        Err(e) => fail(&mut sync, &e),
    };
    if let Err(e) = enter_namespaces(&launch.kind) {
        fail(&mut sync, &e);
    }
    // The process waits on this pipe until the helper has reported its pid.
    let (gate_read, gate_write) = match pipe() {
        Ok(p) => p,
        Err(e) => fail(&mut sync, &format!("pipe: {e}")),
    };
    // SAFETY: the helper is single-threaded, so the child may do anything.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail(&mut sync, &format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(gate_write);
        wait_gate(gate_read);
        let err = match run_process(&launch, &mut sync) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        fail(&mut sync, &err);
    }
    drop(gate_read);
    let _ = sync.write_all(format!("pid {pid}\n").as_bytes());
    drop(sync);
    drop(gate_write);
    std::process::exit(wait_exit_code(pid))
}

/// Reports `error <why>` on the sync socket and exits.
fn fail(sync: &mut UnixStream, why: &str) -> ! {
    let line = format!("error {}\n", why.replace('\n', " "));
    let _ = sync.write_all(line.as_bytes());
    // SAFETY: _exit ends this process without running atexit handlers,
    // which after fork belong to the parent.
    unsafe { libc::_exit(1) }
}

fn read_config() -> Result<Launch, String> {
    // SAFETY: CONFIG_FD was set up by the agent for this process.
    let mut file = unsafe { std::fs::File::from_raw_fd(CONFIG_FD) };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| format!("reading the launch config: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("decoding the launch config: {e}"))
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned a new descriptor that nothing else owns.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

fn wait_gate(gate: OwnedFd) {
    let mut file = std::fs::File::from(gate);
    let mut byte = [0u8; 1];
    while matches!(file.read(&mut byte), Ok(n) if n > 0) {}
}

/// Waits for `pid` and turns its end into an exit code.
fn wait_exit_code(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return crate::reaper::exit_code(status);
        } else if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 255;
        }
    }
}

fn errno(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cstring(path: impl AsRef<OsStr>) -> Result<CString, String> {
    CString::new(path.as_ref().as_bytes()).map_err(|_| format!("{:?} contains a NUL byte", path.as_ref()))
}

fn setns_path(path: &Path, flag: libc::c_int) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening namespace {}: {e}", path.display()))?;
    // SAFETY: a valid namespace fd; setns only changes this process.
    if unsafe { libc::setns(file.as_raw_fd(), flag) } != 0 {
        return Err(errno(format_args!("setns {}", path.display())));
    }
    Ok(())
}

fn enter_namespaces(kind: &Kind) -> Result<(), String> {
    match kind {
        Kind::Init(init) => {
            for (ns, path) in &init.join_namespaces {
                setns_path(path, ns.clone_flag())?;
            }
            let flags = init.new_namespaces.iter().fold(0, |acc, ns| acc | ns.clone_flag());
            // SAFETY: unshare takes flags only; the helper is single-threaded.
            if flags != 0 && unsafe { libc::unshare(flags) } != 0 {
                return Err(errno("unshare"));
            }
            Ok(())
        }
        Kind::Exec { init_pid } => join_by_pidfd(*init_pid),
    }
}

/// Joins every namespace of the process whose pidfd is on [`PIDFD_FD`]:
/// the container's first process itself, whatever its PID is now (a
/// process that has exited is refused, and its PID, reused, is never
/// looked at). A target in the agent's own mount namespace is refused:
/// the exec would run in the agent's context.
fn join_by_pidfd(init_pid: i32) -> Result<(), String> {
    // The agent's /proc, which still shows this process once it is in
    // the container's mount namespace.
    let proc = std::fs::File::open("/proc").map_err(|e| format!("opening /proc: {e}"))?;
    let own_mnt = mnt_ns_inode(&proc)?;
    let all = [Namespace::Cgroup, Namespace::Ipc, Namespace::Uts, Namespace::Net, Namespace::Pid, Namespace::Mount]
        .iter()
        .fold(0, |acc, ns| acc | ns.clone_flag());
    // SAFETY: setns on the pidfd the agent passed; the helper is
    // single-threaded.
    if unsafe { libc::setns(PIDFD_FD, all) } != 0 {
        return Err(match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH) => format!("the container's first process (pid {init_pid}) has exited"),
            _ => errno(format_args!("joining the namespaces of the container's first process (pid {init_pid})")),
        });
    }
    if mnt_ns_inode(&proc)? == own_mnt {
        return Err(format!(
            "the container's first process (pid {init_pid}) is in the agent's own mount namespace: not joined"
        ));
    }
    Ok(())
}

/// The inode of this process's mount namespace, read through `proc`.
fn mnt_ns_inode(proc: &std::fs::File) -> Result<u64, String> {
    let path = cstring("thread-self/ns/mnt")?;
    // SAFETY: stat is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, NUL-terminated path and stat to fill.
    if unsafe { libc::fstatat(proc.as_raw_fd(), path.as_ptr(), &mut st, 0) } != 0 {
        return Err(errno("reading the mount namespace"));
    }
    Ok(st.st_ino)
}

/// In the forked process: set up, report ready, wait for the go, exec.
fn run_process(launch: &Launch, sync: &mut UnixStream) -> Result<std::convert::Infallible, String> {
    // If the helper dies, so does the process (the agent could not wait
    // for it any more).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let process = &launch.process;
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(errno("setsid"));
    }
    // SAFETY: TIOCSCTTY on fd 0 with an integer argument.
    if process.terminal && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(errno("making the terminal the controlling terminal"));
    }
    if let Kind::Init(init) = &launch.kind {
        set_up_root(init)?;
    }
    for &(resource, soft, hard) in &process.rlimits {
        let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: a valid rlimit; the resource number came from our own
        // table of RLIMIT_* names.
        if unsafe { libc::setrlimit(resource as _, &limit) } != 0 {
            return Err(errno(format_args!("setrlimit {resource}")));
        }
    }
    if let Some(mask) = process.umask {
        // SAFETY: umask takes an integer.
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    let program = process.program()?;
    let program_c = cstring(&program)?;
    let argv: Vec<CString> = process.args.iter().map(cstring).collect::<Result<_, _>>()?;
    let envp: Vec<CString> = process.env.iter().map(cstring).collect::<Result<_, _>>()?;
    let cwd = cstring(&process.cwd)?;
    // The bounding set needs CAP_SETPCAP, so before the user changes; the
    // permitted set is kept across it until the end of the setup.
    caps::drop_bounding(process.caps.bounding)?;
    caps::keep_across_setuid()?;
    // SAFETY: the gid list outlives the call; length matches.
    if unsafe { libc::setgroups(process.additional_gids.len(), process.additional_gids.as_ptr()) } != 0 {
        return Err(errno("setgroups"));
    }
    // SAFETY: setgid/setuid take integers.
    if unsafe { libc::setgid(process.gid) } != 0 {
        return Err(errno(format_args!("setgid {}", process.gid)));
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(process.uid) } != 0 {
        return Err(errno(format_args!("setuid {}", process.uid)));
    }
    caps::raise_permitted()?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
        return Err(errno(format_args!("chdir {}", process.cwd.display())));
    }
    if process.no_new_privileges {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(errno("PR_SET_NO_NEW_PRIVS"));
        }
    }
    sync.write_all(b"ready\n").map_err(|e| format!("reporting ready: {e}"))?;
    let mut go = [0u8; 1];
    match sync.read(&mut go) {
        Ok(1) => {}
        // The agent closed the socket: the container was removed before it
        // started.
        _ => {
            // SAFETY: _exit after fork.
            unsafe { libc::_exit(1) }
        }
    }
    // Nothing of ours but stdio reaches the process: the sync socket must
    // close on exec, so the agent reads end-of-file for a successful exec,
    // and any descriptor another agent thread opened before its close-on-
    // exec flag was set goes too.
    // SAFETY: close_range with integer arguments, on our own descriptors.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) } != 0 {
        // Before Linux 5.11: at least the sync socket.
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(SYNC_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // A process starts with default signal handling and nothing blocked,
    // not with what the helper had: it is a Rust program, which ignores
    // SIGPIPE (a shell pipeline relies on SIGPIPE ending its writers), and
    // it inherits whatever else the agent's own parent ignored.
    default_signals();
    // SAFETY: sigset_t is plain data; all-zero is a valid value.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid set to fill.
    unsafe { libc::sigemptyset(&mut none) };
    // SAFETY: a valid, initialised set; no old set wanted.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) };
    // As runc: without no_new_privs the filter needs CAP_SYS_ADMIN, so it
    // goes in before the capabilities are dropped (and the profile must
    // allow capset and prctl); with it, last, so that the profile only
    // needs to allow execve.
    let install = |filter: &Filter| crate::seccomp::install(filter).map_err(|e| format!("installing seccomp: {e}"));
    if let (Some(filter), false) = (&process.seccomp, process.no_new_privileges) {
        install(filter)?;
    }
    caps::set(&process.caps)?;
    if let (Some(filter), true) = (&process.seccomp, process.no_new_privileges) {
        install(filter)?;
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings in NULL-terminated arrays that live
    // across the call.
    unsafe { libc::execve(program_c.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    Err(errno(format_args!("exec {}", program.display())))
}

/// Sets every signal's disposition to the default. Through the system
/// call itself: the C library refuses to touch the signals it reserves
/// (32 and 33), which an ignoring parent can still have left ignored.
fn default_signals() {
    /// The kernel's `struct sigaction` for rt_sigaction on x86_64.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
    for signal in 1..=64 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: a valid sigaction of the size the kernel expects for
            // an 8-byte signal set; the old one is not wanted.
            unsafe {
                libc::syscall(libc::SYS_rt_sigaction, signal, &default, std::ptr::null_mut::<KernelSigaction>(), 8usize)
            };
        }
    }
}

fn mount(source: Option<&Path>, target: &Path, fstype: Option<&str>, flags: u64, data: &str) -> Result<(), String> {
    let source_c = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype_c = fstype.map(cstring).transpose()?;
    let data_c = (!data.is_empty()).then(|| cstring(data)).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a valid NUL-terminated string that
    // lives across the call.
    let r = unsafe {
        libc::mount(ptr(&source_c), target_c.as_ptr(), ptr(&fstype_c), flags as libc::c_ulong, ptr(&data_c).cast())
    };
    if r != 0 {
        return Err(errno(format_args!(
            "mount {} on {} (type {})",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("bind")
        )));
    }
    Ok(())
}

/// The per-mount flags of the mount `path` is on, as `MS_*` flags.
fn mount_flags(path: &Path) -> Result<u64, String> {
    let c = cstring(path)?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(errno(format_args!("statvfs {}", path.display())));
    }
    let pairs = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs.iter().filter(|(st_flag, _)| st.f_flag & st_flag != 0).fold(0, |acc, (_, ms)| acc | ms))
}

const BIND: u64 = libc::MS_BIND;
const REC: u64 = libc::MS_REC;
const REMOUNT: u64 = libc::MS_REMOUNT;
const RDONLY: u64 = libc::MS_RDONLY;
const PROPAGATION: u64 = libc::MS_PRIVATE | libc::MS_SLAVE | libc::MS_SHARED | libc::MS_UNBINDABLE;

/// The container's filesystem: mounts, devices, `pivot_root`, masks.
fn set_up_root(init: &InitConfig) -> Result<(), String> {
    let root = &init.rootfs;
    // Nothing we mount may leak back into the agent's namespace.
    mount(None, Path::new("/"), None, REC | libc::MS_PRIVATE, "")?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(root), root, None, BIND | REC, "")?;
    // Device nodes in the image are not devices: the root is nodev (the
    // spec's own mounts, /dev among them, say for themselves). A bind
    // remount sets every per-mount flag, so the ones it has are kept.
    mount(None, root, None, BIND | REMOUNT | libc::MS_NODEV | mount_flags(root)?, "")?;
    let root_fd =
        std::fs::File::open(root).map(OwnedFd::from).map_err(|e| format!("opening {}: {e}", root.display()))?;
    for m in &init.mounts {
        let is_bind = m.flags & BIND != 0;
        let made = if is_bind && m.source.is_file() { Made::File } else { Made::Dir };
        let target = open_in_root(&root_fd, &m.destination, made)?;
        let target_path = fd_path(&target);
        if is_bind {
            mount(Some(&m.source), &target_path, None, m.flags & (BIND | REC), "")?;
        } else {
            let fstype = if m.fstype == "cgroup" { "cgroup2" } else { m.fstype.as_str() };
            mount(Some(&m.source), &target_path, Some(fstype), m.flags & !PROPAGATION, &m.data)?;
        }
        // What follows changes the new mount, which the target's path now
        // leads to (the descriptor above still holds what was under it).
        let rest = m.flags & !(BIND | REC | PROPAGATION);
        if (is_bind && rest != 0) || m.flags & PROPAGATION != 0 {
            let mounted = open_in_root(&root_fd, &m.destination, made)?;
            if is_bind && rest != 0 {
                mount(None, &fd_path(&mounted), None, BIND | REMOUNT | rest, "")?;
            }
            if m.flags & PROPAGATION != 0 {
                mount(None, &fd_path(&mounted), None, m.flags & (PROPAGATION | REC), "")?;
            }
        }
    }
    if init.default_devices {
        for dev in ["null", "zero", "full", "random", "urandom", "tty"] {
            let target = open_in_root(&root_fd, &Path::new("/dev").join(dev), Made::File)?;
            mount(Some(&Path::new("/dev").join(dev)), &fd_path(&target), None, BIND, "")?;
        }
        let dev = open_in_root(&root_fd, Path::new("/dev"), Made::Dir)?;
        for (link, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            let (link_c, to_c) = (cstring(link)?, cstring(to)?);
            // SAFETY: a valid directory fd and NUL-terminated strings;
            // symlinkat makes the link in that directory, follows nothing.
            if unsafe { libc::symlinkat(to_c.as_ptr(), dev.as_raw_fd(), link_c.as_ptr()) } != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(errno(format_args!("linking /dev/{link} in the container's root")));
            }
        }
    }
    let root_c = cstring(root)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chdir(root_c.as_ptr()) } != 0 {
        return Err(errno(format_args!("chdir {}", root.display())));
    }
    // pivot_root(".", "."): the old root ends up stacked on the new one,
    // and is then detached.
    let dot = cstring(".")?;
    // SAFETY: valid NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(errno(format_args!("pivot_root into {}", root.display())));
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(errno("detaching the old root"));
    }
    let slash = cstring("/")?;
    // SAFETY: as above.
    if unsafe { libc::chdir(slash.as_ptr()) } != 0 {
        return Err(errno("chdir /"));
    }
    for path in &init.masked_paths {
        let path = Path::new(path);
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => mount(Some(Path::new("tmpfs")), path, Some("tmpfs"), RDONLY, "")?,
            Ok(_) => mount(Some(Path::new("/dev/null")), path, None, BIND, "")?,
            Err(_) => {}
        }
    }
    for path in &init.readonly_paths {
        let path = Path::new(path);
        if path.exists() {
            mount(Some(path), path, None, BIND | REC, "")?;
            mount(None, path, None, BIND | REC | REMOUNT | RDONLY, "")?;
        }
    }
    if init.root_readonly {
        mount(None, Path::new("/"), None, BIND | REMOUNT | RDONLY, "")?;
    }
    if let Some(name) = &init.hostname {
        // SAFETY: the pointer and length describe the name's bytes.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            return Err(errno(format_args!("sethostname {name:?}")));
        }
    }
    Ok(())
}
