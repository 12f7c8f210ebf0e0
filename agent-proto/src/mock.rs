//! An in-process mock agent for host-side unit tests: it keeps containers
//! and processes as records, in memory, and enforces the same lifecycle
//! rules and error replies as the real agent (unknown IDs, duplicates,
//! start before create; like the agent, remove takes a container in any
//! state), without running anything.
//! Every started process "exits" at once with [`MockAgent::exit_status`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::agent::{
    ContainerRequest, CreateContainerRequest, Empty, ExecProcessRequest, GuestDetails, HealthCheckResponse,
    ListProcessesResponse, SignalProcessRequest, StatsContainerResponse, UpdateContainerRequest, WaitProcessRequest,
    WaitProcessResponse,
};
use crate::agent_ttrpc::{create_agent, Agent};
use ttrpc::{Code, TtrpcContext};

/// Where a mock container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created, not started.
    Created,
    /// Started.
    Running,
    /// Paused.
    Paused,
}

/// A container the mock knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Its state.
    pub state: State,
    /// Exec IDs of the processes started in it ("" is the first).
    pub processes: Vec<String>,
    /// The memory limit last set by UpdateContainer.
    pub memory_limit: u64,
}

/// The mock. Clone it to look at what the host did while it serves.
#[derive(Clone, Debug, Default)]
pub struct MockAgent {
    containers: Arc<Mutex<HashMap<String, Container>>>,
    /// What every process's WaitProcess returns.
    pub exit_status: i32,
    calls: Arc<Mutex<Vec<&'static str>>>,
}

fn invalid(msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, msg))
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, format!("no {what} with ID {id:?}")))
}

impl MockAgent {
    /// A mock whose processes exit with `exit_status`.
    pub fn new(exit_status: i32) -> Self {
        MockAgent { exit_status, ..Default::default() }
    }

    /// The containers, by ID.
    pub fn containers(&self) -> HashMap<String, Container> {
        self.lock().clone()
    }

    /// The RPCs called so far, in order (their proto names).
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves the mock with ttrpc on a new Unix socket at `path`; drop the
    /// returned server (or call `shutdown`) to stop.
    pub fn serve(&self, path: &Path) -> ttrpc::Result<ttrpc::Server> {
        let service = create_agent(Arc::new(self.clone()));
        let mut server = ttrpc::Server::new().bind(&format!("unix://{}", path.display()))?.register_service(service);
        server.start()?;
        Ok(server)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, call: &'static str) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> ttrpc::Result<T>) -> ttrpc::Result<T> {
        let mut containers = self.lock();
        let c = containers.get_mut(id).ok_or_else(|| not_found("container", id))?;
        f(c)
    }

    /// Moves container `id` from state `from` to `to`, or says why not.
    fn transition(&self, id: &str, from: State, to: State) -> ttrpc::Result<Empty> {
        self.with(id, |c| {
            if c.state != from {
                return Err(invalid(format!("container {id:?} is {:?}, not {from:?}", c.state)));
            }
            c.state = to;
            Ok(Empty::new())
        })
    }
}

