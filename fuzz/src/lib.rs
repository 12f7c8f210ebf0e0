//! Shared set-up for the fuzz targets: guest memory whose contents are the
//! fuzz input, with queues laid over it, so descriptors, rings and request
//! bytes are all attacker-chosen, as a malicious guest would choose them.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size: small, so random addresses often land inside it.
pub const MEM_SIZE: usize = 0x1_0000;
/// Queue size used by every target.
pub const QUEUE_SIZE: u16 = 16;

/// Guest memory holding `data` from address 0.
pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("fuzz memory");
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("write fuzz input");
    mem
}

/// A ready queue whose descriptor table, avail and used rings sit at
/// `base`, `base+0x100` and `base+0x200` (inside the fuzzed memory).
pub fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_ready(true);
    q
}
