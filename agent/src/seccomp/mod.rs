//! OCI `linux.seccomp` profiles compiled to classic BPF for x86_64.
//!
//! The agent compiles a profile when it checks the spec, so a profile it
//! cannot apply is refused before anything runs; the launch helper only
//! installs the instructions. What is refused, with the reason: an
//! action the agent cannot honour (`SCMP_ACT_NOTIFY`: no listener), a
//! seccomp listener, an architecture other than x86_64's, a system call
//! name that is neither an x86_64 call nor a known call of another
//! architecture, an `errnoRet` on an action that returns none, an
//! argument index above 5, a program longer than the kernel takes.
//!
//! Semantics, as runc gives them: `defaultAction` for any call no entry
//! matches; `SCMP_ACT_ERRNO` returns `errnoRet` (else `defaultErrnoRet`
//! for the default action, else EPERM); the conditions of one entry must
//! all hold, except that several conditions on the same argument are
//! alternatives. Entries are tried in order and the first that matches
//! decides. Names of other architectures' calls (`_llseek`, `chown32`,
//! the `*_time64` calls...), which containerd's profile lists for every
//! architecture, have no x86_64 number and nothing to filter.
//!
//! Listing `SCMP_ARCH_X86` or `SCMP_ARCH_X32` is accepted, but calls
//! through those ABIs (i386 `int 0x80`, x32 numbers) kill the process:
//! the agent filters x86_64 numbers only, and denying the other ABIs is
//! the only way that grants nothing the profile does not.

