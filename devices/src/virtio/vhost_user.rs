//! Serving a [`VirtioBackend`] over a vhost-user socket, so that QEMU (or
//! any vhost-user frontend) drives our device code: the frontend owns the
//! transport and shares guest memory; we process the queues.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use virtio_queue::Queue;

use super::{VirtioBackend, Wakeup};
use crate::host_socket;

mod reorder;

/// The control-plane proxy itself, for the fuzz target (`reorder.rs`).
#[doc(hidden)]
pub use reorder::run as reorder_proxy;
pub use reorder::BackendChannel;

/// Largest split virtqueue the virtio spec allows.
const MAX_QUEUE_SIZE: usize = 32768;

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
    /// Our copies of the queue workers' exit notifiers: we run the
    /// connection ourselves (through the proxy), so we tell them to end.
    exits: Mutex<Vec<EventNotifier>>,
    /// The descriptors of the exit consumers handed to the library, which
    /// registers each with its epoll through `into_raw_fd` and never
    /// closes it (vhost-user-backend 0.24, `VringEpollHandler::new`): we
    /// close them once its workers are gone, or every connection served
    /// would leak one.
    leaked_consumers: Mutex<Vec<std::os::fd::RawFd>>,
}

impl VhostUserBackendMut for Device {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.backend.queue_max_sizes().len()
    }

    fn max_queue_size(&self) -> usize {
        // The frontend picks the ring size (QEMU's vhost-user-blk uses
        // 1024) without asking; nothing here is sized by it, so accept any
        // size virtio allows.
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.backend.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.backend.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the frontend opens a channel on which the proxy can
        // tell it of a config change (a placeholder disk given a medium).
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&mut self) {
        self.backend.reset();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the queue worker never ends and serving never
        // returns after the frontend disconnects.
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::empty()).ok()?;
        if let Ok(copy) = notifier.try_clone() {
            self.exits.lock().unwrap_or_else(|p| p.into_inner()).push(copy);
        }
        self.leaked_consumers.lock().unwrap_or_else(|p| p.into_inner()).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The library sets it on each vring's queue; `super::serve` follows it.
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
        let wakeup = if usize::from(device_event) < vrings.len() {
            Wakeup::Queue(device_event)
        } else if u64::from(device_event) == backend_token(vrings.len()) {
            Wakeup::Backend
        } else {
            return Err(std::io::Error::other(format!("event for unknown queue {device_event}")));
        };
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            // No queue can be served before the frontend shares memory, but
            // host work is taken in (with no queues), so that the backend's
            // fd does not stay readable and spin this thread.
            if wakeup == Wakeup::Backend {
                self.backend.process(wakeup, &mut [], &GuestMemoryMmap::new());
            }
            return Ok(());
        };
        let served = {
            let mut guards: smallvec::SmallVec<[_; 4]> = vrings.iter().map(|v| v.get_mut()).collect();
            let mut queues: smallvec::SmallVec<[&mut Queue; 4]> =
                guards.iter_mut().map(|g| g.get_queue_mut()).collect();
            super::serve(self.backend.as_mut(), wakeup, &mut queues, &mem)
        };
        for (index, vring) in vrings.iter().enumerate() {
            if served.notify & (1 << index) != 0 {
                vring.signal_used_queue()?;
            }
            if served.pending & (1 << index) != 0 {
                kick(vring)?;
            }
        }
        Ok(())
    }
}

/// Wakes a queue whose pass ran out of budget, as the driver's kick
/// would: the library's epoll loop serves it again after its other events.
fn kick(vring: &VringRwLock) -> std::io::Result<()> {
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else { return Ok(()) };
    // SAFETY: the kick fd is owned by the vring, whose read guard `state`
    // holds it open for as long as this borrow lives.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(kick.as_raw_fd()) };
    rustix::io::write(fd, &1u64.to_ne_bytes())?;
    Ok(())
}

/// The epoll token of the backend's fd: tokens up to the queue count are
/// the library's (queues, then its exit event).
fn backend_token(queues: usize) -> u64 {
    queues as u64 + 1
}

/// Called on a serving thread once its sockets are open, before it reads a
/// byte from the frontend or the guest's queues, and before the library's
/// worker threads exist (they inherit what it sets up): the place for a
/// seccomp filter. devices cannot name the VMM's filters, so its caller
/// passes one.
pub type Confine = fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A [`Confine`] that leaves the thread as it is, for tests that run in
/// this crate (the filters live in the VMM's crate).
pub fn unconfined() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(())
}

