//! Serving a [`VirtioBackend`] over a vhost-user socket, so that QEMU (or
//! any vhost-user frontend) drives our device code: the frontend owns the
//! transport and shares guest memory; we process the queues.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use super::VirtioBackend;

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The daemon could not be set up or failed while serving.
    #[error("vhost-user {0} device on {1}: {2}")]
    Daemon(&'static str, String, String),
}

/// A backend as vhost-user-backend sees it.
struct Device {
    backend: Box<dyn VirtioBackend>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl VhostUserBackendMut for Device {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.backend.queue_max_sizes().len()
    }

    fn max_queue_size(&self) -> usize {
        self.backend.queue_max_sizes().iter().copied().max().map_or(0, usize::from)
    }

    fn features(&self) -> u64 {
        self.backend.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.backend.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&mut self) {
        self.backend.reset();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the queue worker never ends and serving never
        // returns after the frontend disconnects.
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // EVENT_IDX is not offered; the frontend cannot turn it on.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size as usize];
        self.backend.read_config(u64::from(offset), &mut data);
        data
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| std::io::Error::other(format!("event for unknown queue {device_event}")))?;
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| std::io::Error::other("queue event before the frontend shared memory"))?
            .memory();
        let used = {
            let mut state = vring.get_mut();
            self.backend.process_queue(device_event, state.get_queue_mut(), &mem)
        };
        if used {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Serves `backend` on a vhost-user socket at `socket` (created; an old one
/// is replaced) until the frontend disconnects.
pub fn serve(kind: &'static str, backend: Box<dyn VirtioBackend>, socket: &Path) -> Result<(), VhostUserError> {
    let err = |e: String| VhostUserError::Daemon(kind, socket.display().to_string(), e);
    let device = Arc::new(Mutex::new(Device { backend, mem: None }));
    let mut daemon = VhostUserDaemon::new(
        format!("vhost-user-{kind}"),
        device,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| err(format!("{e:?}")))?;
    let _ = std::fs::remove_file(socket);
    daemon.serve(socket).map_err(|e| err(format!("{e}")))
}