mod syscalls;

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator};
use seccompiler::{sock_filter, BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use serde::{Deserialize, Serialize};

/// What is wrong with a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A system call name the agent does not know.
    #[error("seccomp: unknown system call {0:?}")]
    UnknownSyscall(String),
    /// An entry with no names.
    #[error("seccomp: an entry of \"syscalls\" names no system call")]
    NoNames,
    /// An action the agent cannot take.
    #[error("seccomp: action {0} is not supported")]
    UnsupportedAction(&'static str),
    /// An architecture other than x86_64's.
    #[error("seccomp: architecture {0:?} is not supported (only x86_64, x86 and x32)")]
    UnsupportedArch(Arch),
    /// A seccomp listener (user notification).
    #[error("seccomp: a listener (listenerPath) is not supported")]
    Listener,
    /// `errnoRet` with an action that returns no errno.
    #[error("seccomp: errnoRet is only for SCMP_ACT_ERRNO and SCMP_ACT_TRACE, not {0}")]
    ErrnoRetWithout(&'static str),
    /// A condition seccompiler refused (an argument index above 5).
    #[error("seccomp: condition on argument {index}: {reason}")]
    Condition {
        /// The argument index.
        index: usize,
        /// seccompiler's reason.
        reason: String,
    },
    /// More instructions than a filter may have.
    #[error("seccomp: the profile compiles to {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
}

/// A compiled filter, as the launch helper installs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// `(code, jt, jf, k)` per instruction.
    pub insns: Vec<(u16, u8, u8, u32)>,
    /// `SECCOMP_FILTER_FLAG_*` for seccomp(2).
    pub flags: u32,
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_JMP_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// x32 system calls are x86_64 numbers with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const BPF_MAXINSNS: usize = 4096;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_DATA: u32 = 0xffff;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn action_name(a: LinuxSeccompAction) -> &'static str {
    match a {
        LinuxSeccompAction::ScmpActKill => "SCMP_ACT_KILL",
        LinuxSeccompAction::ScmpActKillThread => "SCMP_ACT_KILL_THREAD",
        LinuxSeccompAction::ScmpActKillProcess => "SCMP_ACT_KILL_PROCESS",
        LinuxSeccompAction::ScmpActTrap => "SCMP_ACT_TRAP",
        LinuxSeccompAction::ScmpActErrno => "SCMP_ACT_ERRNO",
        LinuxSeccompAction::ScmpActNotify => "SCMP_ACT_NOTIFY",
        LinuxSeccompAction::ScmpActTrace => "SCMP_ACT_TRACE",
        LinuxSeccompAction::ScmpActLog => "SCMP_ACT_LOG",
        LinuxSeccompAction::ScmpActAllow => "SCMP_ACT_ALLOW",
    }
}

/// The filter's return value for an action and its `errnoRet`.
fn ret_value(action: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<u32, SeccompError> {
    let data = |v: Option<u32>| v.unwrap_or(libc::EPERM as u32) & RET_DATA;
    let ret = match action {
        LinuxSeccompAction::ScmpActErrno => return Ok(RET_ERRNO | data(errno_ret)),
        LinuxSeccompAction::ScmpActTrace => return Ok(RET_TRACE | data(errno_ret)),
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::UnsupportedAction("SCMP_ACT_NOTIFY")),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
    };
    match errno_ret {
        Some(_) => Err(SeccompError::ErrnoRetWithout(action_name(action))),
        None => Ok(ret),
    }
}

/// The x86_64 number of a system call; `Ok(None)` for a call that only
/// other architectures have.
fn syscall_number(name: &str) -> Result<Option<i64>, SeccompError> {
    if let Ok(i) = syscalls::SYSCALLS.binary_search_by(|(n, _)| n.cmp(&name)) {
        return Ok(Some(syscalls::SYSCALLS[i].1));
    }
    match OTHER_ARCHES.contains(&name) {
        true => Ok(None),
        false => Err(SeccompError::UnknownSyscall(name.to_string())),
    }
}

/// Calls of 32-bit and other architectures that x86_64 does not have.
const OTHER_ARCHES: &[&str] = &[
    "_llseek",
    "_newselect",
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "bdflush",
    "breakpoint",
    "cacheflush",
    "chown32",
    "clock_adjtime64",
    "clock_getres_time64",
    "clock_gettime64",
    "clock_nanosleep_time64",
    "clock_settime64",
    "fadvise64_64",
    "fchown32",
    "fcntl64",
    "fstat64",
    "fstatat64",
    "fstatfs64",
    "ftruncate64",
    "futex_time64",
    "getegid32",
    "geteuid32",
    "getgid32",
    "getgroups32",
    "getresgid32",
    "getresuid32",
    "getuid32",
    "io_pgetevents_time64",
    "ipc",
    "lchown32",
    "lstat64",
    "mmap2",
    "mq_timedreceive_time64",
    "mq_timedsend_time64",
    "nice",
    "oldfstat",
    "oldlstat",
    "oldolduname",
    "oldstat",
    "olduname",
    "ppoll_time64",
    "pselect6_time64",
    "recv",
    "recvmmsg_time64",
    "riscv_flush_icache",
    "riscv_hwprobe",
    "rt_sigtimedwait_time64",
    "s390_guarded_storage",
    "s390_pci_mmio_read",
    "s390_pci_mmio_write",
    "s390_runtime_instr",
    "s390_sthyi",
    "sched_rr_get_interval_time64",
    "semtimedop_time64",
    "send",
    "sendfile64",
    "set_tls",
    "setfsgid32",
    "setfsuid32",
    "setgid32",
    "setgroups32",
    "setregid32",
    "setresgid32",
    "setresuid32",
    "setreuid32",
    "setuid32",
    "sigaction",
    "signal",
    "sigpending",
    "sigprocmask",
    "sigreturn",
    "sigsuspend",
    "socketcall",
    "spu_create",
    "spu_run",
    "stat64",
    "statfs64",
    "stime",
    "subpage_prot",
    "switch_endian",
    "sync_file_range2",
    "sys_debug_setcontext",
    "timer_gettime64",
    "timer_settime64",
    "timerfd_gettime64",
    "timerfd_settime64",
    "truncate64",
    "ugetrlimit",
    "umount",
    "usr26",
    "usr32",
    "utimensat_time64",
    "vm86",
    "vm86old",
    "waitpid",
];

fn condition(arg: &oci_spec::runtime::LinuxSeccompArg) -> Result<SeccompCondition, SeccompError> {
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (SeccompCmpOp::MaskedEq(arg.value()), arg.value_two().unwrap_or_default())
        }
    };
    let bad = |reason: String| SeccompError::Condition { index: arg.index(), reason };
    let index = u8::try_from(arg.index()).map_err(|_| bad("no such argument".into()))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|e| bad(e.to_string()))
}

