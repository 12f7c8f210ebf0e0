//! How a VM's run ended, and the errors that can end it. A leaf: the vCPU
//! threads, the event loop and the handle all report through it.

use std::fmt;
use std::sync::Arc;

use crate::seccomp::SeccompError;

/// How the guest's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset line, KVM reset event).
    Reset,
    /// The guest shut down (triple fault, ACPI power off, HLT with no way to
    /// wake).
    Shutdown,
    /// The VMM was asked to stop.
    Stopped,
    /// KVM or the VMM failed.
    Error(VmError),
}

/// What failed when KVM or the VMM ended a running VM. Clone and
/// comparable, like the [`ExitReason`] that carries it; causes are shared,
/// not copied.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmError {
    /// KVM_RUN reported a failed VM entry.
    #[error("vCPU {vcpu}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})")]
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// The hardware's entry-failure reason.
        reason: u64,
        /// The host CPU.
        cpu: u32,
    },
    /// KVM gave up, usually on an instruction it could not emulate.
    #[error("vCPU {0}: KVM internal error (an instruction KVM could not emulate?)")]
    Internal(u8),
    /// An exit the VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u8,
        /// The exit, as KVM's bindings describe it.
        exit: String,
    },
    /// The KVM_RUN ioctl itself failed.
    #[error("vCPU {0}: KVM_RUN failed")]
    Run(u8, #[source] kvm_ioctls::Error),
    /// A vCPU signalled the end of the VM without saying why.
    #[error("a vCPU stopped without a reason")]
    NoReason,
    /// A vCPU thread could not install its seccomp filter.
    #[error("vCPU {0} cannot run sandboxed")]
    VcpuSeccomp(u8, #[source] SharedError),
    /// The event loop thread could not install its seccomp filter.
    #[error("the event loop cannot run sandboxed")]
    EventLoopSeccomp(#[source] SharedError),
    /// The event loop's epoll set could not be made.
    #[error("cannot create the event loop")]
    EventLoopCreate(#[source] Arc<event_manager::Error>),
    /// One of the VMM's own events could not be watched.
    #[error("cannot watch VMM event {0}")]
    Watch(u32, #[source] Arc<event_manager::Error>),
    /// A restored VM's hot-plugged device could not be watched.
    #[error("cannot watch a restored device's events")]
    RestoredDevice(#[source] SharedError),
    /// Waiting for events failed.
    #[error("the event loop failed")]
    EventLoop(#[source] Arc<event_manager::Error>),
    /// The event loop thread panicked.
    #[error("the VMM event loop panicked")]
    EventLoopPanicked,
}

/// An error shared by every copy of the [`VmError`] that carries it: it
/// reads as the error itself (same message, same source), and two are
/// equal when they are the same error.
#[derive(Clone, Debug)]
pub struct SharedError(Arc<dyn std::error::Error + Send + Sync>);

impl SharedError {
    /// Shares `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }
}

impl From<SeccompError> for SharedError {
    fn from(error: SeccompError) -> Self {
        Self::new(error)
    }
}

impl PartialEq for SharedError {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl Eq for SharedError {}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_shared_error_reads_as_the_error_it_shares() {
        let inner = std::io::Error::other("disk on fire");
        let shared = SharedError::new(crate::vcpu::VcpuError::Spawn(3, inner));
        assert_eq!(shared.to_string(), "cannot spawn the thread for vCPU 3");
        assert_eq!(shared.source().map(ToString::to_string).as_deref(), Some("disk on fire"));
    }

    #[test]
    fn exit_reasons_compare_equal_only_with_the_same_shared_cause() {
        let one = SharedError::new(std::io::Error::other("x"));
        let other = SharedError::new(std::io::Error::other("x"));
        let reason = ExitReason::Error(VmError::EventLoopSeccomp(one.clone()));
        assert_eq!(reason.clone(), reason);
        assert_ne!(reason, ExitReason::Error(VmError::EventLoopSeccomp(other)));
        assert_ne!(reason, ExitReason::Stopped);
    }

    #[test]
    fn vm_errors_name_the_failure_and_keep_the_cause() {
        let e = VmError::Run(1, kvm_ioctls::Error::new(libc::EFAULT));
        assert_eq!(e.to_string(), "vCPU 1: KVM_RUN failed");
        assert!(e.source().is_some());
    }
}
