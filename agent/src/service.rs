//! The ttrpc `Agent` service: requests in, [`Containers`] and the guest's
//! facilities underneath, clear error replies out. A bad request never
//! takes the agent down: it is PID 1, and its death is the VM's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_proto::agent::{
    ContainerRequest, ContainerState, ContainerStatusResponse, CreateContainerRequest, Empty, ExecProcessRequest,
    GuestDetails, HealthCheckResponse, Interface, Interfaces, ListProcessesResponse, MountDiskRequest, OOMEvent,
    OnlineCPUMemRequest, ProcessInfo, RemoveProcessRequest, ResizeTerminalRequest, Resources, Routes,
    SetGuestIdentityRequest, SignalProcessRequest, StatsContainerResponse, UpdateContainerRequest,
    UpdateInterfaceRequest, UpdateRoutesRequest, VirtioSlot, VirtioSlotRequest, VirtioSlots, WaitProcessRequest,
    WaitProcessResponse,
};
use agent_proto::ttrpc::{self, Code, TtrpcContext};

use crate::container::{Containers, Error, State};
use crate::limits::{check_cpuset, check_weight, shares_to_weight, update_limit, Limits, LimitsError};

/// How often GetOOMEvent looks at the containers' memory.events.
const OOM_POLL: Duration = Duration::from_millis(100);

/// The most requests the agent serves at once on one connection (ttrpc's
/// threads).
pub const THREADS: usize = 256;

/// The most WaitProcess calls blocked at once: the threads they take are
/// not there for Remove or DestroySandbox, so some are always kept free.
pub const MAX_BLOCKED_WAITS: usize = THREADS - 64;

/// How long a blocked WaitProcess sleeps between looks at its deadline
/// and connection (an exit wakes it at once).
const WAIT_SLICE: Duration = Duration::from_millis(500);

/// What the service needs besides the containers.
pub struct Service {
    /// The containers.
    pub containers: Arc<Containers>,
    /// Running as a guest's PID 1 (CPUs may be onlined, virtio slots
    /// bound) rather than as a host process.
    pub guest: bool,
    /// When the agent became ready, in milliseconds since the kernel
    /// started (0 on the host).
    pub ready_after_boot_ms: u64,
    /// WaitProcess calls blocked now.
    pub blocked_waits: AtomicUsize,
}

/// A place among [`MAX_BLOCKED_WAITS`], given back when dropped.
struct WaitSlot<'a>(&'a AtomicUsize);

impl<'a> WaitSlot<'a> {
    fn take(count: &'a AtomicUsize) -> Option<Self> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_BLOCKED_WAITS).then_some(n + 1)).ok()?;
        Some(WaitSlot(count))
    }
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When the call must be answered by (its timeout, if it has one).
fn deadline(ctx: &TtrpcContext) -> Option<Instant> {
    u64::try_from(ctx.timeout_nano)
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| Instant::now().checked_add(Duration::from_nanos(n)))
}

