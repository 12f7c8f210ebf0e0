//! Moving a request's bytes between the disk file and guest memory: one
//! vectored read or write (preadv/pwritev) straight into or out of the
//! guest's buffers, and for a disk opened with O_DIRECT, a bounce through
//! an aligned buffer when the guest's buffers or the request's offset are
//! not aligned as the kernel demands.
//!
//! Why bounce rather than refuse: the driver's requests are sector-sized
//! (512 bytes) and its buffers are wherever it put them, while a host disk
//! may want 4 KiB for both; a guest whose filesystem has 1 KiB blocks
//! would otherwise get I/O errors on a disk that works without O_DIRECT.
//! Advertising the host's block size to the driver instead would change
//! the disk's geometry, and such a filesystem would then not mount. Linux
//! drivers read into page-cache pages, so their I/O takes the direct path
//! and the bounce serves the rest; `BlockCounters::bounced` counts it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use smallvec::SmallVec;
use vm_memory::VolatileSlice;

/// Which way data moves between the file and guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    /// Read: file to guest memory.
    FileToGuest,
    /// Write: guest memory to file.
    GuestToFile,
}

/// Page size, the alignment assumed where the kernel does not report the
/// file's own.
const PAGE: usize = 4096;
/// Size of the bounce buffer: a transfer longer than this bounces in
/// chunks.
const BOUNCE_LEN: usize = 256 << 10;
/// The most buffers one preadv/pwritev takes (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// What O_DIRECT asks of a transfer: buffer addresses aligned to `memory`,
/// file offsets and buffer lengths to `offset` (the logical block size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// Alignment of each buffer's address, in bytes.
    pub memory: usize,
    /// Alignment of the file offset and of each buffer's length, in bytes.
    pub offset: usize,
}

impl Alignment {
    /// The direct I/O alignment of `file` as the kernel reports it (statx,
    /// STATX_DIOALIGN, Linux 6.1 on); the page size, which suits any
    /// common block size, where the kernel does not say. None when the
    /// file's filesystem does not do direct I/O.
    pub fn of(file: &File) -> io::Result<Option<Self>> {
        // SAFETY: `statx` is plain old data, for which all zeroes is a
        // valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: an empty, NUL-terminated path with AT_EMPTY_PATH names
        // the open file itself; the kernel writes one `struct statx` into
        // `stx`, which lives across the call.
        let rc =
            unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
            return Ok(Some(Alignment { memory: PAGE, offset: PAGE }));
        }
        if stx.stx_dio_offset_align == 0 {
            return Ok(None);
        }
        let (memory, offset) = (stx.stx_dio_mem_align as usize, stx.stx_dio_offset_align as usize);
        // The bounce buffer is cut in chunks of both alignments: neither may
        // be larger than it.
        if !memory.is_power_of_two() || !offset.is_power_of_two() || offset > BOUNCE_LEN || memory > BOUNCE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("unusual direct I/O alignment: memory {memory}, offset {offset}"),
            ));
        }
        Ok(Some(Alignment { memory, offset }))
    }

    /// The unit a bounce moves: aligned for both addresses and offsets
    /// (both are powers of two, so the larger is a multiple of the other).
    fn unit(&self) -> usize {
        self.memory.max(self.offset)
    }

    /// Whether the kernel takes `slices` at `offset` as they are.
    fn suits(&self, slices: &[VolatileSlice], offset: u64) -> bool {
        offset % self.offset as u64 == 0
            && slices.iter().all(|s| s.len() % self.offset == 0 && s.ptr_guard().as_ptr() as usize % self.memory == 0)
    }
}

/// A disk opened with O_DIRECT: its alignment, and the aligned buffer that
/// transfers the kernel would refuse from guest memory go through.
pub struct Direct {
    align: Alignment,
    /// Over-allocated by one unit, so that an aligned run of
    /// `BOUNCE_LEN` bytes lies inside it (at `start`).
    bounce: Vec<u8>,
    start: usize,
}

impl Direct {
    /// A bounce buffer for `align`.
    pub fn new(align: Alignment) -> Self {
        let unit = align.unit().max(PAGE);
        let bounce = vec![0u8; BOUNCE_LEN + unit];
        let start = bounce.as_ptr().align_offset(unit);
        Direct { align, bounce, start }
    }

    /// The disk's alignment.
    pub fn alignment(&self) -> Alignment {
        self.align
    }

    fn buffer(&mut self) -> &mut [u8] {
        &mut self.bounce[self.start..self.start + BOUNCE_LEN]
    }
}

/// How a transfer went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    /// Straight between the file and guest memory.
    Straight,
    /// Through the bounce buffer.
    Bounced,
}

