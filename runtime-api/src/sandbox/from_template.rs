//! A sandbox made from a VM template (see [`crate::factory`]): a VM
//! restored from the template's snapshot in the sandbox's own directory,
//! with its own vsock socket and console. The restored vsock device resets
//! the guest's connections, so its agent announces itself again, on this
//! sandbox's socket; the guest then gets its own identity (hostname, clock,
//! fresh entropy: clones of one snapshot share its random state until
//! then), and the create goes on as for a cached VM.

use std::time::{Duration, Instant};

use agent_proto::link;
use tracing::{info, info_span, warn};

use super::from_cache::Reached;
use super::{step_done, CreateStep, Sandbox, SandboxError};
use crate::agent::HostSide;
use crate::config::SandboxConfig;
use crate::factory::CacheConfig;
use crate::hypervisor::{Hypervisor, Template};
use crate::state::Store;

impl Sandbox {
    /// Makes sandbox `config` (validated and matched by the caller) with a
    /// VM `vm` restores from `template`, which was booted with `booted`;
    /// the steps and their rollback are create's.
    pub(super) fn create_from_template(
        store: &Store,
        config: SandboxConfig,
        template: &Template,
        booted: &CacheConfig,
        mut vm: Box<dyn Hypervisor>,
    ) -> Result<Sandbox, SandboxError> {
        let id = config.id.clone();
        let _span = info_span!("create_sandbox", id = %id, from_template = %template.dir().display()).entered();
        let began = Instant::now();

        // Directory and lock. Undo: remove the directory.
        let (dir, lock) = super::make_directory(store, &id)?;
        let undo_dir = || {
            if let Err(e) = store.remove(&id) {
                warn!(error = %e, "rollback: cannot remove the sandbox directory");
            }
        };
        step_done(CreateStep::Directory, began);

        // The VM, restored with this sandbox's vsock socket and console.
        // Undo: stop it.
        let spec = booted.spec(&dir);
        let host = HostSide::new(spec.vsock_socket());
        let restored = host.listen(link::DEFAULT_PORT).map_err(SandboxError::from).and_then(|ready| {
            vm.restore_from(template, &spec)?;
            Ok(ready)
        });
        let ready = match restored {
            Ok(ready) => ready,
            Err(e) => {
                let _ = vm.stop();
                drop(lock);
                undo_dir();
                return Err(SandboxError::at(CreateStep::Vm, &id)(e));
            }
        };
        step_done(CreateStep::Vm, began);

        // The agent announces itself again on this socket; the guest gets
        // its own identity.
        let timeout = Duration::from_secs(config.boot_timeout_s);
        let reached = super::reach_agent(&host, &ready, timeout, &spec, &config, vm.as_mut());
        drop(ready);
        let (agent, details, link) = match reached {
            Ok(reached) => reached,
            Err(e) => {
                let _ = vm.stop();
                drop(lock);
                undo_dir();
                return Err(SandboxError::at(CreateStep::Agent, &id)(e.into()));
            }
        };
        step_done(CreateStep::Agent, began);

        let vsock = spec.vsock_socket();
        let reached = Reached { vm, agent, details, vsock, link: Some(link), lock, booted_in: None };
        let sandbox = Self::finish_from_factory(store, config, reached, began)?;
        info!(ms = began.elapsed().as_millis() as u64, "sandbox created from a VM template");
        Ok(sandbox)
    }
}
