//! The host <-> agent protocol: ttrpc services generated at build time from
//! `protos/agent.proto` (read that file for what each RPC and field means).
//!
//! - [`agent`]: the messages; [`agent_ttrpc`]: the `Agent` service trait,
//!   its server registration and the `AgentClient`.
//! - [`identity`]: the checks of a guest identity request.
//! - [`link`]: how the agent and the host reach each other (ports, the
//!   readiness line, the vsock/Unix socket addresses).
//! - [`mock`]: an in-process mock agent for host-side unit tests.
//! - [`spec`]: OCI runtime specs for the host side to send.

#[allow(warnings, clippy::all, clippy::pedantic, clippy::undocumented_unsafe_blocks, missing_docs)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(warnings, clippy::all, clippy::pedantic, clippy::undocumented_unsafe_blocks, missing_docs)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod identity;
pub mod link;
pub mod mock;
pub mod spec;

pub use protobuf;
pub use ttrpc;

/// A ttrpc error as one readable line: `NOT_FOUND: no container with ID "x"`
/// for an error the agent replied with (ttrpc's own `Display` prints the
/// whole status structure).
pub fn error_message(err: &ttrpc::Error) -> String {
    match err {
        ttrpc::Error::RpcStatus(status) => format!("{:?}: {}", status.code(), status.message()),
        other => other.to_string(),
    }
}
