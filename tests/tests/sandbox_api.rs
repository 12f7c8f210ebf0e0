//! The sandbox API (runtime-api) through the library, as an embedder
//! calls it.
//!
//! - With the qemu-tcg hypervisor (tier 3): the distribution kernel, the
//!   agent as PID 1 and busybox containers; every container operation,
//!   status noticing an exit, and create's rollback at each step a real
//!   guest can fail at.
//! - With the builtin hypervisor (tier 2): a tiny guest through the
//!   `Hypervisor` trait: start, pause, resume, figures, hotplug, stop.
//! - A sandbox of real Linux on the builtin hypervisor (tier 4): runs
//!   where hardware virtualization is usable, skipped by name elsewhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use libtest_mimic::Arguments;
use runtime_api::hypervisor::{builtin::Builtin, Disk, Hypervisor, VmSpec};
use runtime_api::sandbox::{CreateStep, STREAM_TIMEOUT};
use runtime_api::{
    ContainerConfig, ContainerPhase, DiskConfig, DiskMount, HypervisorKind, Limit, NetworkConfig, ProcessConfig,
    Resources, Sandbox, SandboxConfig, SandboxError, SandboxPhase, Store,
};
use vessel_tests::harness::{e2fsprogs_unavailable, gate, missing_tool, trial, workspace_binary};
use vessel_tests::netns::veth_pair;
use vessel_tests::tier3::{qemu_tcg_unavailable, test_kernel};
use vessel_tests::{kvm_unavailable, processes_mentioning, TempDir};

/// A guest image (kernel and initramfs with the agent) and busybox root
/// images, in `dir`.
fn guest_image(dir: &Path) -> anyhow::Result<PathBuf> {
    let kernel = test_kernel()?;
    let image = dir.join("guest");
    std::fs::create_dir_all(&image)?;
    std::fs::copy(&kernel.image, image.join(resources::guest_image::KERNEL_FILE)).context("copying the kernel")?;
    let agent = resources::guest_image::read_agent(&workspace_binary("vessel-agent"))?;
    let modules = resources::guest_image::agent_modules(&kernel)?;
    resources::guest_image::build_agent_initramfs(agent, &modules)?
        .write_atomic(&image.join(resources::guest_image::INITRD_FILE))?;
    Ok(image)
}

/// A guest image at `dir` with `image`'s kernel and `initrd`.
fn image_with_initrd(image: &Path, dir: &Path, initrd: &[u8]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(image.join(resources::guest_image::KERNEL_FILE), dir.join(resources::guest_image::KERNEL_FILE))?;
    std::fs::write(dir.join(resources::guest_image::INITRD_FILE), initrd)?;
    Ok(dir.to_path_buf())
}

/// A fresh busybox ext4 root at `dir/name`.
fn busybox_root(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let tree = dir.join(format!("{name}-tree"));
    resources::rootfs::busybox_tree(&tree)?;
    let image = dir.join(format!("{name}.ext4"));
    resources::rootfs::build_ext4(&tree, &image, Some(32 << 20))?;
    Ok(image)
}

fn config(id: &str, image: &Path, kind: HypervisorKind) -> SandboxConfig {
    let mut config = SandboxConfig::new(id, image);
    config.hypervisor = Some(kind);
    config.boot_timeout_s = 240;
    config
}

/// An error and its causes, as one line.
fn chain(err: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::from(err))
}

/// Everything a process writes to its stdout, collected in a thread.
type Output = std::thread::JoinHandle<Result<Vec<u8>, runtime_api::agent::AgentError>>;

fn text(output: Output) -> anyhow::Result<String> {
    let bytes = output.join().map_err(|_| anyhow!("the collector panicked"))??;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Every container operation on two containers in one sandbox.
fn containers_in_one_sandbox(kind: HypervisorKind) -> anyhow::Result<()> {
    let dir = TempDir::new("api-sandbox")?;
    let image = guest_image(dir.path())?;
    let store = Store::new(dir.path().join("state"));
    let mut config = config("api", &image, kind);
    let web = ContainerConfig::new("web", busybox_root(dir.path(), "web")?, &["sh", "-c", "echo up; exec sleep 1000"]);
    let mut job = ContainerConfig::new("job", busybox_root(dir.path(), "job")?, &["sh", "-c", "hostname; exit 3"]);
    job.hostname = Some("jobhost".into());
    config.containers = vec![web, job];
    config.hotplug_slots = 3;

    let late = busybox_root(dir.path(), "late")?;
    let hog = busybox_root(dir.path(), "hog")?;
    // A journal-less ext4, so that what the guest synced is in the image
    // for debugfs to read without a journal replay.
    let data = dir.write("data.img", &[])?;
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal"])
        .arg(&data)
        .arg("4M")
        .output()?;
    ensure!(made.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&made.stderr));
    let mut sandbox = Sandbox::create(&store, config, None)?;
    let outcome = drive(&mut sandbox, &store, [&late, &hog], &data);
    if outcome.is_err() {
        eprintln!("guest console:\n{}", sandbox.console_tail(30));
    }
    outcome?;
    ensure!(!store.root().join("api").exists(), "cleanup of the last container left the sandbox's directory");
    ensure!(Sandbox::list(&store)?.is_empty(), "the sandbox is still listed");
    Ok(())
}