impl Agent for MockAgent {
    fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        self.record("CreateContainer");
        if req.container_id.is_empty() {
            return Err(invalid("container_id is empty".into()));
        }
        let mut containers = self.lock();
        if containers.contains_key(&req.container_id) {
            return Err(invalid(format!("a container with ID {:?} already exists", req.container_id)));
        }
        containers.insert(
            req.container_id,
            Container { state: State::Created, processes: vec![String::new()], memory_limit: 0 },
        );
        Ok(Empty::new())
    }

    fn start_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.record("StartContainer");
        self.transition(&req.container_id, State::Created, State::Running)
    }

    fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.record("ExecProcess");
        self.with(&req.container_id, |c| {
            if c.state != State::Running {
                return Err(invalid(format!("container {:?} is not running", req.container_id)));
            }
            if c.processes.contains(&req.exec_id) {
                return Err(invalid(format!("exec ID {:?} is already used", req.exec_id)));
            }
            c.processes.push(req.exec_id);
            Ok(Empty::new())
        })
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.record("SignalProcess");
        self.with(&req.container_id, |c| match c.processes.contains(&req.exec_id) {
            true => Ok(Empty::new()),
            false => Err(not_found("process", &req.exec_id)),
        })
    }

    fn wait_process(&self, _: &TtrpcContext, req: WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        self.record("WaitProcess");
        let status = self.exit_status;
        self.with(&req.container_id, |c| match c.processes.contains(&req.exec_id) {
            true => Ok(WaitProcessResponse { status, ..Default::default() }),
            false => Err(not_found("process", &req.exec_id)),
        })
    }

    fn list_processes(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        self.record("ListProcesses");
        self.with(&req.container_id, |_| Ok(ListProcessesResponse::new()))
    }

    fn update_container(&self, _: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.record("UpdateContainer");
        let limit = req.resources.memory_limit;
        self.with(&req.container_id, |c| {
            if limit != 0 {
                c.memory_limit = limit;
            }
            Ok(Empty::new())
        })
    }

    fn stats_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        self.record("StatsContainer");
        self.with(&req.container_id, |c| {
            Ok(StatsContainerResponse { memory_limit: c.memory_limit, ..Default::default() })
        })
    }

    fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.record("PauseContainer");
        self.transition(&req.container_id, State::Running, State::Paused)
    }

    fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.record("ResumeContainer");
        self.transition(&req.container_id, State::Paused, State::Running)
    }

    fn remove_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.record("RemoveContainer");
        match self.lock().remove(&req.container_id) {
            Some(_) => Ok(Empty::new()),
            None => Err(not_found("container", &req.container_id)),
        }
    }

    fn get_guest_details(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<GuestDetails> {
        self.record("GetGuestDetails");
        Ok(GuestDetails { agent_version: "mock".into(), online_cpus: 1, possible_cpus: 1, ..Default::default() })
    }

    fn check(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<HealthCheckResponse> {
        self.record("Check");
        Ok(HealthCheckResponse { serving: true, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_ttrpc::AgentClient;
    use ttrpc::context;

    fn temp_socket(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vessel-mock-{tag}-{}.sock", std::process::id()))
    }

    #[test]
    fn the_mock_serves_the_lifecycle_over_ttrpc_and_names_bad_ids() {
        let path = temp_socket("lifecycle");
        let _ = std::fs::remove_file(&path);
        let mock = MockAgent::new(7);
        let server = mock.serve(&path).unwrap();
        let client = AgentClient::new(ttrpc::Client::connect(&format!("unix://{}", path.display())).unwrap());
        let ctx = || context::with_timeout(5_000_000_000);
        let id = |s: &str| ContainerRequest { container_id: s.into(), ..Default::default() };

        assert!(client.check(ctx(), &Empty::new()).unwrap().serving);
        let create = CreateContainerRequest { container_id: "c1".into(), ..Default::default() };
        client.create_container(ctx(), &create).unwrap();
        let dup = crate::error_message(&client.create_container(ctx(), &create).unwrap_err());
        assert!(dup.contains("already exists"), "{dup}");
        client.start_container(ctx(), &id("c1")).unwrap();
        let wait = WaitProcessRequest { container_id: "c1".into(), ..Default::default() };
        assert_eq!(client.wait_process(ctx(), &wait).unwrap().status, 7);
        let unknown = crate::error_message(&client.start_container(ctx(), &id("nope")).unwrap_err());
        assert!(unknown.contains("\"nope\""), "{unknown}");
        // Not implemented by the mock: a clear "not supported" error, not a hang.
        let err = crate::error_message(&client.list_routes(ctx(), &Empty::new()).unwrap_err());
        assert!(err.contains("ListRoutes"), "{err}");
        client.remove_container(ctx(), &id("c1")).unwrap();
        assert!(mock.containers().is_empty());
        assert_eq!(mock.calls().first(), Some(&"Check"));
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }
}
