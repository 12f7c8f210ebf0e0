//! Tier 2: snapshots and restores of tiny guests on this machine's KVM.
//! A guest that counts on its serial port is snapshotted mid-count and
//! restored twice from the same snapshot; a virtio-rng queue in use goes
//! on after a restore; every kind of spoilt snapshot is refused, and no
//! refused restore leaves a thread behind. Skipped by name where /dev/kvm
//! cannot be opened.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use guests::{Format, Program};
use libtest_mimic::Arguments;
use vessel_tests::harness::{gate, in_child, is_child, trial};
use vessel_tests::{kvm_unavailable, start_guest, start_kernel_with, wait_until, BootOptions, Console, TempDir};
use vmm::config::DeviceConfig;
use vmm::snapshot::format::Description;
use vmm::snapshot::{RestoreConfig, Template, DESCRIPTION_FILE, MEMORY_FILE};
use vmm::{ConsoleOutput, VmmAction, VmmHandle};

type TestResult = anyhow::Result<()>;

const WAIT: Duration = Duration::from_secs(20);

/// The numbers of the `count 0x...` lines in `text`, in order; a line cut
/// short (the snapshot's last, or the restore's first) is skipped.
fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("count 0x"))
        .filter(|hex| hex.len() == 16)
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .collect()
}

/// Checks `numbers` go up by one at each step.
fn consecutive(numbers: &[u64]) -> TestResult {
    for pair in numbers.windows(2) {
        ensure!(pair[1] == pair[0] + 1, "{} follows {}: {numbers:?}", pair[1], pair[0]);
    }
    Ok(())
}

/// Pauses `handle`'s VM, writes its snapshot to `dir`, stops it.
fn snapshot(handle: VmmHandle, dir: &Path) -> TestResult {
    handle.request(VmmAction::Pause).context("pause")?;
    handle.request(VmmAction::Snapshot(dir.to_path_buf())).context("snapshot")?;
    drop(handle);
    Ok(())
}

fn restore_config(console: &Console) -> RestoreConfig {
    RestoreConfig { console: ConsoleOutput::Writer(Box::new(console.clone())), ..RestoreConfig::default() }
}

/// A counting guest snapshotted mid-count goes on from where it stopped,
/// twice from the same snapshot: not from the start, not from an invented
/// value. The second restore writes to a file, not the first console.
fn counting_guest_restored_twice(format: Format) -> TestResult {
    let dir = TempDir::new("snap-count")?;
    let snap = dir.path().join("snap");
    let guest = start_guest(Program::Count, format, &BootOptions::default())?;
    ensure!(wait_until(WAIT, || counts(&guest.console.text()).len() >= 10), "no counts:\n{}", guest.console.text());
    snapshot(guest.handle, &snap)?;
    let before = guest.console.text();
    let last = *counts(&before).last().context("no count before the snapshot")?;
    consecutive(&counts(&before))?;
    ensure!(counts(&before)[0] == 1, "the count started at {}", counts(&before)[0]);

    // The guest's memory is its secrets: the snapshot is its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for (path, want) in [(snap.clone(), 0o700), (snap.join(MEMORY_FILE), 0o600), (snap.join(DESCRIPTION_FILE), 0o600)] {
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        ensure!(mode == want, "{} has mode {mode:o}, want {want:o}", path.display());
    }
    let template = Template::load(&snap)?;
    // First restore: to a collecting console.
    let console = Console::default();
    let vm = template.restore(restore_config(&console))?;
    ensure!(wait_until(WAIT, || counts(&console.text()).len() >= 10), "restore 1 counted nothing:\n{}", console.text());
    drop(vm);
    // Second restore, from the same snapshot: to a file.
    let log = dir.path().join("second.log");
    let config = RestoreConfig { console: ConsoleOutput::File(log.clone()), ..RestoreConfig::default() };
    let vm = template.restore(config)?;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(wait_until(WAIT, || counts(&read()).len() >= 10), "restore 2 counted nothing:\n{}", read());
    drop(vm);

    for (which, text) in [("first", console.text()), ("second", read())] {
        // The snapshot may have cut a line: the text before and after it
        // together are whole lines again.
        let joined = format!("{before}{text}");
        let all = counts(&joined);
        consecutive(&all).with_context(|| format!("the {which} restore's count"))?;
        let after = counts(&text);
        let first = *after.first().context("no count after the restore")?;
        ensure!(
            first == last + 1 || (first == last + 2 && !before.ends_with('\n')),
            "the {which} restore counted on from {first}; the snapshot's last count was {last}"
        );
    }
    Ok(())
}

