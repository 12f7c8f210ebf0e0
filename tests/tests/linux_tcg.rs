//! Tier 3 (DESIGN.md, Testing): the distribution's Linux kernel under QEMU
//! TCG, with a test initramfs from the `resources` crate. Linux's own
//! virtio drivers run against the devices attached. Where QEMU, a static
//! busybox or the kernel cannot be had, every test here is reported as
//! skipped, with the reason; none passes without running.
//!
//! The virtio-fs guest also runs on the builtin VMM, as a vhost-user
//! frontend for the same virtiofsd (tier 4): only where hardware
//! virtualization is usable, skipped by name elsewhere.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::vsock::{Vsock, VsockConfig};

use anyhow::{ensure, Context};
use libtest_mimic::{Arguments, Failed, Trial};
use resources::test_image::{test_initramfs, ExtraFile};
use sha2::{Digest, Sha256};
use vessel_tests::harness::{e2fsprogs_unavailable, gate, trial};
use vessel_tests::netns::NetNs;
use vessel_tests::pattern::{exchange, hex, pattern_sha256};
use vessel_tests::tier3::{
    boot_linux_tcg, qemu_tcg_unavailable, test_kernel, vhost_user_device_args, vhost_user_fs_args, LinuxOptions,
    LinuxRun, Verdict, VIRTIO_MMIO,
};
use vessel_tests::TempDir;

type TestResult = anyhow::Result<()>;

const DISK_SIZE: usize = 4 << 20;
/// Where the guest writes its pattern: sector 2051 (sector-aligned, not
/// page-aligned), 128 sectors.
const PATTERN_SECTOR: usize = 2051;
const PATTERN_SECTORS: usize = 128;

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Pseudo-random bytes (xorshift64*), different for each seed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The guest side of the blk round trip: read the whole disk and hash it,
/// write the pattern (O_DIRECT, fsync) and read it back from the device,
/// hash the whole disk again.
const BLK_SCRIPT: &str = r#"set -e
v() { echo "VESSEL-VALUE: $1 $2"; }
[ -b /dev/vda ] || { echo "VESSEL-TEST-RESULT: fail no /dev/vda"; exit 1; }
v size "$(blockdev --getsize64 /dev/vda)"
v disk-sha256 "$(sha256sum < /dev/vda | cut -d' ' -f1)"
dd if=/etc/pattern of=/dev/vda bs=512 seek=__SECTOR__ count=__COUNT__ oflag=direct conv=notrunc,fsync status=none
blockdev --flushbufs /dev/vda
echo 3 > /proc/sys/vm/drop_caches
back="$(dd if=/dev/vda bs=512 skip=__SECTOR__ count=__COUNT__ iflag=direct status=none | sha256sum | cut -d' ' -f1)"
want="$(sha256sum < /etc/pattern | cut -d' ' -f1)"
v region-sha256 "$back"
v disk-after-sha256 "$(sha256sum < /dev/vda | cut -d' ' -f1)"
[ "$back" = "$want" ] || { echo "VESSEL-TEST-RESULT: fail the region read back as $back, want $want"; exit 1; }
echo "VESSEL-TEST-RESULT: ok"
"#;

/// QEMU's own virtio-blk (virtio-mmio) under Linux's virtio_blk driver:
/// the guest reads a disk of random content the host hashed, writes a
/// pattern to a region, and the host finds that pattern in the file.
/// Proves kernel, modules, initramfs and harness end to end. With
/// `vhost_user_setup`, on the machine set-up vhost-user devices need
/// (shared memfd RAM, modern virtio-mmio).
fn qemu_virtio_blk_roundtrip(vhost_user_setup: bool) -> TestResult {
    blk_roundtrip(if vhost_user_setup { BlkBackend::QemuOnVhostUserSetup } else { BlkBackend::Qemu })
}

/// Which virtio-blk device the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlkBackend {
    /// QEMU's own virtio-blk-device.
    Qemu,
    /// QEMU's own, on the machine set-up vhost-user needs.
    QemuOnVhostUserSetup,
    /// vessel's virtio-blk backend served over vhost-user.
    Vessel,
}