fn drive(sandbox: &mut Sandbox, store: &Store, roots: [&Path; 2], data: &Path) -> anyhow::Result<()> {
    let [late_root, hog_root] = roots;
    let status = sandbox.status()?;
    ensure!(status.phase == SandboxPhase::Ready, "{status:?}");
    ensure!(status.containers.iter().all(|c| c.phase == ContainerPhase::Ready), "{status:?}");
    let listed = Sandbox::list(store)?;
    ensure!(listed.len() == 1 && listed[0].owner_alive && listed[0].status.id == "api", "{listed:?}");

    // QEMU runs the guest under its own seccomp filter (-sandbox).
    let qemu = sandbox.state().vm_pid.context("no QEMU PID in the state")?;
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status"))?;
    ensure!(status.lines().any(|l| l.split_whitespace().eq(["Seccomp:", "2"])), "QEMU is not confined:\n{status}");
    for set in ["CapPrm:", "CapEff:", "CapBnd:"] {
        let line = status.lines().find(|l| l.starts_with(set)).unwrap_or_default();
        ensure!(line.ends_with("0000000000000000"), "QEMU keeps capabilities: {line}");
    }

    let web_out = sandbox.take_io("web")?.stdout.collect(STREAM_TIMEOUT);
    let job_out = sandbox.take_io("job")?.stdout.collect(STREAM_TIMEOUT);
    sandbox.start()?;
    ensure!(sandbox.wait_process("job", "", Some(Duration::from_secs(60)))? == 3, "job's exit status");
    ensure!(text(job_out)? == "jobhost\n", "job's output");

    // Status has noticed job's exit.
    let job = sandbox.container_status("job")?;
    ensure!(job.phase == ContainerPhase::Stopped && job.exit_code == Some(3), "{job:?}");
    let web = sandbox.container_status("web")?;
    ensure!(web.phase == ContainerPhase::Running && web.started_unix_ms.is_some(), "{web:?}");

    // A second handle, rebuilt from the state: it sees the same sandbox,
    // execs in it, and pauses and resumes QEMU through QMP.
    let mut fetched = Sandbox::fetch(store, "api")?;
    ensure!(fetched.container_status("web")?.phase == ContainerPhase::Running, "the fetched handle sees web stopped");
    let (status, out) = exec(&mut fetched, "web", "echo via the fetched handle")?;
    ensure!(status == 0 && out == "via the fetched handle\n", "exec through a fetched handle: {status} {out:?}");
    fetched.pause()?;
    ensure!(sandbox.status()?.phase == SandboxPhase::Paused, "the owner does not see the pause");
    fetched.resume()?;
    drop(fetched);
    ensure!(sandbox.status()?.phase == SandboxPhase::Running, "dropping the fetched handle changed the sandbox");

    // exec, with its own output and status.
    let (exec_id, io) = sandbox.enter_container("web", &ProcessConfig::new(&["sh", "-c", "echo in-web; exit 5"]))?;
    let exec_out = io.stdout.collect(STREAM_TIMEOUT);
    ensure!(sandbox.wait_process("web", &exec_id, Some(Duration::from_secs(60)))? == 5, "exec's status");
    ensure!(text(exec_out)? == "in-web\n", "exec's output");
    // exec with a terminal, resized while it runs.
    let mut tty = ProcessConfig::new(&["sh", "-c", "sleep 3; stty size"]);
    tty.terminal = true;
    let (tty_id, io) = sandbox.enter_container("web", &tty)?;
    ensure!(io.stderr.is_none(), "a terminal has one output stream");
    let tty_out = io.stdout.collect(STREAM_TIMEOUT);
    sandbox.resize_terminal("web", &tty_id, 33, 101)?;
    ensure!(sandbox.wait_process("web", &tty_id, Some(Duration::from_secs(60)))? == 0, "stty failed");
    let size = text(tty_out)?;
    ensure!(size.trim() == "33 101", "the terminal's size in the container: {size:?}");
    let err = sandbox.resize_terminal("web", "", 10, 10).unwrap_err();
    ensure!(chain(err).contains("no terminal"), "a process without a terminal was resized");
    let ps = sandbox.process_list("web")?;
    ensure!(ps.iter().any(|p| p.command.contains("sleep 1000")), "ps: {ps:?}");

    // An update, read back.
    let limits = Resources {
        pids: Some(Limit::Value(16)),
        memory_bytes: Some(Limit::Value(64 << 20)),
        cpu_weight: Some(200),
        ..Default::default()
    };
    sandbox.update_container("web", limits)?;
    let stats = sandbox.container_stats("web")?;
    let l = &stats.limits;
    ensure!(l.pids_limit == 16 && l.memory_limit == 64 << 20 && l.cpu_weight == 200, "limits: {l:?}");
    // Lifted back to unlimited.
    sandbox.update_container("web", Resources { pids: Some(Limit::Max), ..Default::default() })?;
    let l = sandbox.container_stats("web")?.limits.into_option().context("no limits in the stats")?;
    ensure!(l.pids_unlimited && l.memory_limit == 64 << 20, "after lifting pids: {l:?}");
    let kept = &sandbox.state().container("web").context("web's record")?.config.resources;
    ensure!(
        kept.pids == Some(Limit::Max) && kept.cpu_weight == Some(200),
        "the state does not hold the update: {kept:?}"
    );
    let all = sandbox.stats()?;
    ensure!(all.vm.uptime > Duration::ZERO && all.vm.memory_bytes == 256 << 20, "{:?}", all.vm);
    ensure!(all.containers.iter().map(|(id, _)| id.as_str()).eq(["web"]), "{:?}", all.containers);

    // Pause and resume: the container, then the whole VM.
    sandbox.pause_container("web")?;
    ensure!(sandbox.container_status("web")?.phase == ContainerPhase::Paused, "not paused");
    sandbox.resume_container("web")?;
    sandbox.pause()?;
    ensure!(sandbox.status()?.phase == SandboxPhase::Paused, "sandbox not paused");
    sandbox.resume()?;
    ensure!(sandbox.process_list("web")?.iter().any(|p| p.command.contains("sleep")), "web gone after resume");

    // Bad requests are refused by name.
    let err = sandbox.delete_container("web").unwrap_err();
    ensure!(err.to_string() == r#"container "web" is running; delete needs it stopped"#, "{err}");
    let err = sandbox.container_status("nope").unwrap_err();
    ensure!(err.to_string() == r#"sandbox "api" has no container with ID "nope""#, "{err}");
    let err = sandbox.start_container("job").unwrap_err();
    ensure!(matches!(err, SandboxError::ContainerState { .. }), "{err}");

    // kill: SIGKILL reaches a PID-namespace init from outside.
    sandbox.kill_container("web", libc::SIGKILL as u32, false)?;
    ensure!(sandbox.wait_process("web", "", Some(Duration::from_secs(60)))? == 128 + libc::SIGKILL, "web's status");
    ensure!(text(web_out)? == "up\n", "web's output");

    // Hotplug: a container created in the running sandbox (its root disk
    // hot-plugged), and a data disk the guest then sees with its serial.
    // The data disk is mounted in the container, which writes to it.
    let script = "for d in /sys/block/vd*; do echo $(cat $d/serial) $(cat $d/size); done; \
                  echo written in the guest > /data/note && sync";
    let mut late = ContainerConfig::new("late", late_root, &["sh", "-c", script]);
    late.disks.push(DiskMount {
        serial: "data-1".into(),
        destination: "/data".into(),
        fstype: "ext4".into(),
        read_only: false,
    });
    let data_disk = DiskConfig { path: data.to_path_buf(), serial: "data-1".into(), read_only: false };
    sandbox.add_disk(&data_disk)?;
    let err = sandbox.add_disk(&data_disk).unwrap_err();
    ensure!(err.to_string() == r#"sandbox "api" has a disk with serial "data-1" already"#, "{err}");
    let err = sandbox.add_disk(&DiskConfig { serial: "ctr-9".into(), ..data_disk.clone() }).unwrap_err();
    ensure!(err.to_string().contains("vessel's own"), "{err}");
    sandbox.create_container(late)?;
    let late_out = sandbox.take_io("late")?.stdout.collect(STREAM_TIMEOUT);
    sandbox.start_container("late")?;
    ensure!(sandbox.wait_process("late", "", Some(Duration::from_secs(60)))? == 0, "the late container failed");
    let listing = text(late_out)?;
    ensure!(listing.lines().any(|l| l == "data-1 8192"), "the hot-plugged data disk is not in the guest: {listing}");
    // Every disk is recorded: the boot roots, then the hot-plugged ones.
    let devices = &sandbox.state().devices;
    let serials: Vec<&str> = devices.iter().map(|d| d.serial.as_str()).collect();
    ensure!(serials == ["ctr-0", "ctr-1", "data-1", "ctr-2"], "devices not recorded: {devices:?}");
    ensure!(!sandbox.cleanup_container("late", false)?, "the sandbox went with a container");

    // An OOM kill is reported with the container's ID.
    let mut hog = ContainerConfig::new("hog", hog_root, &["dd", "if=/dev/zero", "of=/dev/null", "bs=48M", "count=1"]);
    hog.resources.memory_bytes = Some(Limit::Value(16 << 20));
    sandbox.create_container(hog)?;
    sandbox.start_container("hog")?;
    let killed = sandbox.oom_event(Duration::from_secs(60))?;
    ensure!(killed.as_deref() == Some("hog"), "OOM event: {killed:?}");
    ensure!(sandbox.wait_process("hog", "", Some(Duration::from_secs(60)))? == 137, "the hog was not killed");
    ensure!(sandbox.oom_event(Duration::from_millis(300))?.is_none(), "one OOM kill reported twice");
    ensure!(!sandbox.cleanup_container("hog", false)?, "the sandbox went with a container");
    let note = std::process::Command::new("debugfs").args(["-R", "cat /note"]).arg(data).output()?;
    let note = String::from_utf8_lossy(&note.stdout);
    ensure!(note == "written in the guest\n", "the host file does not hold what the container wrote: {note:?}");

    ensure!(!sandbox.cleanup_container("job", false)?, "the sandbox went with its first container");
    ensure!(sandbox.cleanup_container("web", false)?, "the sandbox stayed after its last container");
    ensure!(sandbox.state().phase == SandboxPhase::Stopped, "{:?}", sandbox.state().phase);
    Ok(())
}

fn containers_on_qemu_tcg() -> anyhow::Result<()> {
    containers_in_one_sandbox(HypervisorKind::QemuTcg)
}

fn containers_on_builtin() -> anyhow::Result<()> {
    containers_in_one_sandbox(HypervisorKind::Builtin)
}

/// Create fails at each step a real guest can fail at; each failure names
/// its step and leaves nothing behind (no directory, no VM).
fn create_rolls_back_at_each_step() -> anyhow::Result<()> {
    let dir = TempDir::new("api-rollback")?;
    let image = guest_image(dir.path())?;
    let store = Store::new(dir.path().join("state"));
    let nothing_left = |what: &str| -> anyhow::Result<()> {
        ensure!(store.ids()?.is_empty(), "{what}: left {:?}", store.ids()?);
        let qemus = processes_mentioning(store.root())?;
        ensure!(qemus.is_empty(), "{what}: left processes {qemus:?}");
        Ok(())
    };
    let step_of = |e: &SandboxError| match e {
        SandboxError::Create { step, .. } => Some(*step),
        _ => None,
    };

    // Bad input, refused before anything is made.
    let err = Sandbox::create(&store, config("no-image", dir.path(), HypervisorKind::QemuTcg), None).unwrap_err();
    ensure!(err.to_string().contains("vessel image build"), "{err}");
    let mut twice = config("twice", &image, HypervisorKind::QemuTcg);
    let root = busybox_root(dir.path(), "root")?;
    twice.containers = vec![ContainerConfig::new("a", &root, &["true"]), ContainerConfig::new("a", &root, &["true"])];
    let err = Sandbox::create(&store, twice, None).unwrap_err();
    ensure!(err.to_string() == r#"sandbox "twice" has a container with ID "a" already"#, "{err}");
    let err = Sandbox::create(&store, config("../x", &image, HypervisorKind::QemuTcg), None).unwrap_err();
    ensure!(err.to_string().contains("invalid ID"), "{err}");
    // A directory that holds no template is named, with the record missing.
    let err = runtime_api::Factory::template(dir.path()).unwrap_err();
    ensure!(err.to_string().contains("template.json"), "{err}");
    nothing_left("bad input")?;

    // The VM step: a root disk that does not exist.
    let mut missing = config("vm-step", &image, HypervisorKind::QemuTcg);
    missing.containers = vec![ContainerConfig::new("a", dir.path().join("absent.ext4"), &["true"])];
    let err = Sandbox::create(&store, missing, None).unwrap_err();
    ensure!(step_of(&err) == Some(CreateStep::Vm), "{err:#}");
    nothing_left("vm step")?;

    // The agent step: an initramfs the kernel cannot use, so no agent
    // ever announces itself and the guest dies.
    let broken = image_with_initrd(&image, &dir.path().join("broken"), b"not an initramfs")?;
    let mut silent = config("agent-step", &broken, HypervisorKind::QemuTcg);
    silent.boot_timeout_s = 120;
    let err = Sandbox::create(&store, silent, None).unwrap_err();
    ensure!(step_of(&err) == Some(CreateStep::Agent), "{err:#}");
    nothing_left("agent step")?;

    // A guest that boots but never answers (a busybox init that only
    // sleeps): the agent step times out, naming what it waited for.
    let busybox = resources::test_image::find_busybox()?;
    let sleeper = resources::test_image::build_test_image(&busybox, &test_kernel()?, &[], "sleep 600\n", &[])?;
    let mute = image_with_initrd(&image, &dir.path().join("mute"), &sleeper.to_bytes())?;
    let mut mute_config = config("mute", &mute, HypervisorKind::QemuTcg);
    mute_config.boot_timeout_s = 15;
    let err = Sandbox::create(&store, mute_config, None).unwrap_err();
    ensure!(step_of(&err) == Some(CreateStep::Agent), "{err:#}");
    ensure!(chain(err).contains("nothing within 15s"), "the timeout is not named");
    nothing_left("a guest that never answers")?;

    // The containers step: a root that is not a filesystem; the first
    // container was created and is removed again.
    let junk = dir.path().join("junk.ext4");
    std::fs::write(&junk, vec![0u8; 4 << 20])?;
    let mut bad_root = config("containers-step", &image, HypervisorKind::QemuTcg);
    bad_root.containers =
        vec![ContainerConfig::new("good", &root, &["true"]), ContainerConfig::new("bad", &junk, &["true"])];
    let err = Sandbox::create(&store, bad_root, None).unwrap_err();
    ensure!(step_of(&err) == Some(CreateStep::Containers), "{err:#}");
    ensure!(chain(err).contains("CreateContainer"), "the agent's refusal is not in the error");
    nothing_left("containers step")?;
    Ok(())
}

/// Runs `script` in container `id` and returns its exit status and output.
fn exec(sandbox: &mut Sandbox, id: &str, script: &str) -> anyhow::Result<(i32, String)> {
    let (exec_id, io) = sandbox.enter_container(id, &ProcessConfig::new(&["sh", "-c", script]))?;
    let out = io.stdout.collect(STREAM_TIMEOUT);
    let status = sandbox.wait_process(id, &exec_id, Some(Duration::from_secs(120)))?;
    Ok((status, text(out)?))
}

/// An interface added to a running sandbox (its NIC hot-plugged: a
/// placeholder on qemu-tcg) takes the veth's identity, and a container
/// reaches the peer through it; removed, it is gone from the guest and
/// its TAP from the namespace.
fn an_interface_added_to_a_running_sandbox_reaches_the_peer() -> anyhow::Result<()> {
    let dir = TempDir::new("api-addif")?;
    let image = guest_image(dir.path())?;
    let (sandbox_ns, _peer_ns) = veth_pair("add", "10.82.0")?;
    let store = Store::new(dir.path().join("state"));
    let mut config = config("addif", &image, HypervisorKind::QemuTcg);
    config.containers =
        vec![ContainerConfig::new("web", busybox_root(dir.path(), "addif")?, &["sh", "-c", "exec sleep 1000"])];
    let mut sandbox = Sandbox::create(&store, config, None)?;
    let outcome = (|| -> anyhow::Result<()> {
        sandbox.start()?;
        let network =
            NetworkConfig { netns: format!("/var/run/netns/{}", sandbox_ns.0).into(), interface: "eth0".into() };
        let added = sandbox.add_interface(&network)?;
        ensure!(added.up && added.addresses.iter().any(|a| a.address == "10.82.0.2"), "{added:?}");
        let err = sandbox.add_interface(&network).unwrap_err();
        ensure!(err.to_string().contains("has an interface named \"eth0\" already"), "{err}");
        let (status, out) = exec(&mut sandbox, "web", "ping -c 3 -W 5 10.82.0.1 | tail -2")?;
        ensure!(status == 0 && out.contains("3 packets received"), "exit {status}: {out}");
        let routes = sandbox.list_routes()?;
        ensure!(routes.routes.iter().any(|r| r.dest == "default" && r.gateway == "10.82.0.1"), "{routes:?}");

        sandbox.remove_interface("eth0")?;
        let (status, out) = exec(&mut sandbox, "web", "ping -c 1 -W 2 10.82.0.1")?;
        ensure!(status != 0, "the peer is still reached after the interface went: {out}");
        let links = sandbox_ns.ip(&["-br", "link"])?;
        ensure!(!links.contains("vessel-tap"), "the TAP outlived its interface: {links}");
        let err = sandbox.remove_interface("eth0").unwrap_err();
        ensure!(err.to_string().contains("has no interface named \"eth0\""), "{err}");
        // The same veth can come back.
        sandbox.add_interface(&network)?;
        let (status, out) = exec(&mut sandbox, "web", "ping -c 1 -W 5 10.82.0.1 | tail -2")?;
        ensure!(status == 0, "after adding it again: {out}");
        Ok(())
    })();
    if outcome.is_err() {
        eprintln!("guest console:\n{}", sandbox.console_tail(30));
    }
    sandbox.stop(true)?;
    outcome?;
    let links = sandbox_ns.ip(&["-br", "link"])?;
    ensure!(!links.contains("vessel-tap"), "a TAP outlived the sandbox: {links}");
    sandbox.delete()?;
    Ok(())
}

/// A sandbox created in a network namespace holding a veth, as CNI leaves
/// it: the guest takes the veth's MAC, address and routes (tcfilter), and
/// a container reaches the veth's peer in another namespace. Stopping the
/// sandbox takes the TAP and the redirects away again.
fn a_sandbox_in_a_cni_namespace_reaches_the_peer() -> anyhow::Result<()> {
    let dir = TempDir::new("api-net")?;
    let image = guest_image(dir.path())?;
    let (sandbox_ns, _peer_ns) = veth_pair("api", "10.81.0")?;
    let mac = sandbox_ns.ip(&["-br", "link", "show", "eth0"])?;

    let store = Store::new(dir.path().join("state"));
    let mut config = config("net", &image, HypervisorKind::QemuTcg);
    config.network =
        Some(NetworkConfig { netns: format!("/var/run/netns/{}", sandbox_ns.0).into(), interface: "eth0".into() });
    let script = "ip -br addr show eth0; ip route; ping -c 3 -W 5 10.81.0.1 | tail -2";
    config.containers = vec![ContainerConfig::new("pinger", busybox_root(dir.path(), "net")?, &["sh", "-c", script])];
    let mut sandbox = Sandbox::create(&store, config, None)?;
    let outcome = (|| -> anyhow::Result<()> {
        let interfaces = sandbox.list_interfaces()?;
        let eth0 = interfaces.interfaces.iter().find(|i| i.name == "eth0").context("no eth0 in the guest")?;
        ensure!(mac.contains(&eth0.hw_addr), "the guest's MAC {} is not the veth's: {mac}", eth0.hw_addr);
        ensure!(eth0.addresses.iter().any(|a| a.address == "10.81.0.2" && a.prefix_len == 24), "{eth0:?}");
        let routes = sandbox.list_routes()?;
        ensure!(routes.routes.iter().any(|r| r.dest == "default" && r.gateway == "10.81.0.1"), "{routes:?}");
        let out = sandbox.take_io("pinger")?.stdout.collect(STREAM_TIMEOUT);
        sandbox.start()?;
        let status = sandbox.wait_process("pinger", "", Some(Duration::from_secs(120)))?;
        let out = text(out)?;
        ensure!(status == 0 && out.contains("3 packets received"), "exit {status}: {out}");
        Ok(())
    })();
    if outcome.is_err() {
        eprintln!("guest console:\n{}", sandbox.console_tail(30));
    }
    sandbox.stop(true)?;
    outcome?;
    let links = sandbox_ns.ip(&["-br", "link"])?;
    ensure!(!links.contains(&runtime_api::network::tap_name(0)), "the TAP outlived the sandbox: {links}");
    let qdiscs = sandbox_ns.run(&["tc", "qdisc", "show", "dev", "eth0"])?;
    ensure!(!qdiscs.contains("ingress"), "the redirect outlived the sandbox: {qdiscs}");
    sandbox.delete()?;
    Ok(())
}

/// The builtin hypervisor through the trait, with a tiny guest that spins.
fn builtin_lifecycle_through_the_trait() -> anyhow::Result<()> {
    let dir = TempDir::new("api-builtin")?;
    let kernel = dir.write("spin.elf", guests::image(guests::Program::Spin, guests::Format::Pvh))?;
    let initrd = dir.write("initrd", &[0u8; 4096])?;
    let disk = dir.write("disk.img", &vec![0u8; 1 << 20])?;
    let spec = VmSpec {
        dir: dir.path().to_path_buf(),
        kernel,
        initrd,
        vcpus: 1,
        memory_mib: 32,
        disks: vec![],
        nics: vec![],
        hotplug_slots: 2,
        shared_fs: None,
    };
    let mut vm: Box<dyn Hypervisor> = Box::new(Builtin::default());
    ensure!(vm.kind() == HypervisorKind::Builtin);
    vm.start(&spec)?;
    ensure!(vessel_tests::wait_until(Duration::from_secs(10), || !vm.console_tail(1).is_empty()), "no console output");
    ensure!(vm.exited().is_none(), "the guest ended: {:?}", vm.exited());
    vm.pause()?;
    let paused = vm.figures()?.vcpu_exits.context("builtin counts exits")?;
    std::thread::sleep(Duration::from_millis(50));
    let still = vm.figures()?.vcpu_exits.context("builtin counts exits")?;
    ensure!(paused == still, "exits went on while paused: {paused} -> {still}");
    vm.resume()?;
    ensure!(
        vessel_tests::wait_until(Duration::from_secs(5), || vm.figures().ok().and_then(|f| f.vcpu_exits) > Some(still)),
        "no exits after resume"
    );
    let figures = vm.figures()?;
    ensure!(figures.memory_bytes == 32 << 20 && figures.uptime > Duration::ZERO, "{figures:?}");
    let plugged = vm.add_disk(&Disk { path: disk.clone(), read_only: true, serial: "hot".into() })?;
    ensure!(plugged.bind_address.is_some_and(|a| a != 0), "{plugged:?}");
    ensure!(vm.figures()?.devices.iter().any(|(name, _)| name.contains("disk.img")), "the hot disk has no counters");
    vm.add_disk(&Disk { path: disk.clone(), read_only: true, serial: "hot2".into() })?;
    let err = chain(vm.add_disk(&Disk { path: disk, read_only: true, serial: "hot3".into() }).unwrap_err());
    ensure!(err.contains("no free hotplug slot"), "{err}");
    vm.stop()?;
    ensure!(vm.exited().is_some(), "the VM did not end");
    ensure!(vm.pause().is_err(), "a stopped VM paused");
    vm.stop()?;
    Ok(())
}

/// The descriptors this process has open.
fn open_fds() -> anyhow::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Ten sandboxes created, run and deleted at once, each running a
/// container: all succeed, and afterwards nothing is left: no process, no
/// state, no socket, and no descriptor more in this process than before.
fn ten_sandboxes_at_once_leave_nothing_behind() -> anyhow::Result<()> {
    let dir = TempDir::new("api-ten")?;
    let image = guest_image(dir.path())?;
    let store = Store::new(dir.path().join("state"));
    let roots: Vec<PathBuf> =
        (0..10).map(|i| busybox_root(dir.path(), &format!("ten{i}"))).collect::<Result<_, _>>()?;
    let before = open_fds()?;
    let runs: Vec<_> = roots
        .into_iter()
        .enumerate()
        .map(|(i, root)| {
            let (store, image) = (store.clone(), image.clone());
            std::thread::spawn(move || -> anyhow::Result<String> {
                let id = format!("ten{i}");
                let mut config = config(&id, &image, HypervisorKind::QemuTcg);
                config.boot_timeout_s = 600;
                config.containers = vec![ContainerConfig::new(&id, root, &["sh", "-c", "echo $(hostname)"])];
                config.containers[0].hostname = Some(id.clone());
                let mut sandbox = Sandbox::create(&store, config, None)?;
                let out = sandbox.take_io(&id)?.stdout.collect(STREAM_TIMEOUT);
                sandbox.start()?;
                let status = sandbox.wait_process(&id, "", Some(Duration::from_secs(300)))?;
                let printed = text(out)?;
                ensure!(status == 0 && printed == format!("{id}\n"), "{id}: exit {status}, {printed:?}");
                sandbox.stop(false)?;
                sandbox.delete()?;
                Ok(id)
            })
        })
        .collect();
    for run in runs {
        run.join().map_err(|_| anyhow!("a sandbox thread panicked"))??;
    }
    ensure!(store.ids()?.is_empty(), "state left: {:?}", store.ids()?);
    let left = processes_mentioning(store.root())?;
    ensure!(left.is_empty(), "processes left: {left:?}");
    let leftovers: Vec<_> = std::fs::read_dir(store.root())?.flatten().map(|e| e.file_name()).collect();
    ensure!(leftovers.is_empty(), "files left under the state root: {leftovers:?}");
    // Waiter threads end with their agent connections; give them a moment.
    let settled = vessel_tests::wait_until(Duration::from_secs(10), || open_fds().is_ok_and(|n| n <= before));
    if !settled {
        let open: Vec<String> = std::fs::read_dir("/proc/self/fd")?
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .collect();
        anyhow::bail!("descriptors: {before} before, {} after: {open:?}", open.len());
    }
    Ok(())
}

/// A state root on a full disk (a tiny tmpfs filled up): create fails at
/// the step that could not write, says so, and leaves nothing: no
/// half-written state, no sandbox directory, no QEMU.
fn a_full_state_disk_fails_create_cleanly() -> anyhow::Result<()> {
    let dir = TempDir::new("api-full")?;
    let image = guest_image(dir.path())?;
    let root = busybox_root(dir.path(), "full")?;
    let mount_point = dir.path().join("tiny");
    std::fs::create_dir_all(&mount_point)?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
        .arg(&mount_point)
        .status()?;
    ensure!(mounted.success(), "mounting a tmpfs");
    let outcome = (|| -> anyhow::Result<()> {
        // Fill it to the last byte.
        let mut filler = std::fs::File::create(mount_point.join("filler"))?;
        while std::io::Write::write_all(&mut filler, &[0u8; 4096]).is_ok() {}
        drop(filler);
        let store = Store::new(mount_point.join("state"));
        let mut config = config("full", &image, HypervisorKind::QemuTcg);
        config.containers = vec![ContainerConfig::new("a", &root, &["true"])];
        let err = Sandbox::create(&store, config, None).unwrap_err();
        let text = chain(err);
        ensure!(text.contains("No space left on device"), "the error does not say the disk is full: {text}");
        ensure!(store.ids().unwrap_or_default().is_empty(), "a sandbox directory is left: {:?}", store.ids());
        let stray: Vec<_> = walk(&mount_point).into_iter().filter(|p| !p.ends_with("filler")).collect();
        ensure!(stray.iter().all(|p| p.is_dir()), "files left on the full disk: {stray:?}");
        let left = processes_mentioning(&mount_point)?;
        ensure!(left.is_empty(), "processes left: {left:?}");
        Ok(())
    })();
    let _ = std::process::Command::new("umount").arg(&mount_point).status();
    outcome
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all.extend(walk(&path));
        }
        all.push(path);
    }
    all
}

/// The environment variable that makes this test binary the owner of a
/// sandbox for [`a_dead_owner_is_seen_and_cleaned_up`]: `STORE:IMAGE:ROOT`.
const CHILD_OWNER: &str = "VESSEL_SANDBOX_API_OWNER";

/// Run as a child: creates and starts sandbox "orphan", says so on stdout,
/// and waits to be killed.
fn own_a_sandbox(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.splitn(3, ':');
    let (Some(store), Some(image), Some(root)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("{CHILD_OWNER}={spec:?} is not STORE:IMAGE:ROOT");
    };
    let mut config = config("orphan", Path::new(image), HypervisorKind::QemuTcg);
    config.containers = vec![ContainerConfig::new("sleeper", root, &["sleep", "1000"])];
    let mut sandbox = Sandbox::run(&Store::new(store), config)?;
    println!("ready");
    std::io::Write::flush(&mut std::io::stdout())?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        sandbox.status()?;
    }
}

/// The process that owns a sandbox is killed (-9): its QEMU goes with it,
/// its lock is not left behind, `list` shows it dead, fetch refuses it by
/// name, and only a forced delete cleans up what it left: its state and
/// sockets.
fn a_dead_owner_is_seen_and_cleaned_up() -> anyhow::Result<()> {
    let dir = TempDir::new("api-orphan")?;
    let image = guest_image(dir.path())?;
    let root = busybox_root(dir.path(), "orphan")?;
    let store = Store::new(dir.path().join("state"));
    let spec = format!("{}:{}:{}", store.root().display(), image.display(), root.display());
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env(CHILD_OWNER, spec)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().context("stdout")?), &mut line)?;
    ensure!(line == "ready\n", "the owner said {line:?}");
    child.kill()?;
    child.wait()?;

    let listed = Sandbox::list(&store)?;
    ensure!(listed.len() == 1 && !listed[0].owner_alive, "{listed:?}");
    let err = Sandbox::fetch(&store, "orphan").unwrap_err();
    ensure!(err.to_string().contains("is dead"), "{err}");
    let err = Sandbox::delete_by_id(&store, "orphan", false).unwrap_err();
    ensure!(err.to_string().contains("delete it with force"), "{err}");
    // QEMU dies with its owner, however the owner ends.
    let gone = vessel_tests::wait_until(Duration::from_secs(10), || {
        processes_mentioning(store.root()).is_ok_and(|p| p.is_empty())
    });
    ensure!(gone, "QEMU outlived its owner: {:?}", processes_mentioning(store.root())?);
    Sandbox::delete_by_id(&store, "orphan", true)?;
    ensure!(store.ids()?.is_empty(), "the sandbox's directory is left");
    let left = processes_mentioning(store.root())?;
    ensure!(left.is_empty(), "processes left: {left:?}");
    Ok(())
}

