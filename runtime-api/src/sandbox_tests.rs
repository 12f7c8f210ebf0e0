//! The sandbox API's own logic without a guest: a fake hypervisor that
//! serves agent-proto's mock agent behind a hybrid-vsock-style socket, with
//! a failure to inject at each step of create.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_proto::link;
use agent_proto::mock::MockAgent;

use crate::hypervisor::{
    Disk, Hypervisor, HypervisorError, HypervisorKind, Nic, Plugged, PluggedNic, Template, VmFigures, VmSpec,
};
use crate::sandbox::{CreateStep, Sandbox, SandboxError};
use crate::state::{ContainerPhase, SandboxPhase, Store, LOCK_FILE, STATE_FILE};
use crate::{ContainerConfig, SandboxConfig};

/// What the fake does wrong, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// start fails.
    Start,
    /// The agent never announces itself.
    Silent,
    /// `state.json` is made a directory, so writing the state fails.
    State,
}

/// A VM that is a mock agent: the agent's readiness line is written to
/// `<vsock>_1024` and `CONNECT 1024` on the vsock socket is proxied to the
/// mock's ttrpc socket.
struct FakeVm {
    mock: MockAgent,
    fault: Fault,
    running: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    plugged: Arc<std::sync::Mutex<Vec<Disk>>>,
    server: Option<agent_proto::ttrpc::Server>,
    vsock: PathBuf,
    /// The template directories it was restored from.
    restored: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl FakeVm {
    fn new(fault: Fault) -> (Self, Arc<AtomicBool>) {
        let running = Arc::new(AtomicBool::new(false));
        let vm = FakeVm {
            mock: MockAgent::new(3),
            fault,
            running: running.clone(),
            paused: Arc::default(),
            plugged: Arc::default(),
            server: None,
            vsock: PathBuf::new(),
            restored: Arc::default(),
        };
        (vm, running)
    }
}

/// Answers each `CONNECT <port>` on `listener` (see [`proxy_one`]).
fn proxy_all(listener: UnixListener, mock: PathBuf) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            proxy_one(conn, mock.clone());
        }
    });
}

/// Answers `CONNECT <port>` on `conn`, then copies bytes both ways between
/// it and the mock's socket.
fn proxy_one(conn: UnixStream, mock: PathBuf) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || !line.starts_with("CONNECT ") {
            return;
        }
        let mut writer = conn;
        let Ok(agent) = UnixStream::connect(&mock) else { return };
        writer.write_all(b"OK 1024\n").expect("answer CONNECT");
        let (mut agent_in, mut agent_out) = (agent.try_clone().expect("clone"), agent);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut agent_in);
            let _ = agent_in.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut agent_out, &mut writer);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
}

impl Hypervisor for FakeVm {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Builtin
    }

    fn start(&mut self, spec: &VmSpec) -> Result<(), HypervisorError> {
        if self.fault == Fault::Start {
            return Err(HypervisorError::Start(self.kind(), "injected failure".into()));
        }
        self.running.store(true, Ordering::SeqCst);
        self.vsock = spec.vsock_socket();
        let mock_socket = spec.dir.join("mock-agent.sock");
        self.server = Some(self.mock.serve(&mock_socket).expect("serve the mock"));
        proxy_all(UnixListener::bind(&self.vsock).expect("bind the vsock socket"), mock_socket);
        if self.fault == Fault::State {
            std::fs::create_dir(spec.dir.join(STATE_FILE)).expect("sabotage the state file");
        }
        if self.fault != Fault::Silent {
            let ready = link::port_path(&self.vsock, link::DEFAULT_PORT);
            std::thread::spawn(move || {
                let mut conn = UnixStream::connect(ready).expect("dial the host");
                conn.write_all(link::ready_line("mock").as_bytes()).expect("announce");
            });
        }
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        (!self.running.load(Ordering::SeqCst)).then(|| "stopped".into())
    }

    fn pause(&mut self) -> Result<(), HypervisorError> {
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), HypervisorError> {
        self.running.store(false, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        Ok(())
    }

    fn figures(&mut self) -> Result<VmFigures, HypervisorError> {
        Ok(VmFigures { uptime: Duration::from_millis(1), memory_bytes: 1 << 20, ..Default::default() })
    }

    fn add_disk(&mut self, disk: &Disk) -> Result<Plugged, HypervisorError> {
        self.plugged.lock().unwrap().push(disk.clone());
        Ok(Plugged { bind_address: None })
    }

    fn add_nic(&mut self, _: &Nic) -> Result<PluggedNic, HypervisorError> {
        Err(HypervisorError::Unsupported { kind: self.kind(), op: "hot-plug a NIC", why: "the fake has no slots" })
    }

    fn remove_nic(&mut self, _: usize) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported { kind: self.kind(), op: "remove a NIC", why: "the fake has no slots" })
    }

    fn console_tail(&self, _: usize) -> String {
        String::new()
    }

    /// Writes a description file, as the builtin VMM would, and the fake's
    /// state: paused.
    fn snapshot(&mut self, dir: &Path) -> Result<(), HypervisorError> {
        assert!(self.paused.load(Ordering::SeqCst), "a snapshot of a running VM");
        std::fs::write(dir.join(vmm::snapshot::DESCRIPTION_FILE), b"fake").expect("write the snapshot");
        Ok(())
    }

    /// Starts as a fresh VM does: its agent announces itself on `spec`'s
    /// socket, as a restored guest's does after the transport reset.
    fn restore_from(&mut self, template: &Template, spec: &VmSpec) -> Result<(), HypervisorError> {
        self.restored.lock().unwrap().push(template.dir().to_path_buf());
        self.start(spec)
    }
}

