//! `vessel bench blk`: 4 KiB reads through the virtio-blk backend (guest
//! memory, descriptor chains, used ring, as a driver with a queue depth of
//! 64 would post them) against plain pread(2) of the same file on the host;
//! with `--direct`, both open the file with O_DIRECT.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::VirtioBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Args, Debug)]
pub(crate) struct BlkBenchArgs {
    /// Disk image to read (made, of --mib MiB, if not given).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Passes over the file for each side, alternating (medians are reported).
    #[arg(long, default_value_t = 15)]
    passes: usize,
    /// Open the file with O_DIRECT on both sides: the host's pread and the
    /// backend (`BlockConfig::direct`) read the disk, not the page cache.
    #[arg(long)]
    direct: bool,
    /// Read the first MIB MiB of the file [default: 256, or 16 with --direct,
    /// whose reads reach the disk].
    #[arg(long, value_name = "MIB")]
    mib: Option<u64>,
}

const BLOCK: u64 = 4096;
const DEPTH: u16 = 64;
const DESC_TABLE: u64 = 0x0;
const AVAIL: u64 = 0x1_0000;
const USED: u64 = 0x2_0000;
const HEADERS: u64 = 0x10_0000;
const STATUS: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A page-aligned 4 KiB host buffer. The driver's data buffers are
/// page-aligned too (a Linux guest reads into page-cache pages), so both
/// sides copy between page-aligned addresses: a heap buffer 16 bytes past
/// a page boundary made the host's pread about 0.05 us faster per read on
/// our machines, a difference of alignment rather than of the device.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u8; BLOCK as usize]);

/// A guest driver with `DEPTH` read requests in flight at a time.
struct Driver {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
}

impl Driver {
    fn new() -> anyhow::Result<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)])?;
        let mut queue = Queue::new(DEPTH * 4)?;
        queue.set_size(DEPTH * 4);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        Ok(Driver { mem, queue, avail_idx: 0 })
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> anyhow::Result<()> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, GuestAddress(DESC_TABLE + 16 * u64::from(index)))?;
        Ok(())
    }

    /// Posts reads of `sectors` (one 4 KiB read each), then lets the
    /// device serve them all; returns the time the device took (the
    /// driver's side runs in the guest, not in the VMM).
    fn read_batch(&mut self, blk: &mut Block, sectors: &[u64]) -> anyhow::Result<Duration> {
        for (slot, sector) in sectors.iter().enumerate() {
            let slot = slot as u16;
            let head = slot * 3;
            let hdr = HEADERS + 16 * u64::from(slot);
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr))?;
            self.desc(head, hdr, 16, VIRTQ_DESC_F_NEXT, head + 1)?;
            self.desc(
                head + 1,
                DATA + BLOCK * u64::from(slot),
                BLOCK as u32,
                VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                head + 2,
            )?;
            self.desc(head + 2, STATUS + u64::from(slot), 1, VIRTQ_DESC_F_WRITE, 0)?;
            let ring_slot = u64::from(self.avail_idx % (DEPTH * 4));
            self.mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * ring_slot))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))?;
        let t = Instant::now();
        blk.process_queue(0, &mut self.queue, &self.mem);
        let took = t.elapsed();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS))?;
        anyhow::ensure!(status == 0, "read failed with status {status}");
        Ok(took)
    }
}

fn make_file(mib: u64) -> anyhow::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("vessel-bench-blk-{}", std::process::id()));
    let mut chunk = vec![0u8; 1 << 20];
    let mut f = File::create(&path)?;
    for i in 0..mib {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (i as usize * 31 + j * 7) as u8;
        }
        std::io::Write::write_all(&mut f, &chunk)?;
    }
    Ok(path)
}

/// A fixed pseudo-random permutation-ish order of block numbers.
fn random_order(blocks: u64) -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..blocks)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        })
        .collect()
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

