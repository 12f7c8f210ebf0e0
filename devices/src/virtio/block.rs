//! virtio-blk backed by a host file: read, write, flush, get-id and
//! discard, with every request validated (sector range, sizes, direction,
//! read-only disks) and answered with the right virtio status. Data moves
//! straight between the file and guest memory ([`io`]), optionally with
//! O_DIRECT.

mod io;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use self::io::Alignment;
use self::io::{transfer, Direct, Direction};
use super::chain::{answer_all, Buffers};
use super::{device_type, read_config_bytes, VirtioBackend, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Longest disk ID (serial) the protocol carries.
pub const DISK_ID_LEN: usize = 20;

// Features (virtio spec 5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;

// Request types (5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;

/// Request status written in the last byte of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Failed (bad range, I/O error, write to a read-only disk).
    IoErr = 1,
    /// Unknown or not negotiated request type.
    Unsupported = 2,
}

/// Bytes in a request header: type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// Bytes in one discard segment: sector, num_sectors, flags.
const DISCARD_SEGMENT_LEN: u64 = 16;
/// Discard segments accepted per request (config `max_discard_seg`).
const MAX_DISCARD_SEG: u32 = 32;

/// How to make a block device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockConfig {
    /// The backing file.
    pub path: PathBuf,
    /// Refuse writes and tell the driver so.
    pub read_only: bool,
    /// The disk's ID (serial), at most 20 bytes; the file name if None.
    pub id: Option<String>,
    /// Open the file with O_DIRECT: reads and writes bypass the host's
    /// page cache. Requests the kernel would refuse as they are (buffers
    /// or offsets not aligned to the file's direct I/O alignment) go
    /// through an aligned bounce buffer.
    #[serde(default)]
    pub direct: bool,
}

