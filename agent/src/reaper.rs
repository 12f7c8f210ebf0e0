//! Collecting every child's exit.
//!
//! The agent is PID 1 in a guest, so every orphan becomes its child: one
//! thread waits for any child and hands the statuses of the ones the agent
//! started (its launch helpers) to whoever waits for them; the others are
//! just reaped. Spawning happens under the same lock as the hand-off, and
//! the reaper only looks at an exited child (`WNOWAIT`) before it takes
//! that lock and reaps: a child that exits at once is never reaped before
//! it is registered, and one whose exec failed is left to `spawn`, which
//! reaps it itself (and asserts that it could).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A child's exit status, once known: its exit code, or 128 + the signal.
#[derive(Debug, Default)]
pub struct Exit {
    status: Mutex<Option<i32>>,
    done: Condvar,
}

impl Exit {
    /// Blocks until the child exited, returning its status.
    pub fn wait(&self) -> i32 {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = *status {
                return s;
            }
            status = self.done.wait(status).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the child exited or `timeout` passed.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<i32> {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let (status, _) =
            self.done.wait_timeout_while(status, timeout, |s| s.is_none()).unwrap_or_else(|e| e.into_inner());
        *status
    }

    /// The status if the child has exited.
    pub fn get(&self) -> Option<i32> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set(&self, status: i32) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        self.done.notify_all();
    }
}

/// The status a waitpid(2) without WUNTRACED reported, as a shell gives
/// it: the exit code, or 128 + the signal that killed the process.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// The reaper.
#[derive(Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, Arc<Exit>>>,
    /// Signalled when a child is registered, for a reaper that found no
    /// children to wait for.
    spawned: Condvar,
}

impl Reaper {
    /// Starts the reaping thread.
    pub fn start() -> Arc<Reaper> {
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        std::thread::Builder::new().name("reaper".into()).spawn(move || r.run()).expect("spawn the reaper thread");
        reaper
    }

    /// Locks the registry: spawn while holding it, then [`Registry::watch`].
    pub fn lock(&self) -> Registry<'_> {
        Registry(self.waiting.lock().unwrap_or_else(|e| e.into_inner()), &self.spawned)
    }

    fn run(&self) {
        loop {
            // SAFETY: siginfo_t is plain data; all-zero is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: info is a valid out-pointer; WNOWAIT leaves the child
            // a zombie, to be reaped below.
            let looked = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if looked < 0 {
                // ECHILD: no children right now. Wait for the agent to
                // start one; an orphan handed to PID 1 meanwhile is reaped
                // within a second.
                // A child registered since waitpid looked is waited for at once.
                let registry = self.lock();
                if registry.0.is_empty() {
                    let _ = self.spawned.wait_timeout(registry.0, std::time::Duration::from_secs(1));
                } else {
                    drop(registry);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                continue;
            }
            // SAFETY: waitid filled in a child's exit, so si_pid is set.
            let pid = unsafe { info.si_pid() };
            let mut registry = self.lock();
            let mut status = 0;
            // SAFETY: status is a valid out-pointer.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
                // Reaped meanwhile by the `spawn` that made it (its exec
                // failed), while we waited for the lock.
                continue;
            }
            if let Some(exit) = registry.0.remove(&pid) {
                exit.set(exit_code(status));
            }
        }
    }
}

/// The locked registry.
pub struct Registry<'a>(MutexGuard<'a, HashMap<i32, Arc<Exit>>>, &'a Condvar);

impl Registry<'_> {
    /// Hands `pid`'s exit to the returned [`Exit`].
    pub fn watch(&mut self, pid: i32) -> Arc<Exit> {
        let exit = Arc::new(Exit::default());
        self.0.insert(pid, exit.clone());
        self.1.notify_all();
        exit
    }
}
