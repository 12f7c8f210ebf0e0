//! Descriptor chains as a device sees them: the bytes the driver offers to
//! be read, then the bytes it offers to be written, each a list of guest
//! memory segments. Everything here treats the chain as guest-controlled:
//! segments must lie in guest memory and keep the order the spec demands.

use std::sync::atomic::Ordering;

use smallvec::SmallVec;

use super::PASS_BUDGET;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemory, VolatileSlice,
};

/// Why a chain cannot be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A device-readable descriptor came after a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor of {len} bytes at {addr:#x} is outside guest memory")]
    OutOfMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The segments add up to more than 4 GiB.
    #[error("the descriptor chain is longer than 4 GiB")]
    TooLong,
    /// An access past the end of the readable or writable part.
    #[error("the chain has {available} {what} bytes, {wanted} needed")]
    Short {
        /// "readable" or "writable".
        what: &'static str,
        /// Bytes present.
        available: u64,
        /// Bytes needed.
        wanted: u64,
    },
}

/// The guest memory of one direction, in order; most requests have a few
/// segments, kept inline.
type Segments<'m> = SmallVec<[VolatileSlice<'m>; 4]>;

/// A chain split into its readable and writable segments. Each segment is
/// checked against guest memory once, when the chain is split, and kept as
/// the host mapping it resolved to: a request touches its header, data and
/// status without looking guest memory up again.
#[derive(Debug, Default, Clone)]
pub struct Buffers<'m> {
    readable: Segments<'m>,
    writable: Segments<'m>,
    readable_len: u64,
    writable_len: u64,
}

impl<'m> Buffers<'m> {
    /// Splits `chain` with virtio-queue's own walk, looking each
    /// descriptor and segment up in `mem`. [`ChainReader`] does the same
    /// faster, and hands it the chains it does not walk itself.
    fn from_chain(mem: &'m GuestMemoryMmap, chain: DescriptorChain<&'m GuestMemoryMmap>) -> Result<Self, ChainError> {
        let mut buffers = Buffers::default();
        for desc in chain {
            // Zero-length descriptors carry nothing.
            if desc.len() != 0 {
                // Inside one memory region: our regions are never adjacent,
                // so a segment crossing one's end leaves guest memory.
                let slice = mem.get_slice(desc.addr(), desc.len() as usize).map_err(|_| out_of_memory(&desc))?;
                buffers.push(&desc, slice)?;
            }
        }
        Ok(buffers)
    }

    /// Adds `slice`, the guest memory `desc` describes, after the segments
    /// before it.
    #[inline(always)]
    fn push(&mut self, desc: &Descriptor, slice: VolatileSlice<'m>) -> Result<(), ChainError> {
        let len = u64::from(desc.len());
        if desc.is_write_only() {
            self.writable_len += len;
            self.writable.push(slice);
        } else {
            if !self.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            self.readable_len += len;
            self.readable.push(slice);
        }
        if self.readable_len > u64::from(u32::MAX) || self.writable_len > u64::from(u32::MAX) {
            return Err(ChainError::TooLong);
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Total readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// The readable bytes `[offset, offset+len)`, as guest memory slices.
    pub fn readable(&self, offset: u64, len: u64) -> Result<Pieces<'_, 'm>, ChainError> {
        Pieces::new(&self.readable, self.readable_len, offset, len, "readable")
    }

    /// The writable bytes `[offset, offset+len)`, as guest memory slices.
    pub fn writable(&self, offset: u64, len: u64) -> Result<Pieces<'_, 'm>, ChainError> {
        Pieces::new(&self.writable, self.writable_len, offset, len, "writable")
    }

    /// Reads `out.len()` readable bytes starting at logical `offset`.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for piece in self.readable(offset, out.len() as u64)? {
            piece.copy_to(&mut out[done..done + piece.len()]);
            done += piece.len();
        }
        Ok(())
    }

    /// Writes `data` into the writable bytes starting at logical `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for piece in self.writable(offset, data.len() as u64)? {
            piece.copy_from(&data[done..done + piece.len()]);
            done += piece.len();
        }
        Ok(())
    }
}

/// The pieces of a chain's segments that cover a range of its bytes, in
/// order; together they hold exactly the range's length.
pub struct Pieces<'b, 'm> {
    segments: std::slice::Iter<'b, VolatileSlice<'m>>,
    /// Bytes still to skip before the range starts.
    skip: usize,
    /// Bytes of the range not yet handed out.
    left: usize,
}

