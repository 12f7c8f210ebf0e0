//! A container gets what its spec grants and no more, in a real guest
//! kernel: containerd's default capabilities and seccomp profile
//! (fixtures), containerd's device list (deny all; the defaults stay), a
//! nodev root; an unsupported seccomp feature refused; and Remove
//! leaving no process of the container behind.

use super::*;

/// containerd's default capability sets (bounding, effective, permitted).
const CAPABILITIES: &str = include_str!("../fixtures/containerd-default-capabilities.json");
/// A representative part of containerd's default seccomp profile: the
/// allowlist with defaultAction SCMP_ACT_ERRNO, its conditional entries
/// for personality, socket (no AF_VSOCK) and clone (no namespace flags),
/// and clone3 answered with ENOSYS. See the fixture for the names.
const SECCOMP: &str = include_str!("../fixtures/containerd-default-seccomp.json");
/// The sets above as /proc/self/status shows them.
const CONTAINERD_CAPS: &str = "00000000a80425fb";

/// A static x86_64 program that makes one system call with three small
/// arguments and exits with the errno it got (0 if none; a call that
/// returns a descriptor exits with its negation).
fn syscall_probe(nr: i64, args: [i32; 3]) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let mut code = Vec::new();
    let mov = |code: &mut Vec<u8>, reg: u8, value: i32| {
        // mov r64, imm32 (sign-extended)
        code.extend([0x48, 0xc7, 0xc0 | reg]);
        code.extend(value.to_le_bytes());
    };
    mov(&mut code, 0, nr as i32); // rax
    mov(&mut code, 7, args[0]); // rdi
    mov(&mut code, 6, args[1]); // rsi
    mov(&mut code, 2, args[2]); // rdx
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0x48, 0xf7, 0xd8]); // neg rax
    code.extend([0x48, 0x89, 0xc7]); // mov rdi, rax
    mov(&mut code, 0, libc::SYS_exit as i32);
    code.extend([0x0f, 0x05]); // syscall
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend((BASE + HEADERS).to_le_bytes()); // entry
    elf.extend(64u64.to_le_bytes()); // program headers
    elf.extend(0u64.to_le_bytes()); // no sections
    elf.extend(0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend(half.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R X
    for word in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend(word.to_le_bytes());
    }
    elf.extend(code);
    elf
}

fn probes() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("probe-vsock", syscall_probe(libc::SYS_socket, [libc::AF_VSOCK, libc::SOCK_STREAM, 0])),
        ("probe-module", syscall_probe(libc::SYS_init_module, [0, 0, 0])),
    ]
}

