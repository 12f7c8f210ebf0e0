//! The `vessel` command line, run as a user runs it: a separate process,
//! its stdout, stderr and exit status.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context};
use guests::{Format, Program};
use libtest_mimic::Arguments;
use vessel_tests::harness::{e2fsprogs_unavailable, gate, missing_tool, trial, workspace_binary};
use vessel_tests::{kvm_unavailable, TempDir};

type TestResult = anyhow::Result<()>;

/// The `vessel` binary under test.
fn vessel_bin() -> std::path::PathBuf {
    workspace_binary("vessel")
}

fn vessel(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(vessel_bin()).args(args).output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_guest(dir: &TempDir, program: Program, format: Format) -> anyhow::Result<String> {
    let path = dir.write(guests::file_name(program, format), guests::image(program, format))?;
    Ok(path.to_string_lossy().into_owned())
}

fn boot_prints_the_console_and_exits_with_the_guest() -> TestResult {
    let dir = TempDir::new("cli-boot")?;
    let kernel = write_guest(&dir, Program::Hello, Format::BzImage)?;
    let out = vessel(&["vm", "boot", "--kernel", &kernel])?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    ensure!(out.status.success(), "exit {:?}: {stderr}", out.status);
    ensure!(stdout == "vessel test guest: hello\n", "stdout {stdout:?}");
    ensure!(stderr.contains("guest reset the machine after"), "stderr {stderr:?}");
    ensure!(stderr.contains("boot timer: ") && !stderr.contains("not reached"), "stderr {stderr:?}");
    Ok(())
}

fn boot_with_console_file_initrd_and_stats() -> TestResult {
    let dir = TempDir::new("cli-report")?;
    let kernel = write_guest(&dir, Program::Report, Format::Pvh)?;
    let initrd = dir.write("initrd", &[1u8; 4096])?;
    let console = dir.path().join("console.log");
    let out = vessel(&[
        "vm",
        "boot",
        "--kernel",
        &kernel,
        "--vcpus",
        "2",
        "--mem",
        "32",
        "--cmdline",
        "from the cli",
        "--initrd",
        &initrd.to_string_lossy(),
        "--console",
        &console.to_string_lossy(),
        "--stats",
    ])?;
    let stderr = text(&out.stderr);
    ensure!(out.status.success(), "exit {:?}: {stderr}", out.status);
    ensure!(out.stdout.is_empty(), "the console went to stdout too");
    let report = vessel_tests::parse_report(&std::fs::read_to_string(&console)?)?;
    ensure!(report.cmdline == "from the cli" && report.initrd.1 == 4096 && report.initrd_sum == 4096, "{report:?}");
    ensure!(report.madt_lapics == [0, 1] && report.cpus_up == [1] && report.done, "{report:?}");
    for key in ["uptime_us=", "boot_time_us=", "mem_size=33554432", "vmm_overhead=", "vcpu1_exits "] {
        ensure!(stderr.contains(key), "stats lack {key:?}: {stderr}");
    }
    Ok(())
}

/// `vm boot --pause-after --snapshot` writes a snapshot and exits 0 with
/// the guest unfinished; `vm restore` finishes it and exits as `vm boot`
/// would have, its console where asked. The virtio guest waits about 2 s
/// at an empty hotplug slot, then gives up and resets the machine.
fn vm_boot_snapshots_and_vm_restore_finishes_the_guest() -> TestResult {
    let dir = TempDir::new("cli-snapshot")?;
    let kernel = write_guest(&dir, Program::Virtio, Format::Pvh)?;
    let snap = dir.path().join("snap");
    let snap_arg = snap.to_string_lossy().into_owned();
    let boot = ["vm", "boot", "--kernel", &kernel, "--hotplug-slots", "1", "--pause-after", "300", "--snapshot"];
    let out = vessel(&[&boot[..], &[snap_arg.as_str()]].concat())?;
    ensure!(out.status.success(), "boot: exit {:?}: {}", out.status, text(&out.stderr));
    let before = text(&out.stdout);
    ensure!(before.starts_with("virtio: magic") && !before.contains("done"), "boot printed {before:?}");
    ensure!(text(&out.stderr).contains("snapshot of the VM after 300 ms"), "{}", text(&out.stderr));
    for run in 0..2 {
        let console = dir.path().join(format!("restore-{run}.log"));
        let out = vessel(&["vm", "restore", &snap_arg, "--console", &console.to_string_lossy(), "--stats"])?;
        ensure!(out.status.success(), "restore {run}: exit {:?}: {}", out.status, text(&out.stderr));
        let after = std::fs::read_to_string(&console)?;
        let whole = format!("{before}{after}");
        ensure!(whole.contains("virtio: error no virtio device\ndone\n"), "restore {run} printed {after:?}");
        ensure!(!after.contains("virtio: magic"), "restore {run} started the guest again: {after:?}");
        let stderr = text(&out.stderr);
        ensure!(stderr.contains("reset the machine") && stderr.contains("first_output_us="), "{stderr}");
    }
    let out = vessel(&["vm", "restore", &dir.path().join("nothing").to_string_lossy()])?;
    ensure!(!out.status.success() && text(&out.stderr).contains("vm.state"), "{}", text(&out.stderr));
    Ok(())
}

fn bad_arguments_are_usage_errors() -> TestResult {
    let out = vessel(&["vm", "boot"])?;
    ensure!(out.status.code() == Some(2), "missing --kernel: exit {:?}", out.status);
    ensure!(text(&out.stderr).contains("--kernel"), "stderr {}", text(&out.stderr));
    let out = vessel(&["vm", "boot", "--kernel", "k", "--vcpus", "many"])?;
    ensure!(out.status.code() == Some(2), "bad --vcpus: exit {:?}", out.status);
    ensure!(text(&out.stderr).contains("many"), "stderr {}", text(&out.stderr));
    Ok(())
}

fn missing_kernel_is_a_clear_error() -> TestResult {
    let out = vessel(&["vm", "boot", "--kernel", "/nonexistent/vmlinux"])?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1), "exit {:?}", out.status);
    ensure!(
        stderr.contains("cannot open the kernel image /nonexistent/vmlinux") && stderr.contains("No such file"),
        "stderr {stderr:?}"
    );
    Ok(())
}

fn guests_are_written_out() -> TestResult {
    let dir = TempDir::new("cli-guests")?;
    let out_dir = dir.path().join("g");
    let out = vessel(&["guests", "--out", &out_dir.to_string_lossy()])?;
    ensure!(out.status.success(), "exit {:?}", out.status);
    for program in Program::ALL {
        for format in Format::ALL {
            let path = out_dir.join(guests::file_name(program, format));
            ensure!(std::fs::read(&path)? == guests::image(program, format), "{} differs", path.display());
            ensure!(text(&out.stdout).contains(&*path.to_string_lossy()), "{} not listed", path.display());
        }
    }
    Ok(())
}

/// Runs `vessel vm boot` where /dev/kvm does not exist: a private mount
/// namespace with an empty /dev.
fn missing_dev_kvm_is_a_clear_error() -> TestResult {
    let dir = TempDir::new("cli-nokvm")?;
    let kernel = write_guest(&dir, Program::Hello, Format::Pvh)?;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /dev && exec \"$0\" \"$@\""])
        .arg(vessel_bin())
        .args(["vm", "boot", "--kernel", &kernel])
        .output()?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1), "exit {:?}: {stderr}", out.status);
    ensure!(stderr.contains("cannot open /dev/kvm") && stderr.contains("No such file"), "stderr {stderr:?}");
    Ok(())
}

/// Runs `vessel vm boot` as an unprivileged user who may not open /dev/kvm.
fn inaccessible_dev_kvm_is_a_clear_error() -> TestResult {
    let dir = TempDir::new("cli-nokvm-user")?;
    let kernel = write_guest(&dir, Program::Hello, Format::Pvh)?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vessel_bin())
        .args(["vm", "boot", "--kernel", &kernel])
        .output()?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1), "exit {:?}: {stderr}", out.status);
    ensure!(stderr.contains("cannot open /dev/kvm") && stderr.contains("Permission denied"), "stderr {stderr:?}");
    Ok(())
}