impl<'b, 'm> Pieces<'b, 'm> {
    /// `[offset, offset+len)` of `segments`, which hold `available` bytes.
    fn new(
        segments: &'b [VolatileSlice<'m>],
        available: u64,
        offset: u64,
        len: u64,
        what: &'static str,
    ) -> Result<Self, ChainError> {
        let wanted = offset.checked_add(len).ok_or(ChainError::TooLong)?;
        if wanted > available {
            return Err(ChainError::Short { what, available, wanted });
        }
        // Both fit: `available` is at most 2^32 (checked when splitting).
        Ok(Pieces { segments: segments.iter(), skip: offset as usize, left: len as usize })
    }
}

impl<'m> Iterator for Pieces<'_, 'm> {
    type Item = VolatileSlice<'m>;

    fn next(&mut self) -> Option<VolatileSlice<'m>> {
        while self.left > 0 {
            let segment = self.segments.next()?;
            if self.skip >= segment.len() {
                self.skip -= segment.len();
                continue;
            }
            let n = (segment.len() - self.skip).min(self.left);
            // In range: `skip < segment.len()` and `n <= segment.len() - skip`;
            // and the segments hold the whole range (checked in `new`), so
            // they do not run out before `left` does.
            let piece = segment.subslice(self.skip, n).ok()?;
            self.skip = 0;
            self.left -= n;
            return Some(piece);
        }
        None
    }
}

/// Splits the chains of one queue during one pass over it, with the
/// queue's descriptor table and the guest memory region its buffers last
/// fell in each looked up once rather than for every descriptor. It reads
/// the same descriptors, in the same order, as virtio-queue's own walk
/// ([`Buffers::from_chain`]), which it hands chains with an indirect table.
pub struct ChainReader<'m> {
    mem: &'m GuestMemoryMmap,
    /// The descriptor table and its size, None when the table does not lie
    /// inside one region (every chain then goes to `from_chain`).
    table: Option<(VolatileSlice<'m>, u16)>,
    /// The region the last segment fell in: its guest address and host
    /// slice.
    region: Option<(u64, VolatileSlice<'m>)>,
}

impl<'m> ChainReader<'m> {
    /// A reader for the chains of `queue` in `mem`.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Self {
        let size = queue.size();
        let len = usize::from(size) * size_of::<Descriptor>();
        let table = mem.get_slice(GuestAddress(queue.desc_table()), len).ok().map(|t| (t, size));
        ChainReader { mem, table, region: None }
    }

    /// Splits `chain` into its readable and writable segments, checking
    /// each lies in guest memory, as [`Buffers::from_chain`] does.
    pub fn split(&mut self, chain: DescriptorChain<&'m GuestMemoryMmap>) -> Result<Buffers<'m>, ChainError> {
        let mut buffers = Buffers::default();
        self.split_into(chain, &mut buffers)?;
        Ok(buffers)
    }

    /// [`ChainReader::split`] into `buffers`, which are cleared first.
    fn split_into(
        &mut self,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        buffers: &mut Buffers<'m>,
    ) -> Result<(), ChainError> {
        match self.walk(chain.head_index(), buffers) {
            Some(split) => split,
            None => {
                *buffers = Buffers::from_chain(self.mem, chain)?;
                Ok(())
            }
        }
    }

    /// Splits the chain that starts at descriptor `head` into `buffers`
    /// (cleared first) through the descriptor table looked up once. None
    /// when virtio-queue's walk must do it: the chain has an indirect
    /// table, or the descriptor table does not lie inside one region.
    fn walk(&mut self, head: u16, buffers: &mut Buffers<'m>) -> Option<Result<(), ChainError>> {
        buffers.clear();
        let (table, size) = self.table?;
        // virtio-queue's walk: at most `size` descriptors (so a loop ends),
        // stopping at an index outside the table, and before the
        // descriptor that would take the chain (both directions together)
        // past u32::MAX bytes, which it ends the chain at without an error.
        let mut index = head;
        let mut total = 0u32;
        for _ in 0..size {
            if index >= size {
                break;
            }
            let Ok(desc) = table.get_ref::<Descriptor>(usize::from(index) * size_of::<Descriptor>()) else { break };
            let desc = desc.load();
            if desc.refers_to_indirect_table() {
                return None;
            }
            let Some(sum) = total.checked_add(desc.len()) else { break };
            total = sum;
            if desc.len() != 0 {
                let pushed = self.slice(&desc).and_then(|slice| buffers.push(&desc, slice));
                if let Err(e) = pushed {
                    return Some(Err(e));
                }
            }
            if !desc.has_next() {
                break;
            }
            index = desc.next();
        }
        Some(Ok(()))
    }

    /// The guest memory `desc` describes, inside one region; the region of
    /// the last lookup is tried first.
    #[inline(always)]
    fn slice(&mut self, desc: &Descriptor) -> Result<VolatileSlice<'m>, ChainError> {
        let (addr, len) = (desc.addr().raw_value(), desc.len() as usize);
        if let Some((start, region)) = self.region {
            if let Some(offset) = addr.checked_sub(start) {
                if let Ok(slice) = region.subslice(offset as usize, len) {
                    return Ok(slice);
                }
            }
        }
        let region = self.mem.find_region(desc.addr()).ok_or_else(|| out_of_memory(desc))?;
        let whole = region.as_volatile_slice().map_err(|_| out_of_memory(desc))?;
        let start = region.start_addr().raw_value();
        self.region = Some((start, whole));
        whole.subslice((addr - start) as usize, len).map_err(|_| out_of_memory(desc))
    }
}

