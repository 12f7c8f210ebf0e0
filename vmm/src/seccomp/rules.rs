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
/// What a parked vCPU thread reads of its vCPU for a snapshot (see
/// `snapshot::kvm_state`): KVM_GET_REGS, _SREGS, _LAPIC, _MSRS, _CPUID2,
/// _MP_STATE, _VCPU_EVENTS, _DEBUGREGS, _XSAVE, _XCRS.
const KVM_VCPU_SAVE: [u64; 10] = [
    0x8090_ae81, 0x8138_ae83, 0x8400_ae8e, 0xc008_ae88, 0xc008_ae91, 0x8004_ae98, 0x8040_ae9f, 0x8080_aea1,
    0x9000_aea4, 0x8188_aea6,
];
/// What the event loop reads of the VM for a snapshot: KVM_GET_IRQCHIP,
/// KVM_GET_PIT2, KVM_GET_CLOCK.
const KVM_VM_SAVE: [u64; 3] = [0xc208_ae62, 0x8070_ae9f, 0x8030_ae7c];
/// FIONBIO: how the standard library makes a socket non-blocking.
const FIONBIO: u64 = libc::FIONBIO;
/// KVM_IOEVENTFD = _IOW(KVMIO, 0x79, struct kvm_ioeventfd): a hot-plugged
/// device's queue notifications.
const KVM_IOEVENTFD: u64 = 0x4040_ae79;
/// TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ: opening a TAP for a
/// hot-plugged network card (on the control thread, see `api.rs`).
const TUN_IOCTLS: [u64; 3] = [0x4004_54ca, 0x4004_54d0, 0x4004_54d8];

/// What every thread needs: locks, signals, time, leaving. Memory calls
/// (mmap, mprotect, madvise) and futex are added with their arguments
/// checked, see [`common_rules`].
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
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

/// Serving virtio queues and their host side, on the event loop and on
/// vhost-user threads alike: disk I/O, entropy, vsock's Unix sockets (a
/// guest connection to the host is a new AF_UNIX connection, see
/// [`socket_rules`]), the TAP, waiting on eventfds.
const QUEUES: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    // Who may connect: a connection's peer uid against ours.
    libc::SYS_geteuid,
    libc::SYS_getrandom,
    // Disk data: preadv/pwritev straight into guest memory, pread/pwrite
    // through an O_DIRECT disk's bounce buffer.
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

/// The event loop: kick and join vCPU threads, read stats, serve the
/// queues of the devices it holds, and hot-plug devices whose backends
/// the control thread made (so it opens no file and binds no socket).
const EVENT_LOOP: &[i64] = &[libc::SYS_mincore];