/// Serves `backend` on a vhost-user socket at `socket` (created 0600; an
/// old socket is replaced, any other file refused) until the frontend
/// disconnects, confined by `confine` once the sockets are open.
pub fn serve(
    kind: &'static str,
    backend: Box<dyn VirtioBackend>,
    socket: &Path,
    confine: Confine,
) -> Result<(), VhostUserError> {
    let listener = listen(kind, socket)?;
    serve_on(kind, backend, listener, socket, &BackendChannel::default(), confine)
}

/// [`serve`] in a thread of its own; returns once the socket is there for
/// a frontend to connect to.
pub fn spawn(
    kind: &'static str,
    backend: Box<dyn VirtioBackend>,
    socket: &Path,
    confine: Confine,
) -> Result<std::thread::JoinHandle<Result<(), VhostUserError>>, VhostUserError> {
    Ok(spawn_with_channel(kind, backend, socket, confine)?.0)
}

/// [`spawn`], also returning the frontend's backend-request channel once
/// it opens one: the way to tell the frontend the config space changed.
pub fn spawn_with_channel(
    kind: &'static str,
    backend: Box<dyn VirtioBackend>,
    socket: &Path,
    confine: Confine,
) -> Result<(std::thread::JoinHandle<Result<(), VhostUserError>>, BackendChannel), VhostUserError> {
    let listener = listen(kind, socket)?;
    let path = socket.to_path_buf();
    let channel = BackendChannel::default();
    let kept = channel.clone();
    Ok((std::thread::spawn(move || serve_on(kind, backend, listener, &path, &kept, confine)), channel))
}

fn listen(kind: &'static str, socket: &Path) -> Result<UnixListener, VhostUserError> {
    host_socket::bind_private(socket)
        .map_err(|e| VhostUserError::Daemon(kind, socket.display().to_string(), format!("listening: {e}")))
}

/// A listening socket for our own daemon to connect to, which no other
/// process can reach: bound next to `socket`, then unlinked before it
/// listens, so its name never accepts a connection. The daemon reaches it
/// through `/proc/self/fd/<n>` of the returned `O_PATH` descriptor (the
/// library connects only by path, so a socketpair cannot be handed to it).
fn private_listener(socket: &Path) -> std::io::Result<(UnixListener, std::fs::File, String)> {
    static DAEMONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = DAEMONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut private = socket.as_os_str().to_owned();
    private.push(format!(".daemon-{}-{n}", std::process::id()));
    let private = std::path::PathBuf::from(private);
    host_socket::remove_socket(&private)?;
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &rustix::net::SocketAddrUnix::new(&private)?)?;
    let name = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(&private);
    let _ = std::fs::remove_file(&private);
    let name = name?;
    rustix::net::listen(&fd, 1)?;
    let path = format!("/proc/self/fd/{}", name.as_raw_fd());
    Ok((UnixListener::from(fd), name, path))
}