fn out_of_memory(desc: &Descriptor) -> ChainError {
    ChainError::OutOfMemory { addr: desc.addr().raw_value(), len: desc.len() }
}

// Offsets in the split rings (virtio 1.x, 2.7.6 and 2.7.8): both rings
// start with flags and an index, then their entries.
const RING_IDX: usize = 2;
const RING_ENTRIES: usize = 4;
const AVAIL_ENTRY_LEN: usize = 2;
const USED_ENTRY_LEN: usize = 8;

/// A queue's available and used rings as host memory, each looked up once
/// a pass: reading a head, or putting a used element and publishing the
/// used index, is then a load or store in a slice rather than a search of
/// guest memory. The accesses and orderings are virtio-queue's own
/// (`AvailIter`, `add_used`).
struct Rings<'m> {
    avail: VolatileSlice<'m>,
    used: VolatileSlice<'m>,
    size: u16,
}

impl<'m> Rings<'m> {
    /// `queue`'s rings in `mem`; None when the queue is not ready or a
    /// ring does not lie inside one region (virtio-queue's accessors then
    /// serve the queue).
    fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Option<Self> {
        let size = queue.size();
        if !queue.ready() || queue.avail_ring() == 0 || size == 0 {
            return None;
        }
        let avail_len = RING_ENTRIES + AVAIL_ENTRY_LEN * usize::from(size);
        let used_len = RING_ENTRIES + USED_ENTRY_LEN * usize::from(size);
        let avail = mem.get_slice(GuestAddress(queue.avail_ring()), avail_len).ok()?;
        let used = mem.get_slice(GuestAddress(queue.used_ring()), used_len).ok()?;
        Some(Rings { avail, used, size })
    }

    /// The driver's available index; acquire, so the entries before it
    /// are read after it.
    fn avail_idx(&self) -> Option<u16> {
        self.avail.load::<u16>(RING_IDX, Ordering::Acquire).ok().map(u16::from_le)
    }

    /// The chain head at available position `position`.
    fn avail_head(&self, position: u16) -> Option<u16> {
        let at = RING_ENTRIES + AVAIL_ENTRY_LEN * usize::from(position % self.size);
        self.avail.load::<u16>(at, Ordering::Acquire).ok().map(u16::from_le)
    }

    /// Puts chain `head`, of which `len` bytes were written, at used
    /// position `position`, then publishes `position + 1` as the used
    /// index (release: the element is visible before the index).
    fn put_used(&self, position: u16, head: u16, len: u32) -> Option<()> {
        let at = RING_ENTRIES + USED_ENTRY_LEN * usize::from(position % self.size);
        self.used.store(u32::from(head).to_le(), at, Ordering::Relaxed).ok()?;
        self.used.store(len.to_le(), at + 4, Ordering::Relaxed).ok()?;
        self.used.store(position.wrapping_add(1).to_le(), RING_IDX, Ordering::Release).ok()
    }
}