/// What a container from the cache printed: the kernel's random UUID, 16
/// random bytes, the guest's clock.
struct Seen {
    uuid: String,
    random: String,
    clock: u64,
    create_to_output: Duration,
    /// The host's clock (seconds) when create began and when the output
    /// had been read: the guest's clock was read in between.
    host_window: (u64, u64),
}

impl Seen {
    /// Checks the guest's clock is the host's: inside the window the host
    /// read around it, give or take a second of rounding. A clock that
    /// stood still while its VM waited paused reads before the window.
    fn clock_is_the_hosts(&self) -> anyhow::Result<()> {
        let (before, after) = self.host_window;
        ensure!(
            self.clock + 1 >= before && self.clock <= after + 1,
            "a guest's clock read {}, the host's went from {before} to {after} meanwhile",
            self.clock
        );
        Ok(())
    }
}

/// Sandbox `id` from `factory` (or cold, without one) runs one container
/// that prints what [`Seen`] holds; returns it with the guest's hostname.
fn from_factory(
    store: &Store,
    image: &Path,
    root: &Path,
    id: &str,
    factory: Option<&runtime_api::Factory>,
) -> anyhow::Result<(Seen, String)> {
    let kind = factory.map_or(HypervisorKind::QemuTcg, |f| f.config().hypervisor);
    let mut config = config(id, image, kind);
    config.hotplug_slots = 1;
    let script =
        "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";
    config.containers = vec![ContainerConfig::new(id, root, &["sh", "-c", script])];
    let began = std::time::Instant::now();
    let host_before = runtime_api::state::now_unix_ms() / 1000;
    let mut sandbox = Sandbox::create(store, config, factory)?;
    let io = sandbox.take_io(id)?;
    let first = std::thread::spawn(move || -> anyhow::Result<(String, Duration)> {
        let mut conn = io.stdout.accept(STREAM_TIMEOUT)?;
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut conn, &mut byte)?;
        let at = began.elapsed();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut conn, &mut rest)?;
        Ok((format!("{}{rest}", byte[0] as char), at))
    });
    sandbox.start()?;
    let status = sandbox.wait_process(id, "", Some(Duration::from_secs(120)))?;
    let (printed, create_to_output) = first.join().map_err(|_| anyhow!("the reader panicked"))??;
    let host_after = runtime_api::state::now_unix_ms() / 1000;
    ensure!(status == 0, "the container exited {status}: {printed}");
    let hostname = sandbox.guest_details().hostname.clone();
    sandbox.stop(false)?;
    sandbox.delete()?;
    let lines: Vec<&str> = printed.lines().collect();
    let [uuid, random, clock] = lines[..] else { anyhow::bail!("the container printed {printed:?}") };
    let seen = Seen {
        uuid: uuid.into(),
        random: random.into(),
        clock: clock.parse()?,
        create_to_output,
        host_window: (host_before, host_after),
    };
    Ok((seen, hostname))
}