/// `vessel image rootfs` packs a directory into an ext4 image whose files
/// e2fsprogs reads back; a bad source is a clear error.
fn image_rootfs_packs_a_directory() -> TestResult {
    let dir = TempDir::new("cli-rootfs")?;
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::write(tree.join("etc/hello"), "hello from the rootfs\n")?;
    let img = dir.path().join("rootfs.ext4");
    let out = vessel(&["image", "rootfs", "--from", &tree.to_string_lossy(), "--out", &img.to_string_lossy()])?;
    ensure!(out.status.success(), "exit {:?}: {}", out.status, text(&out.stderr));
    let check = Command::new("e2fsck").args(["-fn"]).arg(&img).output()?;
    ensure!(check.status.success(), "e2fsck: {}", text(&check.stdout));
    let cat = Command::new("debugfs").args(["-R", "cat /etc/hello"]).arg(&img).output()?;
    ensure!(text(&cat.stdout) == "hello from the rootfs\n", "debugfs read {:?}", text(&cat.stdout));
    let out = vessel(&["image", "rootfs", "--from", "/nonexistent/dir", "--out", &img.to_string_lossy()])?;
    ensure!(
        out.status.code() == Some(1) && text(&out.stderr).contains("/nonexistent/dir is not a directory"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

/// `vessel image rootfs` also takes an OCI image layout: the layer's files
/// end up in the ext4 image, with the layer's owners.
fn image_rootfs_from_an_oci_layout() -> TestResult {
    let dir = TempDir::new("cli-oci")?;
    let layer_dir = dir.path().join("layer");
    std::fs::create_dir_all(layer_dir.join("etc"))?;
    std::fs::write(layer_dir.join("etc/os-release"), "NAME=vessel-test\n")?;
    let layer = dir.path().join("layer.tar");
    let tar = Command::new("tar")
        .args(["--owner=999", "--group=998", "-C"])
        .arg(&layer_dir)
        .arg("-cf")
        .arg(&layer)
        .arg("etc")
        .status()?;
    ensure!(tar.success(), "tar failed");
    let oci = dir.path().join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256"))?;
    let sha = |path: &Path| -> anyhow::Result<String> {
        let out = Command::new("sha256sum").arg(path).output()?;
        Ok(text(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
    };
    let layer_sha = sha(&layer)?;
    std::fs::copy(&layer, oci.join("blobs/sha256").join(&layer_sha))?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_sha}","size":1}}]}}"#
    );
    let manifest_path = dir.path().join("manifest.json");
    std::fs::write(&manifest_path, &manifest)?;
    let manifest_sha = sha(&manifest_path)?;
    std::fs::write(oci.join("blobs/sha256").join(&manifest_sha), &manifest)?;
    std::fs::write(
        oci.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"sha256:{manifest_sha}"}}]}}"#),
    )?;
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let img = dir.path().join("rootfs.ext4");
    let out = vessel(&["image", "rootfs", "--from", &oci.to_string_lossy(), "--out", &img.to_string_lossy()])?;
    ensure!(out.status.success(), "exit {:?}: {}", out.status, text(&out.stderr));
    let cat = Command::new("debugfs").args(["-R", "cat /etc/os-release"]).arg(&img).output()?;
    ensure!(text(&cat.stdout) == "NAME=vessel-test\n", "debugfs read {:?}", text(&cat.stdout));
    // The layer's owners, not whoever ran vessel.
    let stat = Command::new("debugfs").args(["-R", "stat /etc/os-release"]).arg(&img).output()?;
    let stat = text(&stat.stdout);
    ensure!(stat.contains("User:   999   Group:   998"), "debugfs stat: {stat}");
    Ok(())
}

/// The entries of a newc cpio archive as (name, data), or an error saying
/// where it is not one.
fn newc_entries(mut b: &[u8]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut entries = Vec::new();
    loop {
        ensure!(b.len() >= 110 && b[..6] == *b"070701", "no newc header at byte {}", b.len());
        let field = |i: usize| -> anyhow::Result<usize> {
            Ok(usize::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i])?, 16)?)
        };
        let (filesize, namesize) = (field(6)?, field(11)?);
        let data_at = (110 + namesize).next_multiple_of(4);
        let next = (data_at + filesize).next_multiple_of(4);
        ensure!(namesize > 0 && next <= b.len(), "a truncated entry");
        let name = String::from_utf8(b[110..110 + namesize - 1].to_vec())?;
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push((name, b[data_at..data_at + filesize].to_vec()));
        b = &b[next..];
    }
}

/// `vessel image build` for the test kernel: the distribution's is the
/// default; one from $VESSEL_TEST_KERNEL is passed on.
fn image_build_args(agent: &Path, out: &Path) -> anyhow::Result<Vec<String>> {
    let kernel = vessel_tests::tier3::test_kernel()?;
    let mut args = vec!["image".to_string(), "build".into(), "--agent".into(), agent.to_string_lossy().into()];
    args.extend(["--out".into(), out.to_string_lossy().into()]);
    if kernel.package.is_none() {
        args.extend(["--kernel".into(), kernel.image.to_string_lossy().into()]);
        if let Some(modules) = &kernel.modules {
            args.extend(["--modules".into(), modules.to_string_lossy().into()]);
        }
    }
    Ok(args)
}

/// `vessel image build` writes the kernel and an initramfs whose `/init`
/// is the agent and whose modules.load names modules it holds.
fn image_build_writes_the_boot_files() -> TestResult {
    let dir = TempDir::new("cli-image-build")?;
    let out_dir = dir.path().join("guest");
    let agent = resources::test_image::find_busybox()?;
    let kernel = vessel_tests::tier3::test_kernel()?;
    let args = image_build_args(&agent, &out_dir)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = vessel(&args)?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    ensure!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let (kernel_out, initrd_out) = (out_dir.join("kernel"), out_dir.join("initrd.img"));
    for path in [&kernel_out, &initrd_out] {
        let line = format!("{} {} bytes", path.display(), std::fs::metadata(path)?.len());
        ensure!(stdout.lines().any(|l| l == line), "{line:?} not in stdout {stdout:?}");
    }
    let copied = std::fs::read(&kernel_out)? == std::fs::read(&kernel.image)?;
    ensure!(copied, "{} is not a copy of {}", kernel_out.display(), kernel.image.display());

    let initrd = std::fs::read(&initrd_out)?;
    let entries = newc_entries(&initrd)?;
    let file = |name: &str| entries.iter().find(|(n, _)| n == name).map(|(_, d)| d);
    ensure!(file("init") == Some(&std::fs::read(&agent)?), "init is not the agent");
    let load = text(file("lib/modules/vessel/modules.load").ok_or_else(|| anyhow::anyhow!("no modules.load"))?);
    for module in load.lines() {
        let present = file(&format!("lib/modules/vessel/{module}")).is_some();
        ensure!(present, "modules.load names {module}, which the image lacks");
    }
    // Dependencies first: the virtio core before the transport.
    let at = |name: &str| load.lines().position(|l| l == name);
    // Whichever of them are modules (a kernel may build some in) come in
    // that order.
    let order: Vec<usize> = ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko"].iter().filter_map(|m| at(m)).collect();
    ensure!(order.windows(2).all(|w| w[0] < w[1]), "modules.load out of order: {load:?}");
    // Every driver the agent needs is loaded or built in.
    let listed = stderr.lines().find(|l| l.contains("[3/4] modules to load:")).unwrap_or("");
    for wanted in resources::guest_image::AGENT_MODULES {
        let file = format!("{}.ko", wanted.replace('-', "_"));
        let built_in = listed.split("built in:").nth(1).is_some_and(|b| b.split([',', ' ']).any(|m| m == wanted));
        ensure!(at(&file).is_some() || built_in, "{wanted} is neither in modules.load nor built in: {listed}");
    }
    ensure!(stderr.contains("[3/4] modules to load:"), "no progress on stderr: {stderr:?}");

    // Built again from the same inputs: the same bytes.
    let again = vessel(&args)?;
    ensure!(again.status.success(), "second build: {}", text(&again.stderr));
    ensure!(std::fs::read(&initrd_out)? == initrd, "a second build gave other bytes");
    Ok(())
}

/// The agent is checked before anything is fetched: one that is not a
/// static x86_64 executable, or none at all, is a clear error.
fn image_build_refuses_a_bad_or_missing_agent() -> TestResult {
    let dir = TempDir::new("cli-image-agent")?;
    let script = dir.write("agent.sh", b"#!/bin/sh\necho hi\n")?;
    let out_dir = dir.path().join("guest");
    let out = vessel(&["image", "build", "--agent", &script.to_string_lossy(), "--out", &out_dir.to_string_lossy()])?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1), "exit {:?}: {stderr}", out.status);
    let want = format!("the agent {} is not a static x86_64 executable: it is not a 64-bit", script.display());
    ensure!(stderr.contains(&want), "stderr {stderr:?}");
    ensure!(!out_dir.exists(), "{} written after an error", out_dir.display());

    // A vessel binary with no vessel-agent next to it.
    let exe = dir.path().join("vessel");
    if std::fs::hard_link(vessel_bin(), &exe).is_err() {
        std::fs::copy(vessel_bin(), &exe)?;
    }
    let out = Command::new(&exe).args(["image", "build", "--out", &out_dir.to_string_lossy()]).output()?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1), "exit {:?}: {stderr}", out.status);
    let beside = dir.path().join("vessel-agent");
    let want = format!("no agent at {}: build it with `cargo build -p agent`", beside.display());
    ensure!(stderr.contains(&want) && stderr.contains("--agent FILE"), "stderr {stderr:?}");
    Ok(())
}