/// The `virtio: again idx <n> data <d>` lines: (used index, data).
fn agains(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("virtio: again idx 0x"))
        .filter_map(|rest| {
            let (idx, data) = rest.split_once(" data 0x")?;
            (data.len() == 16).then_some(())?;
            Some((u64::from_str_radix(idx, 16).ok()?, u64::from_str_radix(data, 16).ok()?))
        })
        .collect()
}

/// A virtio-rng device the guest's driver is using, snapshotted between
/// requests, serves the same driver's next requests after the restore:
/// the used index goes on from where it was, with fresh data.
fn rng_queue_in_use_goes_on_after_restore() -> TestResult {
    let dir = TempDir::new("snap-rng")?;
    let kernel = dir.write("virtio.elf", guests::image(Program::Virtio, Format::Pvh))?;
    let opts = BootOptions { cmdline: "virtio.repeat".into(), ..BootOptions::default() };
    let guest = start_kernel_with(&kernel, &opts, &[DeviceConfig::Rng])?;
    ensure!(wait_until(WAIT, || agains(&guest.console.text()).len() >= 3), "no requests:\n{}", guest.console.text());
    let snap = dir.path().join("snap");
    snapshot(guest.handle, &snap)?;
    let before = agains(&guest.console.text());
    let console = Console::default();
    let vm = vmm::snapshot::restore(&snap, restore_config(&console))?;
    ensure!(wait_until(WAIT, || agains(&console.text()).len() >= 3), "no requests after restore:\n{}", console.text());
    drop(vm);
    let after = agains(&console.text());
    let all: Vec<u64> = before.iter().chain(&after).map(|(idx, _)| *idx).collect();
    // A request in flight at the snapshot may print its line only after.
    let joined = format!("{}{}", guest.console.text(), console.text());
    consecutive(&agains(&joined).iter().map(|(i, _)| *i).collect::<Vec<_>>())
        .with_context(|| format!("used indexes {all:?}"))?;
    ensure!(!console.text().contains("no interrupt"), "the device stopped after the restore:\n{}", console.text());
    let data: std::collections::HashSet<u64> = after.iter().map(|(_, d)| *d).collect();
    ensure!(data.len() == after.len(), "the restored device gave the same bytes twice: {after:x?}");
    Ok(())
}

/// A device hot-plugged into a slot, in use by the guest's driver, is
/// restored into the same slot and goes on serving it: the restore makes
/// it again and the event loop watches it from the start.
fn a_hot_plugged_device_in_use_goes_on_after_restore() -> TestResult {
    let dir = TempDir::new("snap-hotplug")?;
    let kernel = dir.write("virtio.elf", guests::image(Program::Virtio, Format::Pvh))?;
    // The guest waits at the empty slot (announced on its command line)
    // until a device is plugged in.
    let opts = BootOptions { cmdline: "virtio.repeat".into(), hotplug_slots: 1, ..BootOptions::default() };
    let guest = start_kernel_with(&kernel, &opts, &[])?;
    guest.handle.request(VmmAction::AttachDevice(DeviceConfig::Rng))?;
    ensure!(wait_until(WAIT, || agains(&guest.console.text()).len() >= 3), "no requests:\n{}", guest.console.text());
    let snap = dir.path().join("snap");
    snapshot(guest.handle, &snap)?;
    let slots = Description::decode(&std::fs::read(snap.join(DESCRIPTION_FILE))?)?.slots;
    ensure!(slots.len() == 1 && slots[0].device == Some(DeviceConfig::Rng), "saved slots: {slots:?}");
    let console = Console::default();
    let vm = vmm::snapshot::restore(&snap, restore_config(&console))?;
    ensure!(wait_until(WAIT, || agains(&console.text()).len() >= 3), "no requests after restore:\n{}", console.text());
    let stats = vm.stats();
    drop(vm);
    let joined = format!("{}{}", guest.console.text(), console.text());
    consecutive(&agains(&joined).iter().map(|(i, _)| *i).collect::<Vec<_>>())?;
    ensure!(stats.devices.iter().any(|d| d.name == "rng"), "the restored VM counts no rng: {:?}", stats.devices);
    Ok(())
}

