//! The agent's container logic on the host: `vessel-agent --listen` as
//! root, real containers (busybox root, new PID/UTS/IPC/mount namespaces,
//! `pivot_root`), driven through agent-proto exactly as the runtime drives
//! an agent in a guest. cgroup v2 limits, stats and the freezer need a
//! cgroup v2 host, which ours is not (MACHINE-NOTES.md); they are tested in
//! a guest kernel (guest_tcg.rs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use agent_proto::agent::{
    ContainerState, ContainerStatusResponse, Empty, ExecProcessRequest, IPAddress, Interface, RemoveProcessRequest,
    ResizeTerminalRequest, Route, Routes, SignalProcessRequest, Stdio, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use anyhow::{bail, ensure, Context};
use libtest_mimic::Arguments;
use vessel_tests::agent::{
    collected, container, create_request, ctx, output_ports, process_json, rpc_error, spec_json, start_host_agent,
    start_host_agent_in, wait_for, HostAgent, SpecOptions,
};
use vessel_tests::harness::{gate, trial};
use vessel_tests::netns::NetNs;

const AGENT: &str = env!("CARGO_BIN_EXE_vessel-agent");

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid takes no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Some("containers need root (namespaces, mounts, pivot_root)".into());
    }
    rootfs().as_ref().err().map(|e| format!("no busybox root filesystem: {e}"))
}

/// One busybox root for every test (containers never write to it).
static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn rootfs() -> &'static Result<PathBuf, String> {
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vessel-agent-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        resources::rootfs::busybox_tree(&dir).map_err(|e| e.to_string())?;
        Ok(dir)
    })
}

fn root() -> &'static Path {
    rootfs().as_ref().expect("checked by unavailable()")
}

fn agent(tag: &str) -> anyhow::Result<HostAgent> {
    start_host_agent(Path::new(AGENT), tag)
}

/// Creates, starts and waits for a container, returning (status, stdout).
fn run(a: &HostAgent, id: &str, args: &[&str], o: &SpecOptions) -> anyhow::Result<(i32, String)> {
    run_on(a, id, args, o, root())
}

/// [`run`] on the root `root`.
fn run_on(a: &HostAgent, id: &str, args: &[&str], o: &SpecOptions, root: &Path) -> anyhow::Result<(i32, String)> {
    let (out, handle) = a.host.capture()?;
    let create = create_request(id, spec_json(args, o), root, output_ports(out, out));
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container(id)).map_err(rpc_error)?;
    let status = a.client.wait_process(ctx(), &wait_for(id, "")).map_err(rpc_error)?.status;
    let output = collected(handle)?;
    a.client.remove_container(ctx(), &container(id)).map_err(rpc_error)?;
    Ok((status, output))
}

