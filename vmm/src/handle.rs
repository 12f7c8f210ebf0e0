//! [`VmmHandle`]: a running VM as its embedder holds it. Actions go to the
//! event loop over a channel, with an EventFd to wake it; counters are read
//! directly.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::api::{Reply, Request, VmmAction, VmmActionError, VmmData};
use crate::device_manager::prepare;
use crate::exit::{ExitReason, VmError};
use crate::snapshot::file;
use crate::stats::{VmCounters, VmStats};

/// A running VM, held by its embedder. Dropping it stops the VM.
pub struct VmmHandle {
    requests: Sender<Request>,
    wake: EventFd,
    counters: Arc<VmCounters>,
    event_loop: Option<JoinHandle<ExitReason>>,
}

impl VmmHandle {
    /// A handle on the event loop `event_loop`, which takes requests from
    /// `requests` when `wake` is written.
    pub(crate) fn new(
        requests: Sender<Request>,
        wake: EventFd,
        counters: Arc<VmCounters>,
        event_loop: JoinHandle<ExitReason>,
    ) -> Self {
        Self { requests, wake, counters, event_loop: Some(event_loop) }
    }

    /// Sends `action` to the VM and waits for the answer.
    pub fn request(&self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        let (reply, answer): (_, Receiver<_>) = mpsc::channel();
        let prepared = match &action {
            VmmAction::AttachDevice(config) => Some(prepare(config).map_err(VmmActionError::Attach)?),
            _ => None,
        };
        let snapshot_dir = match &action {
            VmmAction::Snapshot(dir) => Some(dir.clone()),
            _ => None,
        };
        self.requests.send(Request { action, prepared, reply }).map_err(|_| VmmActionError::NotRunning)?;
        self.wake.write(1).map_err(|_| VmmActionError::NotRunning)?;
        let Reply { result, captured } = answer.recv().map_err(|_| VmmActionError::NotRunning)?;
        // A snapshot's files are written here, on the asking thread, while
        // the VM stays paused.
        if let (Some(dir), Some(captured), Ok(_)) = (snapshot_dir, captured, &result) {
            file::write(&dir, &captured).map_err(VmmActionError::Snapshot)?;
        }
        result
    }

    /// Reads the counters directly, without a round trip to the event loop.
    pub fn stats(&self) -> VmStats {
        self.counters.snapshot()
    }

    /// The VM's live counters, readable after the VM has ended too.
    pub fn counters(&self) -> Arc<VmCounters> {
        self.counters.clone()
    }

    /// Time from `start` to the guest's boot-timer write, if it wrote.
    pub fn boot_time(&self) -> Option<Duration> {
        self.counters.boot_time()
    }

    /// Waits for the VM to end and says how it ended.
    pub fn wait(mut self) -> ExitReason {
        self.join()
    }

    /// Says how the VM ended if it has, without blocking.
    pub fn try_wait(&mut self) -> Option<ExitReason> {
        if self.event_loop.as_ref().is_some_and(|t| t.is_finished()) {
            Some(self.join())
        } else {
            None
        }
    }

    /// Waits at most `timeout` for the VM to end; on timeout stops it and
    /// returns None.
    pub fn wait_timeout(mut self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(reason) = self.try_wait() {
                return Some(reason);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.try_wait()
    }

    fn join(&mut self) -> ExitReason {
        match self.event_loop.take() {
            Some(thread) => thread.join().unwrap_or(ExitReason::Error(VmError::EventLoopPanicked)),
            None => ExitReason::Stopped,
        }
    }
}

impl Drop for VmmHandle {
    fn drop(&mut self) {
        if self.event_loop.is_some() {
            // The loop may have ended already; then the request just fails.
            let _ = self.request(VmmAction::Stop);
            self.join();
        }
    }
}
