//! The agent as PID 1 of a real guest kernel (DESIGN.md tier 3): the
//! distribution's cloud kernel under QEMU TCG, booted with the initramfs
//! `vessel image build` makes (this agent as /init, its modules), our
//! vsock backend over vhost-user as the agent's link, and our blk backend
//! holding a busybox ext4 root. The host drives real containers through
//! agent-proto: output, exec, cgroup v2 stats, limit updates read back
//! (weight, cpuset, limits lifted back to max), an OOM kill reported by
//! GetOOMEvent, pause (no progress) and resume, kill and exit codes, then
//! DestroySandbox, after which the harness stops QEMU itself. And a
//! container gets what its spec grants and no more (`security.rs`).
//!
//! Skipped, with the reason, where QEMU, busybox or the kernel cannot be
//! had.

use std::os::fd::IntoRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_proto::agent::{
    ContainerRequest, ContainerState, Empty, ExecProcessRequest, IPAddress, Interface, OnlineCPUMemRequest, Resources,
    Route, Routes, SetGuestIdentityRequest, SignalProcessRequest, Stdio, UpdateContainerRequest,
    UpdateInterfaceRequest, UpdateRoutesRequest, VirtioSlotRequest,
};
use agent_proto::agent_ttrpc::AgentClient;
use agent_proto::{link, ttrpc};
use anyhow::{anyhow, ensure, Context};
use libtest_mimic::Arguments;
use runtime_api::hypervisor::qemu_tcg::QemuTcg;
use runtime_api::hypervisor::{Disk, Hypervisor, Nic, VmFigures, VmSpec};
use vessel_tests::agent::{
    collected, container, ctx, output_ports, process_json, rpc_error, spec_json, wait_for, HostSide, SpecOptions,
};
use vessel_tests::harness::{e2fsprogs_unavailable, gate, trial};
use vessel_tests::netns::NetNs;
use vessel_tests::tier3::{qemu_tcg_unavailable, test_kernel};
use vessel_tests::TempDir;

#[path = "guest_tcg/security.rs"]
mod security;

const AGENT: &str = env!("CARGO_BIN_EXE_vessel-agent");
const DISK_SERIAL: &str = "rootfs";
const MEMORY_LIMIT: u64 = 64 << 20;
const PIDS_LIMIT: u64 = 32;

fn request(id: &str, args: &[&str], o: &SpecOptions, stdio: Stdio) -> agent_proto::agent::CreateContainerRequest {
    vessel_tests::agent::create_request_on_disk(id, spec_json(args, o), DISK_SERIAL, stdio)
}

fn cpu_usage(client: &AgentClient, id: &str) -> anyhow::Result<u64> {
    Ok(client.stats_container(ctx(), &container(id)).map_err(rpc_error).context("stats_container")?.cpu_usage_usec)
}

/// What a scenario gets: the host's sockets, the readiness listener, the
/// hybrid vsock socket, and when QEMU was started.
struct Guest<'a> {
    host: &'a HostSide,
    ready: &'a std::os::unix::net::UnixListener,
    uds: &'a Path,
    started: Instant,
}

/// Boots the agent's guest on the sandbox API's qemu-tcg hypervisor (our
/// vsock and blk over vhost-user, QEMU's rng, and a NIC on `nic` when
/// given), runs `scenario` against it, and stops the guest afterwards, as
/// the host stops a sandbox's VM. Returns what the scenario reports and
/// the VM's figures just before the stop.
fn with_guest(
    tag: &str,
    nic: Option<Nic>,
    scenario: impl FnOnce(&Guest) -> anyhow::Result<String>,
) -> anyhow::Result<(String, VmFigures)> {
    with_guest_files(tag, nic, &[], scenario)
}

