//! Guest RAM: one memfd, mapped shared, so the same pages can later be
//! handed to a vhost-user backend or snapshotted.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Why guest memory could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    /// ftruncate failed.
    #[error("cannot size the guest memory file to {0} bytes")]
    Size(u64, #[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// mmap of a snapshot's memory file failed.
    #[error("cannot map the snapshot's memory file")]
    MapFile(#[source] vm_memory::mmap::MmapRegionError),
    /// A region would not fit the guest's address space.
    #[error("guest memory region at {0:#x} does not fit the address space")]
    Layout(u64),
}

/// Creates `size` bytes of guest RAM laid out per `boot::layout`.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    const NAME: &CStr = c"vessel-guest-ram";
    // SAFETY: NAME is a valid NUL-terminated string; the call has no other
    // inputs and its result is checked.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| MemoryError::Size(size, e))?;
    let mut ranges = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in boot::layout::ram_regions(size) {
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, file_offset)),
        ));
        file_offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)
}

/// `size` bytes of guest RAM laid out per `boot::layout`, each region a
/// private copy-on-write mapping of `file` (a snapshot's memory): pages
/// are read from the file only as the guest touches them, and what the
/// guest writes stays in this process. VMs mapping the same file share
/// the pages none of them wrote.
pub fn map_private(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in boot::layout::ram_regions(size) {
        let offset = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, file_offset);
        let mapping = MmapRegion::<()>::build(
            Some(offset),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(MemoryError::MapFile)?;
        regions.push(GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(MemoryError::Layout(start))?);
        file_offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout(0))
}

/// Writes guest RAM to `out` at its file offsets (the layout
/// [`map_private`] reads), leaving holes where the guest has nothing:
/// only the memfd's data extents are copied (SEEK_DATA/SEEK_HOLE), and of
/// a private mapping (a restored VM) only the pages that are not all zero.
pub fn write_contents(mem: &GuestMemoryMmap, out: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let host = mem
            .get_slice(region.start_addr(), len as usize)
            .map_err(|e| std::io::Error::other(format!("guest memory at {:#x}: {e}", region.start_addr().0)))?;
        let extents = match region.file_offset() {
            Some(fo) if region.flags() & libc::MAP_SHARED != 0 => data_extents(fo.file().as_raw_fd(), fo.start(), len)?,
            _ => vec![(0, len)],
        };
        let mut page = vec![0u8; PAGE];
        for (start, end) in extents {
            let mut at = start;
            while at < end {
                let n = PAGE.min((end - at) as usize);
                let slice = host
                    .subslice(at as usize, n)
                    .map_err(|e| std::io::Error::other(format!("guest memory at {at:#x}: {e}")))?;
                if slice.copy_to(&mut page[..n]) != n {
                    return Err(std::io::Error::other(format!("guest memory at {at:#x}: short read")));
                }
                if page[..n].iter().any(|b| *b != 0) {
                    out.write_all_at(&page[..n], file_offset + at)?;
                }
                at += n as u64;
            }
        }
        file_offset += len;
    }
    Ok(())
}

/// The page size snapshots copy by.
const PAGE: usize = 4096;

/// The [start, end) ranges of `[offset, offset + len)` of `fd` that hold
/// data, relative to `offset`.
fn data_extents(fd: std::os::fd::RawFd, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let end = offset + len;
    let mut extents = Vec::new();
    let mut at = offset;
    while at < end {
        // SAFETY: lseek on a descriptor this process owns; no memory is
        // passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data past `at`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        extents.push((data - offset, hole - offset));
        at = hole;
    }
    Ok(extents)
}

/// Bytes of guest RAM resident in host memory now (mincore over each
/// region's mapping).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let mut total = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let Ok(host) = mem.get_host_address(region.start_addr()) else { continue };
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: [host, host+len) is this region's live mapping (it lives as
        // long as `mem`), and `vec` has one byte per page of it.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 == 1).count() as u64 * page as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_laid_out_and_residency_grows_when_touched() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let before = resident_bytes(&mem);
        mem.write_slice(&[1u8; 8192], GuestAddress(0x100000)).unwrap();
        assert!(resident_bytes(&mem) >= before + 8192);
    }
}
