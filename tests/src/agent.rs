//! The host's side of the agent for tests: the sockets the agent dials
//! (`<prefix>_<port>`: its readiness line and process stdio), the ttrpc
//! client, and OCI specs for busybox containers.
//!
//! The same code serves an agent running as a host process (`--listen`)
//! and one in a guest behind the hybrid vsock socket, whose
//! guest-initiated connections arrive on the same `<uds>_<port>` names.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use agent_proto::agent::{ContainerRequest, CreateContainerRequest, Rootfs, Stdio as StdioPorts, WaitProcessRequest};
use agent_proto::agent_ttrpc::AgentClient;
use agent_proto::link;
use agent_proto::ttrpc;
use anyhow::{anyhow, Context};

/// How long an RPC may take before the test gives up (WaitProcess for a
/// process the test killed, a create under TCG).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// A ttrpc context with [`RPC_TIMEOUT`].
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
}

/// The host's end of the agent's dials: runtime-api's, with collectors
/// that suit tests (`listen` and `port` come from it).
pub struct HostSide(runtime_api::agent::HostSide);

impl std::ops::Deref for HostSide {
    type Target = runtime_api::agent::HostSide;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl HostSide {
    /// Host sockets named `<prefix>_<port>`.
    pub fn new(prefix: PathBuf) -> Self {
        HostSide(runtime_api::agent::HostSide::new(prefix))
    }

    /// Listens on a fresh port and collects everything the one connection
    /// to it sends, until end-of-file. Returns the port and the collector.
    pub fn capture(&self) -> anyhow::Result<(u32, JoinHandle<anyhow::Result<Vec<u8>>>)> {
        let stream = self.0.stream()?;
        let port = stream.port;
        let collector = stream.collect(RPC_TIMEOUT);
        let handle = std::thread::spawn(move || {
            collector.join().map_err(|_| anyhow!("the stream collector panicked"))?.context("collecting a stdio stream")
        });
        Ok((port, handle))
    }

    /// Listens on a fresh port for a stdin stream; the handle gives the
    /// connection once the agent dialed it.
    pub fn stdin(&self) -> anyhow::Result<(u32, JoinHandle<anyhow::Result<UnixStream>>)> {
        let stream = self.0.stream()?;
        let port = stream.port;
        Ok((port, std::thread::spawn(move || stream.accept(RPC_TIMEOUT).context("accepting a stdin stream"))))
    }

    /// Waits for the agent's readiness line on `listener`, returning its
    /// version.
    pub fn wait_ready(&self, listener: &UnixListener, timeout: Duration) -> anyhow::Result<String> {
        Ok(self.0.wait_ready(listener, timeout, || None)?)
    }
}

/// The agent as a host process with its client; the process is killed,
/// and its directory removed, when dropped.
pub struct HostAgent {
    /// The client.
    pub client: AgentClient,
    /// The host's sockets.
    pub host: HostSide,
    _process: ChildGuard,
}

/// Starts `vessel-agent --listen` in a fresh directory and connects.
pub fn start_host_agent(agent: &Path, tag: &str) -> anyhow::Result<HostAgent> {
    start_host_agent_in(agent, tag, None)
}

/// [`start_host_agent`], with the agent in a network namespace made by
/// `ip netns add` (the sockets are files, so they work across it).
pub fn start_host_agent_in(agent: &Path, tag: &str, netns: Option<&str>) -> anyhow::Result<HostAgent> {
    let dir = std::env::temp_dir().join(format!("vessel-agent-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let host = HostSide::new(dir.join("host"));
    let ready = host.listen(link::DEFAULT_PORT)?;
    let socket = dir.join("agent.sock");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(agent);
            c
        }
        None => Command::new(agent),
    };
    let child = command
        .arg("--listen")
        .arg(&socket)
        .arg("--host-prefix")
        .arg(&host.prefix)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    // Killed (and its directory removed) on any way out.
    let process = ChildGuard(child, dir);
    host.wait_ready(&ready, Duration::from_secs(10))?;
    let client = ttrpc::Client::connect(&format!("unix://{}", socket.display()))
        .map_err(|e| anyhow!("connecting to the agent at {}: {e}", socket.display()))?;
    Ok(HostAgent { client: AgentClient::new(client), host, _process: process })
}

/// An agent process and its directory: killed and removed when dropped.
struct ChildGuard(Child, PathBuf);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

pub use agent_proto::spec::{process_json, spec_json, SpecOptions};

/// A CreateContainer request for a directory root.
pub fn create_request(id: &str, spec: Vec<u8>, rootfs: &Path, stdio: StdioPorts) -> CreateContainerRequest {
    let mut root = Rootfs::new();
    root.set_path(rootfs.display().to_string());
    create_request_on(id, spec, root, stdio)
}

/// A CreateContainer request for a root the agent finds as a disk with
/// virtio serial `serial`.
pub fn create_request_on_disk(id: &str, spec: Vec<u8>, serial: &str, stdio: StdioPorts) -> CreateContainerRequest {
    let mut root = Rootfs::new();
    root.set_disk_serial(serial.into());
    create_request_on(id, spec, root, stdio)
}

fn create_request_on(id: &str, spec: Vec<u8>, root: Rootfs, stdio: StdioPorts) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        rootfs: Some(root).into(),
        stdio: Some(stdio).into(),
        ..Default::default()
    }
}

/// Stdout (and stderr) to the given ports.
pub fn output_ports(stdout: u32, stderr: u32) -> StdioPorts {
    StdioPorts { stdout_port: stdout, stderr_port: stderr, ..Default::default() }
}

/// A container ID request.
pub fn container(id: &str) -> ContainerRequest {
    ContainerRequest { container_id: id.into(), ..Default::default() }
}

/// A WaitProcess request.
pub fn wait_for(id: &str, exec_id: &str) -> WaitProcessRequest {
    WaitProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() }
}

/// A ttrpc error as one line.
pub fn rpc_error(err: ttrpc::Error) -> anyhow::Error {
    anyhow!(agent_proto::error_message(&err))
}

/// The collected output of a capture, as text.
pub fn collected(handle: JoinHandle<anyhow::Result<Vec<u8>>>) -> anyhow::Result<String> {
    let bytes = handle.join().map_err(|_| anyhow!("the capture thread panicked"))??;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