/// A vhost-user serving thread and the library's threads it starts: the
/// frontend's messages (and the guest memory they share, mapped here) and
/// the guest's queues. Its sockets are open before the filter goes on.
const VHOST_USER: &[i64] = &[
    // Threads: the library's queue worker and request handler, our proxy
    // (clone with a thread's flags only, see `clone_rules`; clone3, whose
    // flags a filter cannot see, is answered ENOSYS by `clone3_enosys`,
    // and glibc then falls back to clone).
    libc::SYS_clone3,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    // Mapping the frontend's memory regions checks their size.
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

/// The control thread: send requests, wait for replies and for the VM's
/// end, and make a hot-plugged device's backend (open its disk or TAP,
/// bind its vsock socket) so that the event loop never needs to.
const CONTROL: &[i64] = &[
    libc::SYS_bind,
    // A hot-plugged vhost-user device (a daemon's queues) connects to its
    // daemon and negotiates when it is made: on this thread.
    libc::SYS_connect,
    libc::SYS_eventfd2,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_fstat,
    // A backend's hash maps seed themselves.
    libc::SYS_getrandom,
    libc::SYS_getrusage,
    libc::SYS_listen,
    libc::SYS_mincore,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_statx,
    // Replacing a stale vsock socket, or a snapshot's temporary file left
    // by an interrupted one.
    libc::SYS_unlink,
    libc::SYS_chmod,
    // Writing a snapshot: its directory, the sparse memory file, the
    // description, each synced and renamed into place.
    libc::SYS_mkdir,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_rename,
    // An embedder's control thread waits between requests.
    libc::SYS_clock_nanosleep,
];

/// A console copier: reads the guest's console bytes (QEMU's output, or
/// the builtin VMM's serial through a pipe) and appends them to the
/// console log, which it rotates (rename, then create; see `console_rules`).
const CONSOLE: &[i64] = &[libc::SYS_read, libc::SYS_rename];

/// fcntl(fd, F_GETFD): Rust's standard library checks an fd is open before
/// closing it (in debug builds); F_DUPFD_CLOEXEC: `try_clone` of a file or
/// eventfd.
const FCNTL_ALLOWED: &[u64] = &[libc::F_GETFD as u64, libc::F_DUPFD_CLOEXEC as u64];

/// What `abort()` needs, which a panic calls (the release profile has
/// `panic = "abort"`): glibc's abort raises SIGABRT with
/// `tgkill(getpid(), tid, SIGABRT)`. Without them a panic on a filtered
/// thread is reported as a seccomp refusal of getpid, hiding the panic.
/// Every thread may signal SIGABRT (only that signal: the event loop
/// also sends the kick signal, see `kick_rules`).
const ABORT: &[i64] = &[libc::SYS_getpid, libc::SYS_gettid];

/// mmap flags any thread may use: private or shared mappings, anonymous
/// or of an fd (guest memory a vhost-user frontend shares), thread stacks.
/// Not MAP_FIXED (which would map over existing memory), MAP_GROWSDOWN or
/// huge pages.
const MMAP_FLAGS: u64 =
    (libc::MAP_SHARED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK) as u64;

/// madvise advice: glibc gives freed thread stacks and trimmed heap back
/// with MADV_DONTNEED; MADV_FREE is the lazy form of the same.
const MADVISE_ADVICE: &[u64] = &[libc::MADV_DONTNEED as u64, libc::MADV_FREE as u64];

/// futex operations, with or without FUTEX_PRIVATE_FLAG and
/// FUTEX_CLOCK_REALTIME: wait and wake (Rust's locks, glibc's thread join).
/// Not requeue, wake-op or the PI operations.
const FUTEX_OPS: &[u64] = &[
    libc::FUTEX_WAIT as u64,
    libc::FUTEX_WAKE as u64,
    libc::FUTEX_WAIT_BITSET as u64,
    libc::FUTEX_WAKE_BITSET as u64,
];

/// prctl options: naming a thread (the standard library does it when a
/// thread starts).
const PRCTL_OPTIONS: &[u64] = &[libc::PR_SET_NAME as u64];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("valid argument condition")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("valid rule")
}

/// A rule allowing a syscall when its argument `arg` is one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values.iter().map(|v| rule(vec![cond(arg, SeccompCmpOp::Eq, *v)])).collect()
}

/// The memory and futex rules every thread has: no executable mappings,
/// only the mmap flags, madvise advice and futex operations above.
fn common_rules() -> Vec<(i64, Vec<SeccompRule>)> {
    let no_exec = || cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    let futex_flags = (libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME) as u64;
    vec![
        (libc::SYS_mmap, vec![rule(vec![no_exec(), cond(3, SeccompCmpOp::MaskedEq(!MMAP_FLAGS & 0xffff_ffff), 0)])]),
        (libc::SYS_mprotect, vec![rule(vec![no_exec()])]),
        (libc::SYS_madvise, arg_in(2, MADVISE_ADVICE)),
        (
            libc::SYS_futex,
            FUTEX_OPS.iter().map(|op| rule(vec![cond(1, SeccompCmpOp::MaskedEq(!futex_flags & 0xffff_ffff), *op)])).collect(),
        ),
        (libc::SYS_fcntl, arg_in(1, FCNTL_ALLOWED)),
        (libc::SYS_prctl, arg_in(0, PRCTL_OPTIONS)),
    ]
}

/// socket(2) for Unix sockets only: vsock's host side is Unix sockets,
/// and nothing else a filtered thread does needs another family.
fn socket_rules() -> Vec<SeccompRule> {
    arg_in(0, &[libc::AF_UNIX as u64])
}

/// fallocate only to punch holes (a disk's discard; the control thread
/// probes for it when it opens a disk): never to grow a file.
fn fallocate_rules() -> Vec<SeccompRule> {
    arg_in(1, &[(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64])
}

/// getsockopt(SOL_SOCKET, SO_PEERCRED): who is at the other end of a
/// connection (only our user may use our sockets); SO_DOMAIN: the vhost
/// crate checks that the frontend's backend channel is a Unix stream
/// socket (SO_TYPE).
fn getsockopt_rules() -> Vec<SeccompRule> {
    [libc::SO_PEERCRED, libc::SO_DOMAIN, libc::SO_TYPE]
        .into_iter()
        .map(|option| {
            rule(vec![cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64), cond(2, SeccompCmpOp::Eq, option as u64)])
        })
        .collect()
}

