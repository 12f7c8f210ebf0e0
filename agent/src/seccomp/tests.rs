use super::*;

/// Runs a filter on one call the way the kernel does (only the opcodes
/// the compiler emits), returning its verdict.
fn run(filter: &Filter, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let word = |offset: u32| -> u32 {
        match offset {
            0 => nr,
            4 => arch,
            o if (16..64).contains(&o) => {
                let arg = args[(o as usize - 16) / 8];
                if o % 8 == 0 {
                    arg as u32
                } else {
                    (arg >> 32) as u32
                }
            }
            o => panic!("load at {o}"),
        }
    };
    let (mut a, mut pc) = (0u32, 0usize);
    loop {
        let (code, jt, jf, k) = filter.insns[pc];
        pc += 1;
        match code {
            0x20 => a = word(k),
            0x54 => a &= k,
            0x05 => pc += k as usize,
            0x15 | 0x25 | 0x35 => {
                let taken = match code {
                    0x15 => a == k,
                    0x25 => a > k,
                    _ => a >= k,
                };
                pc += if taken { jt } else { jf } as usize;
            }
            0x06 => return k,
            other => panic!("opcode {other:#x}"),
        }
    }
}

fn profile(json: &str) -> LinuxSeccomp {
    serde_json::from_str(json).unwrap()
}

const X86_64: u32 = AUDIT_ARCH_X86_64;

#[test]
fn an_allowlist_allows_its_calls_and_returns_the_default_errno_for_others() {
    let f = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
            "syscalls":[{"names":["read","write","_llseek","chown32"],"action":"SCMP_ACT_ALLOW"},
                        {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
    ))
    .unwrap();
    let call = |nr: i64| run(&f, X86_64, nr as u32, [0; 6]);
    assert_eq!(call(libc::SYS_read), RET_ALLOW);
    assert_eq!(call(libc::SYS_write), RET_ALLOW);
    assert_eq!(call(libc::SYS_clone3), RET_ERRNO | libc::ENOSYS as u32);
    assert_eq!(call(libc::SYS_init_module), RET_ERRNO | libc::EPERM as u32);
    // i386 and x32 calls are killed, whatever the number.
    assert_eq!(run(&f, 0x4000_0003, 3, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(run(&f, X86_64, X32_SYSCALL_BIT | libc::SYS_read as u32, [0; 6]), RET_KILL_PROCESS);
}

#[test]
fn conditions_on_one_argument_are_alternatives_and_on_several_all_must_hold() {
    let f = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,"syscalls":[
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[
                {"index":0,"value":0,"op":"SCMP_CMP_EQ"},{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
            {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[
                {"index":0,"value":40,"op":"SCMP_CMP_NE"},{"index":1,"value":2,"op":"SCMP_CMP_LE"}]},
            {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[
                {"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
    ))
    .unwrap();
    let errno = RET_ERRNO | 1;
    let personality = |v: u64| run(&f, X86_64, libc::SYS_personality as u32, [v, 0, 0, 0, 0, 0]);
    assert_eq!((personality(0), personality(8), personality(3)), (RET_ALLOW, RET_ALLOW, errno));
    let socket = |family: u64, ty: u64| run(&f, X86_64, libc::SYS_socket as u32, [family, ty, 0, 0, 0, 0]);
    assert_eq!(socket(libc::AF_INET as u64, 1), RET_ALLOW);
    assert_eq!(socket(libc::AF_VSOCK as u64, 1), errno);
    assert_eq!(socket(libc::AF_INET as u64, 5), errno);
    // The upper half counts: 2^32 + 1 is not 1.
    assert_eq!(socket((1 << 32) | libc::AF_VSOCK as u64, 1), RET_ALLOW);
    let clone = |flags: u64| run(&f, X86_64, libc::SYS_clone as u32, [flags, 0, 0, 0, 0, 0]);
    assert_eq!(clone(libc::SIGCHLD as u64), RET_ALLOW);
    assert_eq!(clone(libc::CLONE_NEWNS as u64), errno);
}

/// runc's reading when one argument repeats beside another: every
/// condition is an alternative (here a deny that an AND could never hit).
#[test]
fn a_repeated_argument_among_others_makes_every_condition_an_alternative() {
    let f = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":1,"args":[
                {"index":0,"value":40,"op":"SCMP_CMP_EQ"},{"index":0,"value":16,"op":"SCMP_CMP_EQ"},
                {"index":1,"value":3,"op":"SCMP_CMP_EQ"}]}]}"#,
    ))
    .unwrap();
    let socket = |family: u64, ty: u64| run(&f, X86_64, libc::SYS_socket as u32, [family, ty, 0, 0, 0, 0]);
    assert_eq!(socket(40, 1), RET_ERRNO | 1);
    assert_eq!(socket(16, 1), RET_ERRNO | 1);
    assert_eq!(socket(2, 3), RET_ERRNO | 1);
    assert_eq!(socket(2, 1), RET_ALLOW);
}

