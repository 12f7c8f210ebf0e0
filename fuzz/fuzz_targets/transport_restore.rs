//! A virtio-mmio transport given saved registers chosen by the fuzzer (a
//! spoilt snapshot's), then resumed and driven by the guest: the restore
//! refuses what does not fit the device or memory, and nothing panics.
#![no_main]

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::virtio::mmio::{MmioInterrupt, MmioTransport, QueueRegisters, TransportState};
use devices::virtio::rng::Rng;
use devices::virtio::Wakeup;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// Reads little-endian fields off the front of the input.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = vessel_fuzz::memory(data);
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::empty(mem, Arc::new(MmioInterrupt::new(irq)));
    let _evts = t.attach(Box::new(Rng::new().0)).expect("attach");
    let mut f = Fields(data);
    let queues = usize::from(f.take::<1>()[0] % 3);
    let state = TransportState {
        device_features_sel: f.u32(),
        driver_features_sel: f.u32(),
        driver_features: f.u64(),
        queue_sel: f.u32(),
        status: f.u32(),
        config_generation: f.u32(),
        interrupt_status: f.u32(),
        queues: (0..queues)
            .map(|_| QueueRegisters {
                max_size: f.u16(),
                size: f.u16(),
                ready: f.take::<1>()[0] & 1 == 1,
                // Mostly inside the small fuzz memory.
                desc_table: f.u64() % 0x2_0000,
                avail_ring: f.u64() % 0x2_0000,
                used_ring: f.u64() % 0x2_0000,
                next_avail: f.u16(),
                next_used: f.u16(),
                event_idx: f.take::<1>()[0] & 1 == 1,
            })
            .collect(),
    };
    if t.restore(&state).is_ok() {
        t.resume_restored();
    }
    // Then the guest's register accesses and queue work, as in virtio_mmio.
    for rec in f.0.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([rec[1], rec[2]])) % 0x200;
        let value = [rec[3], rec[4], rec[5], rec[6]];
        match rec[0] % 3 {
            0 => t.write(offset, &value),
            1 => {
                let mut out = [0u8; 4];
                t.read(offset, &mut out);
            }
            _ => t.process(Wakeup::Queue(u16::from(rec[3]) % 2)),
        }
    }
});
