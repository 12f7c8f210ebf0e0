//! The sandbox API (Kata's virtcontainers API in Rust): sandboxes,
//! containers, devices, network; state persistence and locking.
//!
//! Built so far: [`qemu`], the QEMU TCG fallback hypervisor's command line
//! (used by `vessel sandbox run` and the tier-3 tests). The sandbox and
//! container API itself is not built yet; nothing here pretends it is.

pub mod qemu;