/// The rules of one entry, as runc reads them: one rule with every
/// condition (all must hold), unless some argument is tested more than
/// once, in which case each condition is a rule of its own (any may hold).
fn rules(args: &[oci_spec::runtime::LinuxSeccompArg]) -> Result<Vec<SeccompRule>, SeccompError> {
    if args.is_empty() {
        return Ok(Vec::new());
    }
    let conditions = args.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
    let repeated = args.iter().any(|a| args.iter().filter(|b| b.index() == a.index()).count() > 1);
    let groups = match repeated {
        true => conditions.into_iter().map(|c| vec![c]).collect(),
        false => vec![conditions],
    };
    groups
        .into_iter()
        .map(|g| {
            SeccompRule::new(g).map_err(|e| SeccompError::Condition { index: args[0].index(), reason: e.to_string() })
        })
        .collect()
}

/// Compiles a profile; refuses what cannot be applied.
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::Listener);
    }
    for arch in profile.architectures().as_ref().into_iter().flatten() {
        if !matches!(arch, Arch::ScmpArchNative | Arch::ScmpArchX86_64 | Arch::ScmpArchX86 | Arch::ScmpArchX32) {
            return Err(SeccompError::UnsupportedArch(*arch));
        }
    }
    let mut flags = 0;
    for flag in profile.flags().as_ref().into_iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            // The process is single-threaded when the filter goes in.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
        } as u32;
    }
    let default = ret_value(profile.default_action(), profile.default_errno_ret())?;

    // Another ABI (i386) or an x32 number: killed, see the module's doc.
    let mut prog: BpfProgram = vec![
        stmt(BPF_LD_W_ABS, ARCH_OFFSET),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, RET_KILL_PROCESS),
    ];
    // Whether the accumulator still holds the call's number.
    let mut holds_nr = true;
    for entry in profile.syscalls().as_ref().into_iter().flatten() {
        if entry.names().is_empty() {
            return Err(SeccompError::NoNames);
        }
        let ret = ret_value(entry.action(), entry.errno_ret())?;
        let args = entry.args().as_deref().unwrap_or_default();
        // Each condition is at most 6 instructions (seccompiler's bound).
        if prog.len() + 6 * args.len() > BPF_MAXINSNS {
            return Err(SeccompError::TooLong(prog.len() + 6 * args.len()));
        }
        let rules = rules(args)?;
        // What runs once the number matched: return, or try each rule and
        // fall through to the next entry when none holds.
        let block: BpfProgram = match rules.is_empty() {
            true => vec![stmt(BPF_RET_K, ret)],
            false => rules
                .into_iter()
                .flat_map(|rule| {
                    let mut bpf: BpfProgram = rule.into();
                    bpf.push(stmt(BPF_RET_K, ret));
                    bpf
                })
                .collect(),
        };
        let conditional = block.len() > 1;
        for name in entry.names() {
            let Some(nr) = syscall_number(name)? else { continue };
            // Checked before it grows: a hostile spec must not make the
            // agent build a program it will refuse anyway.
            let grown = prog.len() + 3 + block.len();
            if grown > BPF_MAXINSNS {
                return Err(SeccompError::TooLong(grown));
            }
            if !holds_nr {
                prog.push(stmt(BPF_LD_W_ABS, NR_OFFSET));
            }
            // Equal: into the block; else jump over it (JA has room for
            // any length, a conditional jump only for 255).
            prog.push(jump(BPF_JMP_JEQ_K, nr as u32, 1, 0));
            prog.push(stmt(BPF_JMP_JA, block.len() as u32));
            prog.extend(block.iter().cloned());
            holds_nr = !conditional;
        }
    }
    prog.push(stmt(BPF_RET_K, default));
    if prog.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(Filter { insns: prog.into_iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect(), flags })
}

/// Installs a filter on the calling thread (seccomp(2)). Needs
/// `no_new_privs` or CAP_SYS_ADMIN.
pub fn install(filter: &Filter) -> std::io::Result<()> {
    let insns: Vec<sock_filter> =
        filter.insns.iter().map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k }).collect();
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const sock_filter,
    }
    let len = libc::c_ushort::try_from(insns.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    let prog = SockFprog { len, filter: insns.as_ptr() };
    // SAFETY: prog points at `len` instructions that live across the call;
    // the kernel copies them.
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, filter.flags, &prog as *const SockFprog)
    };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests;
