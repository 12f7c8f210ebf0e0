//! The host <-> guest agent protocol (ttrpc services from our own `.proto`
//! files) and a mock agent for host-side tests.
//!
//! Not built yet: it arrives with the guest agent. Nothing here pretends to
//! work.