/// Why `vessel image build` cannot be tried here with the host's busybox
/// as the agent and the test kernel.
fn image_build_unavailable() -> Option<String> {
    if let Err(e) = resources::test_image::find_busybox() {
        return Some(e.to_string());
    }
    vessel_tests::tier3::test_kernel().err().map(|e| format!("no guest kernel: {e:#}"))
}

/// Why tests that need root, `unshare` and `setpriv` cannot run here.
fn root_tools_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (mount namespaces, changing user)".into());
    }
    missing_tool(&["unshare", "setpriv"], "util-linux")
}

/// Why access to /dev/kvm cannot be denied to a user here.
fn kvm_denial_unavailable() -> Option<String> {
    root_tools_unavailable().or_else(|| {
        std::fs::metadata("/dev/kvm")
            .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 != 0)
            .then(|| "/dev/kvm is open to every user here, so access cannot be denied".into())
    })
}

/// The agent binary cargo built next to `vessel` (same workspace, same
/// profile).
fn built_agent() -> std::path::PathBuf {
    vessel_bin().with_file_name("vessel-agent")
}

/// Why `vessel sandbox run` cannot be tried here.
fn sandbox_unavailable() -> Option<String> {
    if !built_agent().is_file() {
        return Some(format!("{} is not built (cargo build -p agent)", built_agent().display()));
    }
    e2fsprogs_unavailable().or_else(vessel_tests::tier3::qemu_tcg_unavailable)
}

