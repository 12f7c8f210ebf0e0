//! A sandbox made from a VM the factory booted ahead of time (see
//! [`crate::factory`]): the VM's directory becomes the sandbox's, the VM
//! runs again, the guest gets its own identity, and the containers' roots
//! and disks are hot-plugged.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use agent_proto::agent::GuestDetails;
use tracing::{info, info_span, warn};

use super::{step_done, CreateStep, Sandbox, SandboxError};
use crate::agent::{Agent, HostSide};
use crate::config::SandboxConfig;
use crate::factory::{CachedVm, FactoryError, CLAIM_FILE};
use crate::hypervisor::{Disk, Hypervisor};
use crate::state::{
    lock_path, now_unix_ms, LockKind, SandboxLock, SandboxPhase, SandboxState, StateError, Store, LOCK_FILE,
    STATE_VERSION,
};

/// How long a create waits for a cached VM's claim lock.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Renames `from` to `to`, refusing to replace anything at `to`
/// (rename(2) would replace an empty directory).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; the kernel
    // only reads them.
    let rc = unsafe {
        libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What taking a cached VM gives: the sandbox's directory (the VM's,
/// renamed) with its lock held, the VM, and the agent's link.
struct Claimed {
    dir: PathBuf,
    lock: SandboxLock,
    vm: Box<dyn Hypervisor>,
    link: Option<UnixStream>,
}

/// A factory's VM running for sandbox `config.id`, its agent reached and
/// its identity given: what [`Sandbox::finish_from_factory`] takes.
pub(super) struct Reached {
    pub(super) vm: Box<dyn Hypervisor>,
    pub(super) agent: Agent,
    pub(super) details: GuestDetails,
    pub(super) vsock: PathBuf,
    pub(super) link: Option<UnixStream>,
    pub(super) lock: SandboxLock,
    /// Where the VM was booted, when not in the sandbox's directory.
    pub(super) booted_in: Option<PathBuf>,
}

/// Takes `cached` for sandbox `id`: under the VM's claim lock (nobody else
/// may be taking it), checks it lives, takes its `lock` (the sandbox's
/// lock from now on), renames its directory to the sandbox's and leaves a
/// link where it was, so that the paths its devices hold still resolve.
fn claim(store: &Store, id: &str, cached: &mut CachedVm) -> Result<Claimed, SandboxError> {
    let from = cached.dir.clone();
    let name = cached.name.clone();
    // `factory::list` takes the claim for a moment to see whether anyone
    // holds it: a short wait gets past that; a create or a destroy holds it
    // longer, and the VM is not this create's.
    let deadline = Instant::now() + CLAIM_PATIENCE;
    let _claim = loop {
        match lock_path(&from.join(CLAIM_FILE), LockKind::Exclusive, false) {
            Ok(claim) => break claim,
            Err(_) if Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(_) => return Err(FactoryError::Busy(name).into()),
        }
    };
    if let Some(why) = cached.dead() {
        return Err(FactoryError::Gone { name, why }.into());
    }
    let lock = lock_path(&from.join(LOCK_FILE), LockKind::Exclusive, true)?;
    let to = store.dir(id)?;
    store.check_root()?;
    if to.exists() {
        if !store.abandoned(id) {
            return Err(StateError::Exists(id.to_string()).into());
        }
        warn!("taking over the directory of a create that died");
        store.remove(id)?;
    }
    rename_noreplace(&from, &to).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => StateError::Exists(id.to_string()),
        _ => StateError::Io { what: "move the cached VM's directory to", path: to.clone(), source },
    })?;
    if let Err(source) = std::os::unix::fs::symlink(&to, &from) {
        // Without the link the VM's devices lose their sockets: put the
        // directory back.
        let _ = rename_noreplace(&to, &from);
        return Err(StateError::Io { what: "link the cached VM's old directory at", path: from, source }.into());
    }
    let vm = cached.vm.take().ok_or_else(|| FactoryError::Gone { name, why: "it was taken".into() })?;
    Ok(Claimed { dir: to, lock, vm, link: cached.link.take() })
}

