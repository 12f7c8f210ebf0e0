//! A snapshot's description file, as anyone who can write the snapshot
//! directory could make it: refused with an error or read whole, never a
//! panic; what is read encodes back to what decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::Description;

fuzz_target!(|data: &[u8]| {
    if let Ok(description) = Description::decode(data) {
        let again = Description::decode(&description.encode()).expect("a description re-encodes");
        assert_eq!(again, description);
    }
});
