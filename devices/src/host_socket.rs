//! Unix sockets on the host, made so that other local users cannot use
//! them: a listening socket is 0600 whatever the umask, a connection is
//! served only when its peer runs as our user, and only a socket is ever
//! removed to make room for a new one (never a file someone put there).

use std::io::{Error, ErrorKind};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Backlog of the listening sockets made here.
const BACKLOG: i32 = 128;

/// Removes `path` if it is a socket; a missing path is fine, anything else
/// (a file, a directory, a symlink) is an error and stays where it is.
pub fn remove_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.file_type().is_socket() => match std::fs::remove_file(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            other => other,
        },
        Ok(_) => Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; not replacing it", path.display()),
        )),
    }
}

/// Listens on a new socket at `path`, mode 0600 whatever the umask. An old
/// socket there is replaced; any other kind of file is refused.
///
/// The mode is set between `bind` and `listen`: until `listen` a connect
/// is refused, so no one connects through a wider mode in between.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    remove_socket(path)?;
    bind_new_private(path)
}

/// [`bind_private`] where nothing may be at `path` yet: an existing socket
/// is left alone (`AddrInUse`), for names several processes share.
pub fn bind_new_private(path: &Path) -> std::io::Result<UnixListener> {
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::bind(&fd, &addr)?;
    let made = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| rustix::net::listen(&fd, BACKLOG).map_err(Error::from));
    if let Err(e) = made {
        let _ = remove_socket(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Whether the process at the other end of `conn` runs as our effective
/// user (its credentials as of its `connect`).
pub fn peer_is_same_user(conn: &impl AsFd) -> std::io::Result<bool> {
    let cred = rustix::net::sockopt::socket_peercred(conn)?;
    Ok(cred.uid == rustix::process::geteuid())
}

/// Accepts the next connection whose peer runs as our user; connections
/// from other users are closed unanswered.
pub fn accept_same_user(listener: &UnixListener) -> std::io::Result<UnixStream> {
    loop {
        let (conn, _) = listener.accept()?;
        if peer_is_same_user(&conn)? {
            return Ok(conn);
        }
        tracing::warn!("refused a connection from another user");
    }
}

/// Whether the other end of `conn` is this very process (as for a
/// connection a thread of ours made).
pub fn peer_is_this_process(conn: &impl AsFd) -> std::io::Result<bool> {
    let cred = rustix::net::sockopt::socket_peercred(conn)?;
    Ok(cred.pid == rustix::process::getpid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vessel-host-socket-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// Sets the process umask for the duration of `f`. Other tests in this
    /// process may create files meanwhile; they only get narrower modes.
    fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
        let out = f();
        rustix::process::umask(old);
        out
    }

    #[test]
    fn a_listening_socket_is_0600_whatever_the_umask() {
        let dir = temp("mode");
        let path = dir.join("s");
        let listener = with_umask(0, || bind_private(&path)).unwrap();
        let mode = std::fs::symlink_metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "socket mode {mode:o}");
        // It serves: a client of ours connects.
        let _client = UnixStream::connect(&path).unwrap();
        let conn = accept_same_user(&listener).unwrap();
        assert!(peer_is_same_user(&conn).unwrap());
        assert!(peer_is_this_process(&conn).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_old_socket_is_replaced_but_a_file_is_not_removed() {
        let dir = temp("replace");
        let sock = dir.join("s");
        drop(bind_private(&sock).unwrap());
        bind_private(&sock).expect("a stale socket is replaced");
        let file = dir.join("f");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind_private(&file).expect_err("a regular file is not replaced");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        assert!(remove_socket(&file).is_err());
        assert!(file.exists());
        let sub = dir.join("d");
        std::fs::create_dir(&sub).unwrap();
        assert!(remove_socket(&sub).is_err());
        remove_socket(&sock).unwrap();
        assert!(!sock.exists());
        remove_socket(&sock).expect("a missing path is fine");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_connection_from_another_process_is_not_this_process() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(peer_is_this_process(&a).unwrap());
        drop((a, b));
        let dir = temp("other");
        let path = dir.join("s");
        let listener = bind_private(&path).unwrap();
        // A forked child connects: its credentials, not ours, are the
        // peer's (recorded at connect, so they outlive the child).
        let addr = SocketAddrUnix::new(&path).unwrap();
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        // SAFETY: the child only calls connect(2) and _exit(2), both
        // async-signal-safe, on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = rustix::net::connect(&fd, &addr).is_ok();
            // SAFETY: _exit is async-signal-safe and runs no destructors.
            unsafe { libc::_exit(i32::from(!ok)) };
        }
        assert!(pid > 0);
        let (conn, _) = listener.accept().unwrap();
        assert!(!peer_is_this_process(&conn).unwrap(), "a child's connection counted as ours");
        assert!(peer_is_same_user(&conn).unwrap());
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
