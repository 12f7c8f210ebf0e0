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
    Disk, Hypervisor, HypervisorError, HypervisorKind, Nic, Plugged, PluggedNic, VmFigures, VmSpec,
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
    server: Option<agent_proto::ttrpc::Server>,
    vsock: PathBuf,
}

impl FakeVm {
    fn new(fault: Fault) -> (Self, Arc<AtomicBool>) {
        let running = Arc::new(AtomicBool::new(false));
        let vm =
            FakeVm { mock: MockAgent::new(3), fault, running: running.clone(), server: None, vsock: PathBuf::new() };
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
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
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

    fn add_disk(&mut self, _: &Disk) -> Result<Plugged, HypervisorError> {
        Err(HypervisorError::Unsupported { kind: self.kind(), op: "hot-plug a disk", why: "the fake has no slots" })
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
    let err = Sandbox::create(&f.store, f.config("box", &[]), Some(&crate::Factory::Cache(1))).unwrap_err();
    assert!(matches!(err, SandboxError::FactoryUnsupported), "{err}");
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
