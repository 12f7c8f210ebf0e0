//! Descriptor chains as a device sees them: the bytes the driver offers to
//! be read, then the bytes it offers to be written, each a list of guest
//! memory segments. Everything here treats the chain as guest-controlled:
//! segments must lie in guest memory and keep the order the spec demands.

use smallvec::SmallVec;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Why a chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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

/// Segments of one direction; most requests have a few, kept inline.
pub type Segments = SmallVec<[(GuestAddress, u32); 4]>;

/// Guest memory slices covering a range of a chain, usually one or two.
pub type Slices<'m> = SmallVec<[VolatileSlice<'m>; 4]>;

/// A chain split into its readable and writable segments.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Buffers {
    /// Device-readable segments, in order.
    pub readable: Segments,
    /// Device-writable segments, in order.
    pub writable: Segments,
}

impl Buffers {
    /// Splits `chain`, checking each segment lies in `mem`. Zero-length
    /// descriptors are dropped (they carry nothing).
    pub fn from_chain(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Self, ChainError> {
        let mut buffers = Buffers::default();
        let (mut readable_total, mut writable_total) = (0u64, 0u64);
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len());
            if len == 0 {
                continue;
            }
            // Inside one memory region: our regions are never adjacent, so a
            // segment crossing one's end leaves guest memory.
            if mem.get_slice(addr, len as usize).is_err() {
                return Err(ChainError::OutOfMemory { addr: addr.raw_value(), len });
            }
            if desc.is_write_only() {
                writable_total += u64::from(len);
                buffers.writable.push((addr, len));
            } else {
                if !buffers.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                readable_total += u64::from(len);
                buffers.readable.push((addr, len));
            }
            if readable_total > u64::from(u32::MAX) || writable_total > u64::from(u32::MAX) {
                return Err(ChainError::TooLong);
            }
        }
        Ok(buffers)
    }

    /// Total readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Total writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Reads `out.len()` readable bytes starting at logical `offset`.
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: u64, out: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for_each_range(&self.readable, offset, out.len() as u64, "readable", |addr, n| {
            let n = n as usize;
            guest_slice(mem, addr, n)?.copy_to(&mut out[done..done + n]);
            done += n;
            Ok(())
        })
    }

    /// Writes `data` into the writable bytes starting at logical `offset`.
    pub fn write_at(&self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for_each_range(&self.writable, offset, data.len() as u64, "writable", |addr, n| {
            let n = n as usize;
            guest_slice(mem, addr, n)?.copy_from(&data[done..done + n]);
            done += n;
            Ok(())
        })
    }

    /// The readable bytes `[offset, offset+len)` as guest memory slices.
    pub fn readable_slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        offset: u64,
        len: u64,
    ) -> Result<Slices<'m>, ChainError> {
        slices(mem, &self.readable, offset, len, "readable")
    }

    /// The writable bytes `[offset, offset+len)` as guest memory slices.
    pub fn writable_slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        offset: u64,
        len: u64,
    ) -> Result<Slices<'m>, ChainError> {
        slices(mem, &self.writable, offset, len, "writable")
    }
}

/// Calls `f(address, length)` for each piece of `segments` covering the
/// logical range `[offset, offset+len)`, in order.
fn for_each_range(
    segments: &[(GuestAddress, u32)],
    offset: u64,
    len: u64,
    what: &'static str,
    mut f: impl FnMut(GuestAddress, u64) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let available: u64 = segments.iter().map(|s| u64::from(s.1)).sum();
    let wanted = offset.checked_add(len).ok_or(ChainError::TooLong)?;
    if wanted > available {
        return Err(ChainError::Short { what, available, wanted });
    }
    let (mut skip, mut left) = (offset, len);
    for &(addr, seg_len) in segments {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(seg_len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(left);
        f(addr.unchecked_add(skip), n)?;
        left -= n;
        skip = 0;
    }
    Ok(())
}

fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    segments: &[(GuestAddress, u32)],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<Slices<'m>, ChainError> {
    let mut out = Slices::new();
    for_each_range(segments, offset, len, what, |addr, n| {
        out.push(guest_slice(mem, addr, n as usize)?);
        Ok(())
    })?;
    Ok(out)
}

/// `n` bytes of guest memory at `addr`, all inside one region.
fn guest_slice(mem: &GuestMemoryMmap, addr: GuestAddress, n: usize) -> Result<VolatileSlice<'_>, ChainError> {
    mem.get_slice(addr, n).map_err(|_| ChainError::OutOfMemory { addr: addr.raw_value(), len: n as u32 })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::Bytes;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    pub(crate) const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Builds a queue holding one chain made of `descs` and pops that chain.
    pub(crate) fn one_chain(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Buffers {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        Buffers::from_chain(mem, chain).unwrap()
    }

    #[test]
    fn splits_readable_then_writable_segments() {
        let mem = memory();
        let b = one_chain(&mem, &[desc(0x10_0000, 16, 0), desc(0x10_1000, 0, 0), desc(0x10_2000, 512, WRITE), desc(0x10_3000, 1, WRITE)]);
        assert_eq!(b.readable.as_slice(), [(GuestAddress(0x10_0000), 16)]);
        assert_eq!(b.writable.as_slice(), [(GuestAddress(0x10_2000), 512), (GuestAddress(0x10_3000), 1)]);
        assert_eq!((b.readable_len(), b.writable_len()), (16, 513));
    }

    #[test]
    fn reads_and_writes_span_segments() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[4, 5], GuestAddress(0x11_0000)).unwrap();
        let b = one_chain(&mem, &[desc(0x10_0000, 3, 0), desc(0x11_0000, 2, 0), desc(0x12_0000, 2, WRITE), desc(0x13_0000, 4, WRITE)]);
        let mut out = [0u8; 3];
        b.read_at(&mem, 2, &mut out).unwrap();
        assert_eq!(out, [3, 4, 5]);
        b.write_at(&mem, 1, &[9, 8, 7]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x12_0001)).unwrap(), 9);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x13_0000)).unwrap(), u16::from_le_bytes([8, 7]));
        assert_eq!(
            b.read_at(&mem, 4, &mut out),
            Err(ChainError::Short { what: "readable", available: 5, wanted: 7 })
        );
        let slices = b.writable_slices(&mem, 1, 4).unwrap();
        assert_eq!(slices.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn malformed_chains_are_refused() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Readable after writable.
        vq.build_desc_chain(&[desc(0x10_0000, 16, WRITE), desc(0x10_1000, 16, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(Buffers::from_chain(&mem, chain), Err(ChainError::ReadableAfterWritable));
        // Past the end of guest memory.
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x1f_ff00, 0x200, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(Buffers::from_chain(&mem, chain), Err(ChainError::OutOfMemory { addr: 0x1f_ff00, len: 0x200 }));
        // An address that wraps around.
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(u64::MAX - 4, 0x10, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert!(matches!(Buffers::from_chain(&mem, chain), Err(ChainError::OutOfMemory { .. })));
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
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let b = Buffers::from_chain(&mem, chain).unwrap();
        assert!(b.readable.len() <= 4, "{} segments", b.readable.len());
    }
}