/// `spec_json` with `edit` applied to it as JSON.
fn spec_with(args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<Vec<u8>> {
    let mut spec: serde_json::Value = serde_json::from_slice(&spec_json(args, &SpecOptions::default()))?;
    edit(&mut spec);
    Ok(serde_json::to_vec(&spec)?)
}

fn containerd_defaults(spec: &mut serde_json::Value) {
    spec["process"]["capabilities"] = serde_json::from_str(CAPABILITIES).expect("the capabilities fixture");
    spec["linux"]["seccomp"] = serde_json::from_str(SECCOMP).expect("the seccomp fixture");
    spec["linux"]["resources"] = serde_json::json!({"devices": [{"allow": false, "access": "rwm"}]});
}

/// Creates and starts container `id` from `spec`, and returns what it
/// printed and its exit status.
fn run_to_end(g: &Guest, client: &AgentClient, id: &str, spec: Vec<u8>) -> anyhow::Result<(String, i32)> {
    let (out, handle) = g.host.capture()?;
    let req = vessel_tests::agent::create_request_on_disk(id, spec, DISK_SERIAL, output_ports(out, out));
    client.create_container(ctx(), &req).map_err(rpc_error).context("create_container")?;
    client.start_container(ctx(), &container(id)).map_err(rpc_error).context("start_container")?;
    let output = collected(handle)?;
    let status = client.wait_process(ctx(), &wait_for(id, "")).map_err(rpc_error).context("wait_process")?.status;
    client.remove_container(ctx(), &container(id)).map_err(rpc_error).context("remove_container")?;
    Ok((output, status))
}

pub fn a_container_gets_what_its_spec_grants_in_a_guest() -> anyhow::Result<()> {
    let (report, _) = with_guest_files("agent-guest-sec", None, &probes(), |g| {
        let (client, _, _) = connect(g)?;
        // Every part runs, and every failure is reported together.
        let failures: Vec<String> =
            [granted(g, &client), notify_refused(&client), remove_leaves_no_process(g, &client)]
                .into_iter()
                .filter_map(|r| r.err().map(|e| format!("{e:#}")))
                .collect();
        ensure!(failures.is_empty(), "{}", failures.join("\n---\n"));
        destroy(&client)?;
        Ok(format!(
            "a_container_gets_what_its_spec_grants_in_a_guest: caps {CONTAINERD_CAPS}; block mknod, AF_VSOCK and \
             init_module refused with EPERM; nodev root; NOTIFY refused; a removed container's process gone"
        ))
    })?;
    eprintln!("{report}");
    Ok(())
}

/// containerd's defaults: the capability sets /proc shows, and what they,
/// the seccomp profile, the device list and a nodev root refuse.
fn granted(g: &Guest, client: &AgentClient) -> anyhow::Result<()> {
    let script = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
        mknod /tmp/blk b 8 0; echo mknod-block=$?; \
        probe-vsock; echo vsock=$?; \
        probe-module; echo module=$?; \
        mknod /tmp/null c 1 3 && echo x > /tmp/null; echo image-node=$?; \
        echo x > /dev/null; echo dev-null=$?";
    let spec = spec_with(&["sh", "-c", script], containerd_defaults)?;
    let (output, _) = run_to_end(g, client, "granted", spec)?;
    let mut want = vec![
        "CapInh:\t0000000000000000".to_string(),
        format!("CapPrm:\t{CONTAINERD_CAPS}"),
        format!("CapEff:\t{CONTAINERD_CAPS}"),
        format!("CapBnd:\t{CONTAINERD_CAPS}"),
        "CapAmb:\t0000000000000000".to_string(),
    ];
    // EPERM (1): the device program (mknod of a block device), seccomp
    // (AF_VSOCK; init_module, which the capabilities deny too).
    want.extend(["mknod-block=1", "vsock=1", "module=1", "dev-null=0"].map(String::from));
    let missing: Vec<&String> = want.iter().filter(|w| !output.lines().any(|l| l == w.as_str())).collect();
    ensure!(missing.is_empty(), "no {missing:?} in:\n{output}");
    ensure!(output.contains("mknod: /tmp/blk: Operation not permitted"), "{output}");
    // A node made in the image's root is not a device: nodev.
    ensure!(!output.lines().any(|l| l == "image-node=0"), "a device node in the root opened:\n{output}");
    Ok(())
}

/// A profile the agent cannot apply is refused, not skipped.
fn notify_refused(client: &AgentClient) -> anyhow::Result<()> {
    let notify = spec_with(&["true"], |spec| {
        containerd_defaults(spec);
        spec["linux"]["seccomp"]["listenerPath"] = "/run/seccomp-agent.sock".into();
        spec["linux"]["seccomp"]["syscalls"][0]["action"] = "SCMP_ACT_NOTIFY".into();
    })?;
    let req = vessel_tests::agent::create_request_on_disk("notify", notify, DISK_SERIAL, Stdio::new());
    let created = client.create_container(ctx(), &req).map_err(rpc_error);
    if created.is_ok() {
        let _ = client.remove_container(ctx(), &container("notify"));
    }
    let err = created.err().context("a seccomp listener and SCMP_ACT_NOTIFY were accepted")?;
    ensure!(err.to_string().contains("seccomp: a listener (listenerPath) is not supported"), "{err}");
    Ok(())
}

/// A container sharing the guest's PID namespace leaves a process of its
/// own behind its first one; RemoveContainer kills it too (cgroup.kill),
/// where killing the first process alone would not.
fn remove_leaves_no_process(g: &Guest, client: &AgentClient) -> anyhow::Result<()> {
    let no_pid_ns = |spec: &mut serde_json::Value| {
        if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
            list.retain(|ns| ns["type"] != "pid");
        }
    };
    let (out, handle) = g.host.capture()?;
    // The first process ends at once; its child stays, outside any PID
    // namespace of the container's that could take it along.
    let detach = "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!";
    let spec = spec_with(&["sh", "-c", detach], no_pid_ns)?;
    let req = vessel_tests::agent::create_request_on_disk("parent", spec, DISK_SERIAL, output_ports(out, out));
    client.create_container(ctx(), &req).map_err(rpc_error).context("create_container")?;
    client.start_container(ctx(), &container("parent")).map_err(rpc_error).context("start_container")?;
    let pid: u32 = collected(handle)?.trim().parse().context("the detached process's PID")?;
    client.wait_process(ctx(), &wait_for("parent", "")).map_err(rpc_error).context("wait_process")?;
    client.remove_container(ctx(), &container("parent")).map_err(rpc_error).context("remove_container")?;
    let look = format!("kill -0 {pid} 2>/dev/null; echo alive=$?");
    let (seen, _) = run_to_end(g, client, "looker", spec_with(&["sh", "-c", &look], no_pid_ns)?)?;
    ensure!(seen.trim() == "alive=1", "process {pid} of a removed container: {seen:?}");
    Ok(())
}
