//! The agent's side of the link to the host (see `agent_proto::link`):
//! dialing a host port, and the vsock listener.

use std::os::fd::OwnedFd;
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
            HostLink::Vsock { cid } => agent_proto::link::vsock_connect(*cid, port),
        }
    }
}

/// The agent's vsock listener on `port`, for any CID.
pub fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    agent_proto::link::vsock_listen(port, 64)
}
