// The syscalls each vessel thread kind may make. This file is compiled by
// build.rs (into BPF, at build time); it is not part of the library itself.
// Everything not listed is refused with SIGSYS.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// KVM_RUN = _IO(KVMIO, 0x80).
const KVM_RUN: u64 = 0xae80;
/// FIONBIO: how the standard library makes a socket non-blocking.
const FIONBIO: u64 = libc::FIONBIO;
/// KVM_IOEVENTFD = _IOW(KVMIO, 0x79, struct kvm_ioeventfd): a hot-plugged
/// device's queue notifications.
const KVM_IOEVENTFD: u64 = 0x4040_ae79;
/// TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ: opening a hot-plugged TAP.
const TUN_IOCTLS: [u64; 3] = [0x4004_54ca, 0x4004_54d0, 0x4004_54d8];

/// setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO or SO_SNDTIMEO): the timeouts
/// of a hot-plugged vhost-user device's socket, so a stalled daemon cannot
/// hold the event loop.
const SOCKET_TIMEOUTS: &[u64] = &[libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64];

/// What every thread needs: memory, locks, signals, time, leaving.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    // Console output, eventfd signalling, the SIGSYS report itself.
    libc::SYS_write,
];

/// vCPU threads: run the guest, emulate PIO/MMIO devices.
const VCPU: &[i64] = &[];

/// The event loop: wait on eventfds, kick and join vCPU threads, read stats,
/// serve virtio queues (disk I/O, entropy, vsock's Unix sockets, the TAP),
/// talk to vhost-user daemons (sendmsg/recvmsg with fds), and hot-plug
/// devices (open their files and sockets, make eventfds).
const EVENT_LOOP: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_fstat,
    libc::SYS_listen,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_socket,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_mincore,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_read,
    libc::SYS_tgkill,
];

/// The control thread: send requests, wait for replies and for the VM's end.
const CONTROL: &[i64] = &[libc::SYS_getrusage, libc::SYS_mincore, libc::SYS_read];

/// fcntl(fd, F_GETFD): Rust's standard library checks an fd is open before
/// closing it (in debug builds); F_DUPFD_CLOEXEC: `try_clone` of a file or
/// eventfd.
const FCNTL_ALLOWED: &[u64] = &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64];

/// What `abort()` needs, which a panic calls (the release profile has
/// `panic = "abort"`): glibc's abort raises SIGABRT with
/// `tgkill(getpid(), tid, SIGABRT)`. Without them a panic on a filtered
/// thread is reported as a seccomp refusal of getpid, hiding the panic.
/// Every thread may signal SIGABRT (only that signal: the event loop's
/// own rule, which also sends the kick signal, is wider).
const ABORT: &[i64] = &[libc::SYS_getpid, libc::SYS_gettid];

/// A rule allowing `nr` when its second argument (the ioctl request, the
/// fcntl command) is one of `values`.
fn second_arg_in(values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                .expect("valid argument condition");
            SeccompRule::new(vec![cond]).expect("valid rule")
        })
        .collect()
}

/// setsockopt at level SOL_SOCKET, for the options in `options` only.
fn sol_socket_options(options: &[u64]) -> Vec<SeccompRule> {
    options
        .iter()
        .map(|option| {
            let level = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)
                .expect("valid argument condition");
            let name = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *option)
                .expect("valid argument condition");
            SeccompRule::new(vec![level, name]).expect("valid rule")
        })
        .collect()
}

fn filter(allowed: &[&[i64]], ioctls: &[u64], sockopts: &[u64]) -> SeccompFilter {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed
        .iter()
        .flat_map(|list| list.iter())
        .map(|nr| (*nr, vec![]))
        .collect();
    for nr in ABORT {
        rules.insert(*nr, vec![]);
    }
    rules.entry(libc::SYS_tgkill).or_insert_with(|| {
        let sig = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::SIGABRT as u64)
            .expect("valid argument condition");
        vec![SeccompRule::new(vec![sig]).expect("valid rule")]
    });
    rules.insert(libc::SYS_fcntl, second_arg_in(FCNTL_ALLOWED));
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, second_arg_in(ioctls));
    }
    if !sockopts.is_empty() {
        rules.insert(libc::SYS_setsockopt, sol_socket_options(sockopts));
    }
    SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .expect("valid seccomp filter")
}

/// (file name, filter) for each thread kind.
fn thread_filters() -> Vec<(&'static str, SeccompFilter)> {
    vec![
        ("vcpu", filter(&[COMMON, VCPU], &[KVM_RUN], &[])),
        (
            "event_loop",
            filter(
                &[COMMON, EVENT_LOOP],
                &[FIONBIO, KVM_IOEVENTFD, TUN_IOCTLS[0], TUN_IOCTLS[1], TUN_IOCTLS[2]],
                SOCKET_TIMEOUTS,
            ),
        ),
        ("control", filter(&[COMMON, CONTROL], &[], &[])),
    ]
}