/// A cache of two qemu-tcg VMs: two sandboxes taken from it each run a
/// container with an identity of its own (hostname, random state, the
/// host's clock although the VMs waited paused); the cache refills; a
/// cached VM killed by hand is never handed out; dropping the factory
/// leaves nothing. Prints create to the first output from the cache and
/// cold.
fn a_cache_of_two_gives_each_sandbox_its_own_identity_and_refills() -> anyhow::Result<()> {
    use runtime_api::factory::{self, CachedState};
    let dir = TempDir::new("api-factory")?;
    let image = guest_image(dir.path())?;
    let store = Store::new(dir.path().join("state"));
    let root = busybox_root(dir.path(), "root")?;
    let mut cache = runtime_api::CacheConfig::for_sandbox(&config("x", &image, HypervisorKind::QemuTcg));
    cache.hotplug_slots = 2;
    let factory = runtime_api::Factory::cache(&store, cache, 2)?;
    factory.wait_filled(Duration::from_secs(300))?;
    let paused = factory::list(&store)?;
    ensure!(paused.iter().filter(|v| v.state == CachedState::Paused).count() == 2, "{paused:?}");
    // Paused, a TCG guest's clock stands still: without the refresh it
    // would be behind by this much.
    std::thread::sleep(Duration::from_secs(4));
    let (a, host_a) = from_factory(&store, &image, &root, "fa", Some(&factory))?;
    let (b, host_b) = from_factory(&store, &image, &root, "fb", Some(&factory))?;
    ensure!((host_a.as_str(), host_b.as_str()) == ("fa", "fb"), "the guests' hostnames: {host_a}, {host_b}");
    ensure!(a.uuid != b.uuid && a.random != b.random, "two guests share random bytes: {} {}", a.random, b.random);
    ensure!(a.random.len() == 32, "random bytes read as {:?}", a.random);
    for seen in [&a, &b] {
        seen.clock_is_the_hosts()?;
    }
    ensure!(factory.counts() == (2, 0), "taken and died: {:?}", factory.counts());

    // Refilled in the background.
    factory.wait_filled(Duration::from_secs(300))?;
    // One killed by hand (its QEMU) is noticed and never handed out.
    let victim = factory::list(&store)?
        .into_iter()
        .find(|v| v.state == CachedState::Paused)
        .and_then(|v| v.record)
        .and_then(|r| r.vm_pid)
        .context("no cached QEMU to kill")?;
    // SAFETY: kill sends a signal to a QEMU this test's factory started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while factory.counts().1 == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(factory.counts() == (2, 1), "the killed VM was not noticed: {:?}", factory.counts());
    let (c, host_c) = from_factory(&store, &image, &root, "fc", Some(&factory))?;
    ensure!(host_c == "fc" && c.uuid != a.uuid, "the third sandbox: {host_c}");
    ensure!(factory.counts() == (3, 1), "taken and died: {:?}", factory.counts());

    let (cold, _) = from_factory(&store, &image, &root, "cold", None)?;
    eprintln!(
        "factory: create to first output, qemu-tcg: from the cache {:?} and {:?}, {:?} after a VM was killed; cold {:?}",
        a.create_to_output, b.create_to_output, c.create_to_output, cold.create_to_output
    );
    factory.wait_filled(Duration::from_secs(300))?;
    drop(factory);
    let left = factory::list(&store)?;
    ensure!(left.is_empty(), "the factory left {left:?}");
    let processes = processes_mentioning(store.root())?;
    ensure!(processes.is_empty(), "left processes {processes:?}");
    ensure!(store.ids()?.is_empty(), "left sandboxes {:?}", store.ids()?);
    Ok(())
}

