//! The host's side of the guest agent: the sockets the agent dials
//! (`<prefix>_<port>`: its readiness line and each process's stdio) and
//! the ttrpc client, with every RPC's error named after the RPC.
//!
//! The same code serves an agent in a guest behind the hybrid vsock socket
//! (whose guest-initiated connections arrive on `<uds>_<port>`) and one
//! running as a host process (`vessel-agent --listen`, in tests).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use agent_proto::agent::{GuestDetails, SetGuestIdentityRequest};
use agent_proto::agent_ttrpc::AgentClient;
use agent_proto::link::{self, LinkError};
use agent_proto::ttrpc;

/// How many bytes of host entropy a guest gets with its identity.
pub const IDENTITY_ENTROPY: usize = 64;

/// How long an ordinary RPC may take (a create under TCG takes seconds).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the agent could not be reached, or refused a call.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent never announced itself, or the link broke.
    #[error("cannot reach the agent")]
    Link(#[from] LinkError),
    /// The ttrpc connection could not be set up.
    #[error("cannot set up the agent's ttrpc connection: {0}")]
    Connect(String),
    /// A call failed, or the agent refused it.
    #[error("the agent's {rpc} failed: {message}")]
    Rpc {
        /// The RPC's name in the proto.
        rpc: &'static str,
        /// The agent's reply, or why there was none.
        message: String,
    },
    /// A host socket for a process's stdio could not be set up.
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
}

/// The host's end of the agent's dials.
#[derive(Debug)]
pub struct HostSide {
    /// The socket name prefix (`<prefix>_<port>`).
    pub prefix: PathBuf,
    next_port: AtomicU32,
}

impl HostSide {
    /// Host sockets named `<prefix>_<port>`.
    pub fn new(prefix: PathBuf) -> Self {
        // Stream ports start at 5000, spread by process so that handles in
        // several processes seldom meet (and step over each other when
        // they do, see `stream`).
        let start = 5000 + (std::process::id() % 1000) * 1000;
        HostSide { prefix, next_port: AtomicU32::new(start) }
    }

    /// Listens on `<prefix>_<port>`, mode 0600 (an old socket there is
    /// replaced; any other file is refused).
    pub fn listen(&self, port: u32) -> Result<UnixListener, AgentError> {
        let path = link::port_path(&self.prefix, port);
        devices::host_socket::bind_private(&path).map_err(|e| AgentError::Listen(path, e))
    }

    /// A fresh port number for a stream.
    pub fn port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh port and its listener, for one stream the agent will dial.
    /// Handles in several processes share the socket names, so a port
    /// whose socket exists is skipped, never taken over (a stream accepted
    /// removes its socket).
    pub fn stream(&self) -> Result<PendingStream, AgentError> {
        loop {
            let port = self.port();
            let path = link::port_path(&self.prefix, port);
            match devices::host_socket::bind_new_private(&path) {
                Ok(listener) => return Ok(PendingStream { port, path, listener }),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(AgentError::Listen(path, e)),
            }
        }
    }

    /// Waits for the agent's readiness line on `listener`, returning its
    /// version; gives up after `timeout` or once `gone` gives a reason.
    pub fn wait_ready(
        &self,
        listener: &UnixListener,
        timeout: Duration,
        gone: impl FnMut() -> Option<String>,
    ) -> Result<String, AgentError> {
        Ok(link::accept_ready(listener, &link::port_path(&self.prefix, link::DEFAULT_PORT), timeout, gone)?)
    }

    /// [`HostSide::wait_ready`], keeping the connection: a guest's agent
    /// dials again whenever its link ends, so the VM's owner holds it for
    /// as long as it holds the VM.
    pub fn wait_link(
        &self,
        listener: &UnixListener,
        timeout: Duration,
        gone: impl FnMut() -> Option<String>,
    ) -> Result<(String, UnixStream), AgentError> {
        Ok(link::accept_link(listener, &link::port_path(&self.prefix, link::DEFAULT_PORT), timeout, gone)?)
    }
}