impl Sandbox {
    /// Makes sandbox `config` (validated and matched by the caller) from
    /// `cached`; the steps and their rollback are create's.
    pub(super) fn create_from(
        store: &Store,
        config: SandboxConfig,
        mut cached: CachedVm,
    ) -> Result<Sandbox, SandboxError> {
        let id = config.id.clone();
        let booted_in = cached.dir.clone();
        let _span = info_span!("create_sandbox", id = %id, from_factory = %cached.name).entered();
        let began = Instant::now();

        // Directory and lock: the VM's. Undo: stop the VM, remove the
        // directory (and the link).
        let Claimed { dir, lock, mut vm, link } =
            claim(store, &id, &mut cached).map_err(SandboxError::at(CreateStep::Directory, &id))?;
        drop(cached);
        let undo = |vm: &mut Box<dyn Hypervisor>, lock: SandboxLock| {
            let _ = vm.stop();
            drop(lock);
            if let Err(e) = store.remove(&id) {
                warn!(error = %e, "rollback: cannot remove the sandbox directory");
            }
        };
        step_done(CreateStep::Directory, began);

        // The VM runs again.
        if let Err(e) = vm.resume() {
            undo(&mut vm, lock);
            return Err(SandboxError::at(CreateStep::Vm, &id)(e.into()));
        }
        step_done(CreateStep::Vm, began);

        // The agent, through the VM's vsock socket (in the sandbox's
        // directory now); the guest gets its own identity.
        let vsock = dir.join("vsock.sock");
        let reached = Agent::connect_hybrid(&vsock).and_then(|agent| {
            let details = agent.set_identity(config.guest_hostname())?;
            Ok((agent, details))
        });
        let (agent, details) = match reached {
            Ok(reached) => reached,
            Err(e) => {
                let console = vm.console_tail(20);
                if !console.is_empty() {
                    warn!("the guest's console ended with:\n{console}");
                }
                undo(&mut vm, lock);
                return Err(SandboxError::at(CreateStep::Agent, &id)(e.into()));
            }
        };
        step_done(CreateStep::Agent, began);

        let reached = Reached { vm, agent, details, vsock, link, lock, booted_in: Some(booted_in) };
        let sandbox = Self::finish_from_factory(store, config, reached, began)?;
        info!(ms = began.elapsed().as_millis() as u64, "sandbox created from a cached VM");
        Ok(sandbox)
    }

    /// The rest of a create from the factory, once its VM runs for the
    /// sandbox with its identity: the disks, the containers on
    /// hot-plugged roots, then the state. Undo: remove the containers,
    /// stop the VM, remove the directory.
    pub(super) fn finish_from_factory(
        store: &Store,
        config: SandboxConfig,
        reached: Reached,
        began: Instant,
    ) -> Result<Sandbox, SandboxError> {
        let id = config.id.clone();
        let Reached { vm, agent, details, vsock, link, lock, booted_in } = reached;
        let state = SandboxState {
            version: STATE_VERSION,
            hypervisor: vm.kind(),
            phase: SandboxPhase::Ready,
            owner_pid: std::process::id(),
            vm_pid: vm.process_id(),
            created_unix_ms: now_unix_ms(),
            containers: Vec::new(),
            devices: Vec::new(),
            nics: Vec::new(),
            config: SandboxConfig { containers: Vec::new(), shared_fs: false, ..config.clone() },
            booted_in,
        };
        let mut sandbox = Sandbox {
            store: store.clone(),
            state,
            vm,
            agent,
            host: HostSide::new(vsock),
            exits: Arc::default(),
            details,
            io: HashMap::new(),
            fs_daemon: None,
            _link: link,
        };

        // The disks, the containers on hot-plugged roots, then the state.
        // Undo: remove the containers, stop the VM.
        let made = config
            .disks
            .iter()
            .try_for_each(|d| {
                sandbox.plug(&Disk { path: d.path.clone(), read_only: d.read_only, serial: d.serial.clone() })
            })
            .and_then(|()| config.containers.iter().try_for_each(|c| sandbox.plug_root(c)));
        let outcome = made.map_err(SandboxError::at(CreateStep::Containers, &id)).and_then(|()| {
            step_done(CreateStep::Containers, began);
            sandbox.store.save(&sandbox.state).map_err(|e| SandboxError::at(CreateStep::State, &id)(e.into()))
        });
        if let Err(e) = outcome {
            sandbox.remove_containers_on_rollback();
            let _ = sandbox.vm.stop();
            drop(lock);
            if let Err(e) = store.remove(&id) {
                warn!(error = %e, "rollback: cannot remove the sandbox directory");
            }
            return Err(e);
        }
        step_done(CreateStep::State, began);
        Ok(sandbox)
    }
}