fn blk_roundtrip(backend: BlkBackend) -> TestResult {
    let kernel = test_kernel()?;
    let dir = TempDir::new("blk")?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let disk = noise(DISK_SIZE, seed);
    let disk_path = dir.write("disk.img", &disk)?;
    // Fixed, so the image (cached by content) is the same from run to run.
    let pattern = noise(PATTERN_SECTORS * 512, 0x7e55_e100);
    let script = BLK_SCRIPT
        .replace("__SECTOR__", &PATTERN_SECTOR.to_string())
        .replace("__COUNT__", &PATTERN_SECTORS.to_string());
    let extra = [ExtraFile { path: "/etc/pattern".into(), mode: 0o644, contents: pattern.clone() }];
    let initrd = test_initramfs(&kernel, &[VIRTIO_MMIO, "virtio_blk"], &script, &extra)?;

    let mut opts = LinuxOptions::new(&kernel.image, &initrd);
    opts.machine.vhost_user = backend != BlkBackend::Qemu;
    let mut served = None;
    opts.machine.extra_args = match backend {
        BlkBackend::Qemu | BlkBackend::QemuOnVhostUserSetup => {
            ["-drive", &format!("file={},if=none,id=d0,format=raw", disk_path.display())]
                .into_iter()
                .map(String::from)
                .chain(["-device".into(), "virtio-blk-device,drive=d0".into()])
                .collect()
        }
        BlkBackend::Vessel => {
            let socket = dir.path().join("blk.sock");
            let config = BlockConfig {
                path: disk_path.clone(),
                read_only: false,
                id: Some("vessel-test".into()),
                direct: false,
            };
            let (block, counters) = Block::open(&config)?;
            served = Some((
                devices::virtio::vhost_user::spawn("blk", Box::new(block), &socket, vmm::seccomp::confine_vhost_user)?,
                counters,
            ));
            vhost_user_device_args(&socket, "vhost-user-blk")
        }
    };
    let run = boot_linux_tcg(&opts)?;
    eprintln!(
        "blk_roundtrip ({backend:?}): init after {:?} (guest uptime {:?} s), QEMU ran {:?}",
        run.init_after, run.guest_uptime_at_init, run.elapsed
    );
    if let Some((server, counters)) = served {
        server.join().map_err(|_| anyhow::anyhow!("the vhost-user server panicked"))??;
        let reads = counters.read_ops.load(std::sync::atomic::Ordering::Relaxed);
        let writes = counters.write_ops.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(
            reads > 0 && writes > 0,
            "our backend served {reads} reads and {writes} writes: not ours?{}",
            run.context()
        );
    }
    run.ensure_ok()?;
    let ctx = || run.context();

    let size = run.expect_value("size")?;
    ensure!(size == DISK_SIZE.to_string(), "guest sees a {size}-byte disk, want {DISK_SIZE}{}", ctx());
    let got = run.expect_value("disk-sha256")?;
    ensure!(got == sha256_hex(&disk), "guest read the disk as sha256 {got}, want {}{}", sha256_hex(&disk), ctx());
    let got = run.expect_value("region-sha256")?;
    ensure!(got == sha256_hex(&pattern), "guest read the region back as {got}, want {}", sha256_hex(&pattern));

    let after = std::fs::read(&disk_path).context("reading the disk image back")?;
    let mut want = disk;
    let at = PATTERN_SECTOR * 512;
    want[at..at + pattern.len()].copy_from_slice(&pattern);
    ensure!(after[at..at + pattern.len()] == pattern[..], "the pattern the guest wrote is not in the file");
    ensure!(after == want, "the disk file changed outside the region the guest wrote");
    let got = run.expect_value("disk-after-sha256")?;
    ensure!(got == sha256_hex(&after), "guest hashed the written disk as {got}, host {}", sha256_hex(&after));
    Ok(())
}

/// Bytes each vsock stream carries each way.
const VSOCK_BYTES: u64 = 64 << 20;
/// Connections in the concurrent phase, and the bytes each echoes.
const VSOCK_PARALLEL: u64 = 32;
const VSOCK_PARALLEL_BYTES: u64 = 256 << 10;
const GUEST_CID: u64 = 3;

