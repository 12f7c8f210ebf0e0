//! The agent's side of the link to the host (see `agent_proto::link`):
//! dialing a host port, and the vsock listener.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Where "the host, port P" is.
#[derive(Clone, Debug)]
pub enum HostLink {
    /// vsock: the host's CID.
    Vsock {
        /// Normally `agent_proto::link::HOST_CID`.
        cid: u32,
    },
    /// An agent on the host: `<prefix>_P`.
    Unix {
        /// The socket path prefix.
        prefix: PathBuf,
    },
}

impl HostLink {
    /// Connects to the host's port.
    pub fn dial(&self, port: u32) -> std::io::Result<OwnedFd> {
        match self {
            HostLink::Unix { prefix } => {
                let path = agent_proto::link::port_path(prefix, port);
                UnixStream::connect(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display())))
            }
            HostLink::Vsock { cid } => {
                let fd = vsock_socket()?;
                let addr = vsock_addr(*cid, port);
                // SAFETY: addr is a valid sockaddr_vm of the size given.
                let r = unsafe {
                    libc::connect(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        (&addr as *const libc::sockaddr_vm).cast(),
                        std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(e.kind(), format!("connecting to vsock {cid}:{port}: {e}")));
                }
                Ok(fd)
            }
        }
    }
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket() takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("creating a vsock socket: {e}")));
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

/// A vsock listener on `port` for any CID.
pub fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: addr is a valid sockaddr_vm of the size given.
    let r = unsafe {
        libc::bind(raw, (&addr as *const libc::sockaddr_vm).cast(), std::mem::size_of::<libc::sockaddr_vm>() as _)
    };
    // SAFETY: listen on our own socket.
    if r != 0 || unsafe { libc::listen(raw, 64) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("listening on vsock port {port}: {e}")));
    }
    Ok(fd)
}
