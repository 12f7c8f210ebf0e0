//! Seccomp filters, one per thread kind, compiled into BPF at build time
//! (rules in `rules.rs`, compiled by `build.rs`) and installed by each thread
//! before it does its work: vCPU threads before the guest's first
//! instruction. A refused syscall raises SIGSYS; the handler names the
//! syscall on stderr and ends the process.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::Once;

use seccompiler::{sock_filter, BpfProgram};

/// The kinds of thread the VMM runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU and the PIO/MMIO devices it exits into.
    Vcpu,
    /// Runs the event loop: control requests, the reset line, vCPU exits.
    EventLoop,
    /// The thread that drives a started VM through its handle (the CLI's
    /// main thread), and makes the backends of hot-plugged devices.
    /// Library embedders may install it on their own thread.
    Control,
    /// Serves a backend over vhost-user (`vessel device serve`, the
    /// qemu-tcg sandbox's backends), with the library's threads it starts:
    /// the frontend's messages and the guest's queues. Installed through
    /// [`confine_vhost_user`].
    VhostUser,
    /// Copies the guest's console output into its log (runtime-api).
    Console,
}

impl ThreadKind {
    /// Every kind, for tests that check each filter.
    pub const ALL: [ThreadKind; 5] =
        [ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Control, ThreadKind::VhostUser, ThreadKind::Console];

    fn bpf_bytes(self) -> &'static [u8] {
        match self {
            ThreadKind::Vcpu => include_bytes!(concat!(env!("OUT_DIR"), "/vcpu.bpf")),
            ThreadKind::EventLoop => include_bytes!(concat!(env!("OUT_DIR"), "/event_loop.bpf")),
            ThreadKind::Control => include_bytes!(concat!(env!("OUT_DIR"), "/control.bpf")),
            ThreadKind::VhostUser => include_bytes!(concat!(env!("OUT_DIR"), "/vhost_user.bpf")),
            ThreadKind::Console => include_bytes!(concat!(env!("OUT_DIR"), "/console.bpf")),
        }
    }

    /// The compiled filter.
    pub fn program(self) -> BpfProgram {
        decode(self.bpf_bytes())
    }

    /// The filters to install, in order: threads that start threads get
    /// the clone3 filter first (see rules.rs, `clone3_enosys`).
    fn programs(self) -> Vec<BpfProgram> {
        match self {
            ThreadKind::VhostUser => vec![decode(CLONE3_ENOSYS), self.program()],
            ThreadKind::Vcpu | ThreadKind::EventLoop | ThreadKind::Control | ThreadKind::Console => {
                vec![self.program()]
            }
        }
    }
}

/// Answers clone3 with ENOSYS, so that glibc falls back to clone, whose
/// flags a filter can check.
const CLONE3_ENOSYS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/clone3_enosys.bpf"));

fn decode(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|i| sock_filter {
            code: u16::from_le_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect()
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The SIGSYS reporter could not be registered.
    #[error("cannot register the SIGSYS handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for the {0:?} thread")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

thread_local! {
    /// The filter this thread installed, for the SIGSYS report. A thread
    /// that installed none and still gets SIGSYS inherited its filter
    /// from the thread that started it (the vhost-user library's threads).
    static INSTALLED: Cell<&'static [u8]> = const { Cell::new(b"child (filter inherited)") };
}

impl ThreadKind {
    fn label(self) -> &'static [u8] {
        match self {
            ThreadKind::Vcpu => b"vcpu",
            ThreadKind::EventLoop => b"event loop",
            ThreadKind::Control => b"control",
            ThreadKind::VhostUser => b"vhost-user",
            ThreadKind::Console => b"console",
        }
    }
}

/// Installs `kind`'s filter on the calling thread. Irreversible.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    register_sigsys_reporter()?;
    fix_malloc_arena_limit();
    for program in kind.programs() {
        seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(kind, e))?;
    }
    INSTALLED.with(|k| k.set(kind.label()));
    Ok(())
}

/// Installs the vhost-user filter: a [`devices::virtio::vhost_user::Confine`]
/// for the serving functions there, which cannot name this crate.
pub fn confine_vhost_user() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    install(ThreadKind::VhostUser).map_err(Into::into)
}

/// glibc works out how many malloc arenas it may make the first time a
/// process has more than eight, by reading /sys/devices/system/cpu/online
/// from whichever thread needs one: under a filter that is a refused
/// openat. Setting the limit first (to glibc's own default, eight per CPU)
/// leaves nothing to read later.
fn fix_malloc_arena_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let limit = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX takes
        // any positive count.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, limit) };
    });
}

fn register_sigsys_reporter() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, report_sigsys)
            .map_err(SeccompError::SignalHandler);
    });
    result
}

/// Exit status after a refused syscall: 128 + SIGSYS, as a shell reports a
/// process killed by it.
pub const SIGSYS_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// Offset of `si_syscall` in `siginfo_t` for SIGSYS on x86_64 (after
/// signo, errno, code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_sigsys(_num: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // Only async-signal-safe work here: format into a stack buffer, write(2),
    // _exit(2). Both syscalls are in every thread kind's filter.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for SIGSYS,
        // so this offset stays inside it.
        let field = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET) };
        // SAFETY: `_sigsys._syscall`, an i32, lives at that offset.
        unsafe { field.cast::<i32>().read_unaligned() }
    };
    let mut msg = [0u8; 96];
    let prefix = b"vessel: seccomp refused syscall ";
    msg[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if nr < 0 {
        msg[len] = b'-';
        len += 1;
    }
    let count = digits.len() - d;
    msg[len..len + count].copy_from_slice(&digits[d..]);
    len += count;
    let suffix = b" on a ";
    msg[len..len + suffix.len()].copy_from_slice(suffix);
    len += suffix.len();
    let kind = INSTALLED.with(Cell::get);
    let kind = &kind[..kind.len().min(msg.len() - len - 16)];
    msg[len..len + kind.len()].copy_from_slice(kind);
    len += kind.len();
    let suffix = b" thread\n";
    msg[len..len + suffix.len()].copy_from_slice(suffix);
    len += suffix.len();
    // SAFETY: writes `len` initialised bytes of a live stack buffer to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len) };
    // SAFETY: _exit runs no atexit handlers or destructors: signal-safe.
    unsafe { libc::_exit(SIGSYS_EXIT_CODE) };
}

#[cfg(test)]
mod tests;
