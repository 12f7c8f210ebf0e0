//! The kernel loader (boot/src/loader.rs): an arbitrary file as the
//! kernel, ELF (with or without a PVH note) or bzImage, loaded into guest
//! memory, then the setup-header limits read and an initrd and command
//! line placed as the boot path does.
#![no_main]

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 32 << 20;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("fuzz memory"))
}

/// An in-memory file, rewritten for each input.
fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

fuzz_target!(|data: &[u8]| {
    static FILES: OnceLock<Mutex<(File, File)>> = OnceLock::new();
    let files = FILES.get_or_init(|| Mutex::new((memfd(c"kernel"), memfd(c"initrd"))));
    let mut files = files.lock().unwrap_or_else(|p| p.into_inner());
    let (kernel, initrd) = &mut *files;
    kernel.set_len(0).expect("truncate");
    kernel.seek(SeekFrom::Start(0)).expect("seek");
    kernel.write_all(data).expect("write the kernel");
    let Ok(loaded) = boot::loader::load_kernel(memory(), kernel) else { return };
    let max = loaded.cmdline_max();
    let _ = boot::loader::write_cmdline(memory(), "console=ttyS0 panic=-1", max);
    let _ = loaded.initrd_addr_max();
    initrd.set_len(u64::from(data.first().copied().unwrap_or(0)) << 12).expect("initrd size");
    let _ = boot::loader::load_initrd(memory(), MEM_SIZE as u64, &loaded, initrd);
});