/// Serves the first frontend that connects to `listener`.
///
/// The daemon is always reached through the reordering proxy (see
/// reorder.rs): QEMU's vhost-user-net enables rings before it acks
/// features, which the vhost crate refuses; other frontends pass through
/// unchanged.
fn serve_on(
    kind: &'static str,
    backend: Box<dyn VirtioBackend>,
    listener: UnixListener,
    socket: &Path,
    channel: &BackendChannel,
    confine: Confine,
) -> Result<(), VhostUserError> {
    let err = |e: String| VhostUserError::Daemon(kind, socket.display().to_string(), e);
    let io = |what: &'static str| move |e: std::io::Error| err(format!("{what}: {e}"));
    let (inner, inner_name, inner_path) = private_listener(socket).map_err(io("listening for the daemon"))?;
    confine().map_err(|e| err(format!("cannot confine the serving thread: {e}")))?;
    let device = Arc::new(Mutex::new(Device {
        backend,
        mem: None,
        exits: Mutex::new(Vec::new()),
        leaked_consumers: Mutex::new(Vec::new()),
    }));
    let backend_fd = device.lock().unwrap_or_else(|p| p.into_inner()).backend.backend_fd();
    let queues = device.lock().unwrap_or_else(|p| p.into_inner()).backend.queue_max_sizes().len();
    let mut daemon = VhostUserDaemon::new(
        format!("vhost-user-{kind}"),
        device.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| err(format!("{e:?}")))?;
    if let Some(fd) = backend_fd {
        // The backend's host-side events arrive on the queue worker, with a
        // token past the queues (and the library's own exit token).
        let handlers = daemon.get_epoll_handlers();
        let handler = handlers.first().ok_or_else(|| err("no queue worker".into()))?;
        handler
            .register_listener(fd, EventSet::IN, backend_token(queues))
            .map_err(|e| err(format!("cannot watch the backend: {e}")))?;
    }
    // The connect completes into the backlog, so it can be accepted after.
    daemon.start_client(&inner_path).map_err(|e| err(format!("{e}")))?;
    drop(inner_name);
    let (daemon_conn, _) = inner.accept().map_err(io("accepting the daemon"))?;
    drop(inner);
    // The guest's memory goes down this connection: it must be our daemon's.
    if !host_socket::peer_is_this_process(&daemon_conn).map_err(io("checking the daemon"))? {
        return Err(err("the daemon's socket was reached by another process".into()));
    }
    let frontend = host_socket::accept_same_user(&listener).map_err(io("accepting the frontend"))?;
    let proxied = reorder::run(frontend, daemon_conn, channel);
    let waited = daemon.wait();
    // Our own connection handling: the queue workers are told to end here.
    // Our copies of the notifiers are closed once used: the library's
    // handlers may keep the device alive longer than this connection.
    let exits = std::mem::take(
        &mut *device.lock().unwrap_or_else(|p| p.into_inner()).exits.lock().unwrap_or_else(|p| p.into_inner()),
    );
    for exit in exits {
        let _ = exit.notify();
    }
    // Dropping the daemon drops its handler, which joins the queue workers
    // and closes their epolls: the exit consumers are then ours to close.
    drop(daemon);
    let leaked = std::mem::take(
        &mut *device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .leaked_consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    for fd in leaked {
        // SAFETY: `fd` is an exit consumer the library took with
        // `into_raw_fd` and never closes (see `leaked_consumers`); its
        // workers, the only users, were joined when the daemon dropped, so
        // nothing else holds this number.
        unsafe { libc::close(fd) };
    }
    proxied.map_err(io("proxying the frontend"))?;
    match waited {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected))
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::PartialMessage)) => Ok(()),
        Err(e) => Err(err(format!("{e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::{Vsock, VsockConfig};
    use std::io::Write;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vmm_sys_util::eventfd::EventFd;

    fn readable(fd: std::os::fd::RawFd) -> bool {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd, without waiting.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    #[test]
    fn host_work_before_the_frontend_shares_memory_is_taken_in_instead_of_spinning() {
        let uds = std::env::temp_dir().join(format!("vessel-vhost-idle-{}", std::process::id()));
        let (vsock, _) = Vsock::new(&VsockConfig { guest_cid: 3, uds_path: uds.clone() }).unwrap();
        let fd = vsock.backend_fd().unwrap();
        let mut device = Device {
            backend: Box::new(vsock),
            mem: None,
            exits: Mutex::new(Vec::new()),
            leaked_consumers: Mutex::new(Vec::new()),
        };
        let mut host = std::os::unix::net::UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        assert!(readable(fd));
        for _ in 0..5 {
            if !readable(fd) {
                break;
            }
            device.handle_event(backend_token(0) as u16, EventSet::IN, &[], 0).unwrap();
        }
        assert!(!readable(fd), "the backend fd stays readable: the daemon's loop would spin");
        let _ = std::fs::remove_file(&uds);
    }

    #[test]
    fn serving_never_replaces_a_file_that_is_not_a_socket() {
        let path = std::env::temp_dir().join(format!("vessel-vhost-file-{}", std::process::id()));
        std::fs::write(&path, b"data").unwrap();
        let (rng, _) = crate::virtio::rng::Rng::new();
        assert!(spawn("rng", Box::new(rng), &path, unconfined).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"data", "a regular file was replaced");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_daemon_connects_through_a_socket_that_has_no_name() {
        let dir = std::env::temp_dir().join(format!("vessel-vhost-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let (listener, name, path) = private_listener(&dir.join("s.sock")).unwrap();
        // Nothing in the directory: no one else can find the socket.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let _ours = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        assert!(host_socket::peer_is_this_process(&conn).unwrap());
        drop(name);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pending_queue_is_kicked_through_its_kick_eventfd() {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vring = VringRwLock::new(mem, 16).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let theirs = evt.try_clone().unwrap();
        // SAFETY: the fd was just taken out of an EventFd we own; the File owns it now.
        vring.set_kick(Some(unsafe { std::fs::File::from_raw_fd(theirs.into_raw_fd()) }));
        kick(&vring).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
    }
}
