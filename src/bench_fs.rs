//! `vessel bench fs`: virtio-fs against the ext4 image path. A container's
//! start with a large root (packing it into an image, or sharing the
//! directory as it is), and the guest's read throughput of one large file
//! through a shared directory and through a virtio-blk disk. A benchmark
//! that prints figures, never a pass/fail test.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;
use runtime_api::sandbox::STREAM_TIMEOUT;

use crate::bench_sandbox::{ms, spread};
use runtime_api::{
    ContainerConfig, DiskConfig, DiskMount, HypervisorKind, ProcessConfig, Sandbox, SandboxConfig, Store, VolumeConfig,
};

#[derive(Args, Debug)]
pub(crate) struct FsBenchArgs {
    /// Runs of each measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The size of the container root, in MiB (a busybox tree and filler
    /// files of random bytes).
    #[arg(long, default_value_t = 200)]
    root_mib: u64,
    /// The size of the file read in the guest, in MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// The guest image directory (default: the one in the cache directory).
    #[arg(long)]
    image: Option<std::path::PathBuf>,
    /// Guest memory in MiB (more than the file, so that the page cache can
    /// be dropped rather than squeezed).
    #[arg(long, default_value_t = 512)]
    memory: u64,
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift; nothing compresses
/// or is sparse) to `path`.
fn filler(path: &Path, mib: u64, seed: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&block)?;
    }
    file.flush()?;
    Ok(())
}

/// Creates and starts a sandbox from `config`; returns the time from the
/// call to the container's first output byte.
fn start_to_output(store: &Store, config: SandboxConfig) -> anyhow::Result<(Sandbox, Duration)> {
    let id = config.id.clone();
    let began = Instant::now();
    let mut sandbox = Sandbox::create(store, config, None)?;
    let io = sandbox.take_io(&id)?;
    let out = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut conn = io.stdout.accept(STREAM_TIMEOUT)?;
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte)?;
        Ok(())
    });
    sandbox.start()?;
    out.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    Ok((sandbox, began.elapsed()))
}

/// Runs `script` in the sandbox's container and times it; it must exit 0.
fn timed(sandbox: &mut Sandbox, id: &str, script: &str) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let (exec, _io) = sandbox.enter_container(id, &ProcessConfig::new(&["sh", "-c", script]))?;
    let status = sandbox.wait_process(id, &exec, Some(Duration::from_secs(600)))?;
    ensure!(status == 0, "{script:?} exited with {status}");
    Ok(began.elapsed())
}

pub(crate) fn run(args: &FsBenchArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "the shared directory is bind mounts: run this as root");
    runtime_api::shared_fs::find_virtiofsd()?;
    let image = crate::guest_image(args.image.as_deref())?;
    let scratch = resources::cache::temp_name(&std::env::temp_dir(), "vessel-bench-fs");
    std::fs::create_dir_all(&scratch)?;
    let store = Store::new(scratch.join("state"));
    let outcome = (|| {
        let base = |id: &str| {
            let mut config = SandboxConfig::new(id, &image);
            config.hypervisor = Some(HypervisorKind::QemuTcg);
            config.memory_mib = args.memory;
            config
        };

        // A root of root_mib MiB, as a directory.
        let tree = scratch.join("root");
        resources::rootfs::busybox_tree(&tree)?;
        std::fs::create_dir_all(tree.join("data"))?;
        let pieces = args.root_mib.div_ceil(16).max(1);
        for i in 0..pieces {
            filler(&tree.join(format!("data/filler-{i}")), args.root_mib / pieces, i + 1)?;
        }
        println!(
            "container start with a {} MiB root, qemu-tcg, {} runs (min / median / max, ms):",
            args.root_mib, args.runs
        );
        let (mut pack, mut ext4_start, mut fs_start) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..args.runs {
            // The ext4 path: the tree packed into an image, then attached.
            let packing = Instant::now();
            let disk = scratch.join(format!("root-{i}.ext4"));
            resources::rootfs::build_ext4(&tree, &disk, None)?;
            pack.push(ms(packing.elapsed()));
            let mut config = base(&format!("ext4-{i}"));
            config.containers.push(ContainerConfig::new(&config.id, &disk, &["echo", "up"]));
            let (mut sandbox, took) = start_to_output(&store, config)?;
            ext4_start.push(ms(took));
            sandbox.stop(true)?;
            sandbox.delete()?;
            std::fs::remove_file(&disk)?;
            // The virtio-fs path: the directory shared as it is.
            let mut config = base(&format!("fs-{i}"));
            config.containers.push(ContainerConfig::new(&config.id, &tree, &["echo", "up"]));
            let (mut sandbox, took) = start_to_output(&store, config)?;
            fs_start.push(ms(took));
            sandbox.stop(true)?;
            sandbox.delete()?;
        }
        let total: Vec<f64> = pack.iter().zip(&ext4_start).map(|(p, s)| p + s).collect();
        println!("  ext4: packing the image (mkfs.ext4 -d)        {}", spread(pack));
        println!("  ext4: create to first output                  {}", spread(ext4_start));
        println!("  ext4: both                                    {}", spread(total));
        println!("  virtio-fs: create to first output             {}", spread(fs_start));

        // One large file, read in the guest through each path.
        let data = scratch.join("data");
        std::fs::create_dir_all(&data)?;
        // A file per run, each read once through each path: nothing is in
        // the guest's page cache for it yet (the two filesystems do not
        // share one), and a container cannot drop the cache.
        for i in 0..args.runs {
            filler(&data.join(format!("big-{i}")), args.file_mib, 7 + i as u64)?;
        }
        let disk = scratch.join("data.ext4");
        resources::rootfs::build_ext4(&data, &disk, None)?;
        let mut config = base("read");
        config.disks.push(DiskConfig { path: disk.clone(), serial: "data".into(), read_only: true });
        let mut c = ContainerConfig::new("read", resources::rootfs::cached_demo_rootfs()?, &["sleep", "100000"]);
        let root_copy = scratch.join("read-root.ext4");
        std::fs::copy(&c.rootfs, &root_copy).context("copying the demo root")?;
        c.rootfs = root_copy;
        c.disks.push(DiskMount {
            serial: "data".into(),
            destination: "/blk".into(),
            fstype: "ext4".into(),
            read_only: true,
        });
        c.volumes.push(VolumeConfig { source: data.canonicalize()?, destination: "/fs".into(), read_only: true });
        config.containers.push(c);
        let mut sandbox = Sandbox::create(&store, config, None)?;
        sandbox.start()?;
        let (mut blk, mut fs) = (Vec::new(), Vec::new());
        let mib = args.file_mib as f64;
        let measured = (|| {
            for i in 0..args.runs {
                for (dir, out) in [("/blk", &mut blk), ("/fs", &mut fs)] {
                    let script = format!("cat {dir}/big-{i} > /dev/null");
                    let took = timed(&mut sandbox, "read", &script)?;
                    out.push(mib / took.as_secs_f64());
                }
            }
            anyhow::Ok(())
        })();
        sandbox.stop(true)?;
        sandbox.delete()?;
        measured?;
        println!(
            "reading a {} MiB file in the guest, qemu-tcg, each file once (min / median / max, MiB/s):",
            args.file_mib
        );
        println!("  virtio-blk (ext4 image)                       {}", spread(blk));
        println!("  virtio-fs (cache=auto)                        {}", spread(fs));
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}