pub(crate) fn run(args: &BlkBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.passes > 0, "--passes must be at least 1");
    let mib = args.mib.unwrap_or(if args.direct { 16 } else { 256 });
    anyhow::ensure!(mib > 0, "--mib must be at least 1");
    let (path, made) = match &args.file {
        Some(p) => (p.clone(), false),
        None => (make_file(mib)?, true),
    };
    let result = run_on(&path, args.passes, mib, args.direct);
    if made {
        let _ = std::fs::remove_file(&path);
    }
    result
}

fn run_on(path: &std::path::Path, passes: usize, mib: u64, direct: bool) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let blocks = (file.metadata()?.len() / BLOCK).min(mib << 20 >> 12);
    anyhow::ensure!(blocks >= u64::from(DEPTH), "the file needs at least {} bytes", BLOCK * u64::from(DEPTH));
    let config = BlockConfig { path: path.to_path_buf(), read_only: true, id: None, direct };
    let (mut blk, counters) = Block::open(&config)?;
    blk.set_acked_features(blk.features());
    let mut driver = Driver::new()?;
    // The host reads into as many buffers as the driver keeps in flight,
    // page-aligned like the driver's, so both sides write the same amount
    // of distinct memory the same way.
    let mut bufs = vec![Page([0u8; BLOCK as usize]); usize::from(DEPTH)];
    let cache = if direct { "O_DIRECT on both sides" } else { "page cache warm" };
    println!(
        "vessel bench blk: {} ({} MiB read, {cache}), 4 KiB reads into {DEPTH} rotating buffers, median of {passes} alternating passes",
        path.display(),
        (blocks * BLOCK) >> 20
    );
    for (name, order) in [("sequential", (0..blocks).collect::<Vec<_>>()), ("random", random_order(blocks))] {
        // Warm the page cache so both sides read memory, not the disk
        // (with O_DIRECT: whatever caches lie below the host's kernel).
        for (i, b) in order.iter().enumerate() {
            file.read_exact_at(&mut bufs[i % usize::from(DEPTH)].0, b * BLOCK)?;
        }
        // Alternate host and backend, one pass each: the machine's noise
        // hits both alike.
        let mut host_passes = Vec::with_capacity(passes);
        let mut backend_passes = Vec::with_capacity(passes);
        for _ in 0..passes {
            let t = Instant::now();
            for (i, b) in order.iter().enumerate() {
                file.read_exact_at(&mut bufs[i % usize::from(DEPTH)].0, b * BLOCK)?;
            }
            host_passes.push(t.elapsed());
            let mut backend = Duration::ZERO;
            for batch in order.chunks(usize::from(DEPTH)) {
                let sectors: Vec<u64> = batch.iter().map(|b| b * BLOCK / 512).collect();
                backend += driver.read_batch(&mut blk, &sectors)?;
            }
            backend_passes.push(backend);
        }
        // The ratio is the median over pairs of adjacent passes, which saw
        // the same machine; the throughputs are each side's median pass.
        let mut ratios: Vec<f64> =
            host_passes.iter().zip(&backend_passes).map(|(h, b)| h.as_secs_f64() / b.as_secs_f64()).collect();
        ratios.sort_by(f64::total_cmp);
        host_passes.sort();
        backend_passes.sort();
        let host = host_passes[passes / 2];
        let backend = backend_passes[passes / 2];
        let bytes = blocks * BLOCK;
        println!(
            "  {name:<10}  host pread {:>8.1} MiB/s ({:>5.3} us/read)   virtio-blk backend {:>8.1} MiB/s ({:>5.3} us/read)   ratio {:.2} (pairs {:.2}-{:.2}, target >= 0.9)",
            mib_per_s(bytes, host),
            host.as_secs_f64() * 1e6 / blocks as f64,
            mib_per_s(bytes, backend),
            backend.as_secs_f64() * 1e6 / blocks as f64,
            ratios[passes / 2],
            ratios[0],
            ratios[passes - 1],
        );
    }
    // The driver's buffers are page-aligned: an O_DIRECT disk never bounces them.
    let bounced = counters.bounced.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(bounced == 0, "{bounced} reads went through the bounce buffer");
    Ok(())
}