/// [`with_guest`], with more executables in the container's root
/// (`/bin/<name>`).
fn with_guest_files(
    tag: &str,
    nic: Option<Nic>,
    files: &[(&str, Vec<u8>)],
    scenario: impl FnOnce(&Guest) -> anyhow::Result<String>,
) -> anyhow::Result<(String, VmFigures)> {
    let kernel = test_kernel()?;
    let dir = TempDir::new(tag)?;
    let agent = resources::guest_image::read_agent(Path::new(AGENT))?;
    let modules = resources::guest_image::agent_modules(&kernel)?;
    let initrd = dir.path().join("initrd.img");
    resources::guest_image::build_agent_initramfs(agent, &modules)?.write_atomic(&initrd)?;
    let tree = dir.path().join("tree");
    resources::rootfs::busybox_tree(&tree)?;
    for (name, bytes) in files {
        let path = tree.join("bin").join(name);
        std::fs::write(&path, bytes)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let image = dir.path().join("rootfs.ext4");
    resources::rootfs::build_ext4(&tree, &image, Some(32 << 20))?;

    let spec = VmSpec {
        dir: dir.path().to_path_buf(),
        kernel: kernel.image.clone(),
        initrd,
        vcpus: 2,
        memory_mib: 256,
        disks: vec![Disk { path: image, read_only: false, serial: DISK_SERIAL.into() }],
        nics: nic.into_iter().collect(),
        hotplug_slots: 0,
        shared_fs: None,
    };
    let uds = spec.vsock_socket();
    let host = HostSide::new(uds.clone());
    let ready = host.listen(link::DEFAULT_PORT)?;
    let mut vm = QemuTcg::default();
    let started = Instant::now();
    vm.start(&spec)?;

    let outcome = scenario(&Guest { host: &host, ready: &ready, uds: &uds, started });
    // Whatever happened, the harness stops the guest, as the host stops a
    // sandbox's VM: DestroySandbox leaves it running.
    let figures = vm.figures();
    let ended_by_itself = vm.exited();
    let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
    vm.stop()?;
    let report = outcome.with_context(|| format!("guest console:\n{console}"))?;
    // The scenario ended with DestroySandbox and the agent still answering:
    // the guest was still up when QEMU was stopped (it neither powered off
    // nor died by itself), the frontend went away, and each device backend
    // ended cleanly.
    ensure!(
        ended_by_itself.is_none(),
        "{} after DestroySandbox; console:\n{console}",
        ended_by_itself.unwrap_or_default()
    );
    ensure!(vm.backend_errors().is_empty(), "device backends ended badly: {:?}", vm.backend_errors());
    ensure!(console.contains("vessel-agent: ready after"), "no readiness in the console:\n{console}");
    Ok((report, figures?))
}

/// Waits for the agent and connects to it.
fn connect(g: &Guest) -> anyhow::Result<(AgentClient, String, Duration)> {
    let version = g.host.wait_ready(g.ready, Duration::from_secs(240))?;
    let ready_after = g.started.elapsed();
    let conn = link::connect_hybrid(g.uds, link::DEFAULT_PORT)?;
    let client = AgentClient::new(ttrpc::Client::new(conn.into_raw_fd()).map_err(|e| anyhow!("ttrpc client: {e}"))?);
    Ok((client, version, ready_after))
}

fn containers_in_a_guest() -> anyhow::Result<()> {
    let (report, _) = with_guest("agent-guest", None, drive)?;
    eprintln!("{report}");
    Ok(())
}

const GUEST_MAC: &str = "52:54:00:76:73:61";

/// The guest's network set up through the agent (netlink in a real guest
/// kernel, on Linux's virtio_net driver over our TAP backend), and a
/// container sharing it reaching the host.
fn container_network_in_a_guest() -> anyhow::Result<()> {
    let ns = NetNs::new("agent-guest-net")?;
    let mac = [0x52, 0x54, 0x00, 0x76, 0x73, 0x61];
    // A TAP that lasts (the hypervisor opens it in the namespace), with the
    // host's address on it before the guest comes up.
    ns.ip(&["tuntap", "add", "dev", "vtap2", "mode", "tap", "vnet_hdr"])?;
    ns.ip(&["addr", "add", "10.79.0.1/24", "dev", "vtap2"])?;
    ns.ip(&["link", "set", "vtap2", "up"])?;
    let nic = Nic { netns: Some(format!("/var/run/netns/{}", ns.0).into()), tap: "vtap2".into(), mac };
    let (report, figures) = with_guest("agent-guest-net", Some(nic), |g| {
        let (client, _, _) = connect(g)?;
        let iface = Interface {
            name: "eth0".into(),
            hw_addr: GUEST_MAC.into(),
            addresses: vec![IPAddress { address: "10.79.0.2".into(), prefix_len: 24, ..Default::default() }],
            mtu: 1500,
            up: true,
            ..Default::default()
        };
        let got = client
            .update_interface(ctx(), &UpdateInterfaceRequest { interface: Some(iface).into(), ..Default::default() })
            .map_err(rpc_error)
            .context("update_interface")?;
        ensure!(got.up && got.addresses.iter().any(|a| a.address == "10.79.0.2"), "{got:?}");
        let route =
            Route { dest: "default".into(), gateway: "10.79.0.1".into(), device: "eth0".into(), ..Default::default() };
        let routes = UpdateRoutesRequest {
            routes: Some(Routes { routes: vec![route], ..Default::default() }).into(),
            ..Default::default()
        };
        client.update_routes(ctx(), &routes).map_err(rpc_error).context("update_routes")?;
        let listed = client.list_routes(ctx(), &Empty::new()).map_err(rpc_error).context("list_routes")?.routes;
        ensure!(listed.iter().any(|r| r.dest == "default" && r.gateway == "10.79.0.1"), "{listed:?}");

        // No network namespace in the spec: the container shares the guest's.
        let (out, handle) = g.host.capture()?;
        let ping = ["ping", "-c", "3", "-W", "10", "10.79.0.1"];
        client
            .create_container(ctx(), &request("pinger", &ping, &SpecOptions::default(), output_ports(out, out)))
            .map_err(rpc_error)?;
        client.start_container(ctx(), &container("pinger")).map_err(rpc_error).context("start_container")?;
        let output = collected(handle)?;
        let status =
            client.wait_process(ctx(), &wait_for("pinger", "")).map_err(rpc_error).context("wait_process")?.status;
        ensure!(status == 0 && output.contains("3 packets received"), "ping exited {status}: {output}");
        client.remove_container(ctx(), &container("pinger")).map_err(rpc_error).context("remove_container")?;
        destroy(&client)?;
        Ok("eth0 configured through the agent; a container pinged the host 3/3".into())
    })?;
    let net = figures.devices.iter().find(|(name, _)| name.starts_with("net ")).context("no net device figures")?;
    let counter = |key: &str| net.1.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v);
    let (rx, tx) = (counter("rx_packets"), counter("tx_packets"));
    ensure!(rx >= 3 && tx >= 3, "our net backend moved {tx} frames out and {rx} in");
    eprintln!("container_network_in_a_guest: {report}");
    Ok(())
}

