//! How the host and the agent reach each other.
//!
//! In a guest the agent listens for ttrpc on vsock port [`DEFAULT_PORT`]
//! (or `vessel.agent_port=N` from the kernel command line), then dials the
//! host (CID 2) on the same port and writes one readiness line
//! ([`ready_line`]). The host, which accepted that connection on its
//! hybrid vsock socket (`<uds>_<port>`), then connects to the agent's
//! port through the same socket (`CONNECT <port>`). The host never
//! connects before the guest said it listens: a connect to a port nobody
//! listens on yet costs Linux a 2 s timeout.
//!
//! Run on the host (the agent's container logic as a plain process), the
//! agent listens on a Unix socket instead, and "dialing the host on port P"
//! means connecting to `<prefix>_P`, the same names the hybrid vsock
//! device gives guest-initiated connections. Host code therefore handles
//! both the same way: listen on `<prefix>_P`, accept.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The agent's port: its ttrpc listener, and the host port it dials to say
/// it is ready.
pub const DEFAULT_PORT: u32 = 1024;

/// The kernel command-line key that overrides [`DEFAULT_PORT`].
pub const CMDLINE_PORT_KEY: &str = "vessel.agent_port";

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;

/// How a readiness line starts: `VESSEL-AGENT-READY <agent version>\n`.
pub const READY_PREFIX: &str = "VESSEL-AGENT-READY";

/// The longest readiness line accepted; the agent is guest code, so the
/// host bounds what it reads.
pub const MAX_READY_LINE: usize = 256;

/// A link that went wrong.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Connecting or talking to a socket failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No agent said it was ready.
    #[error("no readiness line from the agent on {path}: {why}")]
    NotReady {
        /// The listening socket.
        path: PathBuf,
        /// Timed out, or the guest went away.
        why: String,
    },
    /// The peer sent something that is not the expected line.
    #[error("expected {expected:?} from {path}, got {got:?}")]
    Protocol {
        /// What was expected.
        expected: String,
        /// What came (lossy, bounded).
        got: String,
        /// The socket.
        path: PathBuf,
    },
}

/// The readiness line the agent writes after it dials the host.
pub fn ready_line(agent_version: &str) -> String {
    format!("{READY_PREFIX} {agent_version}\n")
}

/// Reads the readiness line from a connection the agent made, returning the
/// agent's version. At most [`MAX_READY_LINE`] bytes are read.
pub fn read_ready(conn: &mut UnixStream, path: &Path) -> Result<String, LinkError> {
    let line = read_line(conn, path)?;
    match line.strip_prefix(READY_PREFIX).and_then(|rest| rest.strip_prefix(' ')) {
        Some(version) if !version.is_empty() => Ok(version.to_string()),
        _ => Err(LinkError::Protocol { expected: format!("{READY_PREFIX} <version>"), got: line, path: path.into() }),
    }
}

/// Host side: waits for the agent's connection on `listener` (the host's
/// `<prefix>_<port>`) and reads its readiness line, returning the agent's
/// version. Gives up after `timeout`, or as soon as `gone` returns a reason
/// (the guest's VM exited, say).
pub fn accept_ready(
    listener: &UnixListener,
    path: &Path,
    timeout: Duration,
    gone: impl FnMut() -> Option<String>,
) -> Result<String, LinkError> {
    accept_link(listener, path, timeout, gone).map(|(version, _)| version)
}

/// [`accept_ready`], keeping the connection: the agent's link, which a
/// guest's agent holds open and dials again when it ends (see the agent's
/// `hold_link`), so a host that means to keep the agent keeps it.
pub fn accept_link(
    listener: &UnixListener,
    path: &Path,
    timeout: Duration,
    gone: impl FnMut() -> Option<String>,
) -> Result<(String, UnixStream), LinkError> {
    let io = |what| move |source| LinkError::Io { what, path: path.into(), source };
    let mut conn = accept_within(listener, path, timeout, gone)?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("cannot set a timeout on"))?;
    let version = read_ready(&mut conn, path)?;
    conn.set_read_timeout(None).map_err(io("cannot clear the timeout on"))?;
    Ok((version, conn))
}