/// Tier 4: a cache of one on the builtin hypervisor (paused and resumed
/// through `VmmAction`): a sandbox from it runs a container with its own
/// hostname and the host's clock.
fn a_cache_on_builtin_gives_a_sandbox_its_identity() -> anyhow::Result<()> {
    let dir = TempDir::new("api-factory-builtin")?;
    let image = guest_image(dir.path())?;
    let store = Store::new(dir.path().join("state"));
    let root = busybox_root(dir.path(), "root")?;
    let mut cache = runtime_api::CacheConfig::for_sandbox(&config("x", &image, HypervisorKind::Builtin));
    cache.hotplug_slots = 2;
    let factory = runtime_api::Factory::cache(&store, cache, 1)?;
    factory.wait_filled(Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(2));
    let (seen, hostname) = from_factory(&store, &image, &root, "fb", Some(&factory))?;
    ensure!(hostname == "fb", "the guest's hostname: {hostname}");
    seen.clock_is_the_hosts()?;
    eprintln!("factory on builtin: create to first output {:?}", seen.create_to_output);
    drop(factory);
    ensure!(runtime_api::factory::list(&store)?.is_empty(), "the factory left VMs");
    Ok(())
}

/// Tier 4: a VM template on the builtin hypervisor (a booted sandbox VM's
/// snapshot): two sandboxes restored from it each run a container with
/// their own hostname, random bytes and the host's clock; the template is
/// left whole, and nothing else is.
fn a_template_on_builtin_gives_each_clone_its_own_identity() -> anyhow::Result<()> {
    let dir = TempDir::new("api-template-builtin")?;
    let image = guest_image(dir.path())?;
    let store = Store::new(dir.path().join("state"));
    let root = busybox_root(dir.path(), "root")?;
    let mut booted = runtime_api::CacheConfig::for_sandbox(&config("x", &image, HypervisorKind::Builtin));
    booted.hotplug_slots = 2;
    let template = dir.path().join("template");
    runtime_api::factory::make_template(&template, &booted)?;
    let factory = runtime_api::Factory::template(&template)?;
    let (a, host_a) = from_factory(&store, &image, &root, "ta", Some(&factory))?;
    let (b, host_b) = from_factory(&store, &image, &root, "tb", Some(&factory))?;
    ensure!((host_a.as_str(), host_b.as_str()) == ("ta", "tb"), "the clones' hostnames: {host_a}, {host_b}");
    ensure!(a.uuid != b.uuid && a.random != b.random, "two clones share random bytes: {} {}", a.random, b.random);
    ensure!(a.random.len() == 32, "random bytes read as {:?}", a.random);
    for seen in [&a, &b] {
        seen.clock_is_the_hosts()?;
    }
    ensure!(factory.counts() == (2, 0), "restored and died: {:?}", factory.counts());
    eprintln!("template on builtin: create to first output {:?} and {:?}", a.create_to_output, b.create_to_output);
    drop(factory);
    ensure!(runtime_api::factory::read_template(&template).is_ok(), "the creates spent the template");
    ensure!(store.ids()?.is_empty(), "left sandboxes {:?}", store.ids()?);
    Ok(())
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_OWNER) {
        if let Err(e) = own_a_sandbox(&spec) {
            eprintln!("owner: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let args = Arguments::from_args();
    let tier3 = || {
        if args.list {
            return None;
        }
        qemu_tcg_unavailable()
            .or_else(e2fsprogs_unavailable)
            .or_else(|| test_kernel().err().map(|e| format!("no guest kernel: {e:#}")))
    };
    let mut trials = gate(
        tier3(),
        [
            trial("containers_on_qemu_tcg", containers_on_qemu_tcg),
            trial("create_rolls_back_at_each_step", create_rolls_back_at_each_step),
            trial("a_dead_owner_is_seen_and_cleaned_up", a_dead_owner_is_seen_and_cleaned_up),
            trial("ten_sandboxes_at_once_leave_nothing_behind", ten_sandboxes_at_once_leave_nothing_behind),
            trial(
                "a_cache_of_two_gives_each_sandbox_its_own_identity_and_refills",
                a_cache_of_two_gives_each_sandbox_its_own_identity_and_refills,
            ),
        ],
    );
    let root_needed = tier3().or_else(|| {
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } != 0).then(|| "needs root (mounting a tiny tmpfs)".to_string())
    });
    trials.extend(gate(
        root_needed,
        [trial("a_full_state_disk_fails_create_cleanly", a_full_state_disk_fails_create_cleanly)],
    ));
    let net = tier3()
        .or_else(vessel_tests::netns::unavailable)
        .or_else(|| missing_tool(&["nsenter", "tc"], "util-linux, iproute2"));
    trials.extend(gate(
        net,
        [
            trial("a_sandbox_in_a_cni_namespace_reaches_the_peer", a_sandbox_in_a_cni_namespace_reaches_the_peer),
            trial(
                "an_interface_added_to_a_running_sandbox_reaches_the_peer",
                an_interface_added_to_a_running_sandbox_reaches_the_peer,
            ),
        ],
    ));
    trials.extend(gate(
        kvm_unavailable(),
        [trial("builtin_lifecycle_through_the_trait", builtin_lifecycle_through_the_trait)],
    ));
    let tier4 = runtime_api::hypervisor::hardware_virtualization_unusable()
        .map(|why| format!("Linux on the builtin hypervisor needs hardware virtualization: {why}"))
        .or_else(tier3);
    trials.extend(gate(
        tier4,
        [
            trial("containers_on_builtin", containers_on_builtin),
            trial("a_cache_on_builtin_gives_a_sandbox_its_identity", a_cache_on_builtin_gives_a_sandbox_its_identity),
            trial(
                "a_template_on_builtin_gives_each_clone_its_own_identity",
                a_template_on_builtin_gives_each_clone_its_own_identity,
            ),
        ],
    ));
    libtest_mimic::run(&args, trials).exit();
}