#[test]
fn a_denylist_allows_by_default() {
    let f = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_KILL_PROCESS"},
            {"names":["bpf"],"action":"SCMP_ACT_TRAP"},{"names":["ptrace"],"action":"SCMP_ACT_LOG"}]}"#,
    ))
    .unwrap();
    assert_eq!(run(&f, X86_64, libc::SYS_mount as u32, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(run(&f, X86_64, libc::SYS_bpf as u32, [0; 6]), RET_TRAP);
    assert_eq!(run(&f, X86_64, libc::SYS_ptrace as u32, [0; 6]), RET_LOG);
    assert_eq!(run(&f, X86_64, libc::SYS_read as u32, [0; 6]), RET_ALLOW);
}

#[test]
fn what_cannot_be_applied_is_refused_by_name() {
    let cases = [
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["no_such_call"],"action":"SCMP_ACT_ERRNO"}]}"#,
            "no_such_call",
        ),
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_NOTIFY"}]}"#,
            "SCMP_ACT_NOTIFY",
        ),
        (r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#, "SCMP_ACT_NOTIFY"),
        (r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/l.sock"}"#, "listener"),
        (r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#, "Aarch64"),
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_KILL","errnoRet":1}]}"#,
            "errnoRet",
        ),
        (r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":[],"action":"SCMP_ACT_KILL"}]}"#, "names no"),
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_KILL","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
            "argument 6",
        ),
    ];
    for (json, want) in cases {
        let err = crate::container::error_chain(&compile(&profile(json)).unwrap_err());
        assert!(err.contains(want), "{want:?} not in {err:?}");
    }
}

#[test]
fn the_syscall_table_is_sorted_for_binary_search() {
    assert!(syscalls::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(syscall_number("openat2").unwrap(), Some(libc::SYS_openat2));
    assert_eq!(syscall_number("statmount").unwrap(), Some(457));
    assert_eq!(syscall_number("fstat64").unwrap(), None);
}

#[test]
fn containerds_default_profile_compiles_and_denies_vsock_and_modules() {
    let f = compile(&profile(include_str!("../../tests/fixtures/containerd-default-seccomp.json"))).unwrap();
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let call = |nr: i64, arg0: u64| run(&f, X86_64, nr as u32, [arg0, 0, 0, 0, 0, 0]);
    assert_eq!(call(libc::SYS_socket, libc::AF_VSOCK as u64), eperm);
    assert_eq!(call(libc::SYS_socket, libc::AF_INET as u64), RET_ALLOW);
    assert_eq!(call(libc::SYS_init_module, 0), eperm);
    assert_eq!(call(libc::SYS_finit_module, 0), eperm);
    assert_eq!(call(libc::SYS_execve, 0), RET_ALLOW);
    assert_eq!(call(libc::SYS_clone3, 0), RET_ERRNO | libc::ENOSYS as u32);
    assert!(f.insns.len() < 1024, "{} instructions", f.insns.len());
}

#[test]
fn a_profile_too_long_for_the_kernel_is_refused_before_it_is_built() {
    let args: Vec<String> = (0..2000).map(|v| format!(r#"{{"index":0,"value":{v},"op":"SCMP_CMP_EQ"}}"#)).collect();
    let json = format!(
        r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["read","write"],"action":"SCMP_ACT_KILL","args":[{}]}}]}}"#,
        args.join(",")
    );
    let err = compile(&profile(&json)).unwrap_err().to_string();
    assert!(err.contains("more than the kernel's 4096"), "{err}");
}
