//! virtio-rng on arbitrary guest memory.
#![no_main]

use devices::virtio::rng::Rng;
use devices::virtio::VirtioBackend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mem = vessel_fuzz::memory(data);
    let mut queue = vessel_fuzz::queue(0);
    let (mut rng, _) = Rng::new();
    rng.process_queue(0, &mut queue, &mem);
});
