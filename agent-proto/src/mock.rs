//! An in-process mock agent for host-side unit tests: it keeps containers
//! and processes as records, in memory, and enforces the same lifecycle
//! rules and error replies as the real agent (unknown IDs, duplicates,
//! start before create, exec only while running, a process removed only
//! once it exited, resize only with a terminal; like the agent, remove
//! takes a container in any state), without running anything.
//!
//! Processes either exit as soon as they start, with
//! [`MockAgent::exit_status`] ([`MockAgent::new`]), or run until a signal
//! ends them (128 + the signal) or the test ends them with
//! [`MockAgent::finish`] ([`MockAgent::running`]). When a container's
//! first process ends, the container is stopped and its other processes
//! are killed, as in a container's own PID namespace. Unlike a real
//! container's PID 1, which ignores the signals it has no handler for
//! (SIGKILL aside), any signal that ends a process by default ends it. WaitProcess and
//! GetOOMEvent block as the agent's do, until the call's deadline; a test
//! makes an OOM event with [`MockAgent::oom`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::{
    ContainerRequest, ContainerState, ContainerStatusResponse, CreateContainerRequest, Empty, ExecProcessRequest,
    GuestDetails, HealthCheckResponse, ListProcessesResponse, MountDiskRequest, OOMEvent, RemoveProcessRequest,
    ResizeTerminalRequest, Resources, SetGuestIdentityRequest, SignalProcessRequest, StatsContainerResponse,
    UpdateContainerRequest, WaitProcessRequest, WaitProcessResponse,
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
    /// Its first process ended.
    Stopped,
}

/// A process the mock knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    /// Its status once it ended.
    pub exit: Option<i32>,
    /// Whether its spec asked for a terminal.
    pub terminal: bool,
    /// The terminal size last set by ResizeTerminal (rows, columns).
    pub size: Option<(u32, u32)>,
}

/// A container the mock knows.
#[derive(Clone, Debug, PartialEq)]
pub struct Container {
    /// Its state.
    pub state: State,
    /// Its processes by exec ID ("" is the first).
    pub processes: BTreeMap<String, Process>,
    /// The memory limit last set by UpdateContainer.
    pub memory_limit: u64,
    /// Every UpdateContainer's resources, in order.
    pub updates: Vec<Resources>,
    /// The limits as the updates left them, as StatsContainer reports
    /// them (`*_unlimited` true where nothing limits).
    pub limits: Resources,
    /// Its first process's (made-up) PID.
    pub pid: i32,
    /// When it was started (Unix ms; 0 before).
    pub started_at_ms: u64,
    /// MountDisk calls: (serial, destination, read-only).
    pub mounts: Vec<(String, String, bool)>,
}

#[derive(Debug, Default)]
struct Inner {
    containers: HashMap<String, Container>,
    /// OOM events not taken yet.
    ooms: VecDeque<String>,
    next_pid: i32,
    /// WaitProcess calls still to refuse as the agent does when too many
    /// wait at once (RESOURCE_EXHAUSTED).
    refused_waits: usize,
    /// The identity the last SetGuestIdentity gave.
    identity: Option<crate::identity::Identity>,
}

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled whenever a process ends, a container goes or an OOM event
    /// is made.
    changed: Condvar,
}

/// The mock. Clone it to look at what the host did while it serves.
#[derive(Clone, Debug, Default)]
pub struct MockAgent {
    shared: Arc<Shared>,
    /// What a process's WaitProcess returns when processes exit at once.
    pub exit_status: i32,
    /// Processes run until signalled or [`MockAgent::finish`]ed, rather
    /// than exiting at once.
    pub processes_run: bool,
    calls: Arc<Mutex<Vec<&'static str>>>,
}