fn status(code: Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

fn reply<T>(r: Result<T, Error>) -> ttrpc::Result<T> {
    r.map_err(|e| match e {
        Error::Invalid(m) => status(Code::INVALID_ARGUMENT, m),
        Error::NotFound(m) => status(Code::NOT_FOUND, m),
        Error::Failed(m) => status(Code::INTERNAL, m),
    })
}

/// The limits an UpdateContainer asks for, checked (no limit at all is
/// refused by the caller).
pub fn limits_from(r: &Resources) -> Result<Limits, Error> {
    let invalid = |e: LimitsError| Error::Invalid(e.to_string());
    let nonzero = |v: u64| (v != 0).then_some(v);
    let cpu = match (r.cpu_quota, r.cpu_period) {
        (0, _) => None,
        (q, 0) => return Err(invalid(LimitsError::ZeroCpuPeriod(q))),
        (q, p) => Some((q, p)),
    };
    let cpu_weight = match (r.cpu_shares, r.cpu_weight) {
        (0, 0) => None,
        (shares, 0) => Some(shares_to_weight(shares)),
        (0, weight) => Some(check_weight(weight).map_err(invalid)?),
        _ => return Err(invalid(LimitsError::SharesAndWeight)),
    };
    let cpuset = |what, v: &str| (!v.is_empty()).then(|| check_cpuset(what, v)).transpose().map_err(invalid);
    Ok(Limits {
        memory: update_limit("memory limit", nonzero(r.memory_limit), r.memory_unlimited).map_err(invalid)?,
        cpu: update_limit("cpu quota", cpu, r.cpu_unlimited).map_err(invalid)?,
        pids: update_limit("pids limit", nonzero(r.pids_limit), r.pids_unlimited).map_err(invalid)?,
        cpu_weight,
        cpuset_cpus: cpuset("cpuset.cpus", &r.cpuset_cpus)?,
        cpuset_mems: cpuset("cpuset.mems", &r.cpuset_mems)?,
    })
}

impl Service {
    /// Refuses what only a guest's agent may do (`what` is "CPUs are onlined").
    fn guest_only(&self, what: &str) -> ttrpc::Result<()> {
        match self.guest {
            true => Ok(()),
            false => Err(status(Code::FAILED_PRECONDITION, format!("{what} only by an agent in a guest"))),
        }
    }
}

impl agent_proto::agent_ttrpc::Agent for Service {
    fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        let rootfs = req.rootfs.clone().unwrap_or_default();
        let stdio = req.stdio.clone().unwrap_or_default();
        reply(self.containers.create(&req.container_id, &req.oci_spec_json, &rootfs, &stdio)).map(|()| Empty::new())
    }

    fn start_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.start(&req.container_id)).map(|()| Empty::new())
    }

    fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let stdio = req.stdio.clone().unwrap_or_default();
        reply(self.containers.exec(&req.container_id, &req.exec_id, &req.oci_process_json, &stdio))
            .map(|()| Empty::new())
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.signal(&req.container_id, &req.exec_id, req.signal, req.all)).map(|()| Empty::new())
    }

    fn wait_process(&self, ctx: &TtrpcContext, req: WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        // A process that has exited is answered at once, slot or none: only
        // waits that block need one.
        if let Some(status) = reply(self.containers.wait(&req.container_id, &req.exec_id, Duration::ZERO, || false))? {
            return Ok(WaitProcessResponse { status, ..Default::default() });
        }
        let _slot = WaitSlot::take(&self.blocked_waits).ok_or_else(|| {
            let why = format!("{MAX_BLOCKED_WAITS} WaitProcess calls are waiting already; try again later");
            status(Code::RESOURCE_EXHAUSTED, why)
        })?;
        let deadline = deadline(ctx);
        let mut gone = false;
        // Until the deadline, and while the connection is there (ttrpc
        // drops the sender when it goes).
        let go_on = || {
            gone = !matches!(ctx.cancel_rx.try_recv(), Err(e) if e.is_empty());
            !gone && deadline.is_none_or(|d| Instant::now() < d)
        };
        match reply(self.containers.wait(&req.container_id, &req.exec_id, WAIT_SLICE, go_on))? {
            Some(status) => Ok(WaitProcessResponse { status, ..Default::default() }),
            None if gone => Err(status(Code::CANCELLED, "the WaitProcess call was cancelled".into())),
            None => Err(status(Code::DEADLINE_EXCEEDED, "the process did not exit before the call's deadline".into())),
        }
    }

    fn list_processes(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        let rows = reply(self.containers.ps(&req.container_id))?;
        let processes = rows
            .into_iter()
            .map(|r| ProcessInfo {
                pid: r.pid,
                ns_pid: r.ns_pid,
                uid: r.uid,
                user: r.user,
                command: r.command,
                ..Default::default()
            })
            .collect();
        Ok(ListProcessesResponse { processes, ..Default::default() })
    }

    fn update_container(&self, _: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        let limits = reply(limits_from(&req.resources))?;
        if !limits.any() {
            return Err(status(Code::INVALID_ARGUMENT, "the update sets no limit".into()));
        }
        reply(self.containers.update(&req.container_id, &limits)).map(|()| Empty::new())
    }

    fn stats_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        let s = reply(self.containers.stats(&req.container_id))?;
        let (cpu_quota, cpu_period) = s.cpu_limit.unwrap_or((0, 0));
        Ok(StatsContainerResponse {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            memory_usage: s.memory_usage,
            memory_limit: s.memory_limit.unwrap_or(0),
            pids_current: s.pids_current,
            pids_limit: s.pids_limit.unwrap_or(0),
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            limits: Some(Resources {
                memory_limit: s.memory_limit.unwrap_or(0),
                cpu_quota,
                cpu_period,
                pids_limit: s.pids_limit.unwrap_or(0),
                cpu_weight: s.cpu_weight,
                cpuset_cpus: s.cpuset_cpus.clone(),
                cpuset_mems: s.cpuset_mems.clone(),
                memory_unlimited: s.memory_limit.is_none(),
                cpu_unlimited: s.cpu_limit.is_none(),
                pids_unlimited: s.pids_limit.is_none(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.freeze(&req.container_id, true)).map(|()| Empty::new())
    }

    fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.freeze(&req.container_id, false)).map(|()| Empty::new())
    }

    fn remove_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.remove(&req.container_id)).map(|()| Empty::new())
    }

    fn container_status(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ContainerStatusResponse> {
        let s = reply(self.containers.status(&req.container_id))?;
        let state = match s.state {
            State::Created => ContainerState::CREATED,
            State::Running => ContainerState::RUNNING,
            State::Paused => ContainerState::PAUSED,
            State::Stopped => ContainerState::STOPPED,
        };
        Ok(ContainerStatusResponse {
            state: state.into(),
            pid: s.pid,
            started_at_ms: s.started_at_ms,
            exited: s.exit_code.is_some(),
            exit_code: s.exit_code.unwrap_or(0),
            ..Default::default()
        })
    }

    fn resize_terminal(&self, _: &TtrpcContext, req: ResizeTerminalRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.resize(&req.container_id, &req.exec_id, req.rows, req.columns)).map(|()| Empty::new())
    }

    fn mount_disk(&self, _: &TtrpcContext, req: MountDiskRequest) -> ttrpc::Result<Empty> {
        let destination = std::path::Path::new(&req.destination);
        reply(self.containers.mount_disk(&req.container_id, &req.serial, destination, &req.fstype, req.read_only))
            .map(|()| Empty::new())
    }

    fn remove_process(&self, _: &TtrpcContext, req: RemoveProcessRequest) -> ttrpc::Result<Empty> {
        reply(self.containers.remove_process(&req.container_id, &req.exec_id)).map(|()| Empty::new())
    }

    fn get_oom_event(&self, ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<OOMEvent> {
        let deadline = deadline(ctx);
        // Sleeps OOM_POLL (less near the deadline); false once the deadline
        // passed or the connection went (ttrpc then drops the sender).
        let pause = || {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(OOM_POLL),
                None => OOM_POLL,
            };
            !wait.is_zero() && matches!(ctx.cancel_rx.recv_timeout(wait), Err(e) if e.is_timeout())
        };
        match reply(self.containers.oom_event(pause))? {
            Some(container_id) => Ok(OOMEvent { container_id, ..Default::default() }),
            None => {
                Err(status(Code::DEADLINE_EXCEEDED, "no container had an OOM kill before the call's deadline".into()))
            }
        }
    }

    fn update_interface(&self, _: &TtrpcContext, req: UpdateInterfaceRequest) -> ttrpc::Result<Interface> {
        let want =
            req.interface.into_option().ok_or_else(|| status(Code::INVALID_ARGUMENT, "no interface given".into()))?;
        reply(crate::network::update_interface(&want))
    }

    fn update_routes(&self, _: &TtrpcContext, req: UpdateRoutesRequest) -> ttrpc::Result<Routes> {
        let want = req.routes.into_option().map(|r| r.routes).unwrap_or_default();
        let routes = reply(crate::network::update_routes(&want))?;
        Ok(Routes { routes, ..Default::default() })
    }

    fn list_interfaces(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Interfaces> {
        let interfaces = reply(crate::network::list_interfaces())?;
        Ok(Interfaces { interfaces, ..Default::default() })
    }

    fn list_routes(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Routes> {
        let routes = reply(crate::network::list_routes())?;
        Ok(Routes { routes, ..Default::default() })
    }

    fn online_cpu_mem(&self, _: &TtrpcContext, req: OnlineCPUMemRequest) -> ttrpc::Result<Empty> {
        self.guest_only("CPUs are onlined")?;
        reply(crate::guest::online_cpus(req.nb_cpus)).map(|()| Empty::new())
    }

    fn list_virtio_slots(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<VirtioSlots> {
        let slots = reply(crate::slots::list())?;
        Ok(VirtioSlots { slots, ..Default::default() })
    }

    fn update_virtio_slot(&self, _: &TtrpcContext, req: VirtioSlotRequest) -> ttrpc::Result<VirtioSlot> {
        self.guest_only("virtio slots are bound")?;
        reply(crate::slots::update(req.address, req.bind))
    }

    fn get_guest_details(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<GuestDetails> {
        let details = crate::guest::details(self.ready_after_boot_ms);
        Ok(details)
    }

    fn set_guest_identity(&self, _: &TtrpcContext, req: SetGuestIdentityRequest) -> ttrpc::Result<GuestDetails> {
        let identity = agent_proto::identity::check(&req).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        // On the host it would rename and reclock the host itself.
        self.guest_only("the guest's identity is set")?;
        crate::guest::set_identity(&identity).map_err(|e| status(Code::INTERNAL, crate::container::error_chain(&e)))?;
        Ok(crate::guest::details(self.ready_after_boot_ms))
    }

    fn destroy_sandbox(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        // The agent stays: the host stops the VM (or the host process).
        reply(self.containers.remove_all()).map(|()| Empty::new())
    }

    fn check(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<HealthCheckResponse> {
        Ok(HealthCheckResponse { serving: true, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limit;

    #[test]
    fn an_update_keeps_the_old_fields_meaning_and_adds_weight_cpuset_and_lifting() {
        // The old fields: 0 leaves a limit alone.
        let old = Resources { memory_limit: 1 << 20, ..Default::default() };
        assert_eq!(limits_from(&old), Ok(Limits { memory: Some(Limit::To(1 << 20)), ..Default::default() }));
        assert!(!limits_from(&Resources::default()).unwrap().any());
        let new = Resources {
            cpu_shares: 1024,
            cpuset_cpus: "0-1".into(),
            pids_unlimited: true,
            cpu_unlimited: true,
            ..Default::default()
        };
        let want = Limits {
            cpu: Some(Limit::Unlimited),
            pids: Some(Limit::Unlimited),
            cpu_weight: Some(39),
            cpuset_cpus: Some("0-1".into()),
            ..Default::default()
        };
        assert_eq!(limits_from(&new), Ok(want));
    }

    #[test]
    fn contradictory_or_malformed_updates_are_refused_by_name() {
        let cases = [
            (Resources { cpu_quota: 5, ..Default::default() }, "period of 0"),
            (Resources { cpu_shares: 2, cpu_weight: 5, ..Default::default() }, "both set"),
            (Resources { cpu_weight: 10_001, ..Default::default() }, "10001"),
            (Resources { cpuset_mems: "0\n1".into(), ..Default::default() }, "cpuset.mems"),
            (Resources { pids_limit: 4, pids_unlimited: true, ..Default::default() }, "pids limit"),
        ];
        for (resources, want) in cases {
            match limits_from(&resources) {
                Err(Error::Invalid(m)) => assert!(m.contains(want), "{want:?} not in {m:?}"),
                other => panic!("{resources:?} gave {other:?}"),
            }
        }
    }
}