/// DestroySandbox, then a check that the agent (and its guest) is still up.
fn destroy(client: &AgentClient) -> anyhow::Result<()> {
    client.destroy_sandbox(ctx(), &Empty::new()).map_err(rpc_error).context("destroy_sandbox")?;
    let check = client.check(ctx(), &Empty::new()).map_err(rpc_error).context("check after destroy_sandbox")?;
    ensure!(check.serving, "the agent stopped serving after DestroySandbox");
    Ok(())
}

/// Runs `args` in container `id` (sharing the guest's namespaces but for
/// mount and cgroup) and returns what it printed.
fn exec_output(
    client: &AgentClient,
    host: &HostSide,
    id: &str,
    exec_id: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let (out, handle) = host.capture()?;
    let exec = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        oci_process_json: process_json(args, &SpecOptions::default()).into_bytes(),
        stdio: Some(output_ports(out, out)).into(),
        ..Default::default()
    };
    client.exec_process(ctx(), &exec).map_err(rpc_error).context("exec_process")?;
    let output = collected(handle)?;
    let status = client.wait_process(ctx(), &wait_for(id, exec_id)).map_err(rpc_error).context("wait_process")?.status;
    ensure!(status == 0, "{args:?} exited {status}: {output}");
    Ok(output)
}

/// SetGuestIdentity: the hostname and the clock are the guest's at once
/// (a container reads the clock a year ahead, as set), and a bad request
/// is refused whole; the clock is then set back to the host's.
fn identity(client: &AgentClient, host: &HostSide) -> anyhow::Result<()> {
    let now =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let year = 365 * 86400;
    let identity = |hostname: &str, time_sec: i64| SetGuestIdentityRequest {
        hostname: hostname.into(),
        time_sec,
        entropy: vec![0x5a; 64],
        ..Default::default()
    };
    let ahead = now() + year;
    let details = client
        .set_guest_identity(ctx(), &identity("tcg-guest-1", ahead))
        .map_err(rpc_error)
        .context("set_guest_identity")?;
    ensure!(details.hostname == "tcg-guest-1", "the hostname after SetGuestIdentity: {details:?}");
    let (out, handle) = host.capture()?;
    client
        .create_container(ctx(), &request("clock", &["date", "+%s"], &SpecOptions::default(), output_ports(out, out)))
        .map_err(rpc_error)?;
    client.start_container(ctx(), &container("clock")).map_err(rpc_error).context("start_container")?;
    let seen: i64 = collected(handle)?.trim().parse().context("date +%s printed no number")?;
    client.wait_process(ctx(), &wait_for("clock", "")).map_err(rpc_error)?;
    client.remove_container(ctx(), &container("clock")).map_err(rpc_error)?;
    ensure!((ahead..ahead + 120).contains(&seen), "the guest's clock reads {seen}, set to {ahead}");
    let refused = client.set_guest_identity(ctx(), &identity("bad name", now())).map_err(rpc_error);
    ensure!(
        refused.as_ref().err().is_some_and(|e| e.to_string().contains("\"bad name\"")),
        "a bad hostname: {refused:?}"
    );
    let kept = client.get_guest_details(ctx(), &Empty::new()).map_err(rpc_error)?.hostname;
    ensure!(kept == "tcg-guest-1", "a refused request changed the hostname to {kept:?}");
    client.set_guest_identity(ctx(), &identity("tcg-guest", now())).map_err(rpc_error).context("set_guest_identity")?;
    Ok(())
}