/// A store in a fresh directory, and a guest image whose files exist (the
/// fake never reads them).
struct Fixture {
    root: PathBuf,
    store: Store,
    image: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let root = resources::cache::temp_name(&std::env::temp_dir(), &format!("vessel-api-{tag}"));
        let image = root.join("image");
        std::fs::create_dir_all(&image).unwrap();
        for file in [resources::guest_image::KERNEL_FILE, resources::guest_image::INITRD_FILE] {
            std::fs::write(image.join(file), b"").unwrap();
        }
        Fixture { store: Store::new(root.join("state")), root, image }
    }

    fn config(&self, id: &str, containers: &[&str]) -> SandboxConfig {
        let mut config = SandboxConfig::new(id, &self.image);
        config.boot_timeout_s = 1;
        config.containers = containers.iter().map(|c| ContainerConfig::new(*c, Path::new("/r"), &["true"])).collect();
        config
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn step(err: &SandboxError) -> Option<CreateStep> {
    match err {
        SandboxError::Create { step, .. } => Some(*step),
        _ => None,
    }
}

#[test]
fn a_failure_at_each_create_step_names_it_and_leaves_nothing() {
    let f = Fixture::new("rollback");
    for (fault, expected) in
        [(Fault::Start, CreateStep::Vm), (Fault::Silent, CreateStep::Agent), (Fault::State, CreateStep::State)]
    {
        let (vm, running) = FakeVm::new(fault);
        let err = Sandbox::create_with(&f.store, f.config("box", &["a", "b"]), Box::new(vm)).unwrap_err();
        assert_eq!(step(&err), Some(expected), "{fault:?}: {err:?}");
        assert!(!running.load(Ordering::SeqCst), "{fault:?}: the VM was left running");
        assert!(f.store.ids().unwrap().is_empty(), "{fault:?}: left {:?}", f.store.ids());
    }
    // The network step: a namespace that is not there.
    let mut config = f.config("box", &["a"]);
    config.network = Some(crate::NetworkConfig { netns: f.root.join("no-such-netns"), interface: "eth0".into() });
    let (vm, running) = FakeVm::new(Fault::None);
    let err = Sandbox::create_with(&f.store, config, Box::new(vm)).unwrap_err();
    assert_eq!(step(&err), Some(CreateStep::Network), "{err:?}");
    assert!(!running.load(Ordering::SeqCst), "the VM started after the network failed");
    assert!(f.store.ids().unwrap().is_empty());
    // A guest that never answers: the error says what was waited for.
    let (vm, _) = FakeVm::new(Fault::Silent);
    let err = Sandbox::create_with(&f.store, f.config("box", &[]), Box::new(vm)).unwrap_err();
    let text = crate::error_chain(&err);
    assert!(text.contains("reaching the guest's agent") && text.contains("nothing within 1s"), "{text}");
}

#[test]
fn bad_configs_are_refused_before_anything_is_made() {
    let f = Fixture::new("bad");
    let (vm, running) = FakeVm::new(Fault::None);
    let err = Sandbox::create_with(&f.store, f.config("box", &["a", "a"]), Box::new(vm)).unwrap_err();
    assert_eq!(err.to_string(), r#"sandbox "box" has a container with ID "a" already"#);
    let (vm, _) = FakeVm::new(Fault::None);
    let err = Sandbox::create_with(&f.store, f.config("box", &["a/b"]), Box::new(vm)).unwrap_err();
    assert!(err.to_string().starts_with(r#"invalid ID "a/b""#), "{err}");
    let mut no_image = f.config("box", &[]);
    no_image.guest_image = f.root.join("nowhere");
    let (vm, _) = FakeVm::new(Fault::None);
    let err = Sandbox::create_with(&f.store, no_image, Box::new(vm)).unwrap_err();
    assert!(err.to_string().contains("vessel image build"), "{err}");
    let err = crate::Factory::template(&f.root).unwrap_err();
    assert!(crate::error_chain(&err).contains("template.json"), "{err}");
    assert!(!running.load(Ordering::SeqCst));
    assert!(f.store.ids().unwrap().is_empty());
}

#[test]
fn disks_are_checked_recorded_and_mounted_into_live_containers() {
    let f = Fixture::new("disks");
    let disk = |serial: &str| crate::DiskConfig { path: "/d".into(), serial: serial.into(), read_only: true };
    let mount = |serial: &str, at: &str| crate::DiskMount {
        serial: serial.into(),
        destination: at.into(),
        fstype: "ext4".into(),
        read_only: true,
    };
    for (disks, mounted, want) in [
        (vec![disk("a"), disk("a")], None, r#"sandbox "box" has a disk with serial "a" already"#),
        (vec![disk("ctr-0")], None, r#"invalid disk serial "ctr-0""#),
        (vec![disk("twenty-one-bytes-long")], None, "longer than 20 bytes"),
        (vec![disk("a b")], None, "only letters"),
        (vec![disk("a")], Some("b"), r#"sandbox "box" has no disk with serial "b""#),
    ] {
        let mut config = f.config("box", &["c"]);
        config.disks = disks;
        config.containers[0].disks.extend(mounted.map(|s| mount(s, "/x")));
        let (vm, running) = FakeVm::new(Fault::None);
        let err = Sandbox::create_with(&f.store, config, Box::new(vm)).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(!running.load(Ordering::SeqCst) && f.store.ids().unwrap().is_empty());
    }

    let mut config = f.config("box", &["c"]);
    config.disks = vec![disk("data"), disk("more")];
    config.containers[0].disks.push(mount("data", "/data"));
    let (vm, _) = FakeVm::new(Fault::None);
    let mock = vm.mock.clone();
    let mut sandbox = Sandbox::create_with(&f.store, config, Box::new(vm)).unwrap();
    let serials: Vec<&str> = sandbox.state().devices.iter().map(|d| d.serial.as_str()).collect();
    assert_eq!(serials, ["ctr-0", "data", "more"], "the boot disks, the root first");
    assert!(sandbox.state().devices[1].read_only);

    // Into the created container: the agent is asked, the state keeps it.
    sandbox.mount_disk("c", &mount("more", "/more")).unwrap();
    assert_eq!(mock.containers()["c"].mounts, [("more".to_string(), "/more".to_string(), true)]);
    let kept = &f.store.load("box").unwrap().containers[0].config.disks;
    assert_eq!(kept.iter().map(|m| m.destination.as_str()).collect::<Vec<_>>(), ["/data", "/more"]);
    let err = sandbox.mount_disk("c", &mount("gone", "/gone")).unwrap_err();
    assert_eq!(err.to_string(), r#"sandbox "box" has no disk with serial "gone""#);
    let err = sandbox.mount_disk("ghost", &mount("more", "/m")).unwrap_err();
    assert_eq!(err.to_string(), r#"sandbox "box" has no container with ID "ghost""#);
    // A stopped container has no namespace to mount into.
    sandbox.start().unwrap();
    assert_eq!(sandbox.wait_process("c", "", Some(Duration::from_secs(5))).unwrap(), 3);
    let err = sandbox.mount_disk("c", &mount("more", "/again")).unwrap_err();
    assert!(err.to_string().contains("mount a disk needs it created or running"), "{err}");
    sandbox.stop(false).unwrap();
    sandbox.delete().unwrap();
}

#[test]
fn a_wait_the_agent_refuses_as_one_too_many_is_asked_again() {
    let f = Fixture::new("busy");
    let (vm, _) = FakeVm::new(Fault::None);
    let mock = vm.mock.clone();
    let mut sandbox = Sandbox::create_with(&f.store, f.config("box", &["a"]), Box::new(vm)).unwrap();
    mock.refuse_waits(2);
    sandbox.start().unwrap();
    assert_eq!(sandbox.wait_process("a", "", Some(Duration::from_secs(10))).unwrap(), 3);
    assert!(mock.calls().iter().filter(|c| **c == "WaitProcess").count() >= 3, "{:?}", mock.calls());
    sandbox.stop(false).unwrap();
    sandbox.delete().unwrap();
}

#[test]
fn the_lifecycle_through_the_mock_agent_is_recorded_in_the_state() {
    let f = Fixture::new("life");
    let (vm, running) = FakeVm::new(Fault::None);
    let mock = vm.mock.clone();
    let mut sandbox = Sandbox::create_with(&f.store, f.config("box", &["a", "b"]), Box::new(vm)).unwrap();
    let dir = f.store.root().join("box");
    assert!(dir.join(STATE_FILE).is_file() && dir.join(LOCK_FILE).is_file());
    assert_eq!(f.store.load("box").unwrap(), *sandbox.state());
    assert_eq!(sandbox.status().unwrap().phase, SandboxPhase::Ready);
    assert_eq!(mock.containers().len(), 2);

    // The mock's processes exit at once with status 3: status notices.
    sandbox.start().unwrap();
    assert_eq!(sandbox.wait_process("a", "", Some(Duration::from_secs(5))).unwrap(), 3);
    assert_eq!(sandbox.wait_process("b", "", Some(Duration::from_secs(5))).unwrap(), 3);
    let status = sandbox.status().unwrap();
    assert_eq!(status.phase, SandboxPhase::Running);
    for c in &status.containers {
        assert_eq!((c.phase, c.exit_code), (ContainerPhase::Stopped, Some(3)), "{c:?}");
        assert!(c.started_unix_ms.is_some(), "{c:?}");
        assert!(c.pid.is_some_and(|pid| pid > 1000), "the first process's PID is asked when a status needs it: {c:?}");
    }
    // Written before each call returned.
    let saved = f.store.load("box").unwrap();
    assert!(saved.containers.iter().all(|c| c.phase == ContainerPhase::Stopped), "{saved:?}");

    let err = sandbox.container_status("ghost").unwrap_err();
    assert_eq!(err.to_string(), r#"sandbox "box" has no container with ID "ghost""#);
    let err = sandbox.enter_container("a", &crate::ProcessConfig::new(&["sh"])).unwrap_err();
    assert_eq!(err.to_string(), r#"container "a" is stopped; exec needs it running"#);
    let err = sandbox.start_container("a").unwrap_err();
    assert!(matches!(err, SandboxError::ContainerState { .. }), "{err}");

    let listed = Sandbox::list(&f.store).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].owner_alive);

    // Delete needs a stopped sandbox; cleanup of the last container takes it.
    let sandbox_err = {
        let (vm, _) = FakeVm::new(Fault::None);
        let other = Sandbox::create_with(&f.store, f.config("other", &[]), Box::new(vm)).unwrap();
        other.delete().unwrap_err()
    };
    assert_eq!(sandbox_err.to_string(), r#"sandbox "other" is ready; delete needs it stopped"#);
    f.store.remove("other").unwrap();
    assert!(!sandbox.cleanup_container("a", false).unwrap());
    assert!(sandbox.cleanup_container("b", false).unwrap());
    assert!(!running.load(Ordering::SeqCst), "the VM outlived its last container");
    assert!(!dir.exists(), "the sandbox's directory outlived it");
    assert!(Sandbox::list(&f.store).unwrap().is_empty());
    assert_eq!(mock.containers().len(), 0);
}

#[test]
fn a_fetched_handle_sees_and_drives_what_the_owner_made() {
    let f = Fixture::new("fetch");
    let err = Sandbox::fetch(&f.store, "ghost").unwrap_err();
    assert_eq!(err.to_string(), r#"no sandbox with ID "ghost""#);
    let (vm, running) = FakeVm::new(Fault::None);
    let mut owner = Sandbox::create_with(&f.store, f.config("box", &["a", "b"]), Box::new(vm)).unwrap();
    let mut fetched = Sandbox::fetch(&f.store, "box").unwrap();
    assert_eq!(fetched.state(), owner.state());
    // The owner starts; the fetched handle sees it, and the exits through
    // the agent's ContainerStatus (it waits for none of them itself).
    owner.start().unwrap();
    assert_eq!(owner.wait_process("a", "", Some(Duration::from_secs(5))).unwrap(), 3);
    let status = fetched.status().unwrap();
    assert_eq!(status.phase, SandboxPhase::Running);
    let b = status.containers.iter().find(|c| c.id == "b").unwrap();
    assert_eq!((b.phase, b.exit_code), (ContainerPhase::Stopped, Some(3)), "{status:?}");
    // What only the owner can do says so, with the owner's PID.
    let err = fetched.pause().unwrap_err();
    assert!(err.to_string().contains(&format!("process {}", std::process::id())), "{err}");
    // Dropping a fetched handle leaves the sandbox running.
    drop(fetched);
    assert!(running.load(Ordering::SeqCst), "dropping a fetched handle stopped the VM");
    // A live sandbox is not deleted by ID; a stopped one is.
    let err = Sandbox::delete_by_id(&f.store, "box", true).unwrap_err();
    assert!(err.to_string().contains("needs it stopped"), "{err}");
    owner.stop(false).unwrap();
    assert!(matches!(Sandbox::fetch(&f.store, "box"), Err(SandboxError::SandboxState { .. })));
    Sandbox::delete_by_id(&f.store, "box", false).unwrap();
    assert!(f.store.ids().unwrap().is_empty());
}

#[test]
fn list_marks_a_sandbox_whose_owner_died() {
    let f = Fixture::new("dead");
    let (vm, _) = FakeVm::new(Fault::None);
    let sandbox = Sandbox::create_with(&f.store, f.config("box", &[]), Box::new(vm)).unwrap();
    let mut state = sandbox.state().clone();
    // A child that has exited and been reaped: its PID names no process.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    state.owner_pid = child.id();
    f.store.save(&state).unwrap();
    let listed = Sandbox::list(&f.store).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].owner_alive, "{listed:?}");
    let err = Sandbox::fetch(&f.store, "box").unwrap_err();
    assert!(err.to_string().contains("is dead"), "{err}");
    let err = Sandbox::delete_by_id(&f.store, "box", false).unwrap_err();
    assert!(err.to_string().contains("delete it with force"), "{err}");
    Sandbox::delete_by_id(&f.store, "box", true).unwrap();
    assert!(f.store.ids().unwrap().is_empty());
    drop(sandbox);
}

/// What a test looks at in a fake: its mock agent, whether it runs,
/// whether it is paused.
type FakeHandles = (MockAgent, Arc<AtomicBool>, Arc<AtomicBool>);

/// Fakes made by a factory, kept so that a test can look at them.
#[derive(Clone, Default)]
struct Made(Arc<std::sync::Mutex<Vec<FakeHandles>>>);

impl Made {
    fn maker(&self) -> crate::factory::MakeHypervisor {
        let made = self.clone();
        Arc::new(move || {
            let (vm, running) = FakeVm::new(Fault::None);
            made.0.lock().unwrap().push((vm.mock.clone(), running, vm.paused.clone()));
            Box::new(vm)
        })
    }

    /// The fake whose mock has identity `hostname`.
    fn with_hostname(&self, hostname: &str) -> Option<FakeHandles> {
        self.0.lock().unwrap().iter().find(|(m, ..)| m.identity().is_some_and(|i| i.hostname == hostname)).cloned()
    }
}

impl Fixture {
    fn cache_config(&self, slots: u8) -> crate::CacheConfig {
        let mut config = crate::CacheConfig::for_sandbox(&self.config("x", &[]));
        config.hypervisor = HypervisorKind::Builtin;
        config.hotplug_slots = slots;
        config.boot_timeout_s = 5;
        config
    }

    fn factory_config(&self, id: &str, containers: &[&str]) -> SandboxConfig {
        let mut config = self.config(id, containers);
        config.hypervisor = Some(HypervisorKind::Builtin);
        config.hotplug_slots = 1;
        config
    }
}

fn states(store: &Store) -> Vec<String> {
    crate::factory::list(store).unwrap().iter().map(|v| v.state.to_string()).collect()
}

#[test]
fn a_cached_vm_becomes_the_sandbox_with_its_own_identity_and_is_replaced() {
    let f = Fixture::new("cache");
    let made = Made::default();
    let factory = crate::Factory::cache_with(&f.store, f.cache_config(3), 2, made.maker()).unwrap();
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    assert_eq!(states(&f.store), ["paused", "paused"]);
    assert!(made
        .0
        .lock()
        .unwrap()
        .iter()
        .all(|(_, running, paused)| running.load(Ordering::SeqCst) && paused.load(Ordering::SeqCst)));
    assert!(f.store.ids().unwrap().is_empty(), "a cached VM is no sandbox");

    let mut a = Sandbox::create(&f.store, f.factory_config("a", &["c"]), Some(&factory)).unwrap();
    let (mock_a, running_a, paused_a) = made.with_hostname("a").expect("the guest was named after the sandbox");
    assert!(!paused_a.load(Ordering::SeqCst), "the taken VM was not resumed");
    let identity = mock_a.identity().unwrap();
    assert_eq!(identity.entropy.len(), crate::agent::IDENTITY_ENTROPY);
    let host_now = crate::state::now_unix_ms() as i64 / 1000;
    assert!((host_now - identity.sec).abs() < 5, "the guest's clock was set to {}", identity.sec);
    assert_eq!(a.guest_details().hostname, "a");
    // The VM's directory became the sandbox's; a link is left where it was.
    let dir = f.store.dir("a").unwrap();
    let booted_in = a.state().booted_in.clone().expect("where the VM was booted");
    assert_eq!(std::fs::read_link(&booted_in).unwrap(), dir);
    assert!(dir.join(STATE_FILE).is_file() && dir.join("vsock.sock").exists());
    assert_eq!(f.store.load("a").unwrap(), *a.state());
    // The container's root was hot-plugged, then the container made.
    assert_eq!(a.state().devices.iter().map(|d| d.serial.as_str()).collect::<Vec<_>>(), ["ctr-0"]);
    assert_eq!(mock_a.containers().len(), 1);
    a.start().unwrap();
    assert_eq!(a.wait_process("c", "", Some(Duration::from_secs(5))).unwrap(), 3);

    // A replacement boots; the next create gets another VM, its own name.
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    let mut b = Sandbox::create(&f.store, f.factory_config("b", &[]), Some(&factory)).unwrap();
    let (mock_b, ..) = made.with_hostname("b").unwrap();
    assert_ne!(mock_a.identity().unwrap().entropy, mock_b.identity().unwrap().entropy);
    assert_eq!(factory.counts(), (2, 0));
    let mut listed = states(&f.store);
    listed.sort();
    assert!(listed.contains(&"taken by a".to_string()) && listed.contains(&"taken by b".to_string()), "{listed:?}");

    // Deleting a sandbox removes its link; dropping the factory ends and
    // removes the VMs it still holds.
    a.stop(false).unwrap();
    assert!(!running_a.load(Ordering::SeqCst));
    a.delete().unwrap();
    assert!(std::fs::symlink_metadata(&booted_in).is_err(), "the link outlived its sandbox");
    b.stop(false).unwrap();
    b.delete().unwrap();
    assert!(f.store.ids().unwrap().is_empty());
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    drop(factory);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !crate::factory::list(&f.store).unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(crate::factory::list(&f.store).unwrap().is_empty(), "left {:?}", states(&f.store));
    assert!(made.0.lock().unwrap().iter().all(|(_, running, ..)| !running.load(Ordering::SeqCst)), "a VM was left");
}

#[test]
fn a_config_the_cache_cannot_serve_is_refused_with_the_reason_and_nothing_is_taken() {
    let f = Fixture::new("mismatch");
    let made = Made::default();
    let factory = crate::Factory::cache_with(&f.store, f.cache_config(2), 1, made.maker()).unwrap();
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    let mut two_cpus = f.factory_config("m", &[]);
    two_cpus.vcpus = 2;
    let mut more_memory = f.factory_config("m", &[]);
    more_memory.memory_mib = 512;
    let mut qemu = f.factory_config("m", &[]);
    qemu.hypervisor = Some(HypervisorKind::QemuTcg);
    let mut shared = f.factory_config("m", &[]);
    shared.shared_fs = true;
    let mut network = f.factory_config("m", &[]);
    network.network = Some(crate::NetworkConfig { netns: "/x".into(), interface: "eth0".into() });
    let too_many = f.factory_config("m", &["a", "b"]);
    let mut bad_name = f.factory_config("m", &[]);
    bad_name.hostname = Some("no spaces".into());
    for (config, want) in [
        (two_cpus, "the sandbox has 2 vCPUs, the cached VMs 1"),
        (more_memory, "512 MiB"),
        (qemu, "runs on qemu-tcg, the cached VMs on builtin"),
        (shared, "shared directory"),
        (network, "network namespace"),
        (too_many, "needs 3 hotplug slots (2 containers, 0 disks, 1 kept free), the cached VMs have 2"),
        (bad_name, "\"no spaces\""),
    ] {
        let err = Sandbox::create(&f.store, config, Some(&factory)).unwrap_err();
        assert!(crate::error_chain(&err).contains(want), "{want}: {err}");
    }
    assert_eq!((factory.ready(), factory.counts()), (1, (0, 0)), "a refused create took a VM");
    assert!(f.store.ids().unwrap().is_empty());
}

#[test]
fn a_cached_vm_that_died_is_never_handed_out_and_is_replaced() {
    let f = Fixture::new("dead-vm");
    let made = Made::default();
    let factory = crate::Factory::cache_with(&f.store, f.cache_config(2), 1, made.maker()).unwrap();
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    // The VM dies while cached.
    made.0.lock().unwrap()[0].1.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while factory.counts().1 == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(factory.counts(), (0, 1), "the dead VM was not noticed");
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    let sandbox = Sandbox::create(&f.store, f.factory_config("s", &[]), Some(&factory)).unwrap();
    let (_, running, _) = made.with_hostname("s").unwrap();
    assert!(running.load(Ordering::SeqCst), "the sandbox got a dead VM");
    assert!(!Arc::ptr_eq(&running, &made.0.lock().unwrap()[0].1), "the sandbox got the VM that died");
    drop(sandbox);
}

#[test]
fn list_and_sweep_find_cached_vms_whose_owner_died_and_destroy_leaves_nothing() {
    let f = Fixture::new("sweep");
    let made = Made::default();
    let factory = crate::Factory::cache_with(&f.store, f.cache_config(2), 1, made.maker()).unwrap();
    factory.wait_filled(Duration::from_secs(20)).unwrap();
    // A VM another process booted and then died: its record names a PID
    // that is gone.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let ghost = crate::factory::factory_dir(&f.store).join("vm-ghost");
    std::fs::create_dir(&ghost).unwrap();
    let mut record = crate::factory::list(&f.store).unwrap()[0].record.clone().unwrap();
    record.name = "vm-ghost".into();
    record.owner_pid = child.id();
    std::fs::write(ghost.join(crate::factory::RECORD_FILE), serde_json::to_vec(&record).unwrap()).unwrap();
    // And one whose boot died before it was paused (no record, no claim held).
    std::fs::create_dir(crate::factory::factory_dir(&f.store).join("vm-halfway")).unwrap();
    let listed = crate::factory::list(&f.store).unwrap();
    let state = |name: &str| listed.iter().find(|v| v.name == name).map(|v| v.state.to_string()).unwrap();
    assert!(state("vm-ghost").contains(&format!("its owner process {} is gone", child.id())), "{listed:?}");
    assert!(state("vm-halfway").contains("before it was paused"), "{listed:?}");
    let mut swept = crate::factory::sweep(&f.store).unwrap();
    swept.sort();
    assert_eq!(swept, ["vm-ghost", "vm-halfway"]);
    assert_eq!(states(&f.store), ["paused"]);
    // Destroy ends and removes the rest; the directory goes with them.
    let ended = crate::factory::destroy(&f.store, Duration::from_secs(5)).unwrap();
    assert_eq!(ended.len(), 1);
    assert!(!crate::factory::factory_dir(&f.store).exists(), "the factory's directory is left");
    drop(factory);
}

/// What a test looks at in a template's clone: its mock agent, whether it
/// runs, and the templates it was restored from.
type Clone = (MockAgent, Arc<AtomicBool>, Arc<std::sync::Mutex<Vec<PathBuf>>>);

/// Clones made by a template's factory.
#[derive(Clone, Default)]
struct Clones(Arc<std::sync::Mutex<Vec<Clone>>>);

impl Clones {
    fn with_hostname(&self, hostname: &str) -> Option<Clone> {
        self.0.lock().unwrap().iter().find(|(m, ..)| m.identity().is_some_and(|i| i.hostname == hostname)).cloned()
    }
}

/// A template made in the fixture from a fake, and its factory over fakes
/// that fail with `fault`.
fn template_factory(f: &Fixture, fault: Fault, clones: &Clones) -> (crate::Factory, PathBuf) {
    let dir = f.root.join("template");
    let (vm, _) = FakeVm::new(Fault::None);
    let record = crate::factory::make_template_with(&dir, &f.cache_config(2), Box::new(vm)).unwrap();
    let clones = clones.clone();
    let make: crate::factory::MakeHypervisor = Arc::new(move || {
        let (vm, running) = FakeVm::new(fault);
        clones.0.lock().unwrap().push((vm.mock.clone(), running, vm.restored.clone()));
        Box::new(vm)
    });
    (crate::Factory::template_with(record, Template::unloaded(&dir), make), dir)
}

#[test]
fn a_template_is_made_from_a_paused_vm_and_records_its_config() {
    let f = Fixture::new("template-make");
    let dir = f.root.join("template");
    let (vm, running) = FakeVm::new(Fault::None);
    let record = crate::factory::make_template_with(&dir, &f.cache_config(2), Box::new(vm)).unwrap();
    assert!(!running.load(Ordering::SeqCst), "the template's VM was left running");
    assert!(dir.join(vmm::snapshot::DESCRIPTION_FILE).is_file(), "no snapshot was written");
    assert!(!dir.join("boot").exists(), "the boot directory was left");
    assert_eq!(crate::factory::read_template(&dir).unwrap(), record);
    assert_eq!(record.config, f.cache_config(2));
    // A directory that exists is not made a template.
    let (vm, running) = FakeVm::new(Fault::None);
    let err = crate::factory::make_template_with(&dir, &f.cache_config(2), Box::new(vm)).unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
    assert!(!running.load(Ordering::SeqCst));
    // qemu-tcg is refused with the reason.
    let mut qemu = f.cache_config(2);
    qemu.hypervisor = HypervisorKind::QemuTcg;
    let (vm, _) = FakeVm::new(Fault::None);
    let err = crate::factory::make_template_with(&f.root.join("t2"), &qemu, Box::new(vm)).unwrap_err();
    assert!(err.to_string().contains("non-migratable device") && err.to_string().contains("qemu-tcg"), "{err}");
    assert!(!f.root.join("t2").exists());
    // A guest that never announces itself leaves no template.
    let (vm, running) = FakeVm::new(Fault::Silent);
    let mut quick = f.cache_config(2);
    quick.boot_timeout_s = 1;
    let err = crate::factory::make_template_with(&f.root.join("t3"), &quick, Box::new(vm)).unwrap_err();
    assert!(matches!(err, crate::factory::FactoryError::Agent(_)), "{err:?}");
    assert!(!running.load(Ordering::SeqCst) && !f.root.join("t3").exists());
}

#[test]
fn each_sandbox_from_a_template_is_restored_and_given_its_own_identity() {
    let f = Fixture::new("template");
    let clones = Clones::default();
    let (factory, dir) = template_factory(&f, Fault::None, &clones);
    assert_eq!(factory.template_dir(), Some(dir.as_path()));
    let mut a = Sandbox::create(&f.store, f.factory_config("a", &["c"]), Some(&factory)).unwrap();
    let mut b = Sandbox::create(&f.store, f.factory_config("b", &[]), Some(&factory)).unwrap();
    let (mock_a, running_a, restored_a) = clones.with_hostname("a").expect("a clone was named a");
    let (mock_b, _, restored_b) = clones.with_hostname("b").expect("a clone was named b");
    assert_eq!(*restored_a.lock().unwrap(), std::slice::from_ref(&dir), "a was not restored from the template");
    assert_eq!(*restored_b.lock().unwrap(), std::slice::from_ref(&dir), "b was not restored from the template");
    assert_ne!(mock_a.identity().unwrap().entropy, mock_b.identity().unwrap().entropy);
    assert_eq!(mock_a.identity().unwrap().entropy.len(), crate::agent::IDENTITY_ENTROPY);
    assert_eq!((a.guest_details().hostname.as_str(), b.guest_details().hostname.as_str()), ("a", "b"));
    // Each VM is the sandbox's own, in its own directory: no link, its own
    // vsock socket.
    assert_eq!(a.state().booted_in, None);
    assert!(f.store.dir("a").unwrap().join("vsock.sock").exists());
    assert_eq!(f.store.load("a").unwrap(), *a.state());
    assert_eq!(a.state().devices.iter().map(|d| d.serial.as_str()).collect::<Vec<_>>(), ["ctr-0"]);
    a.start().unwrap();
    assert_eq!(a.wait_process("c", "", Some(Duration::from_secs(5))).unwrap(), 3);
    assert_eq!(factory.counts(), (2, 0));
    a.stop(false).unwrap();
    assert!(!running_a.load(Ordering::SeqCst));
    a.delete().unwrap();
    b.stop(false).unwrap();
    b.delete().unwrap();
    assert!(f.store.ids().unwrap().is_empty());
    assert!(dir.join(crate::factory::TEMPLATE_RECORD).is_file(), "a create spent the template");
}

#[test]
fn a_config_the_template_cannot_serve_is_refused_by_name_and_nothing_is_restored() {
    let f = Fixture::new("template-mismatch");
    let clones = Clones::default();
    let (factory, _) = template_factory(&f, Fault::None, &clones);
    let mut two_cpus = f.factory_config("m", &[]);
    two_cpus.vcpus = 2;
    let mut more_memory = f.factory_config("m", &[]);
    more_memory.memory_mib = 512;
    let mut qemu = f.factory_config("m", &[]);
    qemu.hypervisor = Some(HypervisorKind::QemuTcg);
    let mut other_image = f.factory_config("m", &[]);
    other_image.guest_image = f.root.join("image2");
    std::fs::create_dir(&other_image.guest_image).unwrap();
    for file in [resources::guest_image::KERNEL_FILE, resources::guest_image::INITRD_FILE] {
        std::fs::write(other_image.guest_image.join(file), b"").unwrap();
    }
    let too_many = f.factory_config("m", &["a", "b"]);
    for (config, want) in [
        (two_cpus, "the sandbox has 2 vCPUs, the template's VM 1"),
        (more_memory, "the sandbox has 512 MiB of memory, the template's VM 256 MiB"),
        (qemu, "the sandbox runs on qemu-tcg, the template's VM on builtin"),
        (other_image, "the template's"),
        (too_many, "3 hotplug slots"),
    ] {
        let err = Sandbox::create(&f.store, config, Some(&factory)).unwrap_err();
        assert!(matches!(err, SandboxError::FactoryMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{err} lacks {want:?}");
    }
    assert!(clones.0.lock().unwrap().is_empty(), "a refused create restored a VM");
    assert_eq!(factory.counts(), (0, 0));
    assert!(f.store.ids().unwrap().is_empty());
}

#[test]
fn a_failed_restore_is_rolled_back_and_leaves_nothing() {
    for (fault, expected) in [(Fault::Start, CreateStep::Vm), (Fault::Silent, CreateStep::Agent)] {
        let f = Fixture::new("template-rollback");
        let clones = Clones::default();
        let (factory, dir) = template_factory(&f, fault, &clones);
        let err = Sandbox::create(&f.store, f.factory_config("r", &["c"]), Some(&factory)).unwrap_err();
        assert_eq!(step(&err), Some(expected), "{fault:?}: {err:?}");
        let clones = clones.0.lock().unwrap();
        assert_eq!(clones.len(), 1, "{fault:?}: one restore was tried");
        assert!(!clones[0].1.load(Ordering::SeqCst), "{fault:?}: the clone was left running");
        assert!(f.store.ids().unwrap().is_empty(), "{fault:?}: left {:?}", f.store.ids());
        assert!(!f.store.dir("r").unwrap().exists(), "{fault:?}: the directory was left");
        assert!(dir.join(crate::factory::TEMPLATE_RECORD).is_file(), "{fault:?}: the template was spent");
    }
}
