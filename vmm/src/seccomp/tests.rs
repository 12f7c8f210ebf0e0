//! Each thread kind's filter, loaded in a forked child that then makes one
//! syscall: the child's end (exit 0, or killed by SIGSYS) says whether the
//! filter let it through. The child does only async-signal-safe work: the
//! program is decoded before the fork, and the probes are raw syscalls.

use super::*;

/// What a probe expects of a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Refused,
}
use Verdict::{Allowed, Refused};

/// A page mapped read-write in the parent, for the memory probes.
fn page() -> usize {
    // SAFETY: a fresh anonymous mapping; nothing else uses it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    addr as usize
}

/// Runs `probe` in a child under `kind`'s filter and says how it ended.
fn run(kind: ThreadKind, probe: fn(usize), arg: usize) -> Verdict {
    let programs = kind.programs();
    // SAFETY: the child runs only async-signal-safe code (the filter's
    // prctl and seccomp calls, the probe's raw syscalls, _exit) on memory
    // prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        for program in &programs {
            if seccompiler::apply_filter(program).is_err() {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(2) };
            }
        }
        probe(arg);
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above, into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let sigsys = (libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS)
        || (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == SIGSYS_EXIT_CODE);
    if sigsys {
        Refused
    } else {
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{kind:?}: child status {status:#x}");
        Allowed
    }
}

// The probes. Each makes one syscall; its result does not matter, only
// whether the filter let it through.

fn socket_inet(_: usize) {
    // SAFETY: socket(2) with constant arguments.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn socket_unix(_: usize) {
    // SAFETY: socket(2) with constant arguments.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
}

fn mprotect_exec(page: usize) {
    // SAFETY: changes the protection of a page this test mapped.
    unsafe { libc::mprotect(page as *mut libc::c_void, 4096, libc::PROT_READ | libc::PROT_EXEC) };
}

fn mprotect_none(page: usize) {
    // SAFETY: as above; a guard page, as glibc makes for thread stacks.
    unsafe { libc::mprotect(page as *mut libc::c_void, 4096, libc::PROT_NONE) };
}

fn mmap_exec(_: usize) {
    // SAFETY: a fresh anonymous mapping the child never uses.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
}

fn mmap_fixed(page: usize) {
    // SAFETY: maps over a page this test mapped and the child never uses.
    unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
}

fn mmap_private(_: usize) {
    // SAFETY: a fresh anonymous mapping the child never uses.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
}

fn madvise_dontneed(page: usize) {
    // SAFETY: advice on a page this test mapped.
    unsafe { libc::madvise(page as *mut libc::c_void, 4096, libc::MADV_DONTNEED) };
}

fn madvise_dontfork(page: usize) {
    // SAFETY: as above.
    unsafe { libc::madvise(page as *mut libc::c_void, 4096, libc::MADV_DONTFORK) };
}

fn futex_wake(page: usize) {
    // SAFETY: wakes no one on a word of a page this test mapped.
    unsafe { libc::syscall(libc::SYS_futex, page, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1, 0, 0, 0) };
}

fn futex_requeue(page: usize) {
    // SAFETY: requeues no one between two words of a page this test mapped.
    unsafe { libc::syscall(libc::SYS_futex, page, libc::FUTEX_CMP_REQUEUE, 1, 1, page + 8, 0) };
}

fn ioctl_create_vm(_: usize) {
    // SAFETY: ioctl on an invalid fd: EBADF if it gets through.
    unsafe { libc::ioctl(-1, 0xae01, 0) };
}

fn ioctl_fionbio(_: usize) {
    // SAFETY: as above.
    unsafe { libc::ioctl(-1, libc::FIONBIO, 0) };
}

fn ioctl_kvm_run(_: usize) {
    // SAFETY: as above.
    unsafe { libc::ioctl(-1, 0xae80, 0) };
}

fn openat(_: usize) {
    // SAFETY: opens a NUL-terminated constant path.
    unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
}

fn create_log(_: usize) {
    // SAFETY: opens a NUL-terminated constant path as File::create does.
    unsafe {
        libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC, 0o600)
    };
}

fn bind(_: usize) {
    // SAFETY: bind(2) on an invalid fd with a null address: EBADF if it gets through.
    unsafe { libc::bind(-1, std::ptr::null(), 0) };
}

fn clone_process(_: usize) {
    // SAFETY: clone(2) as fork does; parent and child both go on to the
    // probe's _exit, and the test's waitpid reaps only the probe.
    unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
}