/// setsockopt(SOL_SOCKET, SO_RCVTIMEO or SO_SNDTIMEO): the timeouts on a
/// vhost-user frontend's socket (a device whose queues an external daemon
/// serves), so that a stalled daemon cannot hold the thread for ever.
fn setsockopt_rules() -> Vec<SeccompRule> {
    [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
        .into_iter()
        .map(|option| {
            rule(vec![cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64), cond(2, SeccompCmpOp::Eq, option as u64)])
        })
        .collect()
}

/// openat only as `File::create` calls it (write-only, create, truncate,
/// close-on-exec): a fresh console log after a rotation. The path cannot
/// be checked by a filter; nothing else can be opened.
fn console_rules() -> Vec<(i64, Vec<SeccompRule>)> {
    let create = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;
    vec![(libc::SYS_openat, arg_in(2, &[create]))]
}

/// tgkill on the event loop: the vCPU kick signal (vmm-sys-util's
/// SIGRTMIN, glibc's first free real-time signal) to pause or stop vCPU
/// threads, and SIGABRT as every thread may.
fn kick_rules() -> Vec<SeccompRule> {
    arg_in(2, &[libc::SIGABRT as u64, libc::SIGRTMIN() as u64])
}

/// The flags glibc's pthread_create passes to clone: a thread sharing
/// everything, never a new process.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// clone(2) only as pthread_create calls it.
fn clone_rules() -> Vec<SeccompRule> {
    vec![rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, THREAD_CLONE_FLAGS)
        .expect("valid argument condition")])]
}

/// A filter stacked under a thread kind's own: clone3 fails with ENOSYS,
/// everything else is left to the other filter. The kernel takes the
/// strictest answer of all filters, so the kind's filter must allow
/// clone3 for this ENOSYS to be the answer.
fn clone3_enosys() -> SeccompFilter {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)
        .expect("valid seccomp filter")
}

/// The syscalls of one thread kind: those in `allowed` with any
/// arguments, the common rules, ioctl requests in `ioctls`, and the
/// argument-checked calls in `extra`.
fn filter(allowed: &[&[i64]], ioctls: &[u64], extra: Vec<(i64, Vec<SeccompRule>)>) -> SeccompFilter {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed
        .iter()
        .flat_map(|list| list.iter())
        .map(|nr| (*nr, vec![]))
        .collect();
    for nr in ABORT {
        rules.insert(*nr, vec![]);
    }
    rules.entry(libc::SYS_tgkill).or_insert_with(|| {
        vec![rule(vec![cond(2, SeccompCmpOp::Eq, libc::SIGABRT as u64)])]
    });
    for (nr, list) in common_rules().into_iter().chain(extra) {
        rules.insert(nr, list);
    }
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, arg_in(1, ioctls));
    }
    SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .expect("valid seccomp filter")
}

/// (file name, filter) for each thread kind, and the clone3 filter.
fn thread_filters() -> Vec<(&'static str, SeccompFilter)> {
    // The socket and disk calls of the threads that serve queues or make backends.
    let sockets = || {
        vec![
            (libc::SYS_socket, socket_rules()),
            (libc::SYS_getsockopt, getsockopt_rules()),
            (libc::SYS_setsockopt, setsockopt_rules()),
            (libc::SYS_fallocate, fallocate_rules()),
        ]
    };
    vec![
        ("vcpu", filter(&[COMMON, VCPU], &[&[KVM_RUN][..], &KVM_VCPU_SAVE].concat(), vec![])),
        (
            "event_loop",
            filter(
                &[COMMON, QUEUES, EVENT_LOOP],
                &[&[FIONBIO, KVM_IOEVENTFD][..], &KVM_VM_SAVE].concat(),
                [sockets(), vec![(libc::SYS_tgkill, kick_rules())]].concat(),
            ),
        ),
        ("vhost_user", filter(&[COMMON, QUEUES, VHOST_USER], &[FIONBIO], [sockets(), vec![(libc::SYS_clone, clone_rules())]].concat())),
        ("console", filter(&[COMMON, CONSOLE], &[], console_rules())),
        ("clone3_enosys", clone3_enosys()),
        ("control", filter(&[COMMON, CONTROL], &[FIONBIO, TUN_IOCTLS[0], TUN_IOCTLS[1], TUN_IOCTLS[2]], sockets())),
    ]
}
