//! virtio-vsock transmissions (packet headers, payloads, every op) and the
//! receive path answering them, on arbitrary guest memory.
#![no_main]

use std::sync::Mutex;

use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{VirtioBackend, Wakeup};
use libfuzzer_sys::fuzz_target;

static DEVICE: Mutex<Option<Vsock>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mem = vessel_fuzz::memory(data);
    let mut rx = vessel_fuzz::queue(0);
    let mut tx = vessel_fuzz::queue(0x400);
    let mut ev = vessel_fuzz::queue(0x800);
    let mut guard = DEVICE.lock().unwrap_or_else(|p| p.into_inner());
    let dev = guard.get_or_insert_with(|| {
        let uds = std::env::temp_dir().join(format!("vessel-fuzz-vsock-{}", std::process::id()));
        Vsock::new(&VsockConfig { guest_cid: 3, uds_path: uds }).expect("vsock").0
    });
    {
        let mut queues = [&mut rx, &mut tx, &mut ev];
        dev.process(Wakeup::Queue(1), &mut queues, &mem);
        dev.process(Wakeup::Queue(0), &mut queues, &mem);
    }
    // Each input is a fresh guest: forget its connections.
    dev.reset();
});
