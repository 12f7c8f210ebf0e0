//! `answer_all` (devices/src/virtio/chain.rs), which reads the available
//! ring and writes the used ring through host slices of its own, against
//! a pass made with virtio-queue's own accessors (`iter`, `add_used`) on a
//! copy of the same guest memory. Both must take the same chains, split
//! them the same way, put the same used elements, end at the same ring
//! positions and say the same about a corrupt available index.
//!
//! Input: as `chain_reader`'s (queue size, descriptor table, available and
//! used ring addresses, then guest memory region by region). Inputs whose
//! rings overlap are left out: writing the used ring would then change
//! what is read next, and the two passes read at different moments.
#![no_main]

use devices::virtio::chain::{answer_all, Answered, ChainError};
use devices::virtio::PASS_BUDGET;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// (start, length): two adjacent regions, a gap, a third.
const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x2000), (0x1_0000, 0x1000)];

/// (guest address, length) of each segment, readable then writable.
type Shape = Result<(Vec<(u64, usize)>, Vec<(u64, usize)>), ChainError>;

fn address(bytes: &[u8]) -> u64 {
    u64::from(bytes[0]) | u64::from(bytes[1]) << 8 | u64::from(bytes[2] & 1) << 16
}

fn memory(contents: &[u8]) -> GuestMemoryMmap {
    let regions: Vec<(GuestAddress, usize)> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&regions).expect("fuzz memory");
    let mut rest = contents;
    for &(start, len) in &REGIONS {
        let (now, after) = rest.split_at(len.min(rest.len()));
        mem.write_slice(now, GuestAddress(start)).expect("fill memory");
        rest = after;
    }
    mem
}

fn queue(size: u16, table: u64, avail: u64, used: u64) -> Queue {
    let mut queue = Queue::new(256).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(table as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    queue
}

/// The chain as virtio-queue walks it, split as a device must (see the
/// `chain_reader` target), each segment named by its guest address.
fn reference(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Shape {
    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    let (mut r_len, mut w_len) = (0u64, 0u64);
    for desc in chain {
        if desc.len() == 0 {
            continue;
        }
        mem.get_slice(desc.addr(), desc.len() as usize)
            .map_err(|_| ChainError::OutOfMemory { addr: desc.addr().0, len: desc.len() })?;
        let segment = (desc.addr().0, desc.len() as usize);
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

/// The length a chain is answered with: anything that depends on its shape.
fn answered_len(shape: &Shape) -> u32 {
    match shape {
        Ok((r, w)) => (r.len() as u32) << 16 | w.iter().map(|s| s.1 as u32).sum::<u32>() & 0xffff,
        Err(_) => 0xdead,
    }
}

/// The guest address of a host pointer into `mem`.
fn guest_address(mem: &GuestMemoryMmap, host: usize) -> u64 {
    mem.iter()
        .find_map(|r| {
            let base = r.as_volatile_slice().ok()?.ptr_guard().as_ptr() as usize;
            (base..base + r.len() as usize).contains(&host).then(|| r.start_addr().0 + (host - base) as u64)
        })
        .expect("a segment inside guest memory")
}

fn all_bytes(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = Vec::new();
    for &(start, len) in &REGIONS {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(start)).expect("read memory");
        out.extend(v);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((head, contents)) = data.split_first_chunk::<10>() else { return };
    let size = 1u16 << (head[0] % 9);
    let (table, avail, used) = (address(&head[1..4]), address(&head[4..7]), address(&head[7..10]));
    let mut q = queue(size, table, avail, used);
    // Where the queue put its rings (it keeps its default for a misaligned
    // address).
    let spans = [
        (q.desc_table(), 16 * u64::from(size)),
        (q.avail_ring(), 6 + 2 * u64::from(size)),
        (q.used_ring(), 6 + 8 * u64::from(size)),
    ];
    let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    if overlap(spans[0], spans[1]) || overlap(spans[0], spans[2]) || overlap(spans[1], spans[2]) {
        return;
    }

    let mem = memory(contents);
    let mut got: Vec<Shape> = Vec::new();
    let answered = answer_all(&mut q, &mem, |split| {
        let shape = split.map(|b| {
            let placed = |p: Result<devices::virtio::chain::Pieces<'_, '_>, ChainError>| -> Vec<(u64, usize)> {
                p.expect("a whole direction")
                    .map(|s| (guest_address(&mem, s.ptr_guard().as_ptr() as usize), s.len()))
                    .collect()
            };
            (placed(b.readable(0, b.readable_len())), placed(b.writable(0, b.writable_len())))
        });
        let len = answered_len(&shape);
        got.push(shape);
        len
    });

    let mem_ref = memory(contents);
    let mut q_ref = queue(size, table, avail, used);
    let mut expected: Vec<Shape> = Vec::new();
    let mut want = Answered::default();
    for _ in 0..PASS_BUDGET {
        let chain = match q_ref.iter(&mem_ref) {
            Ok(mut chains) => chains.next(),
            Err(_) => {
                want.corrupt = true;
                break;
            }
        };
        let Some(chain) = chain else { break };
        want.used = true;
        let head_index = chain.head_index();
        let shape = reference(&mem_ref, chain);
        let _ = q_ref.add_used(&mem_ref, head_index, answered_len(&shape));
        expected.push(shape);
    }

    assert_eq!(got, expected, "the chains were split differently");
    assert_eq!(answered, want);
    assert_eq!((q.next_avail(), q.next_used()), (q_ref.next_avail(), q_ref.next_used()), "ring positions");
    assert!(all_bytes(&mem) == all_bytes(&mem_ref), "guest memory differs after the pass (the used ring)");
});