/// The README's container: a command in a sandbox VM, its output on our
/// stdout, its exit status ours.
fn sandbox_run_is_the_containers_output_and_status() -> TestResult {
    let dir = TempDir::new("cli-sandbox")?;
    let image = dir.path().join("guest");
    let build = image_build_args(&built_agent(), &image)?;
    let build: Vec<&str> = build.iter().map(String::as_str).collect();
    let out = vessel(&build)?;
    ensure!(out.status.success(), "image build: {}", text(&out.stderr));
    let image = image.to_string_lossy().into_owned();
    let script = "echo out from $(hostname); echo err >&2; test $$ = 1 && echo pid-1; exit 7";
    let out = vessel(&["sandbox", "run", "--image", &image, "--hostname", "box", "--", "sh", "-c", script])?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    ensure!(out.status.code() == Some(7), "exit {:?}; stderr {stderr}", out.status);
    ensure!(stdout == "out from box\npid-1\n", "stdout {stdout:?}; stderr {stderr}");
    ensure!(stderr == "err\n", "stderr {stderr:?}");
    // -i: our stdin is the container's.
    let mut child = Command::new(vessel_bin())
        .args(["sandbox", "run", "-i", "--image", &image, "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, b"shout\n")?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && text(&out.stdout) == "SHOUT\n",
        "-i: {:?} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let missing = vessel(&["sandbox", "run", "--image", "/nonexistent", "--", "true"])?;
    ensure!(text(&missing.stderr).contains("vessel image build"), "{}", text(&missing.stderr));
    Ok(())
}

/// A guest image of the built agent, in `dir/guest`.
fn built_guest_image(dir: &TempDir) -> anyhow::Result<String> {
    let image = dir.path().join("guest");
    let build = image_build_args(&built_agent(), &image)?;
    let build: Vec<&str> = build.iter().map(String::as_str).collect();
    let out = vessel(&build)?;
    ensure!(out.status.success(), "image build: {}", text(&out.stderr));
    Ok(image.to_string_lossy().into_owned())
}

/// A 4 MiB journal-less ext4 image at `path`, so that what a guest synced
/// is there for debugfs to read without a journal replay.
fn make_ext4(path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, [])?;
    let made = Command::new("mkfs.ext4").args(["-q", "-F", "-O", "^has_journal"]).arg(path).arg("4M").output()?;
    ensure!(made.status.success(), "mkfs.ext4: {}", text(&made.stderr));
    Ok(())
}

/// The file `inside` of the ext4 image `image`, read with debugfs.
fn debugfs_cat(image: &Path, inside: &str) -> anyhow::Result<String> {
    let out = Command::new("debugfs").args(["-R", &format!("cat {inside}")]).arg(image).output()?;
    Ok(text(&out.stdout))
}

/// `vessel ARGS` that must succeed; its stdout.
fn ok(args: &[&str]) -> anyhow::Result<String> {
    let out = vessel(args)?;
    ensure!(out.status.success(), "vessel {}: exit {:?}: {}", args.join(" "), out.status, text(&out.stderr));
    Ok(text(&out.stdout))
}

/// `vessel ARGS` that must fail; its stderr.
fn refused(args: &[&str]) -> anyhow::Result<String> {
    let out = vessel(args)?;
    ensure!(out.status.code() == Some(1), "vessel {}: exit {:?}: {}", args.join(" "), out.status, text(&out.stdout));
    Ok(text(&out.stderr))
}

/// `vessel run` with a directory root: the container's output and status
/// are ours, and nothing of the sandbox is left.
fn run_is_create_start_wait_delete_in_the_foreground() -> TestResult {
    let dir = TempDir::new("cli-run")?;
    let image = built_guest_image(&dir)?;
    let tree = dir.path().join("tree");
    resources::rootfs::busybox_tree(&tree)?;
    let root = dir.path().join("state");
    let (root, tree) = (root.to_string_lossy().into_owned(), tree.to_string_lossy().into_owned());
    let script = "echo hi from $(hostname); exit 4";
    let logs = ["--log-level", "runtime_api=debug", "--log-format", "json"];
    let out = vessel(
        &[&logs[..], &["--root", &root, "run", "--rm", "--image", &image, &tree, "--", "sh", "-c", script]].concat(),
    )?;
    ensure!(out.status.code() == Some(4), "exit {:?}: {}", out.status, text(&out.stderr));
    ensure!(text(&out.stdout).starts_with("hi from "), "stdout {:?}", text(&out.stdout));
    // The per-step durations of create, one JSON object a line.
    let steps = text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"message\":\"create step done\"") && l.contains("\"ms\":"))
        .count();
    ensure!(steps >= 5, "{steps} create steps logged as JSON: {}", text(&out.stderr));
    let listed = ok(&["--root", &root, "list", "--format", "json"])?;
    ensure!(listed.trim() == "[]", "run --rm left a sandbox: {listed}");

    // Without --rm the stopped sandbox stays, with its exit code, until
    // delete; its packed root goes with it.
    let kept = vessel(&["--root", &root, "run", "--id", "kept", "--image", &image, &tree, "--", "sh", "-c", "exit 2"])?;
    ensure!(kept.status.code() == Some(2), "run without --rm: {:?} {}", kept.status, text(&kept.stderr));
    let listed = ok(&["--root", &root, "list"])?;
    ensure!(listed.lines().any(|l| l.starts_with("kept ") && l.contains(" stopped ")), "list: {listed}");
    let status = ok(&["--root", &root, "status", "kept"])?;
    ensure!(status.contains("container kept stopped exit 2"), "status: {status}");
    ok(&["--root", &root, "run", "--rm", "--image", &image, &tree, "--", "true"])?;
    ensure!(ok(&["--root", &root, "list"])?.contains("kept "), "the next run swept a stopped sandbox");
    ok(&["--root", &root, "delete", "kept"])?;
    ensure!(!Path::new(&root).join(".scratch").join("kept").exists(), "delete left the packed root");

    // -v: a disk image mounted at a path, written to, then read-only.
    let volume = dir.path().join("volume.img");
    make_ext4(&volume)?;
    let v = format!("{}:/vol", volume.display());
    let script = "echo from the volume > /vol/note && sync";
    ok(&["--root", &root, "run", "--rm", "-v", &v, "--image", &image, &tree, "--", "sh", "-c", script])?;
    ensure!(debugfs_cat(&volume, "/note")? == "from the volume\n", "the volume does not hold the note");
    let v = format!("{v}:ro");
    let script = "cat /vol/note; touch /vol/other";
    let out = vessel(&["--root", &root, "run", "--rm", "-v", &v, "--image", &image, &tree, "--", "sh", "-c", script])?;
    ensure!(text(&out.stdout) == "from the volume\n", "a read-only volume: {:?}", text(&out.stdout));
    ensure!(
        out.status.code() == Some(1) && text(&out.stderr).contains("Read-only file system"),
        "a write to a read-only volume: {:?} {}",
        out.status,
        text(&out.stderr)
    );
    let err =
        refused(&["--root", &root, "run", "--rm", "-v", "/nowhere.img:/v", "--image", &image, &tree, "--", "true"])?;
    ensure!(err.contains("/nowhere.img"), "a missing volume: {err}");

    // Our SIGTERM goes to the container, whose exit status is ours.
    let script = "trap 'echo got TERM; exit 9' TERM; echo ready; while true; do sleep 0.1; done";
    let mut child = Command::new(vessel_bin())
        .args(["--root", &root, "run", "--rm", "--image", &image, &tree, "--", "sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line)?;
    ensure!(line == "ready\n", "the container said {line:?}");
    // SAFETY: kill sends a signal; it touches no memory of ours.
    ensure!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) } == 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest)?;
    let status = child.wait()?;
    ensure!(status.code() == Some(9) && rest == "got TERM\n", "after SIGTERM: {status:?}, {rest:?}");

    // kill -9 of vessel run itself: its QEMU goes with it, and the next
    // run sweeps its sandbox.
    let mut child = Command::new(vessel_bin())
        .args([
            "--root",
            &root,
            "run",
            "--rm",
            "--id",
            "killed",
            "--image",
            &image,
            &tree,
            "--",
            "sh",
            "-c",
            "echo ready; sleep 1000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().context("stdout")?), &mut line)?;
    ensure!(line == "ready\n", "the container said {line:?}");
    child.kill()?;
    child.wait()?;
    let qemu_gone = vessel_tests::wait_until(Duration::from_secs(10), || {
        vessel_tests::processes_mentioning(Path::new(&root)).is_ok_and(|p| p.is_empty())
    });
    ensure!(qemu_gone, "QEMU outlived the vessel run that was killed");
    ensure!(ok(&["--root", &root, "list"])?.contains(" dead "), "the killed run's sandbox is not listed as dead");
    ok(&["--root", &root, "run", "--rm", "--image", &image, &tree, "--", "true"])?;
    let listed = ok(&["--root", &root, "list", "--format", "json"])?;
    ensure!(listed.trim() == "[]", "the next run did not sweep the dead one: {listed}");
    Ok(())
}

/// `create` starts a detached owner; `start`, `logs`, `exec`, `ps`,
/// `status`, `pause`, `resume`, `kill` and `delete` drive the sandbox from
/// other processes; unknown IDs are refused by name.
fn detached_sandboxes_are_driven_command_by_command() -> TestResult {
    let dir = TempDir::new("cli-detached")?;
    let image = built_guest_image(&dir)?;
    let rootfs = dir.path().join("root.ext4");
    resources::rootfs::demo_rootfs(&rootfs)?;
    let root = dir.path().join("state").to_string_lossy().into_owned();
    let rootfs = rootfs.to_string_lossy().into_owned();
    let v = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["--root".to_string(), root.clone()];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    };
    let run = |args: &[&str]| ok(&v(args).iter().map(String::as_str).collect::<Vec<_>>());
    let fail = |args: &[&str]| refused(&v(args).iter().map(String::as_str).collect::<Vec<_>>());

    let id = run(&["create", "--id", "box", "--image", &image, &rootfs, "--", "sh", "-c", "echo up; exec sleep 1000"])?;
    ensure!(id.trim() == "box", "create printed {id:?}");
    ensure!(fail(&["create", "--id", "box", "--image", &image, &rootfs, "--", "true"])?.contains("exists already"));
    ensure!(run(&["list"])?.lines().any(|l| l.starts_with("box ") && l.contains(" ready ")), "list");
    // A lock file left with junk in it (a stale lock) changes nothing:
    // the lock is the flock, which dies with its holder.
    std::fs::write(Path::new(&root).join("box").join("lock"), b"stale junk from a dead process")?;
    run(&["start", "box"])?;
    let exec = vessel(
        &v(&["exec", "box", "--", "sh", "-c", "echo in exec; exit 3"]).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    ensure!(
        exec.status.code() == Some(3) && text(&exec.stdout) == "in exec\n",
        "exec: {:?} {}",
        exec.status,
        text(&exec.stderr)
    );
    ensure!(run(&["logs", "box"])? == "up\n", "logs");
    // A terminal: ours (40x100 under script(1)) is the process's.
    // script(1) is in bsdutils, which Debian marks essential.
    let exec = format!("stty rows 40 cols 100; {} --root {root} exec -t box -- stty size", vessel_bin().display());
    let out = Command::new("script").args(["-qec", &exec, "/dev/null"]).output()?;
    ensure!(text(&out.stdout).contains("40 100"), "exec -t: {:?} {}", text(&out.stdout), text(&out.stderr));
    ensure!(run(&["ps", "box"])?.contains("sleep 1000"), "ps");
    ensure!(run(&["status", "box"])?.contains("container box running"), "status");
    run(&["pause", "box"])?;
    ensure!(run(&["list"])?.contains(" paused "), "list after pause");
    run(&["resume", "box"])?;
    ensure!(run(&["stats", "box"])?.lines().any(|l| l.starts_with("box ")), "stats");
    run(&["update", "box", "--memory", "64", "--pids", "20"])?;
    let stats = run(&["stats", "box", "--format", "json"])?;
    ensure!(
        stats.contains("\"memory_limit\": 67108864") && stats.contains("\"pids_limit\": 20"),
        "after update: {stats}"
    );
    ensure!(fail(&["update", "box"])?.contains("nothing to update"), "an empty update");
    ensure!(run(&["ps", "box", "--format", "json"])?.contains("\"command\": \"sleep 1000\""), "ps --format json");
    // A second container in the sandbox: its root is hot-plugged.
    let side_root = dir.path().join("side.ext4");
    resources::rootfs::demo_rootfs(&side_root)?;
    let side_root = side_root.to_string_lossy().into_owned();
    run(&[
        "container",
        "create",
        "box",
        "--id",
        "side",
        &side_root,
        "--",
        "sh",
        "-c",
        "echo side up; exec sleep 1000",
    ])?;
    run(&["container", "start", "box", "side"])?;
    let side_up = vessel_tests::wait_until(Duration::from_secs(30), || {
        run(&["container", "logs", "box", "side"]).is_ok_and(|l| l == "side up\n")
    });
    ensure!(side_up, "the second container's log: {:?}", run(&["container", "logs", "box", "side"]));
    ensure!(run(&["container", "exec", "box", "side", "--", "echo", "in side"])? == "in side\n", "container exec");
    let listed = run(&["container", "list", "box"])?;
    ensure!(listed.lines().filter(|l| l.contains(" running ")).count() == 2, "container list: {listed}");
    ensure!(
        fail(&["container", "delete", "box", "side"])?.contains("needs it stopped"),
        "deleting a running container"
    );
    run(&["container", "kill", "box", "side", "KILL"])?;
    let side_stopped = vessel_tests::wait_until(Duration::from_secs(30), || {
        run(&["container", "list", "box"]).is_ok_and(|l| l.lines().any(|l| l.starts_with("side ") && l.contains("137")))
    });
    ensure!(side_stopped, "container list after kill: {}", run(&["container", "list", "box"])?);
    run(&["container", "delete", "box", "side"])?;
    ensure!(!run(&["container", "list", "box"])?.contains("side "), "the deleted container is listed");
    ensure!(fail(&["container", "delete", "box", "box"])?.contains("last container"), "deleting the last container");

    run(&["kill", "box", "KILL"])?;
    let stopped = vessel_tests::wait_until(Duration::from_secs(30), || {
        run(&["status", "box"]).is_ok_and(|s| s.contains("container box stopped exit 137"))
    });
    ensure!(stopped, "status after kill: {}", run(&["status", "box"])?);
    for (args, want) in [
        (vec!["start", "nope"], r#"no sandbox with ID "nope""#),
        (vec!["kill", "box", "BOGUS"], "unknown signal"),
        (vec!["delete", "nope"], r#"no sandbox with ID "nope""#),
    ] {
        let err = fail(&args).or_else(|_| {
            let out = vessel(&v(&args).iter().map(String::as_str).collect::<Vec<_>>())?;
            Ok::<_, anyhow::Error>(text(&out.stderr))
        })?;
        ensure!(err.contains(want), "{args:?}: {err}");
    }
    run(&["delete", "box"])?;
    ensure!(run(&["list", "--format", "json"])?.trim() == "[]", "delete left the sandbox listed");
    ensure!(!Path::new(&root).join(".scratch").join("box").exists(), "delete left the scratch directory");
    Ok(())
}

/// kill -9 of a sandbox's owner: `list` shows it dead, `delete` refuses it
/// without --force, `delete --force` removes every trace (its QEMU, state,
/// sockets, scratch), and the ID can be used again.
fn a_killed_owner_leaves_a_dead_sandbox_that_delete_force_removes() -> TestResult {
    let dir = TempDir::new("cli-dead")?;
    let image = built_guest_image(&dir)?;
    let rootfs = dir.path().join("root.ext4");
    resources::rootfs::demo_rootfs(&rootfs)?;
    let root = dir.path().join("state");
    let (root_s, rootfs) = (root.to_string_lossy().into_owned(), rootfs.to_string_lossy().into_owned());
    let create = ["--root", &root_s, "create", "--id", "ghost", "--image", &image, &rootfs, "--", "sleep", "1000"];
    ok(&create)?;
    let owner = runtime_api::Store::new(&root).load("ghost")?.owner_pid;
    // SAFETY: kill sends a signal; it touches no memory of ours.
    ensure!(unsafe { libc::kill(owner as i32, libc::SIGKILL) } == 0, "kill -9 {owner}");
    ensure!(vessel_tests::wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{owner}")).exists()));
    ensure!(ok(&["--root", &root_s, "list"])?.lines().any(|l| l.starts_with("ghost ") && l.contains(" dead ")), "list");
    let err = refused(&["--root", &root_s, "delete", "ghost"])?;
    ensure!(err.contains("is dead") && err.contains("force"), "{err}");
    ok(&["--root", &root_s, "delete", "--force", "ghost"])?;
    ensure!(!root.join("ghost").exists() && !root.join(".scratch").join("ghost").exists(), "traces left");
    let left = vessel_tests::processes_mentioning(&root)?;
    ensure!(left.is_empty(), "processes left: {left:?}");
    ok(&create)?;
    ok(&["--root", &root_s, "delete", "ghost"])?;

    // kill -9 of the owner *during* create (while the guest boots): create
    // fails, delete --force takes what is left, and the ID is free again.
    let creating = Command::new(vessel_bin())
        .args(create)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let owner = || -> Option<i32> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("__own") && cmdline.contains(&root_s)).then(|| e.file_name().to_str()?.parse().ok())?
        })
    };
    let booting =
        vessel_tests::wait_until(Duration::from_secs(30), || root.join("ghost").is_dir() && owner().is_some());
    ensure!(booting, "the owner never started creating");
    let pid = owner().context("the owner's PID")?;
    // SAFETY: kill sends a signal; it touches no memory of ours.
    ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0, "kill -9 {pid}");
    let out = creating.wait_with_output()?;
    ensure!(!out.status.success(), "create succeeded with its owner killed");
    ok(&["--root", &root_s, "delete", "--force", "ghost"])?;
    ensure!(!root.join("ghost").exists(), "delete --force left the half-created sandbox");
    let left = vessel_tests::processes_mentioning(&root)?;
    ensure!(left.is_empty(), "processes left: {left:?}");
    ok(&create)?;
    ok(&["--root", &root_s, "delete", "ghost"])?;
    Ok(())
}

