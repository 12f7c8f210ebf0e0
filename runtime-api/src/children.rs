//! Child processes that die with this process (QEMU, helpers).
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends,
//! not the process: a child started from a short-lived thread (a test's, an
//! embedder's worker) would be killed with that thread. So every such
//! child is started by one spawner thread that lives as long as the
//! process, and gets SIGKILL when the process dies, however it dies
//! (kill -9 included). The child checks after setting it that its parent
//! is still there, since the parent may have died just before, and fails
//! to start if not.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

type Request = (Command, Sender<std::io::Result<Child>>);

/// Starts `command` from the process-long spawner thread, so that the
/// child gets SIGKILL when this process ends.
pub fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("vessel-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .map(drop)
            .unwrap_or_else(|e| tracing::warn!(error = %e, "no spawner thread: children are started unbound"));
        Mutex::new(requests)
    });
    let parent = std::process::id();
    let tie = move || {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and
        // touches no memory; it is async-signal-safe.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: getppid has no preconditions.
        let now = unsafe { libc::getppid() };
        if now as u32 != parent {
            // The parent died before the tie took: do not start.
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec; it
    // calls only prctl and getppid, which are async-signal-safe, and
    // allocates nothing.
    unsafe { command.pre_exec(tie) };
    let (reply, answer) = mpsc::channel();
    let sent = spawner.lock().unwrap_or_else(|p| p.into_inner()).send((command, reply));
    match sent {
        Ok(()) => answer.recv().map_err(|_| std::io::Error::other("the spawner thread is gone"))?,
        // No spawner thread: start it here, still tied to this thread.
        Err(mpsc::SendError((mut command, _))) => command.spawn(),
    }
}

/// Has `command`'s process start with no capabilities at all, whatever
/// its user (root included), and unable to gain any (no_new_privs): its
/// bounding, inheritable and ambient sets are emptied before exec, so the
/// kernel gives an exec'd root nothing. For children that need no
/// privilege: QEMU running a guest under TCG talks to sockets and files
/// this process made for it, and to nothing else.
pub fn without_privileges(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec; it makes only the
    // prctl and capset calls below, which are async-signal-safe and
    // allocate nothing.
    unsafe { command.pre_exec(drop_every_capability) };
}

/// prctl(option, arg) with the other arguments 0.
fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: prctl takes plain integers here and touches no memory of ours.
    match unsafe { libc::prctl(option, arg, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The body of [`without_privileges`], in the child before exec.
fn drop_every_capability() -> std::io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
    // Capability numbers past the kernel's last are EINVAL: done. Without
    // CAP_SETPCAP (not root) the bounding set cannot be changed (EPERM),
    // and needs no change: such a process has no capability, and
    // no_new_privs keeps exec from granting any.
    for cap in 0..64 {
        match prctl(libc::PR_CAPBSET_DROP, cap) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => break,
            other => other?,
        }
    }
    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong)?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words of each set.
    let header = Header { version: 0x2008_0522, pid: 0 };
    let none = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset reads a header and two data structs, which live on
    // this stack for the call.
    match unsafe { libc::syscall(libc::SYS_capset, &header, none.as_ptr()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_without_privileges_has_no_capability_and_cannot_gain_one() {
        let mut cat = Command::new("cat");
        cat.arg("/proc/self/status").stdout(std::process::Stdio::piped());
        without_privileges(&mut cat);
        let out = cat.output().unwrap();
        assert!(out.status.success());
        let status = String::from_utf8_lossy(&out.stdout);
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            let line = status.lines().find(|l| l.starts_with(set)).unwrap();
            assert!(line.ends_with("0000000000000000"), "{line}");
        }
        assert!(status.lines().any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])), "{status}");
    }

    #[test]
    fn a_tied_child_outlives_the_thread_that_asked_for_it() {
        let child = std::thread::spawn(|| {
            let mut sleep = Command::new("sleep");
            sleep.arg("30");
            spawn_tied(sleep).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut child = child;
        assert!(child.try_wait().unwrap().is_none(), "the child died with the thread that asked for it");
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        assert!(status.lines().any(|l| l.starts_with("PPid:")), "{status}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