fn error(code: Code, msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn invalid(msg: String) -> ttrpc::Error {
    error(Code::INVALID_ARGUMENT, msg)
}

fn not_found(what: &str, id: &str) -> ttrpc::Error {
    error(Code::NOT_FOUND, format!("no {what} with ID {id:?}"))
}

/// How a reply names a process (as the agent does).
fn describe(id: &str, exec_id: &str) -> String {
    match exec_id {
        "" => format!("the first process of container {id:?}"),
        exec => format!("process {exec:?} of container {id:?}"),
    }
}

/// Whether an OCI spec (or process) asks for a terminal: `process.terminal`
/// or, for a process object, `terminal`.
fn wants_terminal(json: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else { return false };
    let process = value.get("process").unwrap_or(&value);
    process.get("terminal").and_then(serde_json::Value::as_bool).unwrap_or(false)
}

/// Signals that do not end a process by default.
fn ends_process(signal: u32) -> bool {
    let harmless = [libc::SIGCHLD, libc::SIGCONT, libc::SIGURG, libc::SIGWINCH, libc::SIGSTOP, libc::SIGTSTP];
    !harmless.iter().any(|s| u32::try_from(*s) == Ok(signal))
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Container {
    /// Ends process `exec_id` with `status`; the first process takes the
    /// container (and its other processes) with it.
    fn end(&mut self, exec_id: &str, status: i32) {
        let Some(p) = self.processes.get_mut(exec_id) else { return };
        if p.exit.is_some() {
            return;
        }
        p.exit = Some(status);
        if exec_id.is_empty() {
            self.state = State::Stopped;
            for p in self.processes.values_mut() {
                p.exit.get_or_insert(128 + libc::SIGKILL);
            }
        }
    }

    fn process(&self, id: &str, exec_id: &str) -> ttrpc::Result<&Process> {
        self.processes
            .get(exec_id)
            .ok_or_else(|| error(Code::NOT_FOUND, format!("container {id:?} has no process with exec ID {exec_id:?}")))
    }
}

/// The runc mapping of OCI cpu shares to cgroup v2's cpu.weight.
fn shares_to_weight(shares: u64) -> u64 {
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// Checks an update as the agent does and merges it into `limits`.
fn merge(limits: &mut Resources, r: &Resources) -> ttrpc::Result<()> {
    let both = |what: &str, value: u64, unlimited: bool| match value != 0 && unlimited {
        true => Err(invalid(format!("{what} is given a value and told to be unlimited"))),
        false => Ok(()),
    };
    both("memory limit", r.memory_limit, r.memory_unlimited)?;
    both("cpu quota", r.cpu_quota, r.cpu_unlimited)?;
    both("pids limit", r.pids_limit, r.pids_unlimited)?;
    if r.cpu_quota != 0 && r.cpu_period == 0 {
        return Err(invalid(format!("cpu quota {} with a period of 0", r.cpu_quota)));
    }
    if r.cpu_shares != 0 && r.cpu_weight != 0 {
        return Err(invalid("cpu shares and cpu weight are both set: give one".into()));
    }
    if r.cpu_weight > 10_000 {
        return Err(invalid(format!("cpu weight {} is not between 1 and 10000", r.cpu_weight)));
    }
    let set = |limit: &mut u64, unlimited: &mut bool, value: u64, lift: bool| {
        if value != 0 {
            (*limit, *unlimited) = (value, false);
        } else if lift {
            (*limit, *unlimited) = (0, true);
        }
    };
    set(&mut limits.memory_limit, &mut limits.memory_unlimited, r.memory_limit, r.memory_unlimited);
    set(&mut limits.pids_limit, &mut limits.pids_unlimited, r.pids_limit, r.pids_unlimited);
    set(&mut limits.cpu_quota, &mut limits.cpu_unlimited, r.cpu_quota, r.cpu_unlimited);
    if r.cpu_quota != 0 {
        limits.cpu_period = r.cpu_period;
    }
    match (r.cpu_shares, r.cpu_weight) {
        (0, 0) => {}
        (shares, 0) => limits.cpu_weight = shares_to_weight(shares),
        (_, weight) => limits.cpu_weight = weight,
    }
    if !r.cpuset_cpus.is_empty() {
        limits.cpuset_cpus = r.cpuset_cpus.clone();
    }
    if !r.cpuset_mems.is_empty() {
        limits.cpuset_mems = r.cpuset_mems.clone();
    }
    Ok(())
}

/// What a new container's cgroup has: no limit, the default weight.
fn unlimited() -> Resources {
    Resources {
        cpu_weight: 100,
        cpu_period: 100_000,
        memory_unlimited: true,
        cpu_unlimited: true,
        pids_unlimited: true,
        ..Default::default()
    }
}

impl MockAgent {
    /// A mock whose processes exit at once with `exit_status`.
    pub fn new(exit_status: i32) -> Self {
        MockAgent { exit_status, ..Default::default() }
    }

    /// A mock whose processes run until a signal ends them or
    /// [`MockAgent::finish`].
    pub fn running() -> Self {
        MockAgent { processes_run: true, ..Default::default() }
    }

    /// The containers, by ID.
    pub fn containers(&self) -> HashMap<String, Container> {
        self.lock().containers.clone()
    }

    /// The RPCs called so far, in order (their proto names).
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends a running process with `status`, as if it exited; false if
    /// there is no such process.
    pub fn finish(&self, id: &str, exec_id: &str, status: i32) -> bool {
        let mut inner = self.lock();
        let Some(c) = inner.containers.get_mut(id) else { return false };
        let known = c.processes.contains_key(exec_id);
        c.end(exec_id, status);
        self.shared.changed.notify_all();
        known
    }

    /// Makes an OOM event for container `id`, for one GetOOMEvent to take.
    /// Has the next `n` WaitProcess calls refused as busy, as the agent
    /// refuses calls past its bound on blocked waits.
    pub fn refuse_waits(&self, n: usize) {
        self.lock().refused_waits = n;
    }

    pub fn oom(&self, id: &str) {
        self.lock().ooms.push_back(id.to_string());
        self.shared.changed.notify_all();
    }

    /// Serves the mock with ttrpc on a new Unix socket at `path`; drop the
    /// returned server (or call `shutdown`) to stop.
    pub fn serve(&self, path: &Path) -> ttrpc::Result<ttrpc::Server> {
        let service = create_agent(Arc::new(self.clone()));
        let mut server = ttrpc::Server::new().bind(&format!("unix://{}", path.display()))?.register_service(service);
        server.start()?;
        Ok(server)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The identity the last SetGuestIdentity gave, if any.
    pub fn identity(&self) -> Option<crate::identity::Identity> {
        self.lock().identity.clone()
    }

    fn details(&self) -> GuestDetails {
        let hostname = self.lock().identity.as_ref().map_or("mock".into(), |i| i.hostname.clone());
        GuestDetails { agent_version: "mock".into(), online_cpus: 1, possible_cpus: 1, hostname, ..Default::default() }
    }

    fn record(&self, call: &'static str) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> ttrpc::Result<T>) -> ttrpc::Result<T> {
        let mut inner = self.lock();
        let c = inner.containers.get_mut(id).ok_or_else(|| not_found("container", id))?;
        let result = f(c);
        self.shared.changed.notify_all();
        result
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

    /// Waits until `ready` has an answer, the call's deadline passes or
    /// its connection goes.
    fn block<T>(
        &self,
        ctx: &TtrpcContext,
        mut ready: impl FnMut(&mut Inner) -> Option<ttrpc::Result<T>>,
    ) -> ttrpc::Result<T> {
        let deadline = u64::try_from(ctx.timeout_nano)
            .ok()
            .filter(|n| *n > 0)
            .and_then(|n| Instant::now().checked_add(Duration::from_nanos(n)));
        let mut inner = self.lock();
        loop {
            if let Some(answer) = ready(&mut inner) {
                return answer;
            }
            let mut wait = Duration::from_millis(50);
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(Instant::now()));
            }
            if wait.is_zero() || ctx.cancel_rx.try_recv().is_err_and(|e| e.is_disconnected()) {
                return Err(error(Code::DEADLINE_EXCEEDED, "the call's deadline passed".into()));
            }
            inner = self.shared.changed.wait_timeout(inner, wait).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn started(&self, c: &mut Container, exec_id: &str) {
        if !self.processes_run {
            c.end(exec_id, self.exit_status);
        }
    }
}

impl Agent for MockAgent {
    fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        self.record("CreateContainer");
        if req.container_id.is_empty() {
            return Err(invalid("container_id is empty".into()));
        }
        let mut inner = self.lock();
        if inner.containers.contains_key(&req.container_id) {
            return Err(invalid(format!("a container with ID {:?} already exists", req.container_id)));
        }
        inner.next_pid += 1;
        let pid = 1000 + inner.next_pid;
        let init = Process { terminal: wants_terminal(&req.oci_spec_json), ..Default::default() };
        inner.containers.insert(
            req.container_id,
            Container {
                state: State::Created,
                processes: BTreeMap::from([(String::new(), init)]),
                memory_limit: 0,
                updates: Vec::new(),
                limits: unlimited(),
                pid,
                started_at_ms: 0,
                mounts: Vec::new(),
            },
        );
        Ok(Empty::new())
    }

    fn start_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.record("StartContainer");
        self.transition(&req.container_id, State::Created, State::Running)?;
        self.with(&req.container_id, |c| {
            c.started_at_ms = now_ms();
            self.started(c, "");
            Ok(Empty::new())
        })
    }

    fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.record("ExecProcess");
        let id = req.container_id.clone();
        self.with(&req.container_id, |c| {
            if c.state != State::Running {
                return Err(invalid(format!("container {id:?} is {:?}, not Running", c.state)));
            }
            if req.exec_id.is_empty() {
                return Err(invalid("exec ID \"\" is the first process's".into()));
            }
            if c.processes.contains_key(&req.exec_id) {
                return Err(invalid(format!("container {id:?} already has a process with exec ID {:?}", req.exec_id)));
            }
            let process = Process { terminal: wants_terminal(&req.oci_process_json), ..Default::default() };
            c.processes.insert(req.exec_id.clone(), process);
            self.started(c, &req.exec_id);
            Ok(Empty::new())
        })
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.record("SignalProcess");
        if !(1..=64).contains(&req.signal) {
            return Err(invalid(format!("signal {} is not between 1 and 64", req.signal)));
        }
        let id = req.container_id.clone();
        self.with(&req.container_id, |c| {
            c.process(&id, &req.exec_id)?;
            if !ends_process(req.signal) {
                return Ok(Empty::new());
            }
            let status = 128 + req.signal as i32;
            let targets: Vec<String> = match req.all {
                true => c.processes.keys().cloned().collect(),
                false => vec![req.exec_id.clone()],
            };
            for exec_id in targets {
                c.end(&exec_id, status);
            }
            Ok(Empty::new())
        })
    }

    fn wait_process(&self, ctx: &TtrpcContext, req: WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        self.record("WaitProcess");
        {
            let mut inner = self.lock();
            if inner.refused_waits > 0 {
                inner.refused_waits -= 1;
                return Err(error(Code::RESOURCE_EXHAUSTED, "too many WaitProcess calls are waiting".into()));
            }
        }
        let (id, exec_id) = (req.container_id, req.exec_id);
        let reply = |status| Some(Ok(WaitProcessResponse { status, ..Default::default() }));
        // Seen running, then gone: removed, which kills it (as the agent's
        // RemoveContainer and DestroySandbox do).
        let mut seen_running = false;
        self.block(ctx, |inner| {
            let c = match inner.containers.get(&id) {
                Some(c) => c,
                None if seen_running => return reply(128 + libc::SIGKILL),
                None => return Some(Err(not_found("container", &id))),
            };
            match c.process(&id, &exec_id) {
                Err(_) if seen_running => reply(128 + libc::SIGKILL),
                Err(e) => Some(Err(e)),
                Ok(Process { exit: Some(status), .. }) => reply(*status),
                Ok(_) => {
                    seen_running = true;
                    None
                }
            }
        })
    }

    fn list_processes(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        self.record("ListProcesses");
        self.with(&req.container_id, |_| Ok(ListProcessesResponse::new()))
    }

    fn update_container(&self, _: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.record("UpdateContainer");
        let resources = req.resources.into_option().unwrap_or_default();
        if resources == Resources::default() {
            return Err(invalid("the update sets no limit".into()));
        }
        self.with(&req.container_id, |c| {
            let mut limits = c.limits.clone();
            merge(&mut limits, &resources)?;
            c.memory_limit = limits.memory_limit;
            c.limits = limits;
            c.updates.push(resources);
            Ok(Empty::new())
        })
    }

    fn stats_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        self.record("StatsContainer");
        self.with(&req.container_id, |c| {
            Ok(StatsContainerResponse {
                memory_limit: c.limits.memory_limit,
                pids_limit: c.limits.pids_limit,
                limits: Some(c.limits.clone()).into(),
                ..Default::default()
            })
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
        let removed = self.lock().containers.remove(&req.container_id);
        self.shared.changed.notify_all();
        match removed {
            Some(_) => Ok(Empty::new()),
            None => Err(not_found("container", &req.container_id)),
        }
    }

    fn container_status(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ContainerStatusResponse> {
        self.record("ContainerStatus");
        self.with(&req.container_id, |c| {
            let state = match c.state {
                State::Created => ContainerState::CREATED,
                State::Running => ContainerState::RUNNING,
                State::Paused => ContainerState::PAUSED,
                State::Stopped => ContainerState::STOPPED,
            };
            let exit = c.processes.get("").and_then(|p| p.exit);
            Ok(ContainerStatusResponse {
                state: state.into(),
                pid: c.pid,
                started_at_ms: c.started_at_ms,
                exited: exit.is_some(),
                exit_code: exit.unwrap_or(0),
                ..Default::default()
            })
        })
    }

    fn mount_disk(&self, _: &TtrpcContext, req: MountDiskRequest) -> ttrpc::Result<Empty> {
        self.record("MountDisk");
        if !req.destination.starts_with('/') {
            return Err(invalid(format!("the mount destination {:?} is not an absolute path", req.destination)));
        }
        self.with(&req.container_id, |c| {
            if c.state == State::Stopped {
                return Err(invalid(format!("container {:?} is Stopped", req.container_id)));
            }
            c.mounts.push((req.serial.clone(), req.destination.clone(), req.read_only));
            Ok(Empty::new())
        })
    }

    fn resize_terminal(&self, _: &TtrpcContext, req: ResizeTerminalRequest) -> ttrpc::Result<Empty> {
        self.record("ResizeTerminal");
        for (what, n) in [("rows", req.rows), ("columns", req.columns)] {
            if !(1..=65_535).contains(&n) {
                return Err(invalid(format!("a terminal of {n} {what} is not 1-65535")));
            }
        }
        let id = req.container_id.clone();
        self.with(&req.container_id, |c| {
            c.process(&id, &req.exec_id)?;
            match c.processes.get_mut(&req.exec_id) {
                Some(p) if p.terminal => {
                    p.size = Some((req.rows, req.columns));
                    Ok(Empty::new())
                }
                _ => Err(invalid(format!("{} has no terminal", describe(&id, &req.exec_id)))),
            }
        })
    }

    fn remove_process(&self, _: &TtrpcContext, req: RemoveProcessRequest) -> ttrpc::Result<Empty> {
        self.record("RemoveProcess");
        let id = req.container_id.clone();
        if req.exec_id.is_empty() {
            return Err(invalid(format!(
                "the first process of container {id:?} goes with the container (RemoveContainer)"
            )));
        }
        self.with(&req.container_id, |c| {
            if c.process(&id, &req.exec_id)?.exit.is_none() {
                return Err(invalid(format!(
                    "{} still runs: signal it and wait for it first",
                    describe(&id, &req.exec_id)
                )));
            }
            c.processes.remove(&req.exec_id);
            Ok(Empty::new())
        })
    }

    fn get_oom_event(&self, ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<OOMEvent> {
        self.record("GetOOMEvent");
        self.block(ctx, |inner| {
            inner.ooms.pop_front().map(|container_id| Ok(OOMEvent { container_id, ..Default::default() }))
        })
    }

    fn get_guest_details(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<GuestDetails> {
        self.record("GetGuestDetails");
        Ok(self.details())
    }

    fn set_guest_identity(&self, _: &TtrpcContext, req: SetGuestIdentityRequest) -> ttrpc::Result<GuestDetails> {
        self.record("SetGuestIdentity");
        let identity = crate::identity::check(&req).map_err(|e| invalid(e.to_string()))?;
        self.lock().identity = Some(identity);
        Ok(self.details())
    }

    fn destroy_sandbox(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        self.record("DestroySandbox");
        self.lock().containers.clear();
        self.shared.changed.notify_all();
        Ok(Empty::new())
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

    /// A served mock and a client connected to it.
    struct Served {
        mock: MockAgent,
        client: AgentClient,
        server: Option<ttrpc::Server>,
        path: std::path::PathBuf,
    }

    impl Served {
        fn new(tag: &str, mock: MockAgent) -> Self {
            let path = temp_socket(tag);
            let _ = std::fs::remove_file(&path);
            let server = mock.serve(&path).unwrap();
            let client = AgentClient::new(ttrpc::Client::connect(&format!("unix://{}", path.display())).unwrap());
            Served { mock, client, server: Some(server), path }
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            if let Some(server) = self.server.take() {
                server.shutdown();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn ctx() -> context::Context {
        context::with_timeout(5_000_000_000)
    }

    fn id(s: &str) -> ContainerRequest {
        ContainerRequest { container_id: s.into(), ..Default::default() }
    }

    fn create(s: &str, terminal: bool) -> CreateContainerRequest {
        let spec = format!(r#"{{"process":{{"terminal":{terminal},"args":["sh"]}}}}"#);
        CreateContainerRequest { container_id: s.into(), oci_spec_json: spec.into_bytes(), ..Default::default() }
    }

    fn exec(s: &str, exec_id: &str) -> ExecProcessRequest {
        ExecProcessRequest {
            container_id: s.into(),
            exec_id: exec_id.into(),
            oci_process_json: br#"{"args":["sleep","1"]}"#.to_vec(),
            ..Default::default()
        }
    }

    fn remove(s: &str, exec_id: &str) -> RemoveProcessRequest {
        RemoveProcessRequest { container_id: s.into(), exec_id: exec_id.into(), ..Default::default() }
    }

    fn message<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> String {
        crate::error_message(&r.unwrap_err())
    }

    #[test]
    fn the_mock_serves_the_lifecycle_over_ttrpc_and_names_bad_ids() {
        let s = Served::new("lifecycle", MockAgent::new(7));
        let (client, mock) = (&s.client, &s.mock);

        assert!(client.check(ctx(), &Empty::new()).unwrap().serving);
        let create = CreateContainerRequest { container_id: "c1".into(), ..Default::default() };
        client.create_container(ctx(), &create).unwrap();
        let dup = message(client.create_container(ctx(), &create));
        assert!(dup.contains("already exists"), "{dup}");
        client.start_container(ctx(), &id("c1")).unwrap();
        let wait = WaitProcessRequest { container_id: "c1".into(), ..Default::default() };
        assert_eq!(client.wait_process(ctx(), &wait).unwrap().status, 7);
        let unknown = message(client.start_container(ctx(), &id("nope")));
        assert!(unknown.contains("\"nope\""), "{unknown}");
        // Not implemented by the mock: a clear "not supported" error, not a hang.
        let err = message(client.list_routes(ctx(), &Empty::new()));
        assert!(err.contains("ListRoutes"), "{err}");
        client.remove_container(ctx(), &id("c1")).unwrap();
        assert!(mock.containers().is_empty());
        assert_eq!(mock.calls().first(), Some(&"Check"));
    }

    #[test]
    fn status_follows_a_container_from_created_to_stopped_with_its_exit_code() {
        let s = Served::new("status", MockAgent::running());
        let client = &s.client;
        client.create_container(ctx(), &create("c", false)).unwrap();
        let status = client.container_status(ctx(), &id("c")).unwrap();
        assert_eq!(status.state.enum_value(), Ok(ContainerState::CREATED));
        assert!(status.pid > 0 && status.started_at_ms == 0 && !status.exited, "{status:?}");

        client.start_container(ctx(), &id("c")).unwrap();
        let status = client.container_status(ctx(), &id("c")).unwrap();
        assert_eq!(status.state.enum_value(), Ok(ContainerState::RUNNING));
        assert!(status.started_at_ms > 0 && !status.exited, "{status:?}");
        client.pause_container(ctx(), &id("c")).unwrap();
        let status = client.container_status(ctx(), &id("c")).unwrap();
        assert_eq!(status.state.enum_value(), Ok(ContainerState::PAUSED));
        client.resume_container(ctx(), &id("c")).unwrap();

        assert!(s.mock.finish("c", "", 3));
        let status = client.container_status(ctx(), &id("c")).unwrap();
        assert_eq!(status.state.enum_value(), Ok(ContainerState::STOPPED));
        assert!(status.exited && status.exit_code == 3, "{status:?}");
        let err = message(client.exec_process(ctx(), &exec("c", "late")));
        assert!(err.contains("Stopped, not Running"), "{err}");
        let err = message(client.container_status(ctx(), &id("ghost")));
        assert!(err.contains("NOT_FOUND") && err.contains("\"ghost\""), "{err}");
    }

    #[test]
    fn a_running_exec_is_not_removed_and_its_id_is_reusable_once_it_exited() {
        let s = Served::new("remove-exec", MockAgent::running());
        let client = &s.client;
        client.create_container(ctx(), &create("c", false)).unwrap();
        client.start_container(ctx(), &id("c")).unwrap();
        client.exec_process(ctx(), &exec("c", "e1")).unwrap();
        let dup = message(client.exec_process(ctx(), &exec("c", "e1")));
        assert!(dup.contains("already has a process with exec ID \"e1\""), "{dup}");
        let err = message(client.remove_process(ctx(), &remove("c", "e1")));
        assert!(err.contains("process \"e1\" of container \"c\" still runs"), "{err}");

        let kill = SignalProcessRequest {
            container_id: "c".into(),
            exec_id: "e1".into(),
            signal: libc::SIGKILL as u32,
            ..Default::default()
        };
        client.signal_process(ctx(), &kill).unwrap();
        let wait = WaitProcessRequest { container_id: "c".into(), exec_id: "e1".into(), ..Default::default() };
        assert_eq!(client.wait_process(ctx(), &wait).unwrap().status, 137);
        client.remove_process(ctx(), &remove("c", "e1")).unwrap();
        assert!(!s.mock.containers()["c"].processes.contains_key("e1"));
        let err = message(client.remove_process(ctx(), &remove("c", "e1")));
        assert!(err.contains("NOT_FOUND"), "{err}");
        client.exec_process(ctx(), &exec("c", "e1")).unwrap();
        // The first process is not removed on its own.
        let err = message(client.remove_process(ctx(), &remove("c", "")));
        assert!(err.contains("RemoveContainer"), "{err}");
    }

    #[test]
    fn a_wait_on_a_running_process_ends_at_the_calls_deadline() {
        let s = Served::new("wait-deadline", MockAgent::running());
        s.client.create_container(ctx(), &create("c", false)).unwrap();
        s.client.start_container(ctx(), &id("c")).unwrap();
        let wait = WaitProcessRequest { container_id: "c".into(), ..Default::default() };
        let started = Instant::now();
        let r = s.client.wait_process(context::with_timeout(200_000_000), &wait);
        assert!(r.is_err() && started.elapsed() < Duration::from_secs(3), "{r:?}");
        // Ended by the test: the wait returns its status.
        let mock = s.mock.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            mock.finish("c", "", 0)
        });
        assert_eq!(s.client.wait_process(ctx(), &wait).unwrap().status, 0);
        assert!(finisher.join().unwrap());
        // A container removed under a waiter: its process was killed.
        s.client.create_container(ctx(), &create("d", false)).unwrap();
        s.client.start_container(ctx(), &id("d")).unwrap();
        let client = s.client.clone();
        let remover = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            client.remove_container(ctx(), &id("d"))
        });
        let wait = WaitProcessRequest { container_id: "d".into(), ..Default::default() };
        assert_eq!(s.client.wait_process(ctx(), &wait).unwrap().status, 137);
        remover.join().unwrap().unwrap();
    }

    #[test]
    fn resize_is_refused_for_a_process_without_a_terminal() {
        let s = Served::new("resize", MockAgent::running());
        let client = &s.client;
        client.create_container(ctx(), &create("tty", true)).unwrap();
        client.create_container(ctx(), &create("plain", false)).unwrap();
        let resize = |c: &str, rows, columns| ResizeTerminalRequest {
            container_id: c.into(),
            rows,
            columns,
            ..Default::default()
        };
        client.resize_terminal(ctx(), &resize("tty", 40, 120)).unwrap();
        assert_eq!(s.mock.containers()["tty"].processes[""].size, Some((40, 120)));
        let err = message(client.resize_terminal(ctx(), &resize("plain", 40, 120)));
        assert!(err.contains("the first process of container \"plain\" has no terminal"), "{err}");
        let err = message(client.resize_terminal(ctx(), &resize("tty", 0, 70_000)));
        assert!(err.contains("0 rows"), "{err}");
    }

    #[test]
    fn updates_are_recorded_and_limits_can_be_lifted_back_to_unlimited() {
        let s = Served::new("update", MockAgent::running());
        let client = &s.client;
        client.create_container(ctx(), &create("c", false)).unwrap();
        let update = |r: Resources| UpdateContainerRequest {
            container_id: "c".into(),
            resources: Some(r).into(),
            ..Default::default()
        };
        let limited = Resources {
            memory_limit: 64 << 20,
            pids_limit: 32,
            cpu_shares: 1024,
            cpuset_cpus: "0".into(),
            ..Default::default()
        };
        client.update_container(ctx(), &update(limited.clone())).unwrap();
        let limits = client.stats_container(ctx(), &id("c")).unwrap().limits.unwrap();
        assert_eq!((limits.memory_limit, limits.pids_limit, limits.cpu_weight), (64 << 20, 32, 39));
        assert!(!limits.memory_unlimited && !limits.pids_unlimited && limits.cpu_unlimited, "{limits:?}");
        assert_eq!(limits.cpuset_cpus, "0");

        let lift = Resources { memory_unlimited: true, ..Default::default() };
        client.update_container(ctx(), &update(lift.clone())).unwrap();
        let stats = client.stats_container(ctx(), &id("c")).unwrap();
        let limits = stats.limits.unwrap();
        assert!(stats.memory_limit == 0 && limits.memory_unlimited && limits.pids_limit == 32, "{limits:?}");
        assert_eq!(s.mock.containers()["c"].updates, vec![limited, lift]);

        let both = Resources { pids_limit: 5, pids_unlimited: true, ..Default::default() };
        let err = message(client.update_container(ctx(), &update(both)));
        assert!(err.contains("pids limit is given a value and told to be unlimited"), "{err}");
        let err = message(client.update_container(ctx(), &update(Resources::default())));
        assert!(err.contains("sets no limit"), "{err}");
    }

    #[test]
    fn an_oom_event_the_test_makes_ends_a_waiting_get_oom_event() {
        let s = Served::new("oom", MockAgent::running());
        let started = Instant::now();
        let r = s.client.get_oom_event(context::with_timeout(200_000_000), &Empty::new());
        assert!(r.is_err() && started.elapsed() < Duration::from_secs(3), "{r:?}");
        let mock = s.mock.clone();
        let trigger = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            mock.oom("hog");
        });
        assert_eq!(s.client.get_oom_event(ctx(), &Empty::new()).unwrap().container_id, "hog");
        trigger.join().unwrap();
        // Taken once.
        let r = s.client.get_oom_event(context::with_timeout(100_000_000), &Empty::new());
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn an_identity_is_checked_then_kept_and_reported() {
        let s = Served::new("identity", MockAgent::new(0));
        let mut req = SetGuestIdentityRequest {
            hostname: "box-1".into(),
            time_sec: 1_700_000_000,
            entropy: vec![1; 32],
            ..Default::default()
        };
        assert_eq!(s.client.set_guest_identity(ctx(), &req).unwrap().hostname, "box-1");
        assert_eq!(s.mock.identity().unwrap().hostname, "box-1");
        assert_eq!(s.client.get_guest_details(ctx(), &Empty::new()).unwrap().hostname, "box-1");
        req.hostname = "bad name".into();
        let err = crate::error_message(&s.client.set_guest_identity(ctx(), &req).unwrap_err());
        assert!(err.contains("INVALID_ARGUMENT") && err.contains("\"bad name\""), "{err}");
        assert_eq!(s.mock.identity().unwrap().hostname, "box-1", "a refused request changed the identity");
    }

    #[test]
    fn destroy_sandbox_removes_every_container() {
        let s = Served::new("destroy", MockAgent::running());
        s.client.create_container(ctx(), &create("a", false)).unwrap();
        s.client.create_container(ctx(), &create("b", false)).unwrap();
        s.client.destroy_sandbox(ctx(), &Empty::new()).unwrap();
        assert!(s.mock.containers().is_empty());
        assert!(s.client.check(ctx(), &Empty::new()).unwrap().serving);
    }
}