/// Moves the bytes of `pieces` (in order, one contiguous run of the file
/// from `offset`) between the file and guest memory.
pub(super) fn transfer<'m>(
    file: &File,
    mut pieces: impl Iterator<Item = VolatileSlice<'m>>,
    offset: u64,
    dir: Direction,
    direct: Option<&mut Direct>,
) -> io::Result<Path> {
    let Some(first) = pieces.next() else { return Ok(Path::Straight) };
    let second = pieces.next();
    // The common case, one data buffer (a 4 KiB page): pread or pwrite,
    // which the kernel takes faster than a one-element preadv (no iovec
    // to copy in), with nothing gathered on the way.
    if second.is_none() && direct.as_ref().is_none_or(|d| d.align.suits(&[first], offset)) {
        single(file, &first, offset, dir)?;
        return Ok(Path::Straight);
    }
    let slices: SmallVec<[VolatileSlice<'m>; 8]> = [first].into_iter().chain(second).chain(pieces).collect();
    match direct {
        Some(direct) if !direct.align.suits(&slices, offset) => {
            bounce(file, &slices, offset, dir, direct)?;
            Ok(Path::Bounced)
        }
        _ => {
            vectored(file, &slices, offset, dir)?;
            Ok(Path::Straight)
        }
    }
}

/// pread or pwrite (more than one if it comes up short) straight between
/// the file and `slice`.
fn single(file: &File, slice: &VolatileSlice, offset: u64, dir: Direction) -> io::Result<()> {
    // The guard keeps the slice's mapping for as long as the kernel may use
    // the pointer taken from it.
    let guard = slice.ptr_guard_mut();
    let mut done = 0;
    while done < slice.len() {
        let at = offset.checked_add(done as u64).and_then(|at| i64::try_from(at).ok());
        let at = at.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (ptr, left) = (guard.as_ptr().wrapping_add(done), slice.len() - done);
        let n = match dir {
            // SAFETY: `ptr` and `left` stay inside the slice's guest
            // memory (`done < slice.len()`), mapped while `guard` lives;
            // the kernel writes at most `left` bytes there. The guest may
            // change that memory meanwhile, which only changes what it
            // reads back: no Rust reference points into it.
            Direction::FileToGuest => unsafe { libc::pread64(file.as_raw_fd(), ptr.cast(), left, at) },
            // SAFETY: as above; the kernel only reads those bytes.
            Direction::GuestToFile => unsafe { libc::pwrite64(file.as_raw_fd(), ptr.cast(), left, at) },
        };
        done += moved(n, dir)?;
    }
    Ok(())
}

/// The byte count a read or write returned, or the error it stands for;
/// 0 for a call interrupted before it moved anything (to be made again).
fn moved(n: isize, dir: Direction) -> io::Result<usize> {
    match n {
        0 if dir == Direction::FileToGuest => Err(io::ErrorKind::UnexpectedEof.into()),
        0 => Err(io::ErrorKind::WriteZero.into()),
        n if n < 0 => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(err)
            }
        }
        n => Ok(n as usize),
    }
}

