//! The guest agent: PID 1 inside the sandbox VM. It mounts the guest's
//! filesystems, loads the modules shipped in the initramfs, seeds entropy,
//! reaps every child, dials the host over vsock, and runs the containers
//! the host asks for through `agent-proto`.
//!
//! The same binary runs on the host as a plain process (`--listen`), which
//! is how its container logic is tested without a guest kernel.
//!
//! - [`launch`]: the single-threaded helper that sets up and execs a
//!   container process (namespaces, mounts, `pivot_root`, user, limits).
//! - [`spec`]: OCI runtime spec checking and translation; what a spec
//!   grants, compiled: [`caps`], [`seccomp`] (BPF filters), [`devices`]
//!   (a cgroup device program).
//! - [`container`]: the containers and their processes.
//! - [`cgroup`]: cgroup v2 limits, stats and freezer.
//! - [`stdio`]: process stdio over streams to the host.
//! - [`service`]: the ttrpc service.
//! - [`guest`]: PID 1 duties in a guest.
//! - [`network`] over [`netlink`]: guest interfaces and routes.
//! - [`slots`]: binding hot-plugged virtio-mmio slots.
//! - [`link`], [`reaper`]: dialing the host; collecting children.

pub mod caps;
pub mod cgroup;
pub mod container;
pub mod devices;
pub mod guest;
pub mod hotmount;
pub mod launch;
pub mod limits;
pub mod link;
pub mod netlink;
pub mod network;
pub mod reaper;
pub mod seccomp;
pub mod service;
pub mod shared;
pub mod slots;
pub mod spec;
pub mod stdio;
