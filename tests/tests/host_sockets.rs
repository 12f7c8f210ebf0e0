//! Our host Unix sockets against a process of another local user: the
//! sockets are 0600, so such a process cannot even connect; here the
//! mode is widened on purpose to check the second line, the peer uid.
//! A forked child becomes `nobody` and connects. Needs root (to change
//! user); skipped, with the reason, without it.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use devices::host_socket;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{VirtioBackend, Wakeup};
use libtest_mimic::Arguments;
use vessel_tests::harness::{gate, trial};
use vessel_tests::TempDir;
use vm_memory::GuestMemoryMmap;

/// The uid the child takes (nobody).
const STRANGER: libc::uid_t = 65534;

/// Forks a child that becomes [`STRANGER`], connects to `path` and reads
/// until end-of-file or 10 s. Its exit status: 0 when the connection was
/// closed on it, 1 when it was left open, 2 when it could not connect,
/// 3 when it could not change user.
fn stranger_connects(path: &Path) -> anyhow::Result<libc::pid_t> {
    let addr = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: the child makes raw syscalls only (`as_stranger`, then
    // _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid > 0 {
        return Ok(pid);
    }
    let code = as_stranger(&addr);
    // SAFETY: _exit runs no destructors; the child's work is done.
    unsafe { libc::_exit(code) }
}

/// The child's work in [`stranger_connects`]: raw syscalls only.
fn as_stranger(addr: &std::ffi::CStr) -> i32 {
    // SAFETY: setgid takes a plain id.
    let gid = unsafe { libc::setgid(STRANGER) };
    // SAFETY: setuid takes a plain id.
    if gid != 0 || unsafe { libc::setuid(STRANGER) } != 0 {
        return 3;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    // SAFETY: sockaddr_un is plain data, valid all zeros.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sun.sun_path.iter_mut().zip(addr.to_bytes_with_nul()) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: connect reads `len` bytes of `sun`, a live local of that size.
    if unsafe { libc::connect(fd, (&raw const sun).cast(), len) } != 0 {
        return 2;
    }
    let timeout = libc::timeval { tv_sec: 10, tv_usec: 0 };
    let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: setsockopt reads `size` bytes of `timeout`, a live local.
    unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size) };
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into `byte`, a live local.
    let n = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
    if n == 0 {
        0
    } else {
        1
    }
}

/// The exit code of child `pid`.
fn wait(pid: libc::pid_t) -> anyhow::Result<i32> {
    let mut status = 0;
    // SAFETY: waits for our own child, into a local.
    ensure!(unsafe { libc::waitpid(pid, &mut status, 0) } == pid, "waitpid");
    ensure!(libc::WIFEXITED(status), "child status {status:#x}");
    Ok(libc::WEXITSTATUS(status))
}

/// Lets anyone reach `dir` and the socket at `socket`, so that only the
/// peer-uid check stands between another user and it.
fn widen(dir: &Path, socket: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    Ok(())
}

/// vsock's host socket: a connection from another user is closed before
/// its `CONNECT` line is read; our own stays open.
fn vsock_host_socket_closes_on_another_user() -> anyhow::Result<()> {
    let dir = TempDir::new("host-sockets-vsock")?;
    let uds = dir.path().join("vsock.sock");
    let (mut vsock, counters) = Vsock::new(&VsockConfig { guest_cid: 3, uds_path: uds.clone() })?;
    widen(dir.path(), &uds)?;
    let child = stranger_connects(&uds)?;
    let mut ours = UnixStream::connect(&uds).context("connecting as ourselves")?;
    ours.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mem = GuestMemoryMmap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters.errors.load(std::sync::atomic::Ordering::Relaxed) == 0 && Instant::now() < deadline {
        vsock.process(Wakeup::Backend, &mut [], &mem);
        std::thread::sleep(Duration::from_millis(10));
    }
    let code = wait(child)?;
    ensure!(code == 0, "the other user's connection: child exit {code} (1: left open, 2: no connect, 3: no setuid)");
    // Ours is still open: a read times out instead of reaching its end.
    let mut byte = [0u8; 1];
    let ours_open = matches!(ours.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    ensure!(ours_open, "our own connection was closed");
    Ok(())
}

/// `accept_same_user` (the vhost-user frontend's accept) passes over a
/// connection from another user and takes the next one of ours.
fn accept_passes_over_another_user() -> anyhow::Result<()> {
    let dir = TempDir::new("host-sockets-accept")?;
    let path = dir.path().join("s.sock");
    let listener = host_socket::bind_private(&path)?;
    widen(dir.path(), &path)?;
    let child = stranger_connects(&path)?;
    // Let the stranger's connection queue first.
    std::thread::sleep(Duration::from_millis(300));
    let _ours = UnixStream::connect(&path)?;
    let conn = host_socket::accept_same_user(&listener)?;
    ensure!(host_socket::peer_is_this_process(&conn)?, "accepted someone else's connection");
    let code = wait(child)?;
    ensure!(code == 0, "the other user's connection: child exit {code} (1: left open, 2: no connect, 3: no setuid)");
    Ok(())
}

/// The host side of the agent's link (`<uds>_<port>`, where the agent's
/// streams and readiness arrive) passes over another user's connection
/// and takes the next one of ours.
fn agent_link_accept_passes_over_another_user() -> anyhow::Result<()> {
    let dir = TempDir::new("host-sockets-link")?;
    let path = dir.path().join("vsock.sock_1024");
    let listener = host_socket::bind_private(&path)?;
    widen(dir.path(), &path)?;
    let child = stranger_connects(&path)?;
    std::thread::sleep(Duration::from_millis(300));
    let _ours = UnixStream::connect(&path)?;
    let conn = agent_proto::link::accept_within(&listener, &path, Duration::from_secs(10), || None)?;
    ensure!(host_socket::peer_is_this_process(&conn)?, "accepted someone else's connection");
    let code = wait(child)?;
    ensure!(code == 0, "the other user's connection: child exit {code} (1: left open, 2: no connect, 3: no setuid)");
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = (!root).then(|| "becoming another user needs root".to_string());
    let trials = [
        trial("vsock_host_socket_closes_on_another_user", vsock_host_socket_closes_on_another_user),
        trial("accept_passes_over_another_user", accept_passes_over_another_user),
        trial("agent_link_accept_passes_over_another_user", agent_link_accept_passes_over_another_user),
    ];
    libtest_mimic::run(&args, gate(reason, trials)).exit();
}
