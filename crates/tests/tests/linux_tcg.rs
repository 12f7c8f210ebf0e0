//! Tier 3 (DESIGN.md, Testing): the distribution's Linux kernel under QEMU
//! TCG, with a test initramfs from the `resources` crate. Linux's own
//! virtio drivers run against the devices attached. Where QEMU, a static
//! busybox or the kernel cannot be had, every test here is reported as
//! skipped, with the reason; none passes without running.

use std::time::Duration;

use anyhow::{ensure, Context};
use libtest_mimic::{Arguments, Failed, Trial};
use resources::test_image::{test_initramfs, ExtraFile};
use sha2::{Digest, Sha256};
use vessel_tests::tier3::{
    boot_linux_tcg, qemu_tcg_unavailable, test_kernel, LinuxOptions, LinuxRun, Verdict, VIRTIO_MMIO,
};
use vessel_tests::TempDir;

type TestResult = anyhow::Result<()>;

const DISK_SIZE: usize = 4 << 20;
/// Where the guest writes its pattern: sector 2051 (sector-aligned, not
/// page-aligned), 128 sectors.
const PATTERN_SECTOR: usize = 2051;
const PATTERN_SECTORS: usize = 128;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
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
    opts.vhost_user = vhost_user_setup;
    opts.extra_args = ["-drive", &format!("file={},if=none,id=d0,format=raw", disk_path.display())]
        .into_iter()
        .map(String::from)
        .chain(["-device".into(), "virtio-blk-device,drive=d0".into()])
        .collect();
    let run = boot_linux_tcg(&opts)?;
    eprintln!(
        "qemu_virtio_blk_roundtrip (vhost-user set-up: {vhost_user_setup}): init after {:?} \
         (guest uptime {:?} s), QEMU ran {:?}",
        run.init_after, run.guest_uptime_at_init, run.elapsed
    );
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

fn trial(name: &'static str, f: impl FnOnce() -> TestResult + Send + 'static) -> Trial {
    Trial::test(name, move || f().map_err(|e| Failed::from(format!("{e:#}"))))
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = vec![
        trial("qemu_virtio_blk_roundtrip", || qemu_virtio_blk_roundtrip(false)),
        trial("qemu_virtio_blk_roundtrip_modern_mmio_shared_memory", || qemu_virtio_blk_roundtrip(true)),
        trial("harness_reports_script_failures", harness_reports_script_failures),
        trial("harness_kernel_panic_ends_qemu", harness_kernel_panic_ends_qemu),
        trial("harness_timeout_kills_qemu", harness_timeout_kills_qemu),
    ];
    // Listing the tests must not fetch a kernel.
    if !args.list {
        if let Some(reason) = qemu_tcg_unavailable() {
            for t in &trials {
                eprintln!("skipped {}: {reason}", t.name());
            }
            trials = trials.into_iter().map(|t| t.with_ignored_flag(true)).collect();
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