/// Host side: the first connection to `listener` (bound at `path`), made
/// blocking; gives up after `timeout`, or as soon as `gone` returns a
/// reason.
pub fn accept_within(
    listener: &UnixListener,
    path: &Path,
    timeout: Duration,
    mut gone: impl FnMut() -> Option<String>,
) -> Result<UnixStream, LinkError> {
    let io = |what| move |source| LinkError::Io { what, path: path.into(), source };
    let not_ready = |why: String| LinkError::NotReady { path: path.into(), why };
    listener.set_nonblocking(true).map_err(io("cannot make non-blocking"))?;
    let start = Instant::now();
    let conn = loop {
        match listener.accept() {
            // Only our user's processes (the VMM's vsock backend, here or
            // in the sandbox's owner) may hand us a stream; another user's
            // connection is closed unanswered.
            Ok((conn, _)) if peer_uid(&conn) == Some(effective_uid()) => break conn,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(why) = gone() {
                    return Err(not_ready(why));
                }
                if start.elapsed() > timeout {
                    return Err(not_ready(format!("nothing within {timeout:?}")));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io("cannot accept on")(e)),
        }
    };
    conn.set_nonblocking(false).map_err(io("cannot make blocking"))?;
    Ok(conn)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of `conn` (SO_PEERCRED).
fn peer_uid(conn: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred
    // of that size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(conn),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// Guest side: a vsock stream connected to `cid`:`port`.
pub fn vsock_connect(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of the size given.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN) };
    if r != 0 {
        return Err(context(format_args!("connecting to vsock {cid}:{port}")));
    }
    Ok(fd)
}

/// Guest side: a vsock socket listening on `port` for any CID, with room
/// for `backlog` waiting connections.
pub fn vsock_listen(port: u32, backlog: i32) -> std::io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of the size given.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN) };
    // SAFETY: listen on our own socket.
    if r != 0 || unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(context(format_args!("listening on vsock port {port}")));
    }
    Ok(fd)
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket() takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(context(format_args!("creating a vsock socket")));
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// The last OS error, with what was being done.
fn context(what: std::fmt::Arguments) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Host side: connects to a guest port through a hybrid vsock socket
/// (`CONNECT <port>`, then `OK <host port>`), returning the stream.
pub fn connect_hybrid(uds: &Path, port: u32) -> Result<UnixStream, LinkError> {
    let io = |what| move |source| LinkError::Io { what, path: uds.into(), source };
    let mut stream = UnixStream::connect(uds).map_err(io("cannot connect to"))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io("cannot write CONNECT to"))?;
    let line = read_line(&mut stream, uds)?;
    match line.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(stream),
        _ => {
            Err(LinkError::Protocol { expected: format!("OK <port> for CONNECT {port}"), got: line, path: uds.into() })
        }
    }
}

/// The path a Unix-socket "dial port P" goes to: `<prefix>_P`.
pub fn port_path(prefix: &Path, port: u32) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Reads one `\n`-terminated line byte by byte (nothing past it is
/// consumed, so the stream can be handed on), bounded by
/// [`MAX_READY_LINE`].
fn read_line(conn: &mut UnixStream, path: &Path) -> Result<String, LinkError> {
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1, Read::by_ref(conn).take(MAX_READY_LINE as u64));
    reader.read_until(b'\n', &mut line).map_err(|source| LinkError::Io {
        what: "cannot read a line from",
        path: path.into(),
        source,
    })?;
    let got = String::from_utf8_lossy(&line).into_owned();
    match got.strip_suffix('\n') {
        Some(text) => Ok(text.to_string()),
        None => Err(LinkError::Protocol { expected: "a line ending in \\n".into(), got, path: path.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips_and_bad_lines_are_named() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(ready_line("0.1.0").as_bytes()).unwrap();
        assert_eq!(read_ready(&mut b, Path::new("pair")).unwrap(), "0.1.0");
        a.write_all(b"HELLO\n").unwrap();
        let err = read_ready(&mut b, Path::new("pair")).unwrap_err().to_string();
        assert!(err.contains("VESSEL-AGENT-READY") && err.contains("HELLO"), "{err}");
        a.write_all(&[b'x'; 300]).unwrap();
        let err = read_ready(&mut b, Path::new("pair")).unwrap_err().to_string();
        assert!(err.contains("a line ending"), "{err}");
    }

    #[test]
    fn readiness_is_accepted_or_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("vessel-link-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("ready");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let mut agent = UnixStream::connect(&path).unwrap();
        agent.write_all(ready_line("1.2.3").as_bytes()).unwrap();
        assert_eq!(accept_ready(&listener, &path, Duration::from_secs(5), || None).unwrap(), "1.2.3");
        let err = accept_ready(&listener, &path, Duration::from_secs(5), || Some("the VM exited".into()));
        assert!(err.unwrap_err().to_string().contains("the VM exited"));
        let err = accept_ready(&listener, &path, Duration::from_millis(20), || None).unwrap_err().to_string();
        assert!(err.contains("nothing within"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn port_paths_follow_the_hybrid_convention() {
        assert_eq!(port_path(Path::new("/run/v.sock"), 1024), PathBuf::from("/run/v.sock_1024"));
    }
}