/// One preadv/pwritev (more if it comes up short or there are more than
/// `IOV_MAX` buffers) straight between the file and `slices`.
fn vectored(file: &File, slices: &[VolatileSlice], mut offset: u64, dir: Direction) -> io::Result<()> {
    // The guards keep each slice's mapping for as long as the kernel may
    // use the pointers taken from them.
    let guards: SmallVec<[_; 8]> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovecs: SmallVec<[libc::iovec; 8]> =
        guards.iter().map(|g| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: g.len() }).collect();
    let mut first = 0;
    while first < iovecs.len() {
        let batch = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
        let at = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // `batch.len()` is at most IOV_MAX, so it fits.
        let count = batch.len() as libc::c_int;
        let n = match dir {
            // SAFETY: every iovec is a run of guest memory taken from a
            // VolatileSlice (pointer and length), mapped while `guards`
            // lives; the kernel writes only inside them. The guest may
            // change that memory meanwhile, which only changes what it
            // reads back: no Rust reference points into it.
            Direction::FileToGuest => unsafe { libc::preadv64(file.as_raw_fd(), batch.as_ptr(), count, at) },
            // SAFETY: as above; the kernel only reads the iovecs' memory.
            Direction::GuestToFile => unsafe { libc::pwritev64(file.as_raw_fd(), batch.as_ptr(), count, at) },
        };
        let mut done = moved(n, dir)?;
        offset += done as u64;
        // Skip what was moved: whole buffers, then part of the next.
        while done > 0 && first < iovecs.len() {
            let iov = &mut iovecs[first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(done).cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

/// The transfer through the bounce buffer: the file is read and written in
/// aligned units covering `[offset, offset + len)`; for a write, the units
/// the request covers only in part are read first, so the bytes around it
/// are written back as they were.
fn bounce(file: &File, slices: &[VolatileSlice], offset: u64, dir: Direction, direct: &mut Direct) -> io::Result<()> {
    let unit = direct.align.unit() as u64;
    let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
    let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let (first, last) = (offset / unit * unit, end.div_ceil(unit) * unit);
    let buffer = direct.buffer();
    let mut guest = Cursor { slices, index: 0, skip: 0 };
    let mut at = first;
    while at < last {
        // A multiple of the unit: BOUNCE_LEN is, and so are `at` and `last`.
        let chunk = (last - at).min(BOUNCE_LEN as u64) as usize;
        // The request's part of this chunk.
        let lo = offset.saturating_sub(at) as usize;
        let hi = (end.min(at + chunk as u64) - at) as usize;
        let window = &mut buffer[..chunk];
        match dir {
            Direction::FileToGuest => {
                file.read_exact_at(window, at)?;
                guest.fill_from(&window[lo..hi]);
            }
            Direction::GuestToFile => {
                let unit = unit as usize;
                if lo > 0 {
                    file.read_exact_at(&mut window[..unit], at)?;
                }
                if hi < chunk {
                    file.read_exact_at(&mut window[chunk - unit..], at + (chunk - unit) as u64)?;
                }
                guest.drain_into(&mut window[lo..hi]);
                file.write_all_at(window, at)?;
            }
        }
        at += chunk as u64;
    }
    Ok(())
}

/// A position in a list of guest memory slices, moving forward as bytes
/// are copied to or from them.
struct Cursor<'s, 'm> {
    slices: &'s [VolatileSlice<'m>],
    index: usize,
    skip: usize,
}

impl Cursor<'_, '_> {
    /// Copies `data` into the slices from the cursor on.
    fn fill_from(&mut self, mut data: &[u8]) {
        while let Some(piece) = self.next_piece(data.len()) {
            piece.copy_from(&data[..piece.len()]);
            data = &data[piece.len()..];
        }
    }

    /// Copies from the slices, from the cursor on, into `data`.
    fn drain_into(&mut self, mut data: &mut [u8]) {
        while let Some(piece) = self.next_piece(data.len()) {
            let n = piece.len();
            piece.copy_to(&mut data[..n]);
            data = &mut data[n..];
        }
    }

    /// The next at most `max` bytes of the slices, as one piece of one
    /// slice; None when `max` is 0 or the slices are used up.
    fn next_piece(&mut self, max: usize) -> Option<VolatileSlice<'_>> {
        if max == 0 {
            return None;
        }
        loop {
            let slice = self.slices.get(self.index)?;
            if self.skip == slice.len() {
                self.index += 1;
                self.skip = 0;
                continue;
            }
            let n = (slice.len() - self.skip).min(max);
            let piece = slice.subslice(self.skip, n).ok()?;
            self.skip += n;
            return Some(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    /// A file of `len` bytes, byte i = i % 251.
    fn file(len: usize, name: &str) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("vessel-blk-io-{}-{name}", std::process::id()));
        std::fs::write(&path, (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        (file, path)
    }

    fn pattern(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| (i % 251) as u8).collect()
    }

    /// Guest memory and slices of it: (guest address, length) each.
    fn slices<'m>(mem: &'m GuestMemoryMmap, list: &[(u64, usize)]) -> Vec<VolatileSlice<'m>> {
        list.iter().map(|&(a, l)| mem.get_slice(GuestAddress(a), l).unwrap()).collect()
    }

    fn read_guest(mem: &GuestMemoryMmap, list: &[(u64, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, l) in list {
            let mut v = vec![0u8; l];
            mem.read_slice(&mut v, GuestAddress(a)).unwrap();
            out.extend(v);
        }
        out
    }

    const STRICT: Alignment = Alignment { memory: 4096, offset: 4096 };

    /// Guest buffers: (guest address, length) each.
    type Buffers = Vec<(u64, usize)>;

    #[test]
    fn a_vectored_read_and_write_cover_every_buffer_in_order() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (f, path) = file(64 << 10, "vectored");
        let list = [(0x1003, 700), (0x5000, 1), (0x8000, 4096 - 701)];
        let path_taken = transfer(&f, slices(&mem, &list).into_iter(), 1000, Direction::FileToGuest, None).unwrap();
        assert_eq!(path_taken, Path::Straight);
        assert_eq!(read_guest(&mem, &list), pattern(1000, 4096));
        mem.write_slice(&[0xab; 700], GuestAddress(0x1003)).unwrap();
        transfer(&f, slices(&mem, &list).into_iter(), 8192, Direction::GuestToFile, None).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back[8192..8192 + 700], [0xab; 700]);
        assert_eq!(back[8192 + 700..8192 + 4096], pattern(1000 + 700, 4096 - 700)[..]);
        assert_eq!(back[8192 + 4096..8192 + 4100], pattern(8192 + 4096, 4)[..], "written past the request");
        // Past the end of the file: a read comes up short and fails.
        let err = transfer(&f, slices(&mem, &list).into_iter(), (64 << 10) - 100, Direction::FileToGuest, None);
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn aligned_buffers_at_an_aligned_offset_go_straight_through() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (f, path) = file(64 << 10, "aligned");
        let mut direct = Direct::new(STRICT);
        let list = [(0x3000, 4096), (0x9000, 8192)];
        let taken = transfer(&f, slices(&mem, &list).into_iter(), 4096, Direction::FileToGuest, Some(&mut direct));
        assert_eq!(taken.unwrap(), Path::Straight);
        assert_eq!(read_guest(&mem, &list), pattern(4096, 3 * 4096));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unaligned_reads_bounce_and_read_exactly_the_requested_bytes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (f, path) = file(1 << 20, "bounce-read");
        let mut direct = Direct::new(STRICT);
        // Each case: file offset, guest buffers. Sector offsets inside a
        // 4 KiB unit, buffers off alignment, and a request longer than
        // the bounce buffer.
        let cases: [(u64, Buffers); 4] = [
            (512, vec![(0x1000, 512)]),
            (4096, vec![(0x1200, 4096)]),
            (3 * 512, vec![(0x2000, 4096), (0x7100, 1024)]),
            (512, vec![(0x1000, BOUNCE_LEN + 8192)]),
        ];
        for (offset, list) in cases {
            mem.write_slice(&vec![0xee; 0x8_0000], GuestAddress(0x1000)).unwrap();
            let len: usize = list.iter().map(|l| l.1).sum();
            let taken =
                transfer(&f, slices(&mem, &list).into_iter(), offset, Direction::FileToGuest, Some(&mut direct));
            assert_eq!(taken.unwrap(), Path::Bounced, "at {offset}");
            assert_eq!(read_guest(&mem, &list), pattern(offset as usize, len), "at {offset}");
            // Nothing written around the buffers.
            let after = list.last().map(|&(a, l)| a + l as u64).unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(after)).unwrap(), 0xee);
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unaligned_writes_bounce_and_keep_the_bytes_around_them() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let size = 1 << 20;
        let (f, path) = file(size, "bounce-write");
        let mut direct = Direct::new(STRICT);
        let mut want = pattern(0, size);
        let cases: [(u64, Buffers, u8); 4] = [
            (512, vec![(0x1000, 512)], 0x11),
            (4096 + 1024, vec![(0x1200, 4096)], 0x22),
            (8 * 4096 - 512, vec![(0x2000, 512), (0x7100, 1024)], 0x33),
            (1536, vec![(0x1000, BOUNCE_LEN + 8192)], 0x44),
        ];
        for (offset, list, byte) in cases {
            for &(a, l) in &list {
                mem.write_slice(&vec![byte; l], GuestAddress(a)).unwrap();
            }
            let len: usize = list.iter().map(|l| l.1).sum();
            let taken =
                transfer(&f, slices(&mem, &list).into_iter(), offset, Direction::GuestToFile, Some(&mut direct));
            assert_eq!(taken.unwrap(), Path::Bounced, "at {offset}");
            want[offset as usize..offset as usize + len].fill(byte);
            assert!(std::fs::read(&path).unwrap() == want, "the file differs after the write at {offset}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_direct_disk_opened_for_real_reads_through_either_path() {
        use std::os::unix::fs::OpenOptionsExt;
        let (_, path) = file(1 << 20, "o-direct");
        let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path);
        let f = opened.unwrap_or_else(|e| {
            panic!("O_DIRECT refused in {} ({e}): set TMPDIR to a disk filesystem's directory", path.display())
        });
        let align = Alignment::of(&f).unwrap().expect("a file opened with O_DIRECT does direct I/O");
        let mut direct = Direct::new(align);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let aligned = [(0x4000, 8192)];
        let taken = transfer(&f, slices(&mem, &aligned).into_iter(), 8192, Direction::FileToGuest, Some(&mut direct));
        assert_eq!(taken.unwrap(), Path::Straight);
        assert_eq!(read_guest(&mem, &aligned), pattern(8192, 8192));
        let odd = [(0x8001, 512)];
        let taken = transfer(&f, slices(&mem, &odd).into_iter(), 512, Direction::FileToGuest, Some(&mut direct));
        assert_eq!(taken.unwrap(), Path::Bounced);
        assert_eq!(read_guest(&mem, &odd), pattern(512, 512));
        std::fs::remove_file(path).unwrap();
    }
}
