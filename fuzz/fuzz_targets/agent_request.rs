//! The agent's request decoding: any bytes, as a CreateContainer or
//! ExecProcess request (protobuf), then its OCI spec or process (JSON)
//! through the agent's checks; as an UpdateContainer request, through
//! its limit checks; as a MountDisk request, through its destination
//! check; as a SetGuestIdentity request, through its field checks (an
//! identity that passes must be one the agent can apply: a hostname of
//! at most 64 bytes, entropy within bounds); as a path in the shared filesystem (a Rootfs's `shared_path`,
//! a `vessel-shared:` source), through its check. Nothing may panic; a
//! bad request is an error reply.
#![no_main]

use agent::service::limits_from;
use agent::spec::{parse_process, parse_spec};
use agent_proto::agent::{
    CreateContainerRequest, ExecProcessRequest, MountDiskRequest, SetGuestIdentityRequest, UpdateContainerRequest,
};
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
        if let Ok(fstype) = agent::hotmount::check_disk(&req.serial, &req.fstype) {
            assert!(agent::hotmount::DISK_FILESYSTEMS.contains(&fstype) && !req.serial.is_empty());
        }
    }
    if let Ok(req) = SetGuestIdentityRequest::parse_from_bytes(data) {
        if let Ok(identity) = agent_proto::identity::check(&req) {
            assert!(!identity.hostname.is_empty() && identity.hostname.len() <= agent_proto::identity::MAX_HOSTNAME);
            assert!(identity.hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
            let entropy = agent_proto::identity::MIN_ENTROPY..=agent_proto::identity::MAX_ENTROPY;
            assert!(entropy.contains(&identity.entropy.len()));
            assert!(identity.sec >= 0 && identity.nsec < 1_000_000_000);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = agent::shared::check_relative(text);
    }
    // The JSON checks on their own, for inputs the protobuf layer rejects.
    let _ = parse_spec(data, std::path::Path::new("/nonexistent-root"));
    let _ = parse_process(data);
});
