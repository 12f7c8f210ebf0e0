//! Guest RAM: one memfd, mapped shared, so the same pages can later be
//! handed to a vhost-user backend or snapshotted.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