fn clone3_is_enosys(_: usize) {
    // SAFETY: clone3 with no arguments: EINVAL (or ENOSYS from the
    // filter) before the kernel reads anything.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
    let enosys = rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
    // SAFETY: _exit is async-signal-safe; 3 says clone3 got through.
    unsafe { libc::_exit(if enosys { 0 } else { 3 }) };
}

fn fallocate_grow(_: usize) {
    // SAFETY: fallocate on an invalid fd: EBADF if it gets through.
    unsafe { libc::fallocate(-1, 0, 0, 4096) };
}

fn fallocate_punch_hole(_: usize) {
    // SAFETY: as above.
    unsafe { libc::fallocate(-1, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, 4096) };
}

fn preadv(page: usize) {
    let iov = libc::iovec { iov_base: page as *mut libc::c_void, iov_len: 4096 };
    // SAFETY: preadv on an invalid fd into a page this test mapped: EBADF
    // if it gets through.
    unsafe { libc::preadv(-1, &iov, 1, 0) };
}

fn pwritev(page: usize) {
    let iov = libc::iovec { iov_base: page as *mut libc::c_void, iov_len: 4096 };
    // SAFETY: as above; pwritev only reads the page.
    unsafe { libc::pwritev(-1, &iov, 1, 0) };
}

fn tgkill_usr1(_: usize) {
    let pid = std::process::id();
    // SAFETY: tgkill with thread id 0: EINVAL if it gets through.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, 0, libc::SIGUSR1) };
}

fn tgkill_kick(_: usize) {
    let pid = std::process::id();
    // SAFETY: tgkill with thread id 0: EINVAL if it gets through.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, 0, libc::SIGRTMIN()) };
}

fn check(probe: fn(usize), name: &str, want: [Verdict; 5]) {
    let page = page();
    for (kind, want) in ThreadKind::ALL.into_iter().zip(want) {
        assert_eq!(run(kind, probe, page), want, "{name} on a {kind:?} thread");
    }
}

// Verdicts in the order of `ThreadKind::ALL`: vCPU, event loop, control,
// vhost-user, console.

#[test]
fn no_thread_may_open_an_inet_socket() {
    check(socket_inet, "socket(AF_INET)", [Refused; 5]);
}

#[test]
fn unix_sockets_are_for_the_threads_that_serve_vsock_or_hot_plug_it() {
    check(socket_unix, "socket(AF_UNIX)", [Refused, Allowed, Allowed, Allowed, Refused]);
}

#[test]
fn no_thread_may_make_memory_executable() {
    check(mprotect_exec, "mprotect(PROT_EXEC)", [Refused; 5]);
    check(mmap_exec, "mmap(PROT_EXEC)", [Refused; 5]);
}

#[test]
fn no_thread_may_map_over_existing_memory() {
    check(mmap_fixed, "mmap(MAP_FIXED)", [Refused; 5]);
}

#[test]
fn every_thread_may_map_and_protect_plain_memory() {
    check(mmap_private, "mmap(private, anonymous)", [Allowed; 5]);
    check(mprotect_none, "mprotect(PROT_NONE)", [Allowed; 5]);
    check(madvise_dontneed, "madvise(MADV_DONTNEED)", [Allowed; 5]);
    check(futex_wake, "futex(FUTEX_WAKE_PRIVATE)", [Allowed; 5]);
}

#[test]
fn only_the_listed_madvise_advice_and_futex_operations_pass() {
    check(madvise_dontfork, "madvise(MADV_DONTFORK)", [Refused; 5]);
    check(futex_requeue, "futex(FUTEX_CMP_REQUEUE)", [Refused; 5]);
}

#[test]
fn ioctls_are_filtered_by_request_number() {
    check(ioctl_create_vm, "ioctl(KVM_CREATE_VM)", [Refused; 5]);
    check(ioctl_kvm_run, "ioctl(KVM_RUN)", [Allowed, Refused, Refused, Refused, Refused]);
    check(ioctl_fionbio, "ioctl(FIONBIO)", [Refused, Allowed, Allowed, Allowed, Refused]);
}

#[test]
fn only_the_control_thread_opens_files_and_binds_sockets_and_the_copier_creates_logs() {
    // The console copier creates a fresh log after a rotation, and nothing else.
    check(create_log, "openat(O_WRONLY|O_CREAT|O_TRUNC)", [Refused, Refused, Allowed, Refused, Allowed]);
    check(openat, "openat", [Refused, Refused, Allowed, Refused, Refused]);
    check(bind, "bind", [Refused, Refused, Allowed, Refused, Refused]);
}

