//! The agent's request decoding: any bytes, as a CreateContainer or
//! ExecProcess request (protobuf), then its OCI spec or process (JSON)
//! through the agent's checks; as an UpdateContainer request, through
//! its limit checks; as a MountDisk request, through its destination
//! check; as a path in the shared filesystem (a Rootfs's `shared_path`,
//! a `vessel-shared:` source), through its check. Nothing may panic; a
//! bad request is an error reply.
#![no_main]

use agent::service::limits_from;
use agent::spec::{parse_process, parse_spec};
use agent_proto::agent::{CreateContainerRequest, ExecProcessRequest, MountDiskRequest, UpdateContainerRequest};
use agent_proto::protobuf::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = CreateContainerRequest::parse_from_bytes(data) {
        let _ = parse_spec(&req.oci_spec_json, std::path::Path::new("/nonexistent-root"));
    }
    if let Ok(req) = ExecProcessRequest::parse_from_bytes(data) {
        let _ = parse_process(&req.oci_process_json);
    }
    if let Ok(req) = UpdateContainerRequest::parse_from_bytes(data) {
        let _ = limits_from(&req.resources);
    }
    if let Ok(req) = MountDiskRequest::parse_from_bytes(data) {
        let _ = agent::hotmount::check_destination(std::path::Path::new(&req.destination));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = agent::shared::check_relative(text);
    }
    // The JSON checks on their own, for inputs the protobuf layer rejects.
    let _ = parse_spec(data, std::path::Path::new("/nonexistent-root"));
    let _ = parse_process(data);
});