/// Chains taken from the available ring at a time when virtio-queue reads
/// it (a ring not inside one region).
const BATCH: usize = 16;

/// What [`answer_all`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// Chains were put in the used ring: the driver may need telling.
    pub used: bool,
    /// The available ring could not be read (a corrupt index): the pass
    /// stopped there, and nothing more is served until the driver resets
    /// the device.
    pub corrupt: bool,
}

/// Answers the chains waiting in `queue`, at most [`PASS_BUDGET`] of them
/// (a driver adding chains as fast as we answer them must not keep one
/// pass going; [`super::serve`] leaves the rest for the next pass): each is
/// split by a [`ChainReader`] and handed to `answer`, which returns the
/// number of bytes it wrote into the chain, and is then put in the used
/// ring. The rings are looked up once a pass ([`Rings`]); the available
/// index is read again only once the chains it announced are answered.
/// The driver can corrupt the index meanwhile, so `used` holds even when
/// `corrupt` is set.
pub fn answer_all<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    answer: impl FnMut(Result<&Buffers<'m>, ChainError>) -> u32,
) -> Answered {
    match Rings::new(queue, mem) {
        Some(rings) => answer_through(&rings, queue, mem, answer),
        None => answer_through_queue(queue, mem, answer),
    }
}

/// [`answer_all`] with the rings as host memory.
fn answer_through<'m>(
    rings: &Rings<'m>,
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mut answer: impl FnMut(Result<&Buffers<'m>, ChainError>) -> u32,
) -> Answered {
    let mut reader = ChainReader::new(queue, mem);
    let mut buffers = Buffers::default();
    let mut done = Answered::default();
    let mut budget = PASS_BUDGET;
    let (mut next_avail, mut next_used) = (queue.next_avail(), queue.next_used());
    'pass: while budget > 0 {
        // As virtio-queue's iterator: an index more than a queue ahead of
        // ours is corrupt.
        let waiting = match rings.avail_idx() {
            Some(idx) if idx.wrapping_sub(next_avail) <= rings.size => idx.wrapping_sub(next_avail),
            _ => {
                done.corrupt = true;
                break;
            }
        };
        if waiting == 0 {
            break;
        }
        for _ in 0..waiting.min(budget) {
            let Some(mut head) = rings.avail_head(next_avail) else {
                done.corrupt = true;
                break 'pass;
            };
            next_avail = next_avail.wrapping_add(1);
            budget -= 1;
            done.used = true;
            let split = match reader.walk(head, &mut buffers) {
                Some(split) => split,
                // virtio-queue's walk needs its own chain, taken from the
                // same ring entry; the driver may have changed the entry
                // meanwhile, so its head is the one answered.
                None => {
                    queue.set_next_avail(next_avail.wrapping_sub(1));
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        done.corrupt = true;
                        break 'pass;
                    };
                    head = chain.head_index();
                    Buffers::from_chain(mem, chain).map(|b| buffers = b)
                }
            };
            let len = answer(split.map(|()| &buffers));
            // As virtio-queue's `add_used`: a head outside the table gets
            // no used element.
            if head < rings.size && rings.put_used(next_used, head, len).is_some() {
                next_used = next_used.wrapping_add(1);
            }
        }
    }
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_used);
    done
}