/// The weight, the cpuset and a CPU quota set on a running container, seen
/// by StatsContainer and by the container in its own cgroup files; then
/// memory, pids and CPU lifted back to "max".
fn extended_update(client: &AgentClient, host: &HostSide) -> anyhow::Result<()> {
    let update = |resources: Resources| UpdateContainerRequest {
        container_id: "svc".into(),
        resources: Some(resources).into(),
        ..Default::default()
    };
    let set = Resources {
        cpu_shares: 1024,
        cpuset_cpus: "1".into(),
        cpuset_mems: "0".into(),
        cpu_quota: 50_000,
        cpu_period: 100_000,
        ..Default::default()
    };
    client.update_container(ctx(), &update(set)).map_err(rpc_error).context("update_container")?;
    let stats = client.stats_container(ctx(), &container("svc")).map_err(rpc_error).context("stats_container")?;
    let limits = stats.limits.clone().into_option().context("no limits in stats")?;
    // runc's mapping: 1 + ((1024 - 2) * 9999) / 262142.
    ensure!(limits.cpu_weight == 39, "cpu.weight {} for 1024 shares", limits.cpu_weight);
    ensure!(limits.cpuset_cpus == "1" && limits.cpuset_mems == "0", "cpuset in stats: {limits:?}");
    ensure!(limits.cpu_quota == 50_000 && limits.cpu_period == 100_000 && !limits.cpu_unlimited, "{limits:?}");
    ensure!(!limits.memory_unlimited && !limits.pids_unlimited && limits.pids_limit == PIDS_LIMIT, "{limits:?}");
    let files = "cat /sys/fs/cgroup/cpu.weight /sys/fs/cgroup/cpuset.cpus /sys/fs/cgroup/cpu.max";
    let seen = exec_output(client, host, "svc", "cg1", &["sh", "-c", files])?;
    ensure!(seen == "39\n1\n50000 100000\n", "the container's cgroup files: {seen:?}");
    let weight = Resources { cpu_weight: 250, ..Default::default() };
    client.update_container(ctx(), &update(weight)).map_err(rpc_error).context("update_container")?;

    let lift = Resources { memory_unlimited: true, pids_unlimited: true, cpu_unlimited: true, ..Default::default() };
    client.update_container(ctx(), &update(lift)).map_err(rpc_error).context("update_container")?;
    let stats = client.stats_container(ctx(), &container("svc")).map_err(rpc_error).context("stats_container")?;
    let limits = stats.limits.clone().into_option().context("no limits in stats")?;
    ensure!(stats.memory_limit == 0 && stats.pids_limit == 0, "limits after lifting: {stats:?}");
    ensure!(limits.memory_unlimited && limits.pids_unlimited && limits.cpu_unlimited, "{limits:?}");
    ensure!(limits.cpu_weight == 250 && limits.cpuset_cpus == "1", "{limits:?}");
    let files = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max";
    let seen = exec_output(client, host, "svc", "cg2", &["sh", "-c", files])?;
    ensure!(seen == "max\nmax\nmax 100000\n", "the container's cgroup files after lifting: {seen:?}");

    // A value and "unlimited" for one limit is refused.
    let both = Resources { memory_limit: MEMORY_LIMIT, memory_unlimited: true, ..Default::default() };
    let err = client.update_container(ctx(), &update(both)).map_err(rpc_error).err().context("accepted both")?;
    ensure!(err.to_string().contains("memory limit is given a value and told to be unlimited"), "{err}");
    Ok(())
}

