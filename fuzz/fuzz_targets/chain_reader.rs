//! `ChainReader` (devices/src/virtio/chain.rs) against virtio-queue's own
//! chain walk, on guest memory of several regions (two of them adjacent)
//! with the queue's rings wherever the input puts them. For every chain
//! both must agree: the same error, or the same readable and writable
//! segments (the same host memory, in the same order).
//!
//! Input: queue size (one byte, a power of two up to 256), descriptor
//! table, available and used ring addresses (three bytes each), then the
//! bytes of guest memory, region after region.
#![no_main]

use devices::virtio::chain::{ChainError, ChainReader};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// (start, length): two adjacent regions, a gap, a third.
const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x2000), (0x1_0000, 0x1000)];

/// (host address, length) of each segment of one direction.
type Segments = Vec<(usize, usize)>;

/// The chain as virtio-queue walks it (indirect tables included), split
/// as the spec says a device must: readable segments, then writable ones,
/// each inside one region, each direction at most 4 GiB.
fn reference(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Segments, Segments), ChainError> {
    let (mut readable, mut writable) = (Segments::new(), Segments::new());
    let (mut r_len, mut w_len) = (0u64, 0u64);
    for desc in chain {
        if desc.len() == 0 {
            continue;
        }
        let slice = mem
            .get_slice(desc.addr(), desc.len() as usize)
            .map_err(|_| ChainError::OutOfMemory { addr: desc.addr().0, len: desc.len() })?;
        let segment = (slice.ptr_guard().as_ptr() as usize, slice.len());
        if desc.is_write_only() {
            w_len += u64::from(desc.len());
            writable.push(segment);
        } else {
            if !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            r_len += u64::from(desc.len());
            readable.push(segment);
        }
        if r_len > u64::from(u32::MAX) || w_len > u64::from(u32::MAX) {
            return Err(ChainError::TooLong);
        }
    }
    Ok((readable, writable))
}

fn address(bytes: &[u8]) -> u64 {
    u64::from(bytes[0]) | u64::from(bytes[1]) << 8 | u64::from(bytes[2] & 1) << 16
}

fuzz_target!(|data: &[u8]| {
    let Some((head, mut contents)) = data.split_first_chunk::<10>() else { return };
    let regions: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&regions).expect("fuzz memory");
    for &(start, len) in &REGIONS {
        let (now, rest) = contents.split_at(len.min(contents.len()));
        mem.write_slice(now, GuestAddress(start)).expect("fill memory");
        contents = rest;
    }
    let size = 1u16 << (head[0] % 9);
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    let table = address(&head[1..4]);
    queue.set_desc_table_address(Some(table as u32), Some(0));
    queue.set_avail_ring_address(Some(address(&head[4..7]) as u32), Some(0));
    queue.set_used_ring_address(Some(address(&head[7..10]) as u32), Some(0));
    queue.set_ready(true);
    let mut reader = ChainReader::new(&queue, &mem);
    for _ in 0..2 * usize::from(size) {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else { break };
        let expected = reference(&mem, chain.clone());
        let got = reader.split(chain).map(|b| {
            let pieces = |p: Result<devices::virtio::chain::Pieces<'_, '_>, ChainError>| -> Segments {
                p.expect("a whole direction").map(|s| (s.ptr_guard().as_ptr() as usize, s.len())).collect()
            };
            (pieces(b.readable(0, b.readable_len())), pieces(b.writable(0, b.writable_len())))
        });
        assert_eq!(got, expected, "ChainReader and virtio-queue split a chain differently (table at {table:#x})");
    }
});