/// [`answer_all`] through virtio-queue's own ring accessors, for rings that
/// do not lie inside one region. Chains are taken in batches, so the
/// available index is read once per batch rather than once per chain.
fn answer_through_queue<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mut answer: impl FnMut(Result<&Buffers<'m>, ChainError>) -> u32,
) -> Answered {
    let mut reader = ChainReader::new(queue, mem);
    let mut chains: SmallVec<[DescriptorChain<&'m GuestMemoryMmap>; BATCH]> = SmallVec::new();
    let mut buffers = Buffers::default();
    let mut done = Answered::default();
    let mut budget = usize::from(PASS_BUDGET);
    loop {
        match queue.iter(mem) {
            Ok(avail) => chains.extend(avail.take(BATCH.min(budget))),
            Err(_) => {
                done.corrupt = true;
                return done;
            }
        }
        if chains.is_empty() {
            return done;
        }
        done.used = true;
        budget -= chains.len();
        for chain in chains.drain(..) {
            let head = chain.head_index();
            let len = answer(reader.split_into(chain, &mut buffers).map(|()| &buffers));
            // A used-ring write can only fail on a ring outside memory,
            // which `Queue::is_valid` ruled out at activation.
            let _ = queue.add_used(mem, head, len);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::Bytes;

    pub(crate) const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    /// Runs `f` on its own thread and fails the test if it takes longer than
    /// `limit`: a pass that blocks must fail the test, not hang it.
    pub(crate) fn within<T: Send + 'static>(limit: std::time::Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(limit) {
            Ok(v) => v,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("stalled: still running after {limit:?}"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test's thread panicked (see above)"),
        }
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Builds a queue holding one chain made of `descs` and splits it.
    pub(crate) fn try_one_chain<'m>(
        mem: &'m GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> Result<Buffers<'m>, ChainError> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        split_both_ways(mem, &vq)
    }

    /// Splits the first chain of `vq` with virtio-queue's walk and with a
    /// `ChainReader`, checks the two agree, and returns the reader's.
    fn split_both_ways<'m>(
        mem: &'m GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> Result<Buffers<'m>, ChainError> {
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        let by_queue = Buffers::from_chain(mem, chain.clone());
        let by_reader = ChainReader::new(&q, mem).split(chain);
        assert_eq!(shape(mem, &by_queue), shape(mem, &by_reader));
        by_reader
    }

    type Shape = (Vec<(u64, usize)>, Vec<(u64, usize)>, u64, u64);

    fn shape(mem: &GuestMemoryMmap, split: &Result<Buffers, ChainError>) -> Result<Shape, ChainError> {
        let b = split.as_ref().map_err(Clone::clone)?;
        Ok((placed(mem, &b.readable), placed(mem, &b.writable), b.readable_len(), b.writable_len()))
    }

    pub(crate) fn one_chain<'m>(mem: &'m GuestMemoryMmap, descs: &[RawDescriptor]) -> Buffers<'m> {
        try_one_chain(mem, descs).unwrap()
    }

    /// The guest address and length of each segment.
    fn placed(mem: &GuestMemoryMmap, segments: &[VolatileSlice]) -> Vec<(u64, usize)> {
        let guest_addr = |host: usize| {
            mem.iter()
                .find_map(|r| {
                    let base = r.as_volatile_slice().unwrap().ptr_guard().as_ptr() as usize;
                    (base..base + r.len() as usize)
                        .contains(&host)
                        .then(|| r.start_addr().raw_value() + (host - base) as u64)
                })
                .unwrap()
        };
        segments.iter().map(|s| (guest_addr(s.ptr_guard().as_ptr() as usize), s.len())).collect()
    }

    #[test]
    fn splits_readable_then_writable_segments() {
        let mem = memory();
        let b = one_chain(
            &mem,
            &[desc(0x10_0000, 16, 0), desc(0x10_1000, 0, 0), desc(0x10_2000, 512, WRITE), desc(0x10_3000, 1, WRITE)],
        );
        assert_eq!(placed(&mem, &b.readable), [(0x10_0000, 16)]);
        assert_eq!(placed(&mem, &b.writable), [(0x10_2000, 512), (0x10_3000, 1)]);
        assert_eq!((b.readable_len(), b.writable_len()), (16, 513));
    }

    #[test]
    fn reads_and_writes_span_segments() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[4, 5], GuestAddress(0x11_0000)).unwrap();
        let b = one_chain(
            &mem,
            &[desc(0x10_0000, 3, 0), desc(0x11_0000, 2, 0), desc(0x12_0000, 2, WRITE), desc(0x13_0000, 4, WRITE)],
        );
        let mut out = [0u8; 3];
        b.read_at(2, &mut out).unwrap();
        assert_eq!(out, [3, 4, 5]);
        b.write_at(1, &[9, 8, 7]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x12_0001)).unwrap(), 9);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x13_0000)).unwrap(), u16::from_le_bytes([8, 7]));
        assert_eq!(b.read_at(4, &mut out), Err(ChainError::Short { what: "readable", available: 5, wanted: 7 }));
        assert_eq!(b.writable(1, 4).unwrap().map(|s| s.len()).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(b.writable(0, 6).unwrap().map(|s| s.len()).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(b.writable(6, 0).unwrap().count(), 0);
    }

    #[test]
    fn malformed_chains_are_refused() {
        let mem = memory();
        // Readable after writable.
        let err = try_one_chain(&mem, &[desc(0x10_0000, 16, WRITE), desc(0x10_1000, 16, 0)]).unwrap_err();
        assert_eq!(err, ChainError::ReadableAfterWritable);
        // Past the end of guest memory.
        let err = try_one_chain(&mem, &[desc(0x1f_ff00, 0x200, 0)]).unwrap_err();
        assert_eq!(err, ChainError::OutOfMemory { addr: 0x1f_ff00, len: 0x200 });
        // An address that wraps around.
        let err = try_one_chain(&mem, &[desc(u64::MAX - 4, 0x10, 0)]).unwrap_err();
        assert!(matches!(err, ChainError::OutOfMemory { .. }), "{err:?}");
    }

    #[test]
    fn a_looping_chain_ends() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 4);
        // Two descriptors pointing at each other: virtio-queue stops after
        // the queue size; the chain must not spin forever.
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        vq.desc_table().store(0, RawDescriptor::from(SplitDescriptor::new(0x10_0000, 8, next, 1))).unwrap();
        vq.desc_table().store(1, RawDescriptor::from(SplitDescriptor::new(0x10_1000, 8, next, 0))).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let b = split_both_ways(&mem, &vq).unwrap();
        assert!(b.readable.len() <= 4, "{} segments", b.readable.len());
    }

    #[test]
    fn a_chain_ends_where_virtio_queue_ends_it_past_4_gib() {
        // Found by the chain_reader fuzz target: virtio-queue's walk ends a
        // chain, without an error, at the descriptor that takes its length
        // (both directions together) past u32::MAX, and never reads it. The
        // reader read that descriptor (here: outside guest memory) and
        // refused the chain, so a direct chain and the same chain behind an
        // indirect table were answered differently.
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 4);
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        vq.desc_table().store(0, RawDescriptor::from(SplitDescriptor::new(0x10_0000, 0xa5, next, 1))).unwrap();
        vq.desc_table().store(1, RawDescriptor::from(SplitDescriptor::new(u64::MAX - 4, u32::MAX, next, 2))).unwrap();
        vq.desc_table().store(2, RawDescriptor::from(SplitDescriptor::new(0x10_1000, 8, WRITE, 0))).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let b = split_both_ways(&mem, &vq).unwrap();
        assert_eq!(placed(&mem, &b.readable), [(0x10_0000, 0xa5)]);
        assert!(b.writable.is_empty());
    }

    #[test]
    fn an_indirect_chain_is_split_like_a_direct_one() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // The indirect table, three descriptors linked by NEXT.
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let indirect = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let table = [
            SplitDescriptor::new(0x10_0000, 16, next, 1),
            SplitDescriptor::new(0x10_1000, 512, WRITE | next, 2),
            SplitDescriptor::new(0x10_2000, 1, WRITE, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x8000 + 16 * i as u64)).unwrap();
        }
        vq.desc_table().store(0, RawDescriptor::from(SplitDescriptor::new(0x8000, 48, indirect, 0))).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let b = split_both_ways(&mem, &vq).unwrap();
        assert_eq!(placed(&mem, &b.readable), [(0x10_0000, 16)]);
        assert_eq!(placed(&mem, &b.writable), [(0x10_1000, 512), (0x10_2000, 1)]);
    }

    #[test]
    fn segments_are_found_in_any_region_and_may_not_cross_one() {
        // Two regions with a hole between them; the queue lives in the first.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000), (GuestAddress(0x40_0000), 0x10_0000)])
            .unwrap();
        let b = one_chain(&mem, &[desc(0x40_0000, 16, 0), desc(0x10_0000, 8, 0), desc(0x4f_f000, 0x1000, WRITE)]);
        assert_eq!(placed(&mem, &b.readable), [(0x40_0000, 16), (0x10_0000, 8)]);
        assert_eq!(placed(&mem, &b.writable), [(0x4f_f000, 0x1000)]);
        // Past the end of the second region, after a segment in it.
        let err = try_one_chain(&mem, &[desc(0x40_0000, 16, 0), desc(0x4f_f000, 0x1001, WRITE)]).unwrap_err();
        assert_eq!(err, ChainError::OutOfMemory { addr: 0x4f_f000, len: 0x1001 });
        // From the first region into the hole.
        let err = try_one_chain(&mem, &[desc(0x1f_ff00, 0x200, 0)]).unwrap_err();
        assert_eq!(err, ChainError::OutOfMemory { addr: 0x1f_ff00, len: 0x200 });
        // In the hole.
        let err = try_one_chain(&mem, &[desc(0x10_0000, 16, 0), desc(0x30_0000, 16, WRITE)]).unwrap_err();
        assert_eq!(err, ChainError::OutOfMemory { addr: 0x30_0000, len: 16 });
    }

    #[test]
    fn answer_all_serves_more_chains_than_a_batch() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 256);
        let chains = 3 * BATCH as u16 / 2;
        let descs: Vec<RawDescriptor> = (0..chains).map(|i| desc(0x10_0000 + 0x100 * u64::from(i), 8, WRITE)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut n = 0u64;
        let used = answer_all(&mut q, &mem, |b| {
            b.unwrap().write_at(0, &n.to_le_bytes()).unwrap();
            n += 1;
            8
        });
        assert_eq!(used, Answered { used: true, corrupt: false });
        assert_eq!(vq.used().idx().load(), chains);
        for i in 0..chains {
            let elem = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
            assert_eq!((elem.id(), elem.len()), (u32::from(i), 8));
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0000 + 0x100 * u64::from(i))).unwrap(), u64::from(i));
        }
        // Nothing left: nothing used.
        assert_eq!(answer_all(&mut q, &mem, |_| panic!("no chain waits")), Answered::default());
    }

    #[test]
    fn answer_all_refuses_a_corrupt_available_index() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.avail().idx().store(100);
        let mut q: Queue = vq.create_queue().unwrap();
        let result = answer_all(&mut q, &mem, |_| panic!("no chain may be served"));
        assert_eq!(result, Answered { used: false, corrupt: true });
        assert_eq!(vq.used().idx().load(), 0);
    }

    #[test]
    fn answer_all_reports_chains_used_before_the_index_went_bad() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 256);
        let descs: Vec<RawDescriptor> = (0..BATCH as u64).map(|i| desc(0x10_0000 + 0x100 * i, 8, WRITE)).collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        // While the first batch is answered, the driver writes an index
        // more than a queue ahead of ours.
        let result = answer_all(&mut q, &mem, |_| {
            vq.avail().idx().store(1000);
            0
        });
        assert_eq!(result, Answered { used: true, corrupt: true });
        assert_eq!(vq.used().idx().load(), BATCH as u16);
    }

    /// Guest memory of two adjacent regions, with a queue of 16 whose used
    /// ring crosses from the first into the second: it lies in guest
    /// memory but not inside one region.
    fn memory_with_a_ring_across_regions() -> (GuestMemoryMmap, GuestAddress) {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000), (GuestAddress(0x1_0000), 0x1f_0000)]).unwrap();
        // Table 256 bytes, then the available ring, then the used ring,
        // which ends past 0x1_0000 (checked where it is used).
        (mem, GuestAddress(0xfe80))
    }

    /// Answers every chain of `vq` with its index among the chains (written
    /// at the start of its writable bytes) and returns what the used ring
    /// then holds, with the queue's positions.
    fn answer_each(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> (Vec<(u32, u32)>, u16, u16, u16) {
        let mut q: Queue = vq.create_queue().unwrap();
        let mut n = 0u32;
        let answered = answer_all(&mut q, mem, |b| match b {
            Ok(b) if b.write_at(0, &n.to_le_bytes()).is_ok() => {
                n += 1;
                4 + n
            }
            _ => 1,
        });
        assert_eq!(answered, Answered { used: true, corrupt: false });
        let used = vq.used().idx().load();
        let elems = (0..used).map(|i| vq.used().ring().ref_at(usize::from(i)).unwrap().load());
        (elems.map(|e| (e.id(), e.len())).collect(), used, q.next_avail(), q.next_used())
    }

    #[test]
    fn rings_across_two_regions_are_served_as_rings_inside_one() {
        let descs =
            [desc(0x10_0000, 8, WRITE), desc(0x10_1000, 16, 0), desc(0x10_2000, 8, WRITE), desc(0x30_0000, 8, WRITE)];
        let one = memory();
        let vq = MockSplitQueue::new(&one, 16);
        vq.add_desc_chains(&descs, 0).unwrap();
        let inside = answer_each(&one, &vq);
        assert!(Rings::new(&vq.create_queue().unwrap(), &one).is_some());

        let (two, start) = memory_with_a_ring_across_regions();
        let vq = MockSplitQueue::create(&two, start, 16);
        vq.add_desc_chains(&descs, 0).unwrap();
        assert!(Rings::new(&vq.create_queue().unwrap(), &two).is_none(), "the used ring lies inside one region");
        let across = answer_each(&two, &vq);
        assert_eq!(inside, across);
        // Chain 3 points outside guest memory: answered, with nothing written.
        assert_eq!(inside, (vec![(0, 5), (1, 1), (2, 6), (3, 1)], 4, 4, 4));
        assert_eq!(two.read_obj::<u32>(GuestAddress(0x10_2000)).unwrap(), 1);
    }

    #[test]
    fn a_corrupt_available_index_is_refused_whichever_way_the_rings_are_read() {
        let (two, start) = memory_with_a_ring_across_regions();
        for vq in [MockSplitQueue::new(&two, 16), MockSplitQueue::create(&two, start, 16)] {
            vq.add_desc_chains(&[desc(0x10_0000, 8, WRITE)], 0).unwrap();
            let mut q: Queue = vq.create_queue().unwrap();
            assert_eq!(answer_all(&mut q, &two, |_| 0), Answered { used: true, corrupt: false });
            vq.avail().idx().store(1 + 17);
            let result = answer_all(&mut q, &two, |_| panic!("no chain may be served"));
            assert_eq!(result, Answered { used: false, corrupt: true });
            assert_eq!((vq.used().idx().load(), q.next_avail(), q.next_used()), (1, 1, 1));
        }
    }

    #[test]
    fn an_indirect_chain_is_answered_through_virtio_queues_walk() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let indirect = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let table = [SplitDescriptor::new(0x10_0000, 4, next, 1), SplitDescriptor::new(0x10_1000, 8, WRITE, 0)];
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x8000 + 16 * i as u64)).unwrap();
        }
        // A direct chain at 0, the indirect one at 1 and a direct one at 2.
        vq.desc_table().store(0, desc(0x10_2000, 8, WRITE)).unwrap();
        vq.desc_table().store(1, RawDescriptor::from(SplitDescriptor::new(0x8000, 32, indirect, 0))).unwrap();
        vq.desc_table().store(2, desc(0x10_3000, 8, WRITE)).unwrap();
        for i in 0..3u16 {
            vq.avail().ring().ref_at(usize::from(i)).unwrap().store(i);
        }
        vq.avail().idx().store(3);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut shapes = Vec::new();
        answer_all(&mut q, &mem, |b| {
            let b = b.unwrap();
            shapes.push((placed(&mem, &b.readable), placed(&mem, &b.writable)));
            b.writable_len() as u32
        });
        assert_eq!(
            shapes,
            [
                (vec![], vec![(0x10_2000, 8)]),
                (vec![(0x10_0000, 4)], vec![(0x10_1000, 8)]),
                (vec![], vec![(0x10_3000, 8)])
            ]
        );
        let used: Vec<(u32, u32)> =
            (0..3).map(|i| vq.used().ring().ref_at(i).unwrap().load()).map(|e| (e.id(), e.len())).collect();
        assert_eq!(used, [(0, 8), (1, 8), (2, 8)]);
        assert_eq!((vq.used().idx().load(), q.next_avail(), q.next_used()), (3, 3, 3));
    }

    #[test]
    fn a_head_outside_the_table_is_taken_but_gets_no_used_element() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.desc_table().store(0, desc(0x10_0000, 8, WRITE)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(16);
        vq.avail().ring().ref_at(1).unwrap().store(0);
        vq.avail().idx().store(2);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut lens = Vec::new();
        answer_all(&mut q, &mem, |b| {
            let len = b.unwrap().writable_len() as u32;
            lens.push(len);
            len
        });
        // virtio-queue's walk gives an empty chain for a head past the
        // table, and its `add_used` refuses it: the same here.
        assert_eq!(lens, [0, 8]);
        assert_eq!((vq.used().idx().load(), q.next_avail(), q.next_used()), (1, 2, 1));
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().id(), 0);
    }
}