fn echo_runs_in_its_own_namespaces() -> anyhow::Result<()> {
    let a = agent("echo")?;
    let script = "echo hello; hostname; readlink /proc/self/ns/pid; echo pid=$$; id -u; ls -A /sys/firmware | wc -l; \
                  touch /proc/sysrq-trigger 2>/dev/null || echo sysrq-ro";
    let o = SpecOptions { hostname: Some("box1".into()), ..Default::default() };
    let (status, out) = run(&a, "echo-1", &["sh", "-c", script], &o)?;
    ensure!(status == 0, "exit status {status}, output {out:?}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 7, "unexpected output {out:?}");
    ensure!(lines[0] == "hello" && lines[1] == "box1", "{out:?}");
    let host_ns = std::fs::read_link("/proc/self/ns/pid")?;
    ensure!(
        lines[2].starts_with("pid:[") && Path::new(lines[2]) != host_ns,
        "pid namespace {} vs host {host_ns:?}",
        lines[2]
    );
    ensure!(lines[3] == "pid=1", "the container's process is not PID 1 of its namespace: {out:?}");
    ensure!(lines[4] == "0", "{out:?}");
    ensure!(
        std::fs::read_dir("/sys/firmware").map(|d| d.count() > 0).unwrap_or(false),
        "the host's /sys/firmware is empty: nothing to show its masking"
    );
    ensure!(lines[5].trim() == "0", "/sys/firmware is not masked: {out:?}");
    ensure!(lines[6] == "sysrq-ro", "/proc/sysrq-trigger is writable: {out:?}");
    // The agent's own hostname is untouched.
    ensure!(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim() != "box1");
    Ok(())
}

/// An image whose /dev is an absolute symlink: it is followed inside the
/// container's root, so the mounts and device nodes the agent makes land
/// there, never at the same path outside; a link to nothing in the root is
/// refused by name.
fn image_symlinks_stay_inside_the_root() -> anyhow::Result<()> {
    let a = agent("links")?;
    let base = std::env::temp_dir().join(format!("vessel-agent-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(&outside)?;
    resources::rootfs::busybox_tree(&root)?;
    std::fs::remove_dir_all(root.join("dev"))?;
    std::os::unix::fs::symlink(&outside, root.join("dev"))?;
    let script = &["sh", "-c", "echo x > /dev/null && echo ok"];
    // Dangling inside the root.
    let dangling = run_on(&a, "dangling", script, &SpecOptions::default(), &root);
    // The same path made inside the root.
    let inside = root.join(outside.strip_prefix("/")?);
    std::fs::create_dir_all(&inside)?;
    let followed = run_on(&a, "followed", script, &SpecOptions::default(), &root);
    let leaked: Vec<_> = std::fs::read_dir(&outside)?.flatten().map(|e| e.file_name()).collect();
    let _ = std::fs::remove_dir_all(&base);
    ensure!(leaked.is_empty(), "the agent made {leaked:?} outside the container's root");
    let err = format!("{:#}", dangling.err().context("a dangling /dev was accepted")?);
    ensure!(err.contains("symlink to nothing inside the container's root"), "{err}");
    let (status, out) = followed?;
    ensure!(status == 0 && out == "ok\n", "exit {status}, output {out:?}");
    Ok(())
}

fn exit_codes_and_signals() -> anyhow::Result<()> {
    let a = agent("exit")?;
    let (status, _) = run(&a, "exit-3", &["sh", "-c", "exit 3"], &SpecOptions::default())?;
    ensure!(status == 3, "sh -c 'exit 3' gave {status}");
    // A process starts with no signal ignored or blocked (SIGPIPE ends the
    // writers of a pipeline), whatever the agent had.
    let (status, out) =
        run(&a, "signals", &["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"], &SpecOptions::default())?;
    ensure!(status == 0, "grep gave {status}: {out:?}");
    ensure!(
        out.lines().count() == 2 && out.lines().all(|l| l.ends_with("\t0000000000000000")),
        "signals ignored or blocked in a new process: {out:?}"
    );

    let create = create_request("long", spec_json(&["sleep", "1000"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container("long")).map_err(rpc_error)?;
    let signal = |exec_id: &str, signal: u32, all: bool| SignalProcessRequest {
        container_id: "long".into(),
        exec_id: exec_id.into(),
        signal,
        all,
        ..Default::default()
    };
    // An exec'd process is not its namespace's init: SIGTERM kills it.
    let exec = ExecProcessRequest {
        container_id: "long".into(),
        exec_id: "e1".into(),
        oci_process_json: process_json(&["sleep", "500"], &SpecOptions::default()).into_bytes(),
        ..Default::default()
    };
    a.client.exec_process(ctx(), &exec).map_err(rpc_error)?;
    a.client.signal_process(ctx(), &signal("e1", libc::SIGTERM as u32, false)).map_err(rpc_error)?;
    let status = a.client.wait_process(ctx(), &wait_for("long", "e1")).map_err(rpc_error)?.status;
    ensure!(status == 128 + libc::SIGTERM, "SIGTERM gave {status}");
    a.client.signal_process(ctx(), &signal("", libc::SIGKILL as u32, true)).map_err(rpc_error)?;
    let status = a.client.wait_process(ctx(), &wait_for("long", "")).map_err(rpc_error)?.status;
    ensure!(status == 128 + libc::SIGKILL, "SIGKILL gave {status}");
    a.client.remove_container(ctx(), &container("long")).map_err(rpc_error)?;
    Ok(())
}

fn exec_ps_stdin_and_users() -> anyhow::Result<()> {
    let a = agent("exec")?;
    let create = create_request("svc", spec_json(&["sleep", "1000"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    // Created, not started: nothing runs the command yet.
    let ps = a.client.list_processes(ctx(), &container("svc")).map_err(rpc_error)?;
    ensure!(ps.processes.iter().all(|p| !p.command.contains("sleep")), "sleep runs before start: {:?}", ps.processes);
    a.client.start_container(ctx(), &container("svc")).map_err(rpc_error)?;

    // stdin in, stdout out.
    let (stdin_port, stdin) = a.host.stdin()?;
    let (out, handle) = a.host.capture()?;
    let exec = |id: &str, args: &[&str], o: &SpecOptions, stdio: Stdio| ExecProcessRequest {
        container_id: "svc".into(),
        exec_id: id.into(),
        oci_process_json: process_json(args, o).into_bytes(),
        stdio: Some(stdio).into(),
        ..Default::default()
    };
    let stdio = Stdio { stdin_port, stdout_port: out, ..Default::default() };
    a.client.exec_process(ctx(), &exec("cat", &["cat"], &SpecOptions::default(), stdio)).map_err(rpc_error)?;
    let mut conn = stdin.join().map_err(|_| anyhow::anyhow!("stdin thread"))??;
    conn.write_all(b"ping\n")?;
    conn.shutdown(std::net::Shutdown::Write)?;
    ensure!(collected(handle)? == "ping\n", "cat did not echo its stdin");
    let status = a.client.wait_process(ctx(), &wait_for("svc", "cat")).map_err(rpc_error)?.status;
    ensure!(status == 0, "cat exited {status}");

    // A process as another user, seen by ps and by itself.
    let (out, handle) = a.host.capture()?;
    let user = SpecOptions { uid: 1000, gid: 1000, ..Default::default() };
    let stdio = output_ports(out, out);
    a.client
        .exec_process(ctx(), &exec("user", &["sh", "-c", "id -u; id -g; exec sleep 600"], &user, stdio))
        .map_err(rpc_error)?;
    let ps = a.client.list_processes(ctx(), &container("svc")).map_err(rpc_error)?.processes;
    let init = ps.iter().find(|p| p.ns_pid == 1).context("no PID 1 in ps")?;
    ensure!(init.command == "sleep 1000" && init.user == "root", "PID 1 is {init:?}");
    // The exec'd shell replaces itself with sleep; give it the moment (ten
    // seconds at most: other tests run alongside).
    let mut found = None;
    for _ in 0..1000 {
        let ps = a.client.list_processes(ctx(), &container("svc")).map_err(rpc_error)?.processes;
        found = ps.into_iter().find(|p| p.command == "sleep 600");
        if found.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let found = found.context("the exec'd sleep 600 is not in ps")?;
    ensure!(found.uid == 1000 && found.user == "1000" && found.ns_pid > 1, "{found:?}");
    a.client
        .signal_process(
            ctx(),
            &SignalProcessRequest {
                container_id: "svc".into(),
                signal: libc::SIGKILL as u32,
                all: true,
                ..Default::default()
            },
        )
        .map_err(rpc_error)?;
    ensure!(collected(handle)? == "1000\n1000\n", "id in the container");
    let status = a.client.wait_process(ctx(), &wait_for("svc", "user")).map_err(rpc_error)?.status;
    ensure!(status == 137, "the user's process exited {status} after SIGKILL to all");
    a.client.remove_container(ctx(), &container("svc")).map_err(rpc_error)?;
    let err = a.client.list_processes(ctx(), &container("svc")).map(|_| ()).map_err(rpc_error);
    ensure!(err.is_err(), "a removed container is still listed");
    Ok(())
}

fn a_terminal_when_asked() -> anyhow::Result<()> {
    let a = agent("tty")?;
    let o = SpecOptions { terminal: true, ..Default::default() };
    let (status, out) = run(&a, "tty", &["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"], &o)?;
    ensure!(status == 0 && out == "is-a-tty\r\n", "status {status}, output {out:?}");
    let (status, out) = run(&a, "pipes", &["sh", "-c", "test -t 1 || echo not-a-tty"], &SpecOptions::default())?;
    ensure!(status == 0 && out == "not-a-tty\n", "status {status}, output {out:?}");
    Ok(())
}

fn status(a: &HostAgent, id: &str) -> anyhow::Result<ContainerStatusResponse> {
    a.client.container_status(ctx(), &container(id)).map_err(rpc_error).context("container_status")
}

fn now_ms() -> anyhow::Result<u64> {
    Ok(u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?)
}

/// ContainerStatus from created through running to stopped with the exit
/// code; then DestroySandbox removes what is left and the agent stays.
fn status_follows_a_container_to_stopped_with_its_exit_code() -> anyhow::Result<()> {
    let a = agent("status")?;
    let (stdin_port, stdin) = a.host.stdin()?;
    let stdio = Stdio { stdin_port, ..Default::default() };
    let create =
        create_request("st", spec_json(&["sh", "-c", "read x; exit 5"], &SpecOptions::default()), root(), stdio);
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    let created = status(&a, "st")?;
    ensure!(created.state.enum_value() == Ok(ContainerState::CREATED), "{created:?}");
    ensure!(created.pid > 0 && created.started_at_ms == 0 && !created.exited, "{created:?}");

    let before = now_ms()?;
    a.client.start_container(ctx(), &container("st")).map_err(rpc_error)?;
    let running = status(&a, "st")?;
    ensure!(running.state.enum_value() == Ok(ContainerState::RUNNING) && !running.exited, "{running:?}");
    ensure!(running.pid == created.pid, "the first process's PID changed: {created:?} then {running:?}");
    ensure!((before..=now_ms()?).contains(&running.started_at_ms), "start time {} not now", running.started_at_ms);
    // The agent's view of the PID: its own /proc has it.
    ensure!(Path::new(&format!("/proc/{}", running.pid)).exists(), "no /proc/{}", running.pid);

    let mut conn = stdin.join().map_err(|_| anyhow::anyhow!("stdin thread"))??;
    conn.write_all(b"go\n")?;
    drop(conn);
    let code = a.client.wait_process(ctx(), &wait_for("st", "")).map_err(rpc_error)?.status;
    ensure!(code == 5, "exit {code}");
    let stopped = status(&a, "st")?;
    ensure!(stopped.state.enum_value() == Ok(ContainerState::STOPPED), "{stopped:?}");
    ensure!(stopped.exited && stopped.exit_code == 5, "{stopped:?}");
    ensure!(stopped.started_at_ms == running.started_at_ms, "{stopped:?}");

    // DestroySandbox takes the stopped one and a running one; the agent
    // (in a guest: the VM) stays up for the host to stop.
    let create = create_request("bg", spec_json(&["sleep", "1000"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container("bg")).map_err(rpc_error)?;
    a.client.destroy_sandbox(ctx(), &Empty::new()).map_err(rpc_error).context("destroy_sandbox")?;
    for id in ["st", "bg"] {
        let err = status(&a, id).err().with_context(|| format!("{id} is still there after DestroySandbox"))?;
        ensure!(err.root_cause().to_string().contains("NOT_FOUND"), "{err:#}");
    }
    ensure!(a.client.check(ctx(), &Empty::new()).map_err(rpc_error)?.serving, "the agent stopped serving");
    Ok(())
}

/// RemoveProcess refuses an exec that runs, and frees its ID once it
/// exited.
fn an_exec_is_removed_only_once_it_exited_and_its_id_is_reused() -> anyhow::Result<()> {
    let a = agent("rmexec")?;
    let create = create_request("svc", spec_json(&["sleep", "1000"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container("svc")).map_err(rpc_error)?;
    let exec = |args: &[&str]| ExecProcessRequest {
        container_id: "svc".into(),
        exec_id: "e1".into(),
        oci_process_json: process_json(args, &SpecOptions::default()).into_bytes(),
        ..Default::default()
    };
    let remove = RemoveProcessRequest { container_id: "svc".into(), exec_id: "e1".into(), ..Default::default() };
    a.client.exec_process(ctx(), &exec(&["sleep", "500"])).map_err(rpc_error)?;
    let err = a.client.remove_process(ctx(), &remove).map_err(rpc_error).err().context("a running exec was removed")?;
    ensure!(err.to_string().contains("process \"e1\" of container \"svc\" still runs"), "{err}");
    let err = a.client.exec_process(ctx(), &exec(&["true"])).map_err(rpc_error).err().context("a second e1")?;
    ensure!(err.to_string().contains("already has a process with exec ID \"e1\""), "{err}");

    let kill = SignalProcessRequest {
        container_id: "svc".into(),
        exec_id: "e1".into(),
        signal: libc::SIGKILL as u32,
        ..Default::default()
    };
    a.client.signal_process(ctx(), &kill).map_err(rpc_error)?;
    let code = a.client.wait_process(ctx(), &wait_for("svc", "e1")).map_err(rpc_error)?.status;
    ensure!(code == 137, "the killed exec exited {code}");
    a.client.remove_process(ctx(), &remove).map_err(rpc_error).context("remove_process")?;
    let err = a.client.wait_process(ctx(), &wait_for("svc", "e1")).map_err(rpc_error).err().context("still known")?;
    ensure!(err.to_string().contains("NOT_FOUND"), "{err}");

    // The ID again, for a new process with its own status.
    a.client.exec_process(ctx(), &exec(&["sh", "-c", "exit 4"])).map_err(rpc_error).context("e1 again")?;
    let code = a.client.wait_process(ctx(), &wait_for("svc", "e1")).map_err(rpc_error)?.status;
    ensure!(code == 4, "the second e1 exited {code}");
    // The first process is removed with its container only.
    let first = RemoveProcessRequest { container_id: "svc".into(), ..Default::default() };
    let err = a.client.remove_process(ctx(), &first).map_err(rpc_error).err().context("the first process removed")?;
    ensure!(err.to_string().contains("RemoveContainer"), "{err}");
    a.client.remove_container(ctx(), &container("svc")).map_err(rpc_error)?;
    Ok(())
}

/// ResizeTerminal sets the size `stty` sees inside the container; a
/// process without a terminal is refused by name.
fn a_terminal_is_resized_and_the_process_sees_the_size() -> anyhow::Result<()> {
    let a = agent("resize")?;
    let (stdin_port, stdin) = a.host.stdin()?;
    let (out, handle) = a.host.capture()?;
    let o = SpecOptions { terminal: true, ..Default::default() };
    let stdio = Stdio { stdin_port, stdout_port: out, ..Default::default() };
    let create = create_request("tty", spec_json(&["sh", "-c", "read x; stty size"], &o), root(), stdio);
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container("tty")).map_err(rpc_error)?;
    let resize = |id: &str, rows, columns| ResizeTerminalRequest {
        container_id: id.into(),
        rows,
        columns,
        ..Default::default()
    };
    a.client.resize_terminal(ctx(), &resize("tty", 33, 77)).map_err(rpc_error).context("resize_terminal")?;
    // The shell runs stty once it read a line: after the resize.
    let mut conn = stdin.join().map_err(|_| anyhow::anyhow!("stdin thread"))??;
    conn.write_all(b"go\n")?;
    let output = collected(handle)?;
    drop(conn);
    let code = a.client.wait_process(ctx(), &wait_for("tty", "")).map_err(rpc_error)?.status;
    ensure!(code == 0 && output.lines().any(|l| l.trim_end() == "33 77"), "stty exited {code}, printed {output:?}");
    let err = a.client.resize_terminal(ctx(), &resize("tty", 0, 80)).map_err(rpc_error).err().context("0 rows")?;
    ensure!(err.to_string().contains("0 rows"), "{err}");
    a.client.remove_container(ctx(), &container("tty")).map_err(rpc_error)?;

    let create = create_request("plain", spec_json(&["sleep", "1000"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    let err = a.client.resize_terminal(ctx(), &resize("plain", 24, 80)).map_err(rpc_error).err().context("resized")?;
    ensure!(err.to_string().contains("the first process of container \"plain\" has no terminal"), "{err}");
    a.client.remove_container(ctx(), &container("plain")).map_err(rpc_error)?;
    Ok(())
}

fn bad_requests_get_clear_errors_and_the_agent_stays() -> anyhow::Result<()> {
    let a = agent("bad")?;
    let expect_err = |what: &str, r: Result<(), anyhow::Error>, want: &str| -> anyhow::Result<()> {
        match r {
            Ok(()) => bail!("{what}: accepted"),
            Err(e) if e.to_string().contains(want) => Ok(()),
            Err(e) => bail!("{what}: error {e:#} does not say {want:?}"),
        }
    };
    let ok_spec = || spec_json(&["true"], &SpecOptions::default());
    let create = |id: &str, spec: Vec<u8>, root: &Path| {
        a.client.create_container(ctx(), &create_request(id, spec, root, Stdio::new())).map(|_| ()).map_err(rpc_error)
    };
    expect_err("invalid JSON", create("c", b"{nope".to_vec(), root()), "invalid OCI spec")?;
    expect_err("no such rootfs", create("c", ok_spec(), Path::new("/no/such/root")), "/no/such/root")?;
    expect_err("bad ID", create("../x", ok_spec(), root()), "container ID")?;
    expect_err(
        "missing program",
        create("c", spec_json(&["no-such-program"], &SpecOptions::default()), root()),
        "no-such-program",
    )?;
    expect_err(
        "cgroup limits without cgroup v2",
        create(
            "c",
            spec_json(
                &["true"],
                &SpecOptions { resources: Some(r#"{"memory":{"limit":1048576}}"#.into()), ..Default::default() },
            ),
            root(),
        ),
        "cgroup",
    )?;
    create("c", ok_spec(), root())?;
    expect_err("duplicate", create("c", ok_spec(), root()), "already exists")?;
    let unknown = |r: Result<(), anyhow::Error>| expect_err("unknown container", r, "\"ghost\"");
    unknown(a.client.start_container(ctx(), &container("ghost")).map(|_| ()).map_err(rpc_error))?;
    unknown(a.client.wait_process(ctx(), &wait_for("ghost", "")).map(|_| ()).map_err(rpc_error))?;
    unknown(a.client.remove_container(ctx(), &container("ghost")).map(|_| ()).map_err(rpc_error))?;
    expect_err(
        "unknown exec ID",
        a.client.wait_process(ctx(), &wait_for("c", "nope")).map(|_| ()).map_err(rpc_error),
        "\"nope\"",
    )?;
    expect_err(
        "exec before start",
        a.client
            .exec_process(
                ctx(),
                &ExecProcessRequest {
                    container_id: "c".into(),
                    exec_id: "x".into(),
                    oci_process_json: process_json(&["true"], &SpecOptions::default()).into_bytes(),
                    ..Default::default()
                },
            )
            .map(|_| ())
            .map_err(rpc_error),
        "not Running",
    )?;
    expect_err(
        "stats on a v1 host",
        a.client.stats_container(ctx(), &container("c")).map(|_| ()).map_err(rpc_error),
        "cgroup v2",
    )?;
    expect_err(
        "a bad signal",
        a.client
            .signal_process(
                ctx(),
                &SignalProcessRequest { container_id: "c".into(), signal: 999, ..Default::default() },
            )
            .map(|_| ())
            .map_err(rpc_error),
        "999",
    )?;
    a.client.remove_container(ctx(), &container("c")).map_err(rpc_error)?;
    ensure!(a.client.check(ctx(), &Empty::new()).map_err(rpc_error)?.serving, "the agent stopped serving");
    Ok(())
}

const MAC: &str = "02:00:00:00:00:10";

fn interfaces_and_routes_through_netlink() -> anyhow::Result<()> {
    let ns = NetNs::new("agent-net")?;
    ns.ip(&["link", "add", "vt0", "type", "veth", "peer", "name", "vt1"])?;
    ns.ip(&["link", "set", "vt0", "address", MAC])?;
    ns.ip(&["link", "set", "vt1", "up"])?;
    let a = start_host_agent_in(Path::new(AGENT), "net", Some(&ns.0))?;
    let address = |ip: &str, len: u32| IPAddress { address: ip.into(), prefix_len: len, ..Default::default() };
    let update = |addresses: Vec<IPAddress>, mtu: u32| UpdateInterfaceRequest {
        interface: Some(Interface {
            name: "eth0".into(),
            hw_addr: MAC.into(),
            addresses,
            mtu,
            up: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };

    // Found by MAC, renamed, addressed, MTU set, up.
    let got = a
        .client
        .update_interface(ctx(), &update(vec![address("10.9.8.7", 24), address("fd00::7", 64)], 1400))
        .map_err(rpc_error)?;
    ensure!(got.name == "eth0" && got.mtu == 1400 && got.up && got.hw_addr == MAC, "{got:?}");
    let addrs: Vec<String> = got.addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
    ensure!(addrs.contains(&"10.9.8.7/24".into()) && addrs.contains(&"fd00::7/64".into()), "{addrs:?}");
    let shown = ns.ip(&["addr", "show", "dev", "eth0"])?;
    ensure!(shown.contains("mtu 1400") && shown.contains("inet 10.9.8.7/24") && shown.contains("UP"), "{shown}");

    // Routes: a default and a subnet through gateways.
    let route = |dest: &str, gateway: &str| Route {
        dest: dest.into(),
        gateway: gateway.into(),
        device: "eth0".into(),
        ..Default::default()
    };
    let routes = |list: Vec<Route>| UpdateRoutesRequest {
        routes: Some(Routes { routes: list, ..Default::default() }).into(),
        ..Default::default()
    };
    let got = a
        .client
        .update_routes(ctx(), &routes(vec![route("default", "10.9.8.1"), route("192.168.50.0/24", "10.9.8.2")]))
        .map_err(rpc_error)?
        .routes;
    ensure!(got.iter().any(|r| r.dest == "default" && r.gateway == "10.9.8.1" && r.device == "eth0"), "{got:?}");
    let shown = ns.ip(&["route"])?;
    ensure!(
        shown.contains("default via 10.9.8.1 dev eth0") && shown.contains("192.168.50.0/24 via 10.9.8.2 dev eth0"),
        "{shown}"
    );

    // Replacing: the default route goes, the other stays; the old address
    // goes, the new one comes.
    a.client.update_routes(ctx(), &routes(vec![route("192.168.50.0/24", "10.9.8.2")])).map_err(rpc_error)?;
    let shown = ns.ip(&["route"])?;
    ensure!(!shown.contains("default") && shown.contains("192.168.50.0/24"), "{shown}");
    a.client.update_interface(ctx(), &update(vec![address("10.9.8.8", 24)], 0)).map_err(rpc_error)?;
    let listed = a.client.list_interfaces(ctx(), &Empty::new()).map_err(rpc_error)?.interfaces;
    let eth0 = listed.iter().find(|i| i.name == "eth0").context("eth0 not listed")?;
    let v4: Vec<&str> =
        eth0.addresses.iter().filter(|a| !a.address.contains(':')).map(|a| a.address.as_str()).collect();
    ensure!(v4 == ["10.9.8.8"] && eth0.mtu == 1400, "{eth0:?}");
    ensure!(listed.iter().any(|i| i.name == "lo"), "lo not listed: {listed:?}");
    let listed = a.client.list_routes(ctx(), &Empty::new()).map_err(rpc_error)?.routes;
    ensure!(listed.iter().any(|r| r.dest == "10.9.8.0/24" && r.device == "eth0"), "{listed:?}");

    // Bad input.
    let err = |r: Result<(), anyhow::Error>, want: &str| -> anyhow::Result<()> {
        let e = r.err().with_context(|| format!("accepted, wanted an error saying {want:?}"))?.to_string();
        ensure!(e.contains(want), "{e:?} does not say {want:?}");
        Ok(())
    };
    err(
        a.client.update_interface(ctx(), &update(vec![address("999.1.1.1", 24)], 0)).map(|_| ()).map_err(rpc_error),
        "999.1.1.1",
    )?;
    err(
        a.client.update_interface(ctx(), &update(vec![address("10.1.1.1", 40)], 0)).map(|_| ()).map_err(rpc_error),
        "prefix length 40",
    )?;
    let mut ghost = update(vec![], 0);
    ghost.interface.as_mut().context("interface")?.hw_addr = "02:00:00:00:00:99".into();
    err(a.client.update_interface(ctx(), &ghost).map(|_| ()).map_err(rpc_error), "02:00:00:00:00:99")?;
    let mut bad = route("default", "10.9.8.1");
    bad.device = "nope0".into();
    err(a.client.update_routes(ctx(), &routes(vec![bad])).map(|_| ()).map_err(rpc_error), "nope0")?;
    Ok(())
}

/// Far more blocked WaitProcess calls than the agent has threads: those
/// past its bound are refused at once, and RemoveContainer still gets a
/// thread (it used to starve behind them).
fn blocked_waits_leave_threads_for_remove() -> anyhow::Result<()> {
    let a = agent("waits")?;
    let create =
        create_request("sleeper", spec_json(&["sleep", "1000"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container("sleeper")).map_err(rpc_error)?;
    // A container whose process has exited already: waiting for it needs
    // no slot, so it is answered even when every slot is taken.
    let create = create_request("quick", spec_json(&["true"], &SpecOptions::default()), root(), Stdio::new());
    a.client.create_container(ctx(), &create).map_err(rpc_error)?;
    a.client.start_container(ctx(), &container("quick")).map_err(rpc_error)?;
    let quick = a.client.wait_process(ctx(), &wait_for("quick", "")).map_err(rpc_error)?;
    ensure!(quick.status == 0, "quick exited {}", quick.status);
    let (done, results) = std::sync::mpsc::channel();
    for _ in 0..agent::service::THREADS {
        let (client, done) = (a.client.clone(), done.clone());
        std::thread::spawn(move || {
            // No deadline: blocked until the process exits.
            let r = client.wait_process(agent_proto::ttrpc::context::Context::default(), &wait_for("sleeper", ""));
            let _ = done.send(r.map(|w| w.status).map_err(rpc_error));
        });
    }
    let refused = agent::service::THREADS - agent::service::MAX_BLOCKED_WAITS;
    for _ in 0..refused {
        let r = results.recv_timeout(std::time::Duration::from_secs(60)).context("no wait was refused")?;
        let err = r.err().context("a wait returned while its process runs")?;
        ensure!(err.to_string().contains("WaitProcess calls are waiting already"), "{err}");
    }
    let quick = a.client.wait_process(ctx(), &wait_for("quick", "")).map_err(rpc_error)?;
    ensure!(quick.status == 0, "an exited process's wait was refused with every slot taken: {}", quick.status);
    let (removed_tx, removed) = std::sync::mpsc::channel();
    let client = a.client.clone();
    std::thread::spawn(move || {
        let _ = removed_tx.send(client.remove_container(ctx(), &container("sleeper")).map_err(rpc_error));
    });
    removed.recv_timeout(std::time::Duration::from_secs(30)).context("RemoveContainer starved")??;
    for _ in 0..agent::service::MAX_BLOCKED_WAITS {
        let status = results.recv_timeout(std::time::Duration::from_secs(30)).context("a wait never returned")??;
        ensure!(status == 137, "the removed container's process exited {status}");
    }
    Ok(())
}

/// The launch helper joins the process its pidfd holds, never a PID: when
/// that process is in the agent's own mount namespace (as when a dead
/// container's PID is reused by a process of the agent's), it refuses,
/// and nothing runs in the agent's context. Here this test plays the
/// agent and a `sleep` of its own is the target.
fn an_exec_never_joins_the_agents_own_namespaces() -> anyhow::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;

    let mut target = std::process::Command::new("sleep").arg("100").spawn()?;
    let pid = target.id() as i32;
    // SAFETY: pidfd_open takes integers and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    ensure!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let process: agent::launch::ProcessConfig = serde_json::from_value(serde_json::json!({
        "args": ["true"], "env": [], "cwd": "/", "uid": 0, "gid": 0, "additional_gids": [], "umask": null,
        "rlimits": [], "terminal": false, "no_new_privileges": true
    }))?;
    let launch = agent::launch::Launch { kind: agent::launch::Kind::Exec { init_pid: pid }, process };
    let (config_read, config_write) = agent::launch::pipe()?;
    let (mut sync, helper_sync) = std::os::unix::net::UnixStream::pair()?;
    let fds = [
        (config_read.as_raw_fd(), agent::launch::CONFIG_FD),
        (helper_sync.as_raw_fd(), agent::launch::SYNC_FD),
        (pidfd.as_raw_fd(), agent::launch::PIDFD_FD),
    ];
    // Above the helper's numbers first, so that no dup2 overwrites another.
    let high: Vec<(OwnedFd, i32)> = fds
        .iter()
        .map(|&(fd, to)| {
            // SAFETY: F_DUPFD_CLOEXEC on our own descriptor makes a new one.
            let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            // SAFETY: a new descriptor nothing else owns.
            (unsafe { OwnedFd::from_raw_fd(moved) }, to)
        })
        .collect();
    let pairs: Vec<(i32, i32)> = high.iter().map(|(fd, to)| (fd.as_raw_fd(), *to)).collect();
    let mut command = std::process::Command::new(AGENT);
    command.arg(agent::launch::LAUNCH_ARG).stdin(std::process::Stdio::null());
    let move_fds = move || {
        for &(from, to) in &pairs {
            // SAFETY: dup2 takes integers and is async-signal-safe.
            if unsafe { libc::dup2(from, to) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls dup2, which is safe between fork and exec.
    unsafe { command.pre_exec(move_fds) };
    let mut helper = command.spawn()?;
    drop((config_read, helper_sync, high));
    std::fs::File::from(config_write).write_all(&serde_json::to_vec(&launch)?)?;
    // One line: an error, or (joined) the pid of a process set up to run.
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut sync), &mut said)?;
    let _ = helper.kill();
    let status = helper.wait()?;
    target.kill()?;
    target.wait()?;
    ensure!(
        said.starts_with("error ") && said.contains("is in the agent's own mount namespace: not joined"),
        "the helper said {said:?} (exit {status})"
    );
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let skip = unavailable();
    let mut trials = gate(
        skip.clone(),
        [
            trial("echo_runs_in_its_own_namespaces", echo_runs_in_its_own_namespaces),
            trial("exit_codes_and_signals", exit_codes_and_signals),
            trial("image_symlinks_stay_inside_the_root", image_symlinks_stay_inside_the_root),
            trial("exec_ps_stdin_and_users", exec_ps_stdin_and_users),
            trial("a_terminal_when_asked", a_terminal_when_asked),
            trial(
                "status_follows_a_container_to_stopped_with_its_exit_code",
                status_follows_a_container_to_stopped_with_its_exit_code,
            ),
            trial(
                "an_exec_is_removed_only_once_it_exited_and_its_id_is_reused",
                an_exec_is_removed_only_once_it_exited_and_its_id_is_reused,
            ),
            trial(
                "a_terminal_is_resized_and_the_process_sees_the_size",
                a_terminal_is_resized_and_the_process_sees_the_size,
            ),
            trial(
                "bad_requests_get_clear_errors_and_the_agent_stays",
                bad_requests_get_clear_errors_and_the_agent_stays,
            ),
            trial("blocked_waits_leave_threads_for_remove", blocked_waits_leave_threads_for_remove),
            trial("an_exec_never_joins_the_agents_own_namespaces", an_exec_never_joins_the_agents_own_namespaces),
        ],
    );
    // It makes a veth pair in a network namespace of its own.
    trials.extend(gate(
        skip.or_else(vessel_tests::netns::unavailable),
        [trial("interfaces_and_routes_through_netlink", interfaces_and_routes_through_netlink)],
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(dir)) = ROOT.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
    conclusion.exit();
}