/// Lines of `factory status` for VMs in `state` (their VM PIDs).
fn cached_vm_pids(root: &str, state: &str) -> anyhow::Result<Vec<String>> {
    let status = ok(&["--root", root, "factory", "status"])?;
    Ok(status
        .lines()
        .skip(2)
        .filter(|l| l.split_whitespace().nth(1) == Some(state))
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect())
}

/// `vessel factory`: a cache of two qemu-tcg VMs serves two `run
/// --factory`s (their exit codes ours, their random bytes their own, the
/// host's clock) and refills; a cached VM's QEMU killed by hand is
/// replaced, and `create --factory` gets a live one; `factory destroy`
/// leaves no process, socket or file.
fn the_factory_cache_serves_runs_and_creates_and_destroy_leaves_nothing() -> TestResult {
    let dir = TempDir::new("cli-factory")?;
    let image = built_guest_image(&dir)?;
    let rootfs = dir.path().join("root.ext4");
    resources::rootfs::demo_rootfs(&rootfs)?;
    let root = dir.path().join("state");
    let (root_s, rootfs) = (root.to_string_lossy().into_owned(), rootfs.to_string_lossy().into_owned());
    let at = |args: &[&str]| -> Vec<String> { ["--root", &root_s].iter().chain(args).map(|s| s.to_string()).collect() };
    let run = |args: &[&str]| -> anyhow::Result<Output> {
        let args = at(args);
        vessel(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // A test that fails half-way still ends the cached VMs' owners, which
    // would outlive it (they are detached, as a user's are).
    struct Destroy<'a>(&'a str);
    impl Drop for Destroy<'_> {
        fn drop(&mut self) {
            let _ = vessel(&["--root", self.0, "factory", "destroy"]);
        }
    }
    let _destroy = Destroy(&root_s);
    // qemu-tcg makes no template, and says why.
    let template = run(&["factory", "init", "--template", "/tmp/no-template", "--hypervisor", "qemu-tcg"])?;
    ensure!(!template.status.success(), "a qemu-tcg template was made");
    ensure!(text(&template.stderr).contains("non-migratable device"), "{}", text(&template.stderr));
    let names = ok(&at(&["factory", "init", "--cache", "2", "--hypervisor", "qemu-tcg", "--image", &image])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())?;
    ensure!(names.lines().count() == 2, "init printed {names:?}");
    ensure!(cached_vm_pids(&root_s, "paused")?.len() == 2, "{}", ok(&["--root", &root_s, "factory", "status"])?);
    let again = run(&["factory", "init", "--cache", "1"])?;
    ensure!(text(&again.stderr).contains("exists already"), "{}", text(&again.stderr));
    // Paused, a TCG guest's clock stands still: the refresh must set it.
    std::thread::sleep(Duration::from_secs(3));
    let script = "cat /proc/sys/kernel/random/uuid; date +%s; exit 5";
    let mut seen = Vec::new();
    for _ in 0..2 {
        let args = ["run", "--factory", "--rm", "--hypervisor", "qemu-tcg", "--image", &image, &rootfs, "--"];
        let before = runtime_api::state::now_unix_ms() / 1000;
        let out = run(&[&args[..], &["sh", "-c", script]].concat())?;
        let after = runtime_api::state::now_unix_ms() / 1000;
        ensure!(out.status.code() == Some(5), "run --factory: {:?} {}", out.status, text(&out.stderr));
        let printed = text(&out.stdout);
        let lines: Vec<&str> = printed.lines().collect();
        let [uuid, clock] = lines[..] else { anyhow::bail!("the container printed {printed:?}") };
        // The guest's clock was read while the run went on, give or take
        // a second of rounding; one that stood still reads before.
        let clock: u64 = clock.parse()?;
        ensure!(
            clock + 1 >= before && clock <= after + 1,
            "the guest's clock read {clock}, the host's went from {before} to {after} meanwhile"
        );
        seen.push(uuid.to_string());
    }
    ensure!(seen[0] != seen[1], "two sandboxes from the cache printed one UUID");
    let refilled = vessel_tests::wait_until(Duration::from_secs(180), || {
        cached_vm_pids(&root_s, "paused").is_ok_and(|p| p.len() == 2)
    });
    ensure!(refilled, "the cache did not refill: {}", ok(&["--root", &root_s, "factory", "status"])?);

    // A cached VM killed by hand is replaced, never handed out.
    let victim: i32 = cached_vm_pids(&root_s, "paused")?[0].parse()?;
    // SAFETY: kill sends a signal to the QEMU this test's factory started.
    ensure!(unsafe { libc::kill(victim, libc::SIGKILL) } == 0, "kill -9 {victim}");
    let replaced = vessel_tests::wait_until(Duration::from_secs(180), || {
        cached_vm_pids(&root_s, "paused").is_ok_and(|p| p.len() == 2 && !p.contains(&victim.to_string()))
    });
    ensure!(replaced, "the killed VM was not replaced: {}", ok(&["--root", &root_s, "factory", "status"])?);
    let create = ["create", "--factory", "--id", "fc", "--hypervisor", "qemu-tcg", "--image", &image, &rootfs];
    ok(&at(&[&create[..], &["--", "sleep", "1000"]].concat()).iter().map(String::as_str).collect::<Vec<_>>())?;
    let state = runtime_api::Store::new(&root).load("fc")?;
    ensure!(state.booted_in.is_some() && state.vm_pid != Some(victim as u32), "{state:?}");
    ok(&["--root", &root_s, "start", "fc"])?;
    ensure!(
        ok(&["--root", &root_s, "exec", "fc", "--", "echo", "hi"])?
            == "hi
",
        "exec in a sandbox from the cache"
    );
    ok(&["--root", &root_s, "delete", "--force", "fc"])?;

    // Destroy: nothing is left but the state root.
    ok(&["--root", &root_s, "factory", "destroy"])?;
    ensure!(ok(&["--root", &root_s, "factory", "status"])?.lines().count() == 2, "a VM is still listed");
    let left = vessel_tests::processes_mentioning(&root)?;
    ensure!(left.is_empty(), "processes left: {left:?}");
    ensure!(!root.join(runtime_api::factory::FACTORY_DIR).exists(), "the factory's directory is left");
    ensure!(runtime_api::Store::new(&root).ids()?.is_empty(), "sandboxes left");
    Ok(())
}

