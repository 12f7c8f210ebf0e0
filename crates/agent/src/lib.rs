//! The guest agent (PID 1 inside the sandbox VM): mounts, module loading,
//! child reaping, the vsock link to the host, and the containers.
//!
//! Not built yet. It will be a static binary
//! (`-C target-feature=+crt-static`). Nothing here pretends to work.
