//! virtio-rng: fills the driver's buffers from the host's getrandom(2), so
//! the guest has entropy from its first boot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::answer_all;
use super::{device_type, VirtioBackend, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most, so one request cannot make the
/// device thread spin on getrandom for long.
const MAX_REQUEST: usize = 64 * 1024;

/// Counters a stats call reads.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests served.
    pub requests: AtomicU64,
    /// Bytes given.
    pub bytes: AtomicU64,
    /// Malformed requests.
    pub errors: AtomicU64,
}

super::counter_set!(RngCounters { requests, bytes, errors });

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    counters: Arc<RngCounters>,
}

impl Rng {
    /// A new device and its counters.
    pub fn new() -> (Self, Arc<RngCounters>) {
        let counters = Arc::new(RngCounters::default());
        (Self { counters: counters.clone() }, counters)
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioBackend for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn process_queue(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let counters = &self.counters;
        let answered = answer_all(queue, mem, |request| {
            let Ok(buffers) = request else {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return 0;
            };
            let n = (buffers.writable_len() as usize).min(MAX_REQUEST);
            let mut bytes = vec![0u8; n];
            match getrandom(&mut bytes).ok().and_then(|()| buffers.write_at(0, &bytes).ok()) {
                Some(()) => {
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    n as u32
                }
                None => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
        });
        if answered.corrupt {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        answered.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::{desc, memory, WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x10_0000, 32, WRITE), desc(0x10_1000, 32, WRITE)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut rng, counters) = Rng::new();
        assert!(rng.process_queue(0, &mut q, &mem));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 64));
        let mut a = [0u8; 32];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        assert_ne!(a, [0u8; 32]);
        assert_eq!(counters.bytes.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn malformed_requests_are_completed_empty() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // A readable descriptor is no place for entropy: zero bytes used.
        vq.build_desc_chain(&[desc(0x10_0000, 32, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let (mut rng, counters) = Rng::new();
        assert!(rng.process_queue(0, &mut q, &mem));
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        // Out of guest memory: completed with nothing, counted as an error.
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x1f_fff0, 0x100, WRITE)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(rng.process_queue(0, &mut q, &mem));
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 1);
    }
}