/// `network add|list|routes|remove` and `device add` on a detached
/// sandbox: a veth from a test-made namespace reached from the container,
/// and a hot-plugged disk mounted in a container created afterwards,
/// whose write reaches the host file.
fn network_and_device_commands_reach_a_detached_sandbox() -> TestResult {
    let dir = TempDir::new("cli-netdev")?;
    let image = built_guest_image(&dir)?;
    let (sandbox_ns, _peer) = vessel_tests::netns::veth_pair("cli", "10.83.0")?;
    let roots: Vec<String> = ["a", "b"]
        .iter()
        .map(|n| {
            let path = dir.path().join(format!("{n}.ext4"));
            resources::rootfs::demo_rootfs(&path).map(|()| path.to_string_lossy().into_owned())
        })
        .collect::<Result<_, _>>()?;
    let data = dir.path().join("data.img");
    make_ext4(&data)?;
    let root = dir.path().join("state").to_string_lossy().into_owned();
    let run = |args: &[&str]| ok(&[&["--root", root.as_str()][..], args].concat());

    // vessel run --net: the sandbox joins the namespace for its life.
    let netns = format!("/var/run/netns/{}", sandbox_ns.0);
    let ping = ["ping", "-c", "1", "-W", "5", "10.83.0.1"];
    let pinged = run(&[&["run", "--rm", "--net", &netns, "--image", &image, &roots[0], "--"][..], &ping].concat())?;
    ensure!(pinged.contains("1 packets received"), "ping from run --net: {pinged}");

    let hot = dir.path().join("hot.img");
    make_ext4(&hot)?;
    let read_only = dir.path().join("ro.img");
    make_ext4(&read_only)?;
    run(&["create", "--id", "netbox", "--image", &image, &roots[0], "--", "sleep", "1000"])?;
    let outcome = (|| -> TestResult {
        run(&["start", "netbox"])?;
        run(&["network", "add", "netbox", "--netns", &netns, "--interface", "eth0"])?;
        ensure!(run(&["network", "list", "netbox"])?.contains("10.83.0.2/24"), "network list");
        ensure!(run(&["network", "routes", "netbox"])?
            .lines()
            .any(|l| l.starts_with("default") && l.contains("10.83.0.1")));
        ensure!(
            run(&["exec", "netbox", "--", "ping", "-c", "1", "-W", "5", "10.83.0.1"])?.contains("1 packets received")
        );
        run(&["network", "remove", "netbox", "eth0"])?;
        ensure!(!run(&["network", "list", "netbox"])?.contains("10.83.0.2"), "the address outlived the interface");

        // A disk mounted into the container that runs, and seen by exec.
        run(&["device", "add", "netbox", "--block", &hot.to_string_lossy(), "--path", "/mnt/hot"])?;
        run(&["exec", "netbox", "--", "sh", "-c", "echo hot > /mnt/hot/f && sync"])?;
        let ro = read_only.to_string_lossy();
        run(&["device", "add", "netbox", "--block", &ro, "--read-only", "--path", "/mnt/ro", "--container", "netbox"])?;
        let out = vessel(&["--root", &root, "exec", "netbox", "--", "touch", "/mnt/ro/x"])?;
        ensure!(
            !out.status.success() && text(&out.stderr).contains("Read-only file system"),
            "a write to a read-only hot mount: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        let out = vessel(&["--root", &root, "exec", "netbox", "--", "mount", "-o", "remount,rw", "/mnt/ro"])?;
        ensure!(!out.status.success(), "the read-only disk was remounted read-write: {}", text(&out.stdout));
        let err = refused(&["--root", &root, "device", "add", "netbox", "--block", &ro, "--serial", "vol-0"])?;
        ensure!(err.contains(r#"has a disk with serial "vol-0" already"#), "a second vol-0: {err}");

        run(&["device", "add", "netbox", "--block", &data.to_string_lossy(), "--serial", "data-9"])?;
        let script = "echo from the cli > /data/note && sync";
        run(&[
            "container",
            "create",
            "netbox",
            "--id",
            "writer",
            "--disk",
            "data-9:/data",
            &roots[1],
            "--",
            "sh",
            "-c",
            script,
        ])?;
        run(&["container", "start", "netbox", "writer"])?;
        let done = vessel_tests::wait_until(Duration::from_secs(30), || {
            run(&["container", "list", "netbox"])
                .is_ok_and(|l| l.lines().any(|l| l.starts_with("writer ") && l.contains(" stopped ")))
        });
        ensure!(done, "the writer did not finish: {}", run(&["container", "list", "netbox"])?);

        // kill -9 of the owner with an interface in: delete --force takes
        // its TAP out of the namespace too.
        run(&["network", "add", "netbox", "--netns", &netns, "--interface", "eth0"])?;
        ensure!(sandbox_ns.ip(&["link", "show"])?.contains("vessel-tap"), "no TAP beside the veth");
        let owner = runtime_api::Store::new(&root).load("netbox")?.owner_pid;
        // SAFETY: kill sends a signal; it touches no memory of ours.
        ensure!(unsafe { libc::kill(owner as i32, libc::SIGKILL) } == 0, "kill -9 {owner}");
        ensure!(vessel_tests::wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{owner}")).exists()));
        Ok(())
    })();
    run(&["delete", "--force", "netbox"])?;
    outcome?;
    let links = sandbox_ns.ip(&["link", "show"])?;
    ensure!(!links.contains("vessel-tap"), "delete --force left the TAP: {links}");
    ensure!(links.contains("eth0"), "delete --force took the veth: {links}");
    let left = vessel_tests::processes_mentioning(Path::new(&root))?;
    ensure!(left.is_empty(), "processes left: {left:?}");
    let note = Command::new("debugfs").args(["-R", "cat /note"]).arg(&data).output()?;
    ensure!(text(&note.stdout) == "from the cli\n", "the host file holds {:?}", text(&note.stdout));
    ensure!(debugfs_cat(&hot, "/f")? == "hot\n", "the hot-mounted disk does not hold what exec wrote");
    Ok(())
}

/// Tier 4: `vessel run` and a detached sandbox on the builtin hypervisor
/// (vessel's own VMM, in the owner process), where hardware KVM exists.
fn run_and_create_on_builtin() -> TestResult {
    let dir = TempDir::new("cli-builtin")?;
    let image = built_guest_image(&dir)?;
    let tree = dir.path().join("tree");
    resources::rootfs::busybox_tree(&tree)?;
    let root = dir.path().join("state").to_string_lossy().into_owned();
    let tree = tree.to_string_lossy().into_owned();
    let on_builtin = ["--hypervisor", "builtin", "--image", &image];
    let out =
        vessel(&[&["--root", &root, "run", "--rm"][..], &on_builtin, &[&tree, "--", "sh", "-c", "exit 6"]].concat())?;
    ensure!(out.status.code() == Some(6), "run on builtin: {:?} {}", out.status, text(&out.stderr));
    let create =
        [&["--root", &root, "create", "--id", "bi"][..], &on_builtin, &[&tree, "--", "sleep", "1000"]].concat();
    ok(&create)?;
    ok(&["--root", &root, "start", "bi"])?;
    ensure!(ok(&["--root", &root, "exec", "bi", "--", "echo", "in builtin"])? == "in builtin\n", "exec on builtin");
    ensure!(ok(&["--root", &root, "status", "bi"])?.contains("(builtin)"), "status on builtin");
    ok(&["--root", &root, "delete", "bi"])?;
    ensure!(ok(&["--root", &root, "list", "--format", "json"])?.trim() == "[]", "delete left the sandbox");
    Ok(())
}

/// A corrupt, a truncated and a future state file: each is an error that
/// names the file, hides no other sandbox, and loses nothing (the state
/// put back, the sandbox works again); a forced delete of an unreadable
/// one ends its processes. A missing root and a broken OCI layout are
/// refused by name before any sandbox exists.
fn bad_state_files_and_roots_are_named_and_hide_nothing() -> TestResult {
    let dir = TempDir::new("cli-badstate")?;
    let image = built_guest_image(&dir)?;
    let root = dir.path().join("state");
    let root_s = root.to_string_lossy().into_owned();
    let run = |args: &[&str]| ok(&[&["--root", root_s.as_str()][..], args].concat());
    let fail = |args: &[&str]| refused(&[&["--root", root_s.as_str()][..], args].concat());
    for id in ["hurt", "fine"] {
        let rootfs = dir.path().join(format!("{id}.ext4"));
        resources::rootfs::demo_rootfs(&rootfs)?;
        run(&["create", "--id", id, "--image", &image, &rootfs.to_string_lossy(), "--", "sleep", "1000"])?;
        run(&["start", id])?;
    }
    let state_file = root.join("hurt").join("state.json");
    let good = std::fs::read(&state_file)?;
    let future = String::from_utf8(good.clone())?.replacen("\"version\": 1,", "\"version\": 99,", 1);
    ensure!(future.as_bytes() != good, "the state file has no version 1 to change: {}", text(&good));
    for (what, bytes, want) in [
        ("corrupt", b"{ not json at all".to_vec(), "is not valid sandbox state"),
        ("truncated", good[..good.len() / 2].to_vec(), "is not valid sandbox state"),
        ("future", future.into_bytes(), "has format version 99"),
    ] {
        std::fs::write(&state_file, &bytes)?;
        let err = fail(&["status", "hurt"])?;
        ensure!(err.contains(&state_file.to_string_lossy().into_owned()) && err.contains(want), "{what}: {err}");
        let err = fail(&["delete", "hurt"])?;
        ensure!(err.contains(want), "{what}: delete without --force: {err}");
        let listed = run(&["list"])?;
        ensure!(
            listed.lines().any(|l| l.starts_with("hurt ") && l.contains("unreadable") && l.contains(want))
                && listed.lines().any(|l| l.starts_with("fine ") && l.contains(" running ")),
            "{what}: list: {listed}"
        );
        ensure!(run(&["exec", "fine", "--", "echo", "unhurt"])? == "unhurt\n", "{what}: the other sandbox");
        std::fs::write(&state_file, &good)?;
        ensure!(run(&["exec", "hurt", "--", "echo", "back"])? == "back\n", "{what}: the state put back");
    }
    std::fs::write(&state_file, b"garbage")?;
    // An admin's tail on its console log is not the sandbox's to end.
    let mut tail = Command::new("tail").arg("-f").arg(root.join("hurt").join("console.log")).spawn()?;
    run(&["delete", "--force", "hurt"])?;
    ensure!(tail.try_wait()?.is_none(), "delete --force killed an admin's tail of the console log");
    tail.kill()?;
    tail.wait()?;
    ensure!(!root.join("hurt").exists(), "delete --force left the unreadable sandbox");
    let hurt_dir = format!("{}/", root.join("hurt").display());
    let gone = vessel_tests::wait_until(Duration::from_secs(10), || {
        vessel_tests::processes_mentioning(Path::new(&hurt_dir)).is_ok_and(|p| p.is_empty())
    });
    ensure!(
        gone,
        "processes of the unreadable sandbox: {:?}",
        vessel_tests::processes_mentioning(Path::new(&hurt_dir))
    );
    run(&["delete", "fine"])?;

    let missing = dir.path().join("no-such-root");
    let err = fail(&["run", "--rm", "--image", &image, &missing.to_string_lossy(), "--", "true"])?;
    ensure!(err.contains("no-such-root"), "a missing root: {err}");
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs"))?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion": "1.0.0"}"#)?;
    std::fs::write(layout.join("index.json"), b"{ broken")?;
    let err = fail(&["run", "--rm", "--image", &image, &layout.to_string_lossy(), "--", "true"])?;
    ensure!(err.contains("index.json") || err.contains("OCI layout"), "a broken OCI layout: {err}");
    ensure!(run(&["list", "--format", "json"])?.trim() == "[]", "a refused run left a sandbox");
    let processes = vessel_tests::processes_mentioning(&root)?;
    ensure!(processes.is_empty(), "processes left: {processes:?}");
    Ok(())
}

/// virtio-fs (tier 3): a directory root and volumes shared live, each way;
/// a read-only volume stays read-only whatever the container does; path
/// escapes refused; a container added later on a directory root; nothing
/// left after delete (daemon, mounts, sockets).
fn directories_are_shared_live_into_containers() -> TestResult {
    let dir = TempDir::new("cli-virtiofs")?;
    let image = built_guest_image(&dir)?;
    let tree = dir.path().join("tree");
    resources::rootfs::busybox_tree(&tree)?;
    let (vol, ro) = (dir.path().join("vol"), dir.path().join("ro"));
    std::fs::create_dir_all(&vol)?;
    std::fs::create_dir_all(&ro)?;
    std::fs::write(ro.join("fixed"), "read only\n")?;
    let root = dir.path().join("state");
    let root_s = root.to_string_lossy().into_owned();
    let run = |args: &[&str]| ok(&[&["--root", root_s.as_str()][..], args].concat());
    let fail = |args: &[&str]| refused(&[&["--root", root_s.as_str()][..], args].concat());
    let (tree_s, vol_v, ro_v) =
        (tree.to_string_lossy().into_owned(), format!("{}:/vol", vol.display()), format!("{}:/ro:ro", ro.display()));

    // A foreground run: the root's and the volumes' writes land on the host.
    let script = "echo made in the guest > /made && cat /ro/fixed && echo to the host > /vol/out && \
                  if touch /ro/x 2>/dev/null; then echo WROTE-RO; fi; \
                  if mount -o remount,rw /ro 2>/dev/null; then echo REMOUNTED; touch /ro/y; fi; true";
    let said = run(&["run", "--rm", "-v", &vol_v, "-v", &ro_v, "--image", &image, &tree_s, "--", "sh", "-c", script])?;
    ensure!(said == "read only\n", "the run said {said:?}");
    ensure!(
        std::fs::read_to_string(tree.join("made"))? == "made in the guest\n",
        "the root's write is not on the host"
    );
    ensure!(std::fs::read_to_string(vol.join("out"))? == "to the host\n", "the volume's write is not on the host");
    ensure!(!ro.join("x").exists() && !ro.join("y").exists(), "the read-only volume was written");

    // Escapes are refused before anything runs.
    std::os::unix::fs::symlink(&vol, dir.path().join("link"))?;
    for (bad, why) in [
        (format!("{}:/vol", dir.path().join("link").display()), "symlink"),
        (format!("{}/../vol:/vol", vol.display()), "'..'"),
        (format!("{}:/vol/../../etc", vol.display()), "'..'"),
    ] {
        let err = fail(&["run", "--rm", "-v", &bad, "--image", &image, &tree_s, "--", "true"])?;
        ensure!(err.contains(why), "{bad}: {err}");
    }

    // Detached: a host write is seen in the container, at once.
    run(&["create", "--id", "fs", "-v", &vol_v, "--image", &image, &tree_s, "--", "sleep", "1000"])?;
    let outcome = (|| -> TestResult {
        run(&["start", "fs"])?;
        std::fs::write(vol.join("late"), "written on the host\n")?;
        ensure!(run(&["exec", "fs", "--", "cat", "/vol/late"])? == "written on the host\n", "a new host file");
        std::fs::write(vol.join("late"), "changed on the host\n")?;
        ensure!(run(&["exec", "fs", "--", "cat", "/vol/late"])? == "changed on the host\n", "a changed host file");
        // A second container, on a directory root, added later.
        let second = dir.path().join("second");
        resources::rootfs::busybox_tree(&second)?;
        let script = "echo second > /made-too";
        run(&["container", "create", "fs", "--id", "two", &second.to_string_lossy(), "--", "sh", "-c", script])?;
        run(&["container", "start", "fs", "two"])?;
        let done = vessel_tests::wait_until(Duration::from_secs(30), || second.join("made-too").exists());
        ensure!(done, "the second container's write is not on the host");
        Ok(())
    })();
    run(&["delete", "--force", "fs"])?;
    outcome?;
    let left = runtime_api::shared_fs::mounts_under(&root);
    ensure!(left.is_empty(), "mounts left: {left:?}");
    let processes = vessel_tests::processes_mentioning(&root)?;
    ensure!(processes.is_empty(), "processes left: {processes:?}");
    ensure!(run(&["list", "--format", "json"])?.trim() == "[]", "delete left the sandbox");
    ensure!(vol.join("late").exists() && tree.join("bin/busybox").exists(), "delete removed the shared directories");
    Ok(())
}

/// Why directories cannot be shared here, if they cannot: the shared
/// directory is bind mounts (root), served by virtiofsd.
fn virtiofs_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("sharing directories needs root (the shared directory is bind mounts)".into());
    }
    runtime_api::shared_fs::find_virtiofsd().err().map(|e| e.to_string())
}

/// The number of open fds of process `pid`.
fn fd_count(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Ten `vessel run`s at once, each its own process and sandbox: all
/// succeed with their own output, and nothing is left (processes, state,
/// sockets, scratch). Then execs and stats on one detached sandbox while
/// another is deleted: all succeed, and the owner's fds return to their
/// count. Last, while one sandbox's lock is held (a mutation under way),
/// commands on another do not wait, and one on the locked sandbox does
/// until the lock is let go.
fn many_sandboxes_at_once_through_the_cli() -> TestResult {
    let dir = TempDir::new("cli-many")?;
    let image = built_guest_image(&dir)?;
    let tree = dir.path().join("tree");
    resources::rootfs::busybox_tree(&tree)?;
    let root = dir.path().join("state");
    let (root_s, tree) = (root.to_string_lossy().into_owned(), tree.to_string_lossy().into_owned());
    let runs: Vec<_> = (0..10)
        .map(|n| {
            let script = format!("echo run {n} on $(hostname)");
            Command::new(vessel_bin())
                .args(["--root", &root_s, "run", "--rm", "--id", &format!("many-{n}"), "--image", &image, &tree])
                .args(["--", "sh", "-c", &script])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for (n, child) in runs.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "run {n}: {:?} {}", out.status, text(&out.stderr));
        ensure!(text(&out.stdout) == format!("run {n} on vessel\n"), "run {n} printed {:?}", text(&out.stdout));
    }
    ensure!(ok(&["--root", &root_s, "list", "--format", "json"])?.trim() == "[]", "the runs left sandboxes");
    let left: Vec<_> = std::fs::read_dir(&root)?.flatten().map(|e| e.file_name()).collect();
    ensure!(left.iter().all(|n| n == ".scratch"), "left in the state root: {left:?}");
    ensure!(std::fs::read_dir(root.join(".scratch"))?.next().is_none(), "scratch left behind");
    let processes = vessel_tests::processes_mentioning(&root)?;
    ensure!(processes.is_empty(), "processes left: {processes:?}");

    // Work on one sandbox while another is deleted.
    let rootfs = |name: &str| -> anyhow::Result<String> {
        let path = dir.path().join(format!("{name}.ext4"));
        resources::rootfs::demo_rootfs(&path)?;
        Ok(path.to_string_lossy().into_owned())
    };
    let (busy_root, doomed_root, locked_root) = (rootfs("busy")?, rootfs("doomed")?, rootfs("locked")?);
    for (id, rootfs) in [("busy", &busy_root), ("doomed", &doomed_root), ("locked", &locked_root)] {
        ok(&["--root", &root_s, "create", "--id", id, "--image", &image, rootfs, "--", "sleep", "1000"])?;
        ok(&["--root", &root_s, "start", id])?;
    }
    let owner = runtime_api::Store::new(&root).load("busy")?.owner_pid;
    let fds_before = fd_count(owner)?;
    std::thread::scope(|scope| -> TestResult {
        let delete = scope.spawn(|| ok(&["--root", &root_s, "delete", "doomed"]));
        let workers: Vec<_> = (0..4)
            .map(|n| {
                let root_s = &root_s;
                scope.spawn(move || -> TestResult {
                    let said = ok(&["--root", root_s, "exec", "busy", "--", "echo", &format!("exec {n}")])?;
                    ensure!(said == format!("exec {n}\n"), "exec {n} said {said:?}");
                    ensure!(ok(&["--root", root_s, "stats", "busy"])?.contains("busy "), "stats {n}");
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        delete.join().map_err(|_| anyhow::anyhow!("the delete panicked"))??;
        Ok(())
    })?;
    ensure!(!root.join("doomed").exists(), "the deleted sandbox is still there");
    let settled = vessel_tests::wait_until(Duration::from_secs(10), || fd_count(owner).is_ok_and(|n| n == fds_before));
    ensure!(settled, "the owner had {fds_before} fds before the execs and {} after", fd_count(owner)?);

    // A mutation holds a sandbox's lock: others do not wait for it.
    let lock = std::fs::File::open(root.join("locked").join("lock"))?;
    // SAFETY: flock on an fd we own.
    ensure!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } == 0, "flock");
    let mut waiting = Command::new(vessel_bin())
        .args(["--root", &root_s, "exec", "locked", "--", "echo", "after the lock"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let said = ok(&["--root", &root_s, "exec", "busy", "--", "echo", "not waiting"])?;
    ensure!(said == "not waiting\n", "exec on another sandbox: {said:?}");
    ensure!(waiting.try_wait()?.is_none(), "a command on a locked sandbox did not wait for the lock");
    drop(lock);
    let out = waiting.wait_with_output()?;
    ensure!(out.status.success() && text(&out.stdout) == "after the lock\n", "after the lock: {out:?}");
    for id in ["busy", "locked"] {
        ok(&["--root", &root_s, "delete", id])?;
    }
    let processes = vessel_tests::processes_mentioning(&root)?;
    ensure!(processes.is_empty(), "processes left: {processes:?}");
    Ok(())
}

/// `vessel device serve`: the socket is 0600 whatever the umask, the
/// threads that serve the guest's queues run under a seccomp filter, and
/// SIGTERM removes the socket and ends the process cleanly.
fn device_serve_confines_its_threads_and_removes_its_socket_on_sigterm() -> TestResult {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("cli-serve")?;
    let socket = dir.path().join("rng.sock");
    let mut command = Command::new(vessel_bin());
    command.args(["device", "serve", "rng", "--socket"]).arg(&socket);
    let widest_umask = || {
        // SAFETY: umask(2) is async-signal-safe and has no preconditions.
        unsafe { libc::umask(0) };
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and makes only an
    // async-signal-safe call.
    unsafe { command.pre_exec(widest_umask) };
    let mut child = command.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        ensure!(std::time::Instant::now() < deadline, "no socket at {}", socket.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = std::fs::symlink_metadata(&socket)?.mode() & 0o777;
    // The serving threads are up once the socket is (it is made before them).
    std::thread::sleep(Duration::from_millis(200));
    // (name, filtered) of every thread but the main one, which waits for
    // SIGTERM unfiltered.
    let mut filtered = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id()))? {
        let dir = task?.path();
        if dir.file_name().is_some_and(|tid| *tid == *child.id().to_string()) {
            continue;
        }
        let comm = std::fs::read_to_string(dir.join("comm"))?.trim_end().to_string();
        let status = std::fs::read_to_string(dir.join("status"))?;
        filtered.push((comm, status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))));
    }
    // SAFETY: kill sends a signal; it touches no memory of ours.
    ensure!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) } == 0);
    let status = child.wait()?;
    ensure!(mode == 0o600, "socket mode {mode:o} under umask 0");
    ensure!(filtered.len() >= 2 && filtered.iter().all(|(_, f)| *f), "threads (name, filtered): {filtered:?}");
    ensure!(status.success(), "after SIGTERM: {status:?}");
    ensure!(!socket.exists(), "the socket is still there after SIGTERM");
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = vec![
        trial("bad_arguments_are_usage_errors", bad_arguments_are_usage_errors),
        trial(
            "device_serve_confines_its_threads_and_removes_its_socket_on_sigterm",
            device_serve_confines_its_threads_and_removes_its_socket_on_sigterm,
        ),
        trial("missing_kernel_is_a_clear_error", missing_kernel_is_a_clear_error),
        trial("guests_are_written_out", guests_are_written_out),
        trial("image_build_refuses_a_bad_or_missing_agent", image_build_refuses_a_bad_or_missing_agent),
    ];
    // Listing the tests must not fetch a kernel.
    trials.extend(gate(
        if args.list { None } else { image_build_unavailable() },
        vec![trial("image_build_writes_the_boot_files", image_build_writes_the_boot_files)],
    ));
    trials.extend(gate(
        if args.list { None } else { sandbox_unavailable() },
        vec![
            trial("sandbox_run_is_the_containers_output_and_status", sandbox_run_is_the_containers_output_and_status),
            trial(
                "run_is_create_start_wait_delete_in_the_foreground",
                run_is_create_start_wait_delete_in_the_foreground,
            ),
            trial("detached_sandboxes_are_driven_command_by_command", detached_sandboxes_are_driven_command_by_command),
            trial(
                "a_killed_owner_leaves_a_dead_sandbox_that_delete_force_removes",
                a_killed_owner_leaves_a_dead_sandbox_that_delete_force_removes,
            ),
            trial("many_sandboxes_at_once_through_the_cli", many_sandboxes_at_once_through_the_cli),
            trial(
                "the_factory_cache_serves_runs_and_creates_and_destroy_leaves_nothing",
                the_factory_cache_serves_runs_and_creates_and_destroy_leaves_nothing,
            ),
            trial(
                "bad_state_files_and_roots_are_named_and_hide_nothing",
                bad_state_files_and_roots_are_named_and_hide_nothing,
            ),
        ],
    ));
    trials.extend(gate(
        if args.list { None } else { sandbox_unavailable().or_else(virtiofs_unavailable) },
        [trial("directories_are_shared_live_into_containers", directories_are_shared_live_into_containers)],
    ));
    trials.extend(gate(
        if args.list { None } else { sandbox_unavailable().or_else(vessel_tests::netns::unavailable) },
        [trial(
            "network_and_device_commands_reach_a_detached_sandbox",
            network_and_device_commands_reach_a_detached_sandbox,
        )],
    ));
    let tier4 = if args.list { None } else { runtime_api::hypervisor::hardware_virtualization_unusable() };
    trials.extend(gate(
        tier4
            .map(|why| format!("Linux on the builtin hypervisor needs hardware virtualization: {why}"))
            .or_else(|| if args.list { None } else { sandbox_unavailable() }),
        [trial("run_and_create_on_builtin", run_and_create_on_builtin)],
    ));
    trials.extend(gate(
        kvm_unavailable(),
        vec![
            trial("boot_prints_the_console_and_exits_with_the_guest", boot_prints_the_console_and_exits_with_the_guest),
            trial("boot_with_console_file_initrd_and_stats", boot_with_console_file_initrd_and_stats),
            trial(
                "vm_boot_snapshots_and_vm_restore_finishes_the_guest",
                vm_boot_snapshots_and_vm_restore_finishes_the_guest,
            ),
        ],
    ));
    trials.extend(gate(
        e2fsprogs_unavailable(),
        vec![
            trial("image_rootfs_packs_a_directory", image_rootfs_packs_a_directory),
            trial("image_rootfs_from_an_oci_layout", image_rootfs_from_an_oci_layout),
        ],
    ));
    trials.extend(gate(
        root_tools_unavailable(),
        [trial("missing_dev_kvm_is_a_clear_error", missing_dev_kvm_is_a_clear_error)],
    ));
    trials.extend(gate(
        kvm_denial_unavailable(),
        [trial("inaccessible_dev_kvm_is_a_clear_error", inaccessible_dev_kvm_is_a_clear_error)],
    ));
    libtest_mimic::run(&args, trials).exit();
}
