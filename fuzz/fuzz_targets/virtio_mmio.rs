//! The virtio-mmio register file driven by an arbitrary sequence of guest
//! reads and writes (with a virtio-rng behind it), then queue processing.
#![no_main]

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::virtio::mmio::{MmioInterrupt, MmioTransport};
use devices::virtio::rng::Rng;
use devices::virtio::Wakeup;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let mem = vessel_fuzz::memory(data);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::empty(mem, Arc::new(MmioInterrupt::new(irq)));
    let _evts = t.attach(Box::new(Rng::new().0)).expect("attach");
    // Each 7-byte record: op (read/write/process), offset (u16), value (u32).
    for rec in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([rec[1], rec[2]])) % 0x200;
        let value = [rec[3], rec[4], rec[5], rec[6]];
        match rec[0] % 4 {
            0 => t.write(offset, &value),
            1 => {
                let mut out = [0u8; 4];
                t.read(offset, &mut out);
            }
            2 => t.write(offset, &value[..1]),
            _ => t.process(Wakeup::Queue(u16::from(rec[3]) % 2)),
        }
    }
});