/// A stream the agent has been told to dial, not yet accepted.
#[derive(Debug)]
pub struct PendingStream {
    /// The port named in the request.
    pub port: u32,
    path: PathBuf,
    listener: UnixListener,
}

impl PendingStream {
    /// The agent's connection, once it dials (within `timeout`). The
    /// listening socket is removed either way.
    pub fn accept(self, timeout: Duration) -> Result<UnixStream, AgentError> {
        let conn = link::accept_within(&self.listener, &self.path, timeout, || None);
        let _ = devices::host_socket::remove_socket(&self.path);
        Ok(conn?)
    }

    /// Accepts in a thread and collects everything the stream sends until
    /// end-of-file.
    pub fn collect(self, timeout: Duration) -> JoinHandle<Result<Vec<u8>, AgentError>> {
        std::thread::spawn(move || {
            let path = self.path.clone();
            let mut conn = self.accept(timeout)?;
            let mut out = Vec::new();
            conn.read_to_end(&mut out).map_err(|source| LinkError::Io {
                what: "cannot read a stream from",
                path,
                source,
            })?;
            Ok(out)
        })
    }
}

impl PendingStream {
    /// Accepts in a thread and copies everything the stream sends to `to`
    /// (flushing as it goes) until end-of-file or a failed write.
    pub fn collect_into(
        self,
        mut to: impl std::io::Write + Send + 'static,
        timeout: Duration,
    ) -> JoinHandle<Result<(), AgentError>> {
        std::thread::spawn(move || {
            let mut conn = self.accept(timeout)?;
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    break;
                }
            }
            Ok(())
        })
    }
}

/// A ttrpc context that gives up after `timeout` (zero: never).
pub fn context(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

/// The agent's client, with calls that name the RPC when they fail.
#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agent")
    }
}

impl Agent {
    /// A client over `stream`, already connected to the agent's ttrpc
    /// server.
    pub fn over(stream: UnixStream) -> Result<Self, AgentError> {
        use std::os::fd::IntoRawFd;
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(|e| AgentError::Connect(e.to_string()))?;
        Ok(Agent { client: AgentClient::new(client) })
    }

    /// Connects through the hybrid vsock socket `uds` (`CONNECT <port>`).
    pub fn connect_hybrid(uds: &Path) -> Result<Self, AgentError> {
        Self::over(link::connect_hybrid(uds, link::DEFAULT_PORT)?)
    }

    /// Gives the guest its own identity (`SetGuestIdentity`): `hostname`,
    /// this host's wall clock now, and [`IDENTITY_ENTROPY`] fresh bytes
    /// from this host's CSPRNG for its entropy pool. Returns the guest's
    /// details as they are afterwards.
    pub fn set_identity(&self, hostname: &str) -> Result<GuestDetails, AgentError> {
        let mut entropy = vec![0u8; IDENTITY_ENTROPY];
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut entropy)).map_err(|e| {
            AgentError::Rpc { rpc: "SetGuestIdentity", message: format!("no host entropy to send (/dev/urandom: {e})") }
        })?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let request = SetGuestIdentityRequest {
            hostname: hostname.into(),
            time_sec: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            time_nsec: now.subsec_nanos(),
            entropy,
            ..Default::default()
        };
        self.call("SetGuestIdentity", |c, ctx| c.set_guest_identity(ctx, &request))
    }

    /// Calls `rpc` with [`RPC_TIMEOUT`].
    pub fn call<T>(
        &self,
        rpc: &'static str,
        f: impl FnOnce(&AgentClient, ttrpc::context::Context) -> ttrpc::Result<T>,
    ) -> Result<T, AgentError> {
        self.call_within(rpc, RPC_TIMEOUT, f)
    }

    /// Calls `rpc`, giving up after `timeout` (zero: never, for waits).
    pub fn call_within<T>(
        &self,
        rpc: &'static str,
        timeout: Duration,
        f: impl FnOnce(&AgentClient, ttrpc::context::Context) -> ttrpc::Result<T>,
    ) -> Result<T, AgentError> {
        f(&self.client, context(timeout)).map_err(|e| AgentError::Rpc { rpc, message: agent_proto::error_message(&e) })
    }
}
