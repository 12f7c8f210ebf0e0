//! The vsock packet header codec: any 44 bytes decode, and re-encode to
//! the same bytes.
#![no_main]

use devices::virtio::vsock::packet::{Header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..HEADER_LEN) {
        let raw: [u8; HEADER_LEN] = bytes.try_into().expect("44 bytes");
        assert_eq!(Header::parse(&raw).to_bytes(), raw);
    }
});