/// The guest side of the vsock test: a guest-initiated stream, a
/// host-initiated stream, then 32 concurrent echoed connections.
const VSOCK_SCRIPT: &str = r#"set -e
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
t0=$(cs)
/bin/vsock-probe connect 2 5000 __BYTES__ 1 | sed 's/VESSEL-VALUE: /VESSEL-VALUE: g2h-/'
t1=$(cs)
echo "VESSEL-VALUE: g2h-ns $(( (t1 - t0) * 10000000 ))"
/bin/vsock-probe listen 6000 __BYTES__ 3 | sed 's/VESSEL-VALUE: /VESSEL-VALUE: h2g-/'
echo "VESSEL-VALUE: phase parallel"
/bin/vsock-probe parallel 2 7000 __N__ __PBYTES__
echo "VESSEL-TEST-RESULT: ok"
"#;

/// What the host side of the vsock test saw.
#[derive(Debug, Default)]
struct HostSide {
    g2h: Option<(String, String, u64)>,
    h2g: Option<(String, String, u64)>,
    echoed: u64,
}

/// Our vsock backend over vhost-user under Linux's vsock drivers: 64 MiB
/// each way guest-initiated and host-initiated, checked by SHA-256 on both
/// ends, then 32 concurrent echoed connections.
fn vessel_vhost_user_vsock() -> TestResult {
    let kernel = test_kernel()?;
    let dir = TempDir::new("vsock")?;
    let probe = std::fs::read(env!("CARGO_BIN_EXE_vsock-probe")).context("reading vsock-probe")?;
    let script = VSOCK_SCRIPT
        .replace("__BYTES__", &VSOCK_BYTES.to_string())
        .replace("__N__", &VSOCK_PARALLEL.to_string())
        .replace("__PBYTES__", &VSOCK_PARALLEL_BYTES.to_string());
    let extra = [ExtraFile { path: "/bin/vsock-probe".into(), mode: 0o755, contents: probe }];
    let initrd = test_initramfs(&kernel, &[VIRTIO_MMIO, "vmw_vsock_virtio_transport"], &script, &extra)?;

    let uds = dir.path().join("vsock.sock");
    let socket = dir.path().join("vhost-vsock.sock");
    let (vsock, counters) = Vsock::new(&VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() })?;
    let server =
        devices::virtio::vhost_user::spawn("vsock", Box::new(vsock), &socket, vmm::seccomp::confine_vhost_user)?;

    // The host side, in its own threads.
    let g2h = UnixListener::bind(format!("{}_5000", uds.display()))?;
    let echo = UnixListener::bind(format!("{}_7000", uds.display()))?;
    let host = std::thread::spawn(move || -> anyhow::Result<HostSide> {
        let mut side = HostSide::default();
        let (stream, _) = g2h.accept()?;
        side.g2h = Some(exchange(stream, VSOCK_BYTES, 2)?);
        // Host-initiated: retry until the guest listens.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        let stream = loop {
            ensure!(std::time::Instant::now() < deadline, "the guest never accepted CONNECT 6000");
            let mut s = UnixStream::connect(&uds)?;
            s.write_all(b"CONNECT 6000\n")?;
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            if line.starts_with(b"OK ") {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        side.h2g = Some(exchange(stream, VSOCK_BYTES, 4)?);
        let echoes: Vec<_> = (0..VSOCK_PARALLEL)
            .map(|_| {
                let (stream, _) = echo.accept()?;
                Ok(std::thread::spawn(move || -> std::io::Result<u64> {
                    let mut reader = stream.try_clone()?;
                    let mut writer = stream;
                    let n = std::io::copy(&mut reader, &mut writer)?;
                    writer.shutdown(std::net::Shutdown::Write)?;
                    Ok(n)
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        for t in echoes {
            if t.join().map_err(|_| anyhow::anyhow!("echo panicked"))?? == VSOCK_PARALLEL_BYTES {
                side.echoed += 1;
            }
        }
        Ok(side)
    });

    let mut opts = LinuxOptions::new(&kernel.image, &initrd);
    opts.machine.vhost_user = true;
    // The guest tool, a debug build, is about 70 MiB (debug info of every
    // crate it links), which the initramfs unpacks into RAM: 256 MiB is
    // just too little ("Initramfs unpacking failed: write error").
    opts.machine.mem_mib = 512;
    opts.timeout = Duration::from_secs(600);
    opts.machine.extra_args = vhost_user_device_args(&socket, "vhost-user-vsock-device");
    let run = boot_linux_tcg(&opts)?;
    eprintln!("vessel_vhost_user_vsock: init after {:?}, QEMU ran {:?}", run.init_after, run.elapsed);
    run.ensure_ok()?;
    server.join().map_err(|_| anyhow::anyhow!("the vhost-user server panicked"))??;
    let side = host.join().map_err(|_| anyhow::anyhow!("the host side panicked"))??;
    let ctx = || run.context();

    let want_g2h = pattern_sha256(VSOCK_BYTES, 1);
    let want_h2g = pattern_sha256(VSOCK_BYTES, 2);
    let (host_sent, host_got, host_n) = side.g2h.clone().context("no guest-initiated stream")?;
    ensure!(run.expect_value("g2h-sent-sha256")? == want_g2h, "guest sent something else{}", ctx());
    ensure!(
        host_got == want_g2h && host_n == VSOCK_BYTES,
        "host received {host_n} bytes, sha {host_got}, want {want_g2h}"
    );
    ensure!(host_sent == want_h2g, "host side pattern mismatch");
    ensure!(run.expect_value("g2h-recv-sha256")? == want_h2g, "guest received something else{}", ctx());
    ensure!(run.expect_value("g2h-recv-bytes")? == VSOCK_BYTES.to_string(), "guest got a short stream{}", ctx());

    let (h_sent, h_got, h_n) = side.h2g.clone().context("no host-initiated stream")?;
    ensure!(
        h_got == pattern_sha256(VSOCK_BYTES, 3) && h_n == VSOCK_BYTES,
        "host-initiated: host received {h_n} bytes, sha {h_got}"
    );
    ensure!(run.expect_value("h2g-recv-sha256")? == h_sent, "host-initiated: guest received something else{}", ctx());

    ensure!(run.expect_value("parallel-ok")? == VSOCK_PARALLEL.to_string(), "concurrent connections failed{}", ctx());
    ensure!(side.echoed == VSOCK_PARALLEL, "host echoed {} of {VSOCK_PARALLEL} connections in full", side.echoed);
    let moved = counters.tx_bytes.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(moved >= 2 * VSOCK_BYTES, "our backend moved only {moved} bytes guest to host");
    let g2h_ns: f64 = run.expect_value("g2h-ns")?.parse()?;
    eprintln!(
        "vessel_vhost_user_vsock: guest-initiated stream, {} MiB each way at once, took {:.1} s in the guest \
         ({:.1} MiB/s per direction under TCG, hashing both streams in the guest included); QEMU ran {:?}",
        VSOCK_BYTES >> 20,
        g2h_ns / 1e9,
        (VSOCK_BYTES >> 20) as f64 / (g2h_ns / 1e9),
        run.elapsed
    );
    Ok(())
}

const ROOTFS_SCRIPT: &str = r#"set -e
mkdir -p /mnt
mount -t ext4 -o ro /dev/vda /mnt
chroot /mnt /bin/sh -c 'echo "VESSEL-VALUE: chroot $(cat /etc/passwd | cut -d: -f1)"'
echo "VESSEL-TEST-RESULT: ok"
"#;

/// The demo busybox root filesystem (`vessel image demo-rootfs`), served
/// read-only by our vhost-user-blk, mounts as ext4 in Linux and runs.
fn vessel_blk_demo_rootfs_mounts() -> TestResult {
    let kernel = test_kernel()?;
    let dir = TempDir::new("rootfs")?;
    let image = dir.path().join("rootfs.ext4");
    resources::rootfs::demo_rootfs(&image)?;
    let initrd = test_initramfs(&kernel, &[VIRTIO_MMIO, "virtio_blk", "ext4"], ROOTFS_SCRIPT, &[])?;
    let socket = dir.path().join("blk.sock");
    let config = BlockConfig { path: image, read_only: true, id: Some("rootfs".into()), direct: false };
    let server = devices::virtio::vhost_user::spawn(
        "blk",
        Box::new(Block::open(&config)?.0),
        &socket,
        vmm::seccomp::confine_vhost_user,
    )?;
    let mut opts = LinuxOptions::new(&kernel.image, &initrd);
    opts.machine.vhost_user = true;
    opts.machine.extra_args = vhost_user_device_args(&socket, "vhost-user-blk");
    let run = boot_linux_tcg(&opts)?;
    server.join().map_err(|_| anyhow::anyhow!("the vhost-user server panicked"))??;
    run.ensure_ok()?;
    ensure!(run.expect_value("chroot")? == "root", "the rootfs's /etc/passwd{}", run.context());
    Ok(())
}

/// The guest side of the blk benchmark: direct 1 MiB reads of the whole
/// disk, then 4 KiB reads, each timed inside the guest (10 ms resolution,
/// /proc/uptime: busybox's date has no nanoseconds).
const BLK_BENCH_SCRIPT: &str = r#"set -e
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
t0=$(cs); dd if=/dev/vda of=/dev/null bs=1M iflag=direct status=none; t1=$(cs)
dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct status=none; t2=$(cs)
echo "VESSEL-VALUE: seq-1m-ns $(( (t1 - t0) * 10000000 ))"
echo "VESSEL-VALUE: rand-4k-ns $(( (t2 - t1) * 10000000 ))"
echo "VESSEL-TEST-RESULT: ok"
"#;

const BENCH_DISK: usize = 256 << 20;

/// A benchmark, not a test: the same guest reads the same file through our
/// vhost-user-blk backend and through qemu-storage-daemon's, under QEMU
/// TCG. Prints both; asserts only that each run worked.
fn bench_vhost_user_blk() -> anyhow::Result<u64> {
    let mut vessel_ns = 0;
    let kernel = test_kernel()?;
    let dir = TempDir::new("blk-bench")?;
    let disk = dir.write("disk.img", &noise(BENCH_DISK, 5))?;
    let initrd = test_initramfs(&kernel, &[VIRTIO_MMIO, "virtio_blk"], BLK_BENCH_SCRIPT, &[])?;
    for backend in ["vessel", "qemu-storage-daemon"] {
        let socket = dir.path().join(format!("{backend}.sock"));
        let mut daemon = None;
        let mut server = None;
        if backend == "vessel" {
            let config = BlockConfig { path: disk.clone(), read_only: true, id: None, direct: false };
            server = Some(devices::virtio::vhost_user::spawn(
                "blk",
                Box::new(Block::open(&config)?.0),
                &socket,
                vmm::seccomp::confine_vhost_user,
            )?);
        } else {
            let child = std::process::Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=disk,filename={},cache.direct=off", disk.display()))
                .arg("--export")
                .arg(format!("type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={}", socket.display()))
                .spawn()
                .context("qemu-storage-daemon")?;
            daemon = Some(child);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                ensure!(std::time::Instant::now() < deadline, "qemu-storage-daemon never listened");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut opts = LinuxOptions::new(&kernel.image, &initrd);
        opts.machine.vhost_user = true;
        opts.machine.extra_args = vhost_user_device_args(&socket, "vhost-user-blk");
        let run = boot_linux_tcg(&opts);
        if let Some(mut child) = daemon {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(server) = server {
            server.join().map_err(|_| anyhow::anyhow!("the vhost-user server panicked"))??;
        }
        let run = run?;
        run.ensure_ok()?;
        let seq: f64 = run.expect_value("seq-1m-ns")?.parse()?;
        if backend == "vessel" {
            vessel_ns = seq as u64;
        }
        let rand: f64 = run.expect_value("rand-4k-ns")?.parse()?;
        println!(
            "bench vhost-user-blk under QEMU TCG, {backend:<20}: 1 MiB direct reads {:>7.1} MiB/s, 4 KiB direct reads {:>7.1} us/read",
            BENCH_DISK as f64 / (1 << 20) as f64 / (seq / 1e9),
            rand / 1e3 / 4096.0
        );
    }
    Ok(vessel_ns)
}

/// The guest side of the virtio-fs tests: mount the tag, read what the
/// host put there, write a file back, unmount.
const VIRTIO_FS_SCRIPT: &str = r#"set -e
mkdir -p /mnt/fs
mount -t virtiofs vesselfs /mnt/fs
echo "VESSEL-VALUE: from-host $(cat /mnt/fs/from-host)"
echo "written by the guest" > /mnt/fs/from-guest
umount /mnt/fs
echo "VESSEL-TEST-RESULT: ok"
"#;

/// The modules the virtio-fs guest loads (fuse comes as a dependency).
const VIRTIO_FS_MODULES: [&str; 2] = [VIRTIO_MMIO, "virtiofs"];

/// A directory to share, with a file in it, and virtiofsd serving it.
fn virtio_fs_share(dir: &TempDir) -> anyhow::Result<vessel_tests::virtiofsd::Virtiofsd> {
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::write(shared.join("from-host"), "hello from the host\n")?;
    vessel_tests::virtiofsd::Virtiofsd::start(dir.path(), &shared, None)
}

/// What the guest left in the shared directory and printed.
fn check_virtio_fs_run(dir: &TempDir, run: &LinuxRun, daemon: &vessel_tests::virtiofsd::Virtiofsd) -> TestResult {
    let ctx = || format!("{}--- virtiofsd ---\n{}", run.context(), daemon.log_text());
    run.ensure_ok().with_context(ctx)?;
    ensure!(run.expect_value("from-host")? == "hello from the host", "{}", ctx());
    let back = std::fs::read_to_string(dir.path().join("shared/from-guest")).with_context(ctx)?;
    ensure!(back == "written by the guest\n", "the guest wrote {back:?}");
    Ok(())
}

/// Linux's virtio-fs driver on virtiofsd under QEMU's own vhost-user
/// frontend: the guest half of the builtin tier-4 test below, proven here.
fn qemu_virtio_fs_on_virtiofsd() -> TestResult {
    let kernel = test_kernel()?;
    let dir = TempDir::new("virtiofs-qemu")?;
    let daemon = virtio_fs_share(&dir)?;
    let initrd = test_initramfs(&kernel, &VIRTIO_FS_MODULES, VIRTIO_FS_SCRIPT, &[])?;
    let mut opts = LinuxOptions::new(&kernel.image, &initrd);
    opts.machine.vhost_user = true;
    opts.machine.extra_args = vhost_user_fs_args(&daemon.socket, "vesselfs");
    let run = boot_linux_tcg(&opts)?;
    check_virtio_fs_run(&dir, &run, &daemon)
}

/// Tier 4: the same guest on the builtin VMM, whose virtio-mmio device is
/// a vhost-user frontend for virtiofsd. Init powers off at the end, which
/// the builtin VMM may not see as an exit, so the test stops the VM once
/// the result is on the console.
fn builtin_virtio_fs_on_virtiofsd() -> TestResult {
    use devices::virtio::vhost_user_frontend::{VhostUserConfig, VhostUserDevice};
    let kernel = test_kernel()?;
    let dir = TempDir::new("virtiofs-builtin")?;
    let daemon = virtio_fs_share(&dir)?;
    let initrd = test_initramfs(&kernel, &VIRTIO_FS_MODULES, VIRTIO_FS_SCRIPT, &[])?;
    let fs = vmm::DeviceConfig::VhostUser(VhostUserConfig {
        socket: daemon.socket.clone(),
        device: VhostUserDevice::Fs { tag: "vesselfs".into(), request_queues: 1, queue_size: 1024 },
    });
    let opts = vessel_tests::BootOptions {
        mem_mib: 256,
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        ..Default::default()
    };
    let mut guest = vessel_tests::start_kernel_with_initrd(&kernel.image, &initrd, &opts, &[fs])?;
    let done = vessel_tests::wait_until(Duration::from_secs(120), || {
        guest.console.text().contains(resources::test_image::RESULT_MARKER) || guest.handle.try_wait().is_some()
    });
    // Let a failing script print all its lines before the VM stops.
    std::thread::sleep(Duration::from_millis(200));
    let console = guest.console.text().replace('\r', "");
    drop(guest);
    let (verdict, values, _) = vessel_tests::tier3::parse_console(&console);
    let run = LinuxRun {
        console,
        stderr: String::new(),
        verdict,
        values,
        timed_out: !done,
        exit: None,
        init_after: None,
        guest_uptime_at_init: None,
        elapsed: Duration::ZERO,
    };
    check_virtio_fs_run(&dir, &run, &daemon)
}

/// Boots a test image whose script is `script` (no modules), with `timeout`.
fn boot_script(script: &str, timeout: Duration) -> anyhow::Result<LinuxRun> {
    let kernel = test_kernel()?;
    let initrd = test_initramfs(&kernel, &[], script, &[])?;
    let mut opts = LinuxOptions::new(&kernel.image, &initrd);
    opts.timeout = timeout;
    boot_linux_tcg(&opts)
}

/// The harness itself: a script that fails is a failure with its reason,
/// even when it printed nothing, and a script that printed ok but then
/// failed is still a failure.
fn harness_reports_script_failures() -> TestResult {
    let run = boot_script("echo \"VESSEL-TEST-RESULT: ok\"\nexit 3\n", Duration::from_secs(120))?;
    ensure!(
        run.verdict == Verdict::Fail("/test.sh exited with status 3".into()),
        "verdict {:?}{}",
        run.verdict,
        run.context()
    );
    let err = run.ensure_ok().unwrap_err().to_string();
    ensure!(err.starts_with("the guest test failed: /test.sh exited with status 3"), "{err}");
    ensure!(!run.timed_out && run.exit.is_some_and(|e| e.success()), "QEMU ended with {:?}", run.exit);
    Ok(())
}

/// A kernel panic ends QEMU at once (panic=-1 with -no-reboot), with no
/// verdict, rather than hanging until the timeout.
fn harness_kernel_panic_ends_qemu() -> TestResult {
    let run = boot_script("echo c > /proc/sysrq-trigger\nsleep 1000\n", Duration::from_secs(120))?;
    ensure!(!run.timed_out, "QEMU ran into the timeout after a panic{}", run.context());
    ensure!(run.console.contains("Kernel panic"), "no panic on the console{}", run.context());
    ensure!(run.verdict == Verdict::Missing, "verdict {:?}", run.verdict);
    ensure!(run.ensure_ok().is_err(), "a panicked guest passed");
    Ok(())
}

/// A guest that never ends is killed at the timeout, and what it printed
/// so far comes back.
fn harness_timeout_kills_qemu() -> TestResult {
    let timeout = Duration::from_secs(5);
    let run = boot_script("sleep 1000\n", timeout)?;
    ensure!(run.timed_out && run.exit.is_none(), "QEMU was not killed: {:?}", run.exit);
    ensure!(run.elapsed >= timeout && run.elapsed < timeout + Duration::from_secs(5), "ran {:?}", run.elapsed);
    ensure!(run.console.contains("Linux version"), "the console so far was lost{}", run.context());
    let err = run.ensure_ok().unwrap_err().to_string();
    ensure!(err.starts_with("the guest did not finish in time"), "{err}");
    Ok(())
}

/// Prints the vhost-user libraries' log records (errors and warnings) to
/// stderr, so a failing device negotiation says why.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

const NET_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x73, 0x6e];

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The guest side of the net test: Linux's virtio_net driver brings eth0
/// up, pings the host's end of the TAP with small and full-size frames,
/// and reports how many replies came back.
const NET_SCRIPT: &str = r#"set -e
ip link set eth0 up
ip addr add 10.78.0.2/24 dev eth0
echo "VESSEL-VALUE: mac $(cat /sys/class/net/eth0/address)"
small=$(ping -c 3 -W 10 10.78.0.1 | grep -o '[0-9]* packets received' | cut -d' ' -f1)
large=$(ping -c 3 -W 10 -s 1472 10.78.0.1 | grep -o '[0-9]* packets received' | cut -d' ' -f1)
echo "VESSEL-VALUE: small $small"
echo "VESSEL-VALUE: large $large"
echo "VESSEL-TEST-RESULT: ok"
"#;

/// Our TAP-backed virtio-net over vhost-user (`vessel device serve net`'s
/// code) against Linux's virtio_net driver: the guest pings the host's end
/// of the TAP, inside a network namespace of the test's own.
fn vessel_vhost_user_net_ping() -> TestResult {
    let kernel = test_kernel()?;
    let dir = TempDir::new("net")?;
    let ns = NetNs::new("tcg-net")?;
    let (net, counters) = ns.within(|| Ok(Net::new(&NetConfig { tap: "vtap1".into(), mac: NET_GUEST_MAC })?))?;
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "vtap1"])?;
    ns.ip(&["link", "set", "vtap1", "up"])?;
    let initrd = test_initramfs(&kernel, &[VIRTIO_MMIO, "virtio_net"], NET_SCRIPT, &[])?;
    let socket = dir.path().join("vhost-net.sock");
    let server = devices::virtio::vhost_user::spawn("net", Box::new(net), &socket, vmm::seccomp::confine_vhost_user)?;
    let mut opts = LinuxOptions::new(&kernel.image, &initrd);
    opts.machine.vhost_user = true;
    opts.machine.extra_args = runtime_api::qemu::vhost_user_net_args(&socket, &mac_string(&NET_GUEST_MAC));
    let run = boot_linux_tcg(&opts)?;
    server.join().map_err(|_| anyhow::anyhow!("the vhost-user server panicked"))??;
    run.ensure_ok()?;
    ensure!(run.expect_value("mac")? == mac_string(&NET_GUEST_MAC), "the guest has another MAC{}", run.context());
    ensure!(run.expect_value("small")? == "3", "small pings answered{}", run.context());
    ensure!(run.expect_value("large")? == "3", "1500-byte pings answered{}", run.context());
    let rx = counters.rx_packets.load(std::sync::atomic::Ordering::Relaxed);
    let tx = counters.tx_packets.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(rx >= 6 && tx >= 6, "our backend moved {tx} frames out, {rx} in");
    Ok(())
}

fn main() {
    let _ = log::set_logger(&StderrLog).map(|()| log::set_max_level(log::LevelFilter::Warn));
    let args = Arguments::from_args();
    // Listing the tests must not fetch a kernel.
    let tcg = if args.list { None } else { qemu_tcg_unavailable() };
    let mut trials = gate(
        tcg.clone(),
        [
            trial("qemu_virtio_blk_roundtrip", || qemu_virtio_blk_roundtrip(false)),
            trial("qemu_virtio_blk_roundtrip_modern_mmio_shared_memory", || qemu_virtio_blk_roundtrip(true)),
            trial("vessel_vhost_user_blk_roundtrip", || blk_roundtrip(BlkBackend::Vessel)),
            trial("vessel_vhost_user_vsock", vessel_vhost_user_vsock),
            trial("harness_reports_script_failures", harness_reports_script_failures),
            trial("harness_kernel_panic_ends_qemu", harness_kernel_panic_ends_qemu),
            trial("harness_timeout_kills_qemu", harness_timeout_kills_qemu),
        ],
    );
    let virtiofsd = || vessel_tests::virtiofsd::binary().err();
    trials.extend(gate(
        if args.list { None } else { tcg.clone().or_else(virtiofsd) },
        [trial("qemu_virtio_fs_on_virtiofsd", qemu_virtio_fs_on_virtiofsd)],
    ));
    let tier4 = runtime_api::hypervisor::hardware_virtualization_unusable()
        .map(|why| format!("Linux on the builtin VMM needs hardware virtualization: {why}"));
    trials.extend(gate(
        if args.list { None } else { tier4.or_else(|| tcg.clone()).or_else(virtiofsd) },
        [trial("builtin_virtio_fs_on_virtiofsd", builtin_virtio_fs_on_virtiofsd)],
    ));
    trials.extend(gate(
        if args.list { None } else { tcg.clone().or_else(e2fsprogs_unavailable) },
        [trial("vessel_blk_demo_rootfs_mounts", vessel_blk_demo_rootfs_mounts)],
    ));
    trials.extend(gate(
        if args.list { None } else { tcg.clone().or_else(vessel_tests::netns::unavailable) },
        [trial("vessel_vhost_user_net_ping", vessel_vhost_user_net_ping)],
    ));
    // Benchmarks: run with `cargo test -p vessel-tests --test linux_tcg -- --bench`.
    let bench = Trial::bench("bench_vhost_user_blk_vessel_vs_qemu_storage_daemon", |_| {
        // The figure the harness records: our backend's whole-disk read.
        let ns = bench_vhost_user_blk().map_err(|e| Failed::from(format!("{e:#}")))?;
        Ok(Some(libtest_mimic::Measurement { avg: ns, variance: 0 }))
    });
    trials.extend(gate(tcg, [bench]));
    libtest_mimic::run(&args, trials).exit();
}
