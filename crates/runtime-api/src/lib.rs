//! The sandbox API (Kata's virtcontainers API in Rust): sandboxes,
//! containers, devices, network; state persistence and locking.
//!
//! Not built yet. The VMM it will drive is the `vmm` crate; the agent
//! protocol it will speak is `agent-proto`. Nothing here pretends to work.
