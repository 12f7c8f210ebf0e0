//! Why a sandbox operation failed, and the steps of create a failure
//! names.

use std::time::Duration;

use crate::agent::AgentError;
use crate::config::InvalidId;
use crate::hypervisor::HypervisorError;
use crate::state::{ContainerPhase, SandboxPhase, StateError};

/// The steps of create, in order; a failure names its step and undoes the
/// ones before it, in reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateStep {
    /// The sandbox's directory and lock.
    Directory,
    /// The TAP and redirects in the sandbox's network namespace.
    Network,
    /// The shared directory (bind mounts, virtiofsd).
    SharedFs,
    /// The VM boots.
    Vm,
    /// The agent announces itself, the guest gets its identity, and the
    /// agent describes it.
    Agent,
    /// The containers are created.
    Containers,
    /// The state is written.
    State,
}

impl std::fmt::Display for CreateStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CreateStep::Directory => "making its directory",
            CreateStep::Network => "setting up its network",
            CreateStep::SharedFs => "sharing its directories",
            CreateStep::Vm => "booting the VM",
            CreateStep::Agent => {
                "reaching the guest's agent, giving the guest its identity and configuring its network"
            }
            CreateStep::Containers => "creating the containers",
            CreateStep::State => "writing the state",
        })
    }
}

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A bad sandbox or container ID.
    #[error(transparent)]
    Id(#[from] InvalidId),
    /// The state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// A bad disk serial.
    #[error(transparent)]
    Serial(#[from] crate::config::InvalidSerial),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The agent could not be reached, or refused.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The shared directory could not be set up or taken down.
    #[error(transparent)]
    SharedFs(#[from] crate::shared_fs::SharedFsError),
    /// The network namespace could not be set up.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// The guest's hostname is not one.
    #[error(transparent)]
    Hostname(#[from] agent_proto::identity::IdentityError),
    /// Create failed; what was done has been undone.
    #[error("cannot create sandbox {id:?}: {step} failed")]
    Create {
        /// The sandbox.
        id: String,
        /// Where it failed.
        step: CreateStep,
        /// Why.
        #[source]
        source: Box<SandboxError>,
    },
    /// The guest image lacks a file.
    #[error("the guest image has no {0}: build it with `vessel image build --out DIR`")]
    GuestImage(std::path::PathBuf),
    /// The factory's VMs cannot be this sandbox's.
    #[error("sandbox {id:?} cannot take a VM from the factory: {why}")]
    FactoryMismatch {
        /// The sandbox.
        id: String,
        /// What differs.
        why: String,
    },
    /// The factory failed.
    #[error(transparent)]
    Factory(#[from] crate::factory::FactoryError),
    /// Two containers with one ID.
    #[error("sandbox {sandbox:?} has a container with ID {id:?} already")]
    ContainerExists {
        /// The sandbox.
        sandbox: String,
        /// The container.
        id: String,
    },
    /// A container needs the shared directory the sandbox was made without.
    #[error(
        "container {id:?} has a directory root or volumes, but sandbox {sandbox:?} was created without a shared \
         directory (create it with shared_fs)"
    )]
    NoSharedFs {
        /// The sandbox.
        sandbox: String,
        /// The container.
        id: String,
    },
    /// Two disks with one serial.
    #[error("sandbox {sandbox:?} has a disk with serial {serial:?} already")]
    DiskExists {
        /// The sandbox.
        sandbox: String,
        /// The serial asked for.
        serial: String,
    },
    /// No disk with that serial.
    #[error("sandbox {sandbox:?} has no disk with serial {serial:?}")]
    NoSuchDisk {
        /// The sandbox.
        sandbox: String,
        /// The serial asked for.
        serial: String,
    },
    /// No such container.
    #[error("sandbox {sandbox:?} has no container with ID {id:?}")]
    NoSuchContainer {
        /// The sandbox.
        sandbox: String,
        /// The container.
        id: String,
    },
    /// The container is in the wrong state for the operation.
    #[error("container {id:?} is {phase}; {op} needs it {needs}")]
    ContainerState {
        /// The container.
        id: String,
        /// Where it is.
        phase: ContainerPhase,
        /// The operation.
        op: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// The sandbox is in the wrong state for the operation.
    #[error("sandbox {id:?} is {phase}; {op} needs it {needs}")]
    SandboxState {
        /// The sandbox.
        id: String,
        /// Where it is.
        phase: SandboxPhase,
        /// The operation.
        op: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// Two interfaces with one name.
    #[error("sandbox {sandbox:?} has an interface named {name:?} already")]
    InterfaceExists {
        /// The sandbox.
        sandbox: String,
        /// The interface.
        name: String,
    },
    /// No such interface.
    #[error("sandbox {sandbox:?} has no interface named {name:?}")]
    NoSuchInterface {
        /// The sandbox.
        sandbox: String,
        /// The interface.
        name: String,
    },
    /// The interface came with the sandbox and goes with it.
    #[error(
        "interface {name:?} of sandbox {sandbox:?} was attached when it was created; it goes when the sandbox stops"
    )]
    BootInterface {
        /// The sandbox.
        sandbox: String,
        /// The interface.
        name: String,
    },
    /// The process that owned the sandbox's VM is gone.
    #[error("sandbox {id:?} is dead: the process that owned it ({owner_pid}) is gone; delete it with force")]
    OwnerGone {
        /// The sandbox.
        id: String,
        /// Its owner.
        owner_pid: u32,
    },
    /// No exit within the time allowed.
    #[error("process {exec_id:?} of container {id:?} did not exit within {timeout:?}")]
    WaitTimeout {
        /// The container.
        id: String,
        /// The process ("" is the first).
        exec_id: String,
        /// How long was waited.
        timeout: Duration,
    },
}

impl SandboxError {
    pub(super) fn at(step: CreateStep, id: &str) -> impl FnOnce(SandboxError) -> SandboxError + '_ {
        move |e| SandboxError::Create { id: id.to_string(), step, source: Box::new(e) }
    }
}