/// Why a block device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("cannot open the disk image {0}")]
    Open(PathBuf, #[source] std::io::Error),
    /// Its size could not be read.
    #[error("cannot read the size of the disk image {0}")]
    Size(PathBuf, #[source] std::io::Error),
    /// O_DIRECT was asked for on a file whose filesystem does not do it.
    #[error("the file system of the disk image {0} does not support O_DIRECT")]
    DirectUnsupported(PathBuf),
    /// Its direct I/O alignment could not be read.
    #[error("cannot read the direct I/O alignment of the disk image {0}")]
    DirectAlignment(PathBuf, #[source] std::io::Error),
    /// O_DIRECT was asked for on a file whose size is not a whole number
    /// of its direct I/O blocks (the last one could not be read).
    #[error("the disk image {path} is {size} bytes, not a multiple of {unit}, the block size O_DIRECT needs there")]
    DirectSize {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// Its direct I/O block size.
        unit: u64,
    },
    /// The ID is too long.
    #[error("disk ID {0:?} is longer than {DISK_ID_LEN} bytes")]
    IdTooLong(String),
    /// A placeholder slot already holds a medium.
    #[error("this empty disk slot holds a medium already")]
    SlotUsed,
}

/// Counters a stats call reads.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Read requests completed.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests completed.
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes.
    pub flush_ops: AtomicU64,
    /// Discard requests.
    pub discard_ops: AtomicU64,
    /// Requests answered with an error status or dropped as malformed.
    pub errors: AtomicU64,
    /// Reads and writes of an O_DIRECT disk that went through the bounce
    /// buffer (the guest's buffers or offset were not aligned for it).
    pub bounced: AtomicU64,
}

super::counter_set!(BlockCounters {
    read_ops,
    read_bytes,
    write_ops,
    write_bytes,
    flush_ops,
    discard_ops,
    errors,
    bounced
});

/// What one pass over the queue did, added to the shared counters once at
/// its end: an atomic add per request and counter would cost more than the
/// request's own bookkeeping.
#[derive(Default)]
struct Tally {
    read_ops: u64,
    read_bytes: u64,
    write_ops: u64,
    write_bytes: u64,
    flush_ops: u64,
    discard_ops: u64,
    errors: u64,
    bounced: u64,
}

impl Tally {
    fn publish(&self, counters: &BlockCounters) {
        for (counter, n) in [
            (&counters.read_ops, self.read_ops),
            (&counters.read_bytes, self.read_bytes),
            (&counters.write_ops, self.write_ops),
            (&counters.write_bytes, self.write_bytes),
            (&counters.flush_ops, self.flush_ops),
            (&counters.discard_ops, self.discard_ops),
            (&counters.errors, self.errors),
            (&counters.bounced, self.bounced),
        ] {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// The block device.
pub struct Block {
    file: File,
    /// Set when the file is open with O_DIRECT.
    direct: Option<Direct>,
    capacity: u64,
    read_only: bool,
    discard: bool,
    id: [u8; DISK_ID_LEN],
    acked: u64,
    counters: Arc<BlockCounters>,
    /// A placeholder's medium, once inserted (see [`Block::placeholder`]).
    inbox: Option<Arc<Mutex<Option<Medium>>>>,
}

/// A disk file opened for a placeholder, waiting to be taken in.
struct Medium {
    disk: Disk,
    read_only: bool,
}

/// Where a placeholder disk's medium is inserted (see
/// [`Block::placeholder`]).
#[derive(Clone)]
pub struct MediumSlot(Arc<Mutex<Option<Medium>>>, Arc<std::sync::atomic::AtomicBool>);

impl MediumSlot {
    /// Opens the disk `config` names for this slot: the device takes it in
    /// before its next request, and its config space shows the new
    /// capacity from now on (tell the driver with a config change). A
    /// slot takes one medium. The driver negotiated the placeholder's
    /// features, which offer neither read-only nor discard: a read-only
    /// medium is opened read-only and the device fails every write to it,
    /// which the guest sees as I/O errors (mount it read-only there).
    pub fn insert(&self, config: &BlockConfig) -> Result<u64, BlockError> {
        if self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(BlockError::SlotUsed);
        }
        let disk = match Disk::open(config) {
            Ok(disk) => disk,
            Err(e) => {
                self.1.store(false, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        };
        let capacity = disk.capacity;
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Medium { disk, read_only: config.read_only });
        Ok(capacity)
    }

    /// Whether a medium has been inserted.
    pub fn is_used(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An open disk file.
struct Disk {
    file: File,
    /// Set when `file` is open with O_DIRECT.
    direct: Option<Direct>,
    /// In sectors.
    capacity: u64,
    id: [u8; DISK_ID_LEN],
}

impl Disk {
    /// Opens the disk file `config` names.
    fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        let path = &config.path;
        let mut options = OpenOptions::new();
        options.read(true).write(!config.read_only);
        if config.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|e| match e.raw_os_error() {
            // open(2): EINVAL, "the filesystem does not support O_DIRECT".
            Some(libc::EINVAL) if config.direct => BlockError::DirectUnsupported(path.clone()),
            _ => BlockError::Open(path.clone(), e),
        })?;
        let size = file.metadata().map_err(|e| BlockError::Size(path.clone(), e))?.len();
        let direct = if config.direct {
            let align = Alignment::of(&file)
                .map_err(|e| BlockError::DirectAlignment(path.clone(), e))?
                .ok_or_else(|| BlockError::DirectUnsupported(path.clone()))?;
            let unit = align.memory.max(align.offset) as u64;
            if size % unit != 0 {
                return Err(BlockError::DirectSize { path: path.clone(), size, unit });
            }
            Some(Direct::new(align))
        } else {
            None
        };
        let id_text = match &config.id {
            Some(id) => id.clone(),
            None => file_name(path),
        };
        if id_text.len() > DISK_ID_LEN {
            return Err(BlockError::IdTooLong(id_text));
        }
        let mut id = [0u8; DISK_ID_LEN];
        id[..id_text.len()].copy_from_slice(id_text.as_bytes());
        Ok(Disk { file, direct, capacity: size / SECTOR_SIZE, id })
    }
}

impl Block {
    /// Opens the disk described by `config`.
    pub fn open(config: &BlockConfig) -> Result<(Self, Arc<BlockCounters>), BlockError> {
        let Disk { file, direct, capacity, id } = Disk::open(config)?;
        let discard = !config.read_only && supports_punch_hole(&file, capacity * SECTOR_SIZE);
        let counters = Arc::new(BlockCounters::default());
        let block = Block {
            file,
            direct,
            capacity,
            read_only: config.read_only,
            discard,
            id,
            acked: 0,
            counters: counters.clone(),
            inbox: None,
        };
        Ok((block, counters))
    }

    /// A disk with no medium yet (capacity 0, no ID), for frontends that
    /// cannot add a device after boot (QEMU microvm): it is attached at
    /// boot, and a medium inserted through the returned slot later turns
    /// it into a real disk once the driver rereads the capacity.
    pub fn placeholder() -> Result<(Self, Arc<BlockCounters>, MediumSlot), BlockError> {
        let null = Path::new("/dev/null");
        let file = File::open(null).map_err(|e| BlockError::Open(null.into(), e))?;
        let counters = Arc::new(BlockCounters::default());
        let inbox = Arc::new(Mutex::new(None));
        let block = Block {
            file,
            direct: None,
            capacity: 0,
            read_only: false,
            discard: false,
            id: [0; DISK_ID_LEN],
            acked: 0,
            counters: counters.clone(),
            inbox: Some(inbox.clone()),
        };
        Ok((block, counters, MediumSlot(inbox, Arc::default())))
    }

    /// Takes in a medium inserted since the last request.
    fn take_medium(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        let inserted = inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(medium) = inserted {
            self.file = medium.disk.file;
            self.direct = medium.disk.direct;
            self.capacity = medium.disk.capacity;
            self.id = medium.disk.id;
            self.read_only = medium.read_only;
            self.inbox = None;
        }
    }

    /// The capacity the driver should see: an inserted medium's, even
    /// before the device has taken it in.
    fn visible_capacity(&self) -> u64 {
        self.inbox
            .as_ref()
            .and_then(|inbox| inbox.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|m| m.disk.capacity))
            .unwrap_or(self.capacity)
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The direct I/O alignment, for a disk open with O_DIRECT.
    pub fn direct_alignment(&self) -> Option<Alignment> {
        self.direct.as_ref().map(Direct::alignment)
    }

    /// Moves `len` bytes of the request's data, `from` bytes into its
    /// writable part (a read) or its readable part (a write), to or from
    /// the file at `offset`.
    fn data(&mut self, req: &Buffers, from: u64, len: u64, offset: u64, dir: Direction, tally: &mut Tally) -> bool {
        let pieces = match dir {
            Direction::FileToGuest => req.writable(from, len),
            Direction::GuestToFile => req.readable(from, len),
        };
        let Ok(pieces) = pieces else { return false };
        match transfer(&self.file, pieces, offset, dir, self.direct.as_mut()) {
            Ok(path) => {
                tally.bounced += u64::from(path == io::Path::Bounced);
                true
            }
            Err(_) => false,
        }
    }

    /// Executes one request; returns its status and the bytes written into
    /// the chain before the status byte.
    fn execute(&mut self, req: &Buffers, tally: &mut Tally) -> (Status, u32) {
        let mut header = [0u8; HEADER_LEN as usize];
        if req.read_at(0, &mut header).is_err() {
            return (Status::IoErr, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        // Everything writable but the status byte is data for the driver.
        let in_len = req.writable_len() - 1;
        let out_len = req.readable_len() - HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN => match self.range(sector, in_len) {
                Some(offset) if self.data(req, 0, in_len, offset, Direction::FileToGuest, tally) => {
                    tally.read_ops += 1;
                    tally.read_bytes += in_len;
                    (Status::Ok, in_len as u32)
                }
                _ => (Status::IoErr, 0),
            },
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (Status::IoErr, 0);
                }
                match self.range(sector, out_len) {
                    Some(offset) if self.data(req, HEADER_LEN, out_len, offset, Direction::GuestToFile, tally) => {
                        tally.write_ops += 1;
                        tally.write_bytes += out_len;
                        (Status::Ok, 0)
                    }
                    _ => (Status::IoErr, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.acked & VIRTIO_BLK_F_FLUSH == 0 {
                    return (Status::Unsupported, 0);
                }
                tally.flush_ops += 1;
                match self.file.sync_data() {
                    Ok(()) => (Status::Ok, 0),
                    Err(_) => (Status::IoErr, 0),
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (in_len as usize).min(DISK_ID_LEN);
                match req.write_at(0, &self.id[..n]) {
                    Ok(()) => (Status::Ok, n as u32),
                    Err(_) => (Status::IoErr, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD => {
                if self.acked & VIRTIO_BLK_F_DISCARD == 0 {
                    return (Status::Unsupported, 0);
                }
                if self.read_only {
                    return (Status::IoErr, 0);
                }
                self.discard(req, out_len, tally)
            }
            _ => (Status::Unsupported, 0),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity).then(|| sector * SECTOR_SIZE)
    }

    fn discard(&mut self, req: &Buffers, len: u64, tally: &mut Tally) -> (Status, u32) {
        if len == 0 || len % DISCARD_SEGMENT_LEN != 0 || len / DISCARD_SEGMENT_LEN > u64::from(MAX_DISCARD_SEG) {
            return (Status::IoErr, 0);
        }
        for i in 0..len / DISCARD_SEGMENT_LEN {
            let mut seg = [0u8; DISCARD_SEGMENT_LEN as usize];
            if req.read_at(HEADER_LEN + i * DISCARD_SEGMENT_LEN, &mut seg).is_err() {
                return (Status::IoErr, 0);
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4])));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            // Bit 0 is "unmap", only meaningful for write-zeroes; others are reserved.
            if flags != 0 {
                return (Status::Unsupported, 0);
            }
            let Some(offset) = self.range(sector, sectors * SECTOR_SIZE) else { return (Status::IoErr, 0) };
            if punch_hole(&self.file, offset, sectors * SECTOR_SIZE).is_err() {
                return (Status::IoErr, 0);
            }
        }
        tally.discard_ops += 1;
        (Status::Ok, 0)
    }
}

fn file_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Keep the ID within 20 bytes without cutting a UTF-8 character.
    let mut end = name.len().min(DISK_ID_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on our own open file; no memory is passed.
    let rc = unsafe {
        libc::fallocate64(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the file's filesystem can punch holes: punching at the end of the
/// file (changing nothing) succeeds exactly where it can.
fn supports_punch_hole(file: &File, size: u64) -> bool {
    punch_hole(file, size, SECTOR_SIZE).is_ok()
}

impl VirtioBackend for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        if self.discard {
            f |= VIRTIO_BLK_F_DISCARD;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config, up to the discard fields.
        let mut config = [0u8; 48];
        config[0..8].copy_from_slice(&self.visible_capacity().to_le_bytes());
        // seg_max: the queue size less the header and status descriptors.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        if self.discard {
            config[36..40].copy_from_slice(&u32::MAX.to_le_bytes()); // max_discard_sectors
            config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        }
        read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        self.take_medium();
        let mut tally = Tally::default();
        let answered = answer_all(queue, mem, |request| match request {
            // No room for a status byte, or no header: nothing can be
            // reported, so the chain is returned untouched.
            Ok(req) if req.writable_len() == 0 || req.readable_len() < HEADER_LEN => {
                tally.errors += 1;
                if req.writable_len() > 0 {
                    let status_at = req.writable_len() - 1;
                    let _ = req.write_at(status_at, &[Status::IoErr as u8]);
                    1
                } else {
                    0
                }
            }
            Ok(req) => {
                let (status, written) = self.execute(req, &mut tally);
                if status != Status::Ok {
                    tally.errors += 1;
                }
                match req.write_at(req.writable_len() - 1, &[status as u8]) {
                    Ok(()) => written + 1,
                    Err(_) => 0,
                }
            }
            Err(_) => {
                tally.errors += 1;
                0
            }
        });
        tally.errors += u64::from(answered.corrupt);
        tally.publish(&self.counters);
        answered.used
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::{desc, memory, WRITE};
    use std::io::{Read, Seek, SeekFrom, Write};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;

    fn disk(sectors: u64, read_only: bool) -> (Block, Arc<BlockCounters>, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "vessel-blk-{}-{:?}-{}",
            std::process::id(),
            std::thread::current().id(),
            sectors
        ));
        let mut f = File::create(&path).unwrap();
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i % 251) as u8).collect();
        f.write_all(&content).unwrap();
        let (mut blk, counters) =
            Block::open(&BlockConfig { path: path.clone(), read_only, id: Some("disk-7".into()), direct: false })
                .unwrap();
        blk.set_acked_features(blk.features());
        (blk, counters, path)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs one request chain; returns (status byte, used length).
    fn run(blk: &mut Block, mem: &GuestMemoryMmap, descs: &[virtio_queue::desc::RawDescriptor]) -> (u8, u32) {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(blk.process_queue(0, &mut q, mem));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
    }

    #[test]
    fn a_placeholder_becomes_the_inserted_disk() {
        let mem = memory();
        let (mut empty, _, slot) = Block::placeholder().unwrap();
        empty.set_acked_features(empty.features());
        assert_eq!(empty.features() & (VIRTIO_BLK_F_RO | VIRTIO_BLK_F_DISCARD), 0);
        let capacity = |blk: &Block| {
            let mut bytes = [0u8; 8];
            blk.read_config(0, &mut bytes);
            u64::from_le_bytes(bytes)
        };
        assert_eq!(capacity(&empty), 0);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let read = [desc(HDR, 16, 0), desc(DATA, 512, WRITE), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut empty, &mem, &read).0, Status::IoErr as u8, "an empty slot has no sectors");

        let (_, _, path) = disk(8, false);
        let config = |read_only| BlockConfig { path: path.clone(), read_only, id: Some("hot-1".into()), direct: false };
        let missing = BlockConfig { path: path.with_extension("missing"), read_only: false, id: None, direct: false };
        assert!(matches!(slot.insert(&missing), Err(BlockError::Open(..))));
        assert!(!slot.is_used(), "a refused medium used the slot up");
        assert_eq!(slot.insert(&config(false)).unwrap(), 8);
        // The config space shows it before the device has taken it in.
        assert_eq!(capacity(&empty), 8);
        assert!(matches!(slot.insert(&config(false)), Err(BlockError::SlotUsed)));
        assert_eq!(run(&mut empty, &mem, &read), (0, 513));
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, (0..512).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let id = [desc(HDR, 16, 0), desc(DATA, 20, WRITE), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut empty, &mem, &id).0, 0);
        let mut name = [0u8; 5];
        mem.read_slice(&mut name, GuestAddress(DATA)).unwrap();
        assert_eq!(&name, b"hot-1");

        // A read-only medium in a slot whose driver was never told so:
        // reads work, every write fails, and the file is untouched.
        let (mut ro, _, ro_slot) = Block::placeholder().unwrap();
        ro.set_acked_features(ro.features());
        assert_eq!(ro_slot.insert(&config(true)).unwrap(), 8);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mut ro, &mem, &read), (0, 513));
        mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let write = [desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut ro, &mem, &write).0, Status::IoErr as u8, "a write reached a read-only medium");
        let mut first = [0u8; 512];
        File::open(&path).unwrap().read_exact(&mut first).unwrap();
        assert_eq!(first[..4], [0, 1, 2, 3], "the read-only medium was written");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reads_writes_flushes_and_reports_its_id() {
        let mem = memory();
        let (mut blk, counters, path) = disk(16, false);
        header(&mem, VIRTIO_BLK_T_IN, 2);
        let r = run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 1024, WRITE), desc(STATUS, 1, WRITE)]);
        assert_eq!(r, (0, 1025));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (1024..2048).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);

        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 15);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, WRITE)]), (0, 1));
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(15 * 512)).unwrap();
        let mut back = [0u8; 512];
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, [0xab; 512]);

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(STATUS, 1, WRITE)]), (0, 1));
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 20, WRITE), desc(STATUS, 1, WRITE)]), (0, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..7], b"disk-7\0");
        assert_eq!(counters.read_ops.load(Ordering::Relaxed), 1);
        assert_eq!(counters.write_bytes.load(Ordering::Relaxed), 512);
        assert_eq!(counters.flush_ops.load(Ordering::Relaxed), 1);
        std::fs::remove_file(path).unwrap();
    }

    /// Descriptors for chains laid out one after another from index 0:
    /// each inner list is a chain of (address, length, flags).
    fn chains(list: &[&[(u64, u32, u16)]]) -> Vec<virtio_queue::desc::RawDescriptor> {
        use virtio_queue::desc::split::Descriptor as SplitDescriptor;
        const NEXT: u16 = 1;
        let mut out = Vec::new();
        for chain in list {
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let index = out.len() as u16;
                let last = i + 1 == chain.len();
                let (flags, next) = if last { (flags, 0) } else { (flags | NEXT, index + 1) };
                out.push(virtio_queue::desc::RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)));
            }
        }
        out
    }

    #[test]
    fn a_queue_of_mixed_requests_is_served_in_one_pass() {
        let mem = memory();
        let (mut blk, counters, path) = disk(8, false);
        let (hdr, data, status) = (|i: u64| HDR + 16 * i, |i: u64| DATA + 0x1000 * i, |i: u64| STATUS + i);
        let put_header = |i: u64, kind: u32, sector: u64| {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr(i))).unwrap();
        };
        put_header(0, VIRTIO_BLK_T_IN, 1);
        put_header(1, VIRTIO_BLK_T_OUT, 3);
        put_header(2, VIRTIO_BLK_T_FLUSH, 0);
        put_header(3, VIRTIO_BLK_T_IN, 3);
        put_header(4, VIRTIO_BLK_T_IN, 2);
        put_header(5, VIRTIO_BLK_T_IN, 100);
        mem.write_slice(&[0xcd; 512], GuestAddress(data(1))).unwrap();
        // Not a status any request can leave: each must be written.
        mem.write_slice(&[0xff; 6], GuestAddress(status(0))).unwrap();
        let descs = chains(&[
            &[(hdr(0), 16, 0), (data(0), 512, WRITE), (status(0), 1, WRITE)],
            &[(hdr(1), 16, 0), (data(1), 512, 0), (status(1), 1, WRITE)],
            &[(hdr(2), 16, 0), (status(2), 1, WRITE)],
            &[(hdr(3), 16, 0), (data(3), 512, WRITE), (status(3), 1, WRITE)],
            &[(hdr(4), 16, 0), (data(4), 256, WRITE), (data(5), 256, WRITE), (status(4), 1, WRITE)],
            &[(hdr(5), 16, 0), (data(6), 512, WRITE), (status(5), 1, WRITE)],
        ]);
        let vq = MockSplitQueue::new(&mem, 32);
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(blk.process_queue(0, &mut q, &mem));
        assert_eq!(vq.used().idx().load(), 6);
        let statuses: Vec<u8> = (0..6).map(|i| mem.read_obj(GuestAddress(status(i))).unwrap()).collect();
        assert_eq!(statuses, [0, 0, 0, 0, 0, Status::IoErr as u8]);
        let read = |addr: u64, len: usize| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        };
        let file_bytes = |from: u64, len: u64| (from..from + len).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
        assert_eq!(read(data(0), 512), file_bytes(512, 512));
        // The read after the flush sees the write before it.
        assert_eq!(read(data(3), 512), vec![0xcd; 512]);
        let mut split = read(data(4), 256);
        split.extend(read(data(5), 256));
        assert_eq!(split, file_bytes(1024, 512));
        assert_eq!(counters.read_ops.load(Ordering::Relaxed), 3);
        assert_eq!(counters.write_ops.load(Ordering::Relaxed), 1);
        assert_eq!(counters.flush_ops.load(Ordering::Relaxed), 1);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_header_split_across_descriptors_works() {
        let mem = memory();
        let (mut blk, _, path) = disk(4, false);
        header(&mem, VIRTIO_BLK_T_IN, 1);
        let r = run(
            &mut blk,
            &mem,
            &[desc(HDR, 5, 0), desc(HDR + 5, 11, 0), desc(DATA, 512, WRITE), desc(STATUS, 1, WRITE)],
        );
        assert_eq!(r, (0, 513));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_requests_get_an_error_status_not_a_panic() {
        let mem = memory();
        let (mut blk, counters, path) = disk(8, false);
        let io = Status::IoErr as u8;
        // Past the end of the disk.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 1024, WRITE), desc(STATUS, 1, WRITE)]), (io, 1));
        // A sector number that overflows.
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 512, WRITE), desc(STATUS, 1, WRITE)]), (io, 1));
        // Not a whole number of sectors.
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 100, 0), desc(STATUS, 1, WRITE)]), (io, 1));
        // Read data in a device-readable buffer: no writable data room.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, WRITE)]),
            (0, 1),
            "a zero-length read is valid"
        );
        // Unknown type.
        header(&mem, 77, 0);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(STATUS, 1, WRITE)]), (Status::Unsupported as u8, 1));
        // Short header: status still reported.
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 8, 0), desc(STATUS, 1, WRITE)]), (io, 1));
        // No status byte at all: returned with nothing written.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0)]), (0xee, 0));
        // Data outside guest memory.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(0x1f_ff00, 512, WRITE), desc(STATUS, 1, WRITE)]),
            (0xee, 0)
        );
        // Writable descriptor before the readable header.
        assert_eq!(run(&mut blk, &mem, &[desc(DATA, 512, WRITE), desc(HDR, 16, 0), desc(STATUS, 1, WRITE)]), (0xee, 0));
        assert!(counters.errors.load(Ordering::Relaxed) >= 8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disks_refuse_writes_and_discards() {
        let mem = memory();
        let (mut blk, _, path) = disk(8, true);
        assert_ne!(blk.features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(blk.features() & VIRTIO_BLK_F_DISCARD, 0);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, WRITE)]),
            (Status::IoErr as u8, 1)
        );
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, WRITE)]),
            (Status::Unsupported as u8, 1)
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn discard_punches_a_hole_where_supported() {
        let mem = memory();
        let (mut blk, counters, path) = disk(64, false);
        if blk.features() & VIRTIO_BLK_F_DISCARD == 0 {
            // The temp filesystem cannot punch holes: discard must not be offered.
            header(&mem, VIRTIO_BLK_T_DISCARD, 0);
            assert_eq!(
                run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, WRITE)]),
                (Status::Unsupported as u8, 1)
            );
        } else {
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&8u64.to_le_bytes());
            seg[8..12].copy_from_slice(&16u32.to_le_bytes());
            mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            header(&mem, VIRTIO_BLK_T_DISCARD, 0);
            assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, WRITE)]), (0, 1));
            let content = std::fs::read(&path).unwrap();
            assert!(content[8 * 512..24 * 512].iter().all(|b| *b == 0));
            assert_eq!(content[24 * 512], ((24 * 512) % 251) as u8);
            assert_eq!(counters.discard_ops.load(Ordering::Relaxed), 1);
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_disk_opened_with_o_direct_serves_aligned_requests_straight_and_bounces_the_rest() {
        let mem = memory();
        let (_, _, path) = disk(64, false);
        let config = BlockConfig { path: path.clone(), read_only: false, id: None, direct: true };
        let (mut blk, counters) = Block::open(&config).unwrap_or_else(|e| {
            panic!("O_DIRECT refused in {} ({e}): set TMPDIR to a disk filesystem's directory", path.display())
        });
        blk.set_acked_features(blk.features());
        let align = blk.direct_alignment().expect("opened with O_DIRECT");
        let bounced = || counters.bounced.load(Ordering::Relaxed);
        // A page-aligned 4 KiB read at 4 KiB: straight into guest memory.
        header(&mem, VIRTIO_BLK_T_IN, 8);
        let read = |at: u64, len: u32| [desc(HDR, 16, 0), desc(at, len, WRITE), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut blk, &mem, &read(DATA, 4096)), (0, 4097));
        assert_eq!(bounced(), 0, "an aligned read was bounced (alignment {align:?})");
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, (4096..8192).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        // A buffer one byte off alignment: bounced, same bytes.
        header(&mem, VIRTIO_BLK_T_IN, 1);
        assert_eq!(run(&mut blk, &mem, &read(DATA + 1, 1024)), (0, 1025));
        assert_eq!(bounced(), 1);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA + 1)).unwrap();
        assert_eq!(got, (512..1536).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        // An unaligned write of one sector keeps its neighbours.
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA + 3)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 3);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(DATA + 3, 512, 0), desc(STATUS, 1, WRITE)]), (0, 1));
        assert_eq!(bounced(), 2);
        let content = std::fs::read(&path).unwrap();
        let mut want: Vec<u8> = (0..64 * 512).map(|i| (i % 251) as u8).collect();
        want[3 * 512..4 * 512].fill(0x5a);
        assert!(content == want, "the file differs from the one sector written");
        // Flush works as on any disk.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mut blk, &mem, &[desc(HDR, 16, 0), desc(STATUS, 1, WRITE)]), (0, 1));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn o_direct_is_refused_by_name_where_it_cannot_work() {
        let direct = |path: &Path| BlockConfig { path: path.into(), read_only: true, id: None, direct: true };
        // /dev/null refuses O_DIRECT at open, as a filesystem without it does.
        let err = Block::open(&direct(Path::new("/dev/null"))).err().expect("O_DIRECT on /dev/null");
        assert!(matches!(err, BlockError::DirectUnsupported(ref p) if p == Path::new("/dev/null")), "{err:?}");
        assert_eq!(err.to_string(), "the file system of the disk image /dev/null does not support O_DIRECT");
        // A size that is not a whole number of direct I/O blocks.
        let path = std::env::temp_dir().join(format!("vessel-blk-odd-{}", std::process::id()));
        std::fs::write(&path, [7u8; 1000]).unwrap();
        let err = Block::open(&direct(&path)).err().expect("O_DIRECT on a 1000-byte image");
        assert!(matches!(err, BlockError::DirectSize { size: 1000, unit, .. } if unit >= 512), "{err:?}");
        // Without O_DIRECT the same image opens.
        assert!(Block::open(&BlockConfig { direct: false, ..direct(&path) }).is_ok());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_space_has_capacity_and_limits() {
        let (blk, _, path) = disk(10, false);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 10);
        let mut seg_max = [0u8; 4];
        blk.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 254);
        let mut past = [0xffu8; 4];
        blk.read_config(300, &mut past);
        assert_eq!(past, [0; 4]);
        std::fs::remove_file(path).unwrap();
    }
}
