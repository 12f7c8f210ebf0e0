//! The sandbox API: Kata Containers' virtcontainers API in Rust, on
//! vessel's own VMM. A [`Sandbox`] is one microVM holding containers; the
//! embedder calls its methods, which drive the VM through a
//! [`hypervisor::Hypervisor`] and the guest's agent over vsock.
//!
//! - [`sandbox`]: the operations on sandboxes and containers.
//! - [`config`]: what a sandbox and its containers are made of.
//! - [`state`]: the state files and the per-sandbox lock.
//! - [`factory`]: VMs booted ahead of time, which a create can take.
//! - [`hypervisor`]: the `Hypervisor` trait, `builtin` and `qemu-tcg`.
//! - [`network`]: a sandbox in a CNI network namespace (tcfilter).
//! - [`agent`]: the host's side of the guest agent.
//! - [`qemu`]: the QEMU TCG command line.
//!
//! ```no_run
//! use runtime_api::{ContainerConfig, Sandbox, SandboxConfig, Store};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::new("/run/vessel");
//! let mut config = SandboxConfig::new("demo", "/var/lib/vessel/guest-image");
//! config.containers.push(ContainerConfig::new("hello", "/tmp/rootfs.ext4", &["echo", "hello"]));
//! let mut sandbox = Sandbox::create(&store, config, None)?;
//! let output = sandbox.take_io("hello")?.stdout.collect(std::time::Duration::from_secs(60));
//! sandbox.start()?;
//! let status = sandbox.wait_process("hello", "", None)?;
//! let printed = output.join().expect("the collector thread")?;
//! assert_eq!((status, printed.as_slice()), (0, &b"hello\n"[..]));
//! sandbox.stop(false)?;
//! sandbox.delete()?;
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod children;
pub mod config;
pub mod console;
pub mod factory;
pub mod hypervisor;
pub mod network;
pub mod qemu;
pub mod sandbox;
pub mod shared_fs;
pub mod state;

#[cfg(test)]
mod sandbox_tests;

pub use config::{
    ContainerConfig, DiskConfig, DiskMount, Limit, NetworkConfig, ProcessConfig, Resources, SandboxConfig, VolumeConfig,
};
pub use factory::{CacheConfig, Factory};
pub use hypervisor::{Hypervisor, HypervisorKind};
pub use sandbox::{ContainerStatus, ProcessIo, Sandbox, SandboxError, SandboxStatus};
pub use state::{ContainerPhase, SandboxPhase, Store};

/// An error and its causes, as one line (`a: b: c`), for logs and for
/// answers that cross a process boundary.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}