/// A container that allocates past its memory limit is OOM-killed, and a
/// GetOOMEvent waiting since before it started returns its ID. Returns
/// the time from start to the event.
fn oom_event(client: &AgentClient) -> anyhow::Result<Duration> {
    // Nothing to report: the call ends at its deadline.
    let t0 = Instant::now();
    let quiet = client.get_oom_event(ttrpc::context::with_timeout(300_000_000), &Empty::new());
    ensure!(quiet.is_err() && t0.elapsed() < Duration::from_secs(10), "a quiet GetOOMEvent: {quiet:?}");

    let waiter = client.clone();
    let event = std::thread::spawn(move || {
        waiter.get_oom_event(ttrpc::context::with_timeout(180_000_000_000), &Empty::new()).map_err(rpc_error)
    });
    let o = SpecOptions { resources: Some(r#"{"memory":{"limit":16777216}}"#.into()), ..Default::default() };
    // dd's one 48 MiB block is read into memory: three times the limit.
    let hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=48M", "count=1"];
    client.create_container(ctx(), &request("hog", &hog, &o, Stdio::new())).map_err(rpc_error)?;
    let started = Instant::now();
    client.start_container(ctx(), &container("hog")).map_err(rpc_error).context("start_container")?;
    let status = client.wait_process(ctx(), &wait_for("hog", "")).map_err(rpc_error).context("wait_process")?.status;
    ensure!(status == 137, "the hog exited {status}, not killed by the OOM killer");
    let got = event.join().map_err(|_| anyhow!("the GetOOMEvent thread panicked"))?.context("get_oom_event")?;
    let oom_after = started.elapsed();
    ensure!(got.container_id == "hog", "GetOOMEvent named {:?}", got.container_id);
    let status = client.container_status(ctx(), &container("hog")).map_err(rpc_error).context("container_status")?;
    ensure!(status.state.enum_value() == Ok(ContainerState::STOPPED), "{status:?}");
    ensure!(status.exited && status.exit_code == 137, "{status:?}");
    // Reported once.
    let again = client.get_oom_event(ttrpc::context::with_timeout(500_000_000), &Empty::new());
    ensure!(again.is_err(), "the same OOM kill reported twice: {again:?}");
    client.remove_container(ctx(), &container("hog")).map_err(rpc_error).context("remove_container")?;
    Ok(oom_after)
}

/// The host's part: returns the figures to print.
fn drive(g: &Guest) -> anyhow::Result<String> {
    let (client, version, ready_after) = connect(g)?;
    let host = g.host;
    let details = client.get_guest_details(ctx(), &Empty::new()).map_err(rpc_error).context("get_guest_details")?;
    ensure!(details.agent_version == version && details.kernel_release.starts_with("6."), "{details:?}");
    ensure!(details.online_cpus >= 1 && details.mem_total_bytes > 100 << 20, "{details:?}");

    // CPUs: the guest boots with two; offline one, online it again.
    ensure!(details.online_cpus == 2 && details.possible_cpus == 2, "{details:?}");
    for n in [1, 2] {
        client
            .online_cpu_mem(ctx(), &OnlineCPUMemRequest { nb_cpus: n, ..Default::default() })
            .map_err(rpc_error)
            .context("online_cpu_mem")?;
        let online =
            client.get_guest_details(ctx(), &Empty::new()).map_err(rpc_error).context("get_guest_details")?.online_cpus;
        ensure!(online == n, "asked for {n} CPUs online, the guest has {online}");
    }

    // virtio-mmio slots: blk, vsock and rng are found; rng is unbound (no
    // device left behind) and bound again (probed again).
    let slots = client.list_virtio_slots(ctx(), &Empty::new()).map_err(rpc_error).context("list_virtio_slots")?.slots;
    for id in [2, 4, 19] {
        ensure!(slots.iter().any(|s| s.device_id == id && s.bound), "no bound slot with device {id}: {slots:?}");
    }
    let rng = slots.iter().find(|s| s.device_id == 4).map(|s| s.address).context("no rng slot")?;
    let slot = |bind| VirtioSlotRequest { address: rng, bind, ..Default::default() };
    let unbound = client.update_virtio_slot(ctx(), &slot(false)).map_err(rpc_error).context("update_virtio_slot")?;
    ensure!(!unbound.bound && unbound.device_id == 0, "after unbind: {unbound:?}");
    let bound = client.update_virtio_slot(ctx(), &slot(true)).map_err(rpc_error).context("update_virtio_slot")?;
    ensure!(bound.bound && bound.device_id == 4, "after bind: {bound:?}");
    let missing =
        client.update_virtio_slot(ctx(), &VirtioSlotRequest { address: 0x1234, bind: true, ..Default::default() });
    ensure!(missing.map_err(rpc_error).err().is_some_and(|e| e.to_string().contains("0x1234")), "a slot at 0x1234");

    // echo: create to output.
    let (out, handle) = host.capture()?;
    let t0 = Instant::now();
    client
        .create_container(
            ctx(),
            &request("hello", &["echo", "hello from vessel"], &SpecOptions::default(), output_ports(out, out)),
        )
        .map_err(rpc_error)?;
    client.start_container(ctx(), &container("hello")).map_err(rpc_error).context("start_container")?;
    let output = collected(handle)?;
    let create_to_output = t0.elapsed();
    ensure!(output == "hello from vessel\n", "echo printed {output:?}");
    let status = client.wait_process(ctx(), &wait_for("hello", "")).map_err(rpc_error).context("wait_process")?.status;
    ensure!(status == 0, "echo exited {status}");
    client.remove_container(ctx(), &container("hello")).map_err(rpc_error).context("remove_container")?;

    identity(&client, host)?;
    // The host dropped the agent's link after its readiness line: the
    // agent dials again and announces itself anew.
    let again = g.host.wait_ready(g.ready, Duration::from_secs(30)).context("no second announcement")?;
    ensure!(again == version, "the second announcement said {again:?}");

    // A long-running container with limits.
    let resources = format!(r#"{{"memory":{{"limit":{MEMORY_LIMIT}}},"pids":{{"limit":{PIDS_LIMIT}}}}}"#);
    let o = SpecOptions { hostname: Some("guestbox".into()), resources: Some(resources), ..Default::default() };
    // The beat file is replaced by a rename, so a reader never sees it empty.
    let looping = "while :; do echo x > /tmp/beat.new && mv /tmp/beat.new /tmp/beat; sleep 0.05; done";
    // Its cgroup namespace is rooted at its own cgroup: it sees itself at
    // "/", with its own limits there.
    let (out, handle) = host.capture()?;
    let look = "cat /proc/self/cgroup; cat /sys/fs/cgroup/pids.max";
    client
        .create_container(ctx(), &request("cgns", &["sh", "-c", look], &o, output_ports(out, out)))
        .map_err(rpc_error)?;
    client.start_container(ctx(), &container("cgns")).map_err(rpc_error)?;
    let seen = collected(handle)?;
    client.wait_process(ctx(), &wait_for("cgns", "")).map_err(rpc_error)?;
    client.remove_container(ctx(), &container("cgns")).map_err(rpc_error)?;
    ensure!(seen == format!("0::/\n{PIDS_LIMIT}\n"), "the container's cgroup view: {seen:?}");
    client
        .create_container(ctx(), &request("svc", &["sh", "-c", looping], &o, Stdio::new()))
        .map_err(rpc_error)
        .context("create_container")?;
    client.start_container(ctx(), &container("svc")).map_err(rpc_error).context("start_container")?;

    let (out, handle) = host.capture()?;
    let exec = ExecProcessRequest {
        container_id: "svc".into(),
        exec_id: "probe".into(),
        oci_process_json: process_json(&["sh", "-c", "hostname; cat /tmp/beat"], &SpecOptions::default()).into_bytes(),
        stdio: Some(output_ports(out, out)).into(),
        ..Default::default()
    };
    client.exec_process(ctx(), &exec).map_err(rpc_error).context("exec_process")?;
    ensure!(collected(handle)? == "guestbox\nx\n", "exec in the container");
    ensure!(
        client.wait_process(ctx(), &wait_for("svc", "probe")).map_err(rpc_error).context("wait_process")?.status == 0,
        "exec status"
    );

    let stats = client.stats_container(ctx(), &container("svc")).map_err(rpc_error).context("stats_container")?;
    ensure!(stats.memory_limit == MEMORY_LIMIT && stats.pids_limit == PIDS_LIMIT, "limits in stats: {stats:?}");
    ensure!(stats.memory_usage > 0 && stats.memory_usage < MEMORY_LIMIT, "memory usage {}", stats.memory_usage);
    ensure!((1..=PIDS_LIMIT).contains(&stats.pids_current), "pids {}", stats.pids_current);

    let update = UpdateContainerRequest {
        container_id: "svc".into(),
        resources: Some(Resources { memory_limit: 2 * MEMORY_LIMIT, ..Default::default() }).into(),
        ..Default::default()
    };
    client.update_container(ctx(), &update).map_err(rpc_error).context("update_container")?;
    let stats = client.stats_container(ctx(), &container("svc")).map_err(rpc_error).context("stats_container")?;
    ensure!(stats.memory_limit == 2 * MEMORY_LIMIT, "memory.max after the update: {}", stats.memory_limit);
    extended_update(&client, host)?;

    // Paused: no CPU time goes by; resumed: it does again.
    let settle = Duration::from_millis(700);
    client.pause_container(ctx(), &container("svc")).map_err(rpc_error).context("pause_container")?;
    let a = cpu_usage(&client, "svc")?;
    std::thread::sleep(settle);
    let b = cpu_usage(&client, "svc")?;
    ensure!(a == b, "a paused container used {} us of CPU", b - a);
    client.resume_container(ctx(), &container("svc")).map_err(rpc_error).context("resume_container")?;
    let c = cpu_usage(&client, "svc")?;
    std::thread::sleep(settle);
    let d = cpu_usage(&client, "svc")?;
    ensure!(d > c, "a resumed container made no progress ({c} us, then {d} us)");

    let kill = SignalProcessRequest {
        container_id: "svc".into(),
        signal: libc::SIGKILL as u32,
        all: true,
        ..Default::default()
    };
    client.signal_process(ctx(), &kill).map_err(rpc_error).context("signal_process")?;
    let status = client.wait_process(ctx(), &wait_for("svc", "")).map_err(rpc_error).context("wait_process")?.status;
    ensure!(status == 137, "killed container exited {status}");
    client.remove_container(ctx(), &container("svc")).map_err(rpc_error).context("remove_container")?;
    let gone = client.stats_container(ctx(), &ContainerRequest { container_id: "svc".into(), ..Default::default() });
    ensure!(gone.is_err(), "a removed container still has stats");

    let oom_after = oom_event(&client)?;
    destroy(&client)?;
    Ok(format!(
        "containers_in_a_guest: QEMU spawn to agent ready {ready_after:?} (guest uptime at ready {} ms); \
         create to output {create_to_output:?} (echo, under TCG); weight, cpuset and lifted limits read back; \
         OOM kill of \"hog\" reported {oom_after:?} after its start",
        details.ready_after_boot_ms
    ))
}

fn main() {
    let mut args = Arguments::from_args();
    // One guest at a time: each has 2 vCPUs, and the boot figure printed
    // should not include another guest's share of the machine.
    args.test_threads.get_or_insert(1);
    // The root disk is an ext4 image made here.
    let tcg = if args.list { None } else { e2fsprogs_unavailable().or_else(qemu_tcg_unavailable) };
    let net = tcg.clone().or_else(vessel_tests::netns::unavailable);
    let mut trials = gate(
        tcg.clone(),
        [
            trial("containers_in_a_guest", containers_in_a_guest),
            trial(
                "a_container_gets_what_its_spec_grants_in_a_guest",
                security::a_container_gets_what_its_spec_grants_in_a_guest,
            ),
        ],
    );
    trials.extend(gate(net, [trial("container_network_in_a_guest", container_network_in_a_guest)]));
    libtest_mimic::run(&args, trials).exit();
}