#[test]
fn threads_start_threads_only_through_clone_with_a_threads_flags() {
    check(clone_process, "clone(SIGCHLD), a fork", [Refused; 5]);
    check(clone3_is_enosys, "clone3 answered ENOSYS", [Refused, Refused, Refused, Allowed, Refused]);
}

#[test]
fn fallocate_only_punches_holes() {
    check(fallocate_grow, "fallocate(0)", [Refused; 5]);
    check(fallocate_punch_hole, "fallocate(PUNCH_HOLE)", [Refused, Allowed, Allowed, Allowed, Refused]);
}

#[test]
fn the_threads_that_serve_queues_move_disk_data_with_vectored_io() {
    check(preadv, "preadv", [Refused, Allowed, Refused, Allowed, Refused]);
    check(pwritev, "pwritev", [Refused, Allowed, Refused, Allowed, Refused]);
}

#[test]
fn only_the_event_loop_sends_the_kick_signal_and_nothing_else() {
    check(tgkill_usr1, "tgkill(SIGUSR1)", [Refused; 5]);
    check(tgkill_kick, "tgkill(kick signal)", [Refused, Allowed, Refused, Refused, Refused]);
}

#[test]
fn every_thread_kind_has_a_nonempty_filter() {
    for kind in ThreadKind::ALL {
        let program = kind.program();
        assert!(program.len() > 10, "{kind:?} filter has {} instructions", program.len());
        assert_eq!(kind.bpf_bytes().len() % 8, 0);
    }
}

#[test]
fn threads_under_a_filter_make_malloc_arenas_without_reading_files() {
    // SAFETY: glibc's fork resets malloc's locks in the child, so the child
    // may allocate and start threads; it leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = match install(ThreadKind::VhostUser) {
            Ok(()) => {
                // More threads than glibc's first eight arenas, all alive
                // at once, each allocating: the ninth arena makes glibc
                // settle its arena limit.
                let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
                let threads: Vec<_> = (0..16)
                    .map(|_| {
                        let barrier = barrier.clone();
                        std::thread::spawn(move || {
                            let v = vec![1u8; 4096];
                            barrier.wait();
                            v.len()
                        })
                    })
                    .collect();
                let ok = threads.into_iter().all(|t| t.join().is_ok_and(|n| n == 4096));
                i32::from(!ok)
            }
            Err(_) => 2,
        };
        // SAFETY: _exit runs no destructors; the child's work is done.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above, into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "child exit (159: a seccomp refusal)");
}

#[test]
fn the_control_thread_can_make_hot_plugged_disks_and_vsock_devices() {
    use devices::virtio::block::BlockConfig;
    use devices::virtio::vhost_user_frontend::{VhostUserConfig, VhostUserDevice};
    use devices::virtio::vsock::VsockConfig;
    let dir = std::env::temp_dir().join(format!("vessel-seccomp-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    // Our rng backend served over vhost-user by this (unfiltered) process.
    let daemon_socket = dir.join("rng.sock");
    let _daemon = devices::virtio::vhost_user::spawn(
        "rng",
        Box::new(devices::virtio::rng::Rng::new().0),
        &daemon_socket,
        devices::virtio::vhost_user::unconfined,
    )
    .unwrap();
    let configs = [
        crate::DeviceConfig::Block(BlockConfig { path: disk, read_only: false, id: None, direct: false }),
        crate::DeviceConfig::Vsock(VsockConfig { guest_cid: 3, uds_path: dir.join("vsock.sock") }),
        // A stale vsock socket is replaced (lstat, unlink, bind, chmod, listen).
        crate::DeviceConfig::Vsock(VsockConfig { guest_cid: 3, uds_path: dir.join("vsock.sock") }),
        crate::DeviceConfig::Rng,
        // A vhost-user device connects to its daemon and negotiates.
        crate::DeviceConfig::VhostUser(VhostUserConfig {
            socket: daemon_socket.clone(),
            device: VhostUserDevice::Generic { device_type: 4, queue_sizes: vec![256], config: vec![] },
        }),
    ];
    // SAFETY: glibc's fork resets malloc's locks in the child, which may
    // then allocate; it leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = match install(ThreadKind::Control) {
            Ok(()) => {
                // Each backend is dropped (closing its files) before the next.
                let made = configs.iter().all(|c| crate::device_manager::prepare(c).is_ok());
                i32::from(!made)
            }
            Err(_) => 2,
        };
        // SAFETY: _exit runs no destructors; the child's work is done.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above, into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "child exit (1: a backend failed, 159: a seccomp refusal)");
}