/// A VM restored from a snapshot can be snapshotted in turn (its memory a
/// private mapping now, not a memfd), and that snapshot restores too.
fn a_restored_vm_snapshotted_again_counts_on() -> TestResult {
    let dir = TempDir::new("snap-again")?;
    let guest = start_guest(Program::Count, Format::Pvh, &BootOptions::default())?;
    ensure!(wait_until(WAIT, || counts(&guest.console.text()).len() >= 5), "no counts");
    snapshot(guest.handle, &dir.path().join("first"))?;
    let first = Console::default();
    let vm = vmm::snapshot::restore(&dir.path().join("first"), restore_config(&first))?;
    ensure!(wait_until(WAIT, || counts(&first.text()).len() >= 5), "the first restore counted nothing");
    snapshot(vm, &dir.path().join("second"))?;
    let second = Console::default();
    let vm = vmm::snapshot::restore(&dir.path().join("second"), restore_config(&second))?;
    ensure!(wait_until(WAIT, || counts(&second.text()).len() >= 5), "the second restore counted nothing");
    drop(vm);
    let joined = format!("{}{}{}", guest.console.text(), first.text(), second.text());
    consecutive(&counts(&joined))?;
    ensure!(counts(&joined)[0] == 1, "the count started at {}", counts(&joined)[0]);
    Ok(())
}

/// This process's thread count.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Every way a snapshot can be spoilt is refused with what is wrong, and
/// no refused restore leaves a vCPU thread or an event loop behind.
fn spoilt_snapshots_are_refused_by_name() -> TestResult {
    let dir = TempDir::new("snap-bad")?;
    let take = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let guest = start_guest(Program::Spin, Format::Pvh, &BootOptions::default())?;
        ensure!(wait_until(WAIT, || guest.console.text().contains("spin")), "the guest did not start");
        let snap = dir.path().join(name);
        snapshot(guest.handle, &snap)?;
        Ok(snap)
    };
    let good = take("good")?;
    let other = take("other")?;
    let description = std::fs::read(good.join(DESCRIPTION_FILE))?;
    let decoded = Description::decode(&description)?;

    // Each case: a copy of the good snapshot, spoilt one way.
    let spoil = |name: &str, f: &dyn Fn(&Path) -> TestResult| -> anyhow::Result<std::path::PathBuf> {
        let copy = dir.path().join(name);
        std::fs::create_dir_all(&copy)?;
        for file in [DESCRIPTION_FILE, MEMORY_FILE] {
            std::fs::copy(good.join(file), copy.join(file))?;
        }
        f(&copy)?;
        Ok(copy)
    };
    let rewrite = |path: &Path, d: &Description| std::fs::write(path.join(DESCRIPTION_FILE), d.encode());
    let with_msr = {
        let mut d = decoded.clone();
        let mut bad = d.vcpus[0].msrs[0].clone();
        bad[..4].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        d.vcpus[0].msrs.push(bad);
        d
    };
    let with_feature = {
        let mut d = decoded.clone();
        // Leaf 7 EBX: vessel passes it through whole, so a bit it shows
        // clear is one this host does not have.
        let entry = d.vcpus[0]
            .cpuid
            .iter_mut()
            .find(|e| e[..8] == [7, 0, 0, 0, 0, 0, 0, 0])
            .context("no CPUID leaf 7 in the snapshot")?;
        let ebx = u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]);
        let clear = (0..32).map(|b| 1u32 << b).find(|bit| ebx & bit == 0).context("leaf 7 EBX has every bit")?;
        entry[16..20].copy_from_slice(&(ebx | clear).to_le_bytes());
        d
    };
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        (
            "no description",
            spoil("no-description", &|p| Ok(std::fs::remove_file(p.join(DESCRIPTION_FILE))?))?,
            "cannot read",
        ),
        (
            "truncated description",
            spoil("truncated", &|p| {
                Ok(std::fs::write(p.join(DESCRIPTION_FILE), &description[..description.len() / 2])?)
            })?,
            "truncated",
        ),
        (
            "corrupt description",
            spoil("corrupt", &|p| {
                let mut bytes = description.clone();
                let at = bytes.len() - 100;
                bytes[at] ^= 1;
                Ok(std::fs::write(p.join(DESCRIPTION_FILE), bytes)?)
            })?,
            "checksum",
        ),
        (
            "another version",
            spoil("version", &|p| {
                let mut bytes = description.clone();
                bytes[16] = 9;
                Ok(std::fs::write(p.join(DESCRIPTION_FILE), bytes)?)
            })?,
            "format version 9",
        ),
        (
            "truncated memory",
            spoil("short-memory", &|p| {
                let f = std::fs::OpenOptions::new().write(true).open(p.join(MEMORY_FILE))?;
                Ok(f.set_len(decoded.mem_size / 2)?)
            })?,
            "bytes long",
        ),
        (
            "another snapshot's memory",
            spoil("mixed", &|p| Ok(std::fs::copy(other.join(MEMORY_FILE), p.join(MEMORY_FILE)).map(drop)?))?,
            "belongs to snapshot",
        ),
        ("an MSR KVM does not have", spoil("msr", &|p| Ok(rewrite(p, &with_msr)?))?, "MSR 0x12345678"),
        ("a CPU feature the host lacks", spoil("cpuid", &|p| Ok(rewrite(p, &with_feature)?))?, "CPUID leaf 0x7.0 EBX"),
    ];
    let threads_before = threads();
    for (what, path, want) in cases {
        let result =
            vmm::snapshot::restore(&path, RestoreConfig { console: ConsoleOutput::Discard, ..Default::default() });
        let Err(e) = result else { bail!("a snapshot with {what} was restored") };
        let text = format!("{:#}", anyhow::Error::new(e));
        ensure!(text.contains(want), "{what}: {text:?} does not say {want:?}");
    }
    ensure!(
        threads() == threads_before,
        "refused restores left threads: {} before, {} after",
        threads_before,
        threads()
    );
    // The good one still restores, and its guest runs (its exits count).
    let vm = vmm::snapshot::restore(&good, RestoreConfig { console: ConsoleOutput::Discard, ..Default::default() })?;
    ensure!(
        wait_until(WAIT, || vm.stats().vcpus[0].io_out > 1000),
        "the restored spin guest makes no port writes: {:?}",
        vm.stats().vcpus
    );
    Ok(())
}

/// A snapshot needs the VM paused, and says so.
fn a_running_vm_is_not_snapshotted() -> TestResult {
    let dir = TempDir::new("snap-running")?;
    let guest = start_guest(Program::Spin, Format::Pvh, &BootOptions::default())?;
    let err = guest.handle.request(VmmAction::Snapshot(dir.path().join("s"))).expect_err("a running VM snapshotted");
    let text = format!("{:#}", anyhow::Error::new(err));
    ensure!(text.contains("not paused"), "{text}");
    ensure!(!dir.path().join("s").join(DESCRIPTION_FILE).exists(), "a description was written");
    Ok(())
}

const SPOILT_CHILD: &str = "spoilt_snapshots_child_process";

fn main() {
    let args = Arguments::from_args();
    if is_child() {
        let children = vec![trial(SPOILT_CHILD, spoilt_snapshots_are_refused_by_name)];
        libtest_mimic::run(&args, children).exit();
    }
    let trials = vec![
        trial("a_counting_guest_restored_twice_counts_on_from_where_it_stopped_pvh", || {
            counting_guest_restored_twice(Format::Pvh)
        }),
        trial("a_counting_guest_restored_twice_counts_on_from_where_it_stopped_bzimage", || {
            counting_guest_restored_twice(Format::BzImage)
        }),
        trial("a_virtio_rng_queue_in_use_goes_on_after_a_restore", rng_queue_in_use_goes_on_after_restore),
        trial("a_hot_plugged_device_in_use_goes_on_after_a_restore", a_hot_plugged_device_in_use_goes_on_after_restore),
        trial("a_restored_vm_snapshotted_again_counts_on", a_restored_vm_snapshotted_again_counts_on),
        trial("spoilt_snapshots_are_refused_by_name_and_leave_no_thread", || in_child(SPOILT_CHILD)),
        trial("a_running_vm_is_not_snapshotted", a_running_vm_is_not_snapshotted),
    ];
    libtest_mimic::run(&args, gate(kvm_unavailable(), trials)).exit();
}
