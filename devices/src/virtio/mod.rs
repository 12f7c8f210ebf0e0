//! virtio devices. Each device's queue logic is a [`VirtioBackend`], written
//! once against virtio-queue's `Queue`; two transports serve it: the
//! in-process virtio-mmio transport ([`mmio`]) and a vhost-user socket
//! ([`vhost_user`]).

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vhost_user;
pub mod vhost_user_frontend;
pub mod vsock;

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: the device follows virtio 1.x (required by modern
/// virtio-mmio and by vhost-user frontends).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX: notification suppression with event indexes.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// virtio device IDs (virtio spec 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// File system device (virtio-fs).
    pub const FS: u32 = 26;
}

/// A device's counters, read by name for a stats call.
pub trait CounterSet: Send + Sync {
    /// (name, value) of every counter, now.
    fn snapshot(&self) -> Vec<(&'static str, u64)>;
}

/// Implements [`CounterSet`] for a struct of `AtomicU64` fields.
macro_rules! counter_set {
    ($ty:ty { $($field:ident),+ $(,)? }) => {
        impl $crate::virtio::CounterSet for $ty {
            fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(std::sync::atomic::Ordering::Relaxed))),+]
            }
        }
    };
}
pub(crate) use counter_set;

/// What woke a device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// The driver notified this queue.
    Queue(u16),
    /// The backend's own file descriptor is readable.
    Backend,
}

/// A device's queue logic and configuration, independent of the transport.
///
/// Which thread calls what: the in-process transport calls
/// `set_acked_features`, `read_config`, `write_config` and `reset` from the
/// register access of a vCPU thread, under the vCPU seccomp filter (memory,
/// locks, `close`, `write` to an eventfd; no `epoll_ctl`, no sockets, no
/// file I/O). Work that needs more waits for `process`, which runs on the
/// event loop.
pub trait VirtioBackend: Send + Sync {
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn set_acked_features(&mut self, _features: u64) {}
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let _ = offset;
    }
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Processes the available buffers of queue `index`. Returns true when
    /// buffers were used and the driver should be told. Devices whose work
    /// spans queues implement [`VirtioBackend::process`] instead.
    fn process_queue(&mut self, _index: u16, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// Serves whatever woke the device, with every queue at hand. Returns
    /// the set of queues (bit i = queue i) that used buffers and need a
    /// notification. The default hands a queue notification to
    /// `process_queue`.
    fn process(&mut self, wakeup: Wakeup, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> u64 {
        match wakeup {
            Wakeup::Queue(index) => match queues.get_mut(usize::from(index)) {
                Some(queue) => u64::from(self.process_queue(index, queue, mem)) << index,
                None => 0,
            },
            Wakeup::Backend => 0,
        }
    }
    /// A pollable file descriptor for work that arrives from the host side
    /// (sockets, a tap device); when it is readable the transport calls
    /// `process(Wakeup::Backend, ..)`, with no queues while the driver is
    /// not running: the backend must still take in what made the fd
    /// readable, or the event loop, which polls it level-triggered, spins.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The device was restored from a snapshot with a live driver: its
    /// host side is new (connections, sockets, files were opened again),
    /// while the driver's view of it is the saved one. A device whose host
    /// side had state the driver relies on tells the driver here (vsock
    /// sends a transport reset). Returns the queues that used buffers, as
    /// `process` does. Runs before the vCPUs do.
    fn restored(&mut self, _queues: &mut [&mut Queue], _mem: &GuestMemoryMmap) -> u64 {
        0
    }
    /// Forgets per-driver state after a device reset. Runs on a vCPU thread
    /// (see above): dropping an fd is fine, changing an epoll set is not.
    fn reset(&mut self) {}

    /// Whether another process serves this device's rings (a vhost-user
    /// frontend). Then the transport never touches them: it does not watch
    /// the queue eventfds (they go to [`VirtioBackend::set_kick_events`]),
    /// it hands the driver's queue setup to [`VirtioBackend::activate`],
    /// and it raises the used-buffer interrupt whenever
    /// `process(Wakeup::Backend, ..)` returns non-zero.
    fn queues_served_elsewhere(&self) -> bool {
        false
    }
    /// For a device whose queues are served elsewhere: the driver's queue
    /// notifications, in queue order (the eventfds the VMM registers as
    /// ioeventfds), given once when the device is put in its slot.
    fn set_kick_events(&mut self, _kicks: Vec<EventFd>) {}
    /// For a device whose queues are served elsewhere: the driver set
    /// DRIVER_OK with `queues` set up. Runs on a vCPU thread (see above),
    /// so work that needs more waits for `process(Wakeup::Backend, ..)`.
    fn activate(&mut self, _queues: &[Queue]) {}
    /// Whether the device failed and needs the driver to reset it
    /// (DEVICE_NEEDS_RESET); asked after each backend wakeup.
    fn needs_reset(&self) -> bool {
        false
    }
}

/// The most chains one pass takes from one queue. A driver can add buffers
/// as fast as we use them; past the budget the pass ends and the queue is
/// served again after the event loop's other work (control requests, other
/// queues), so no guest keeps a pass going for ever.
pub const PASS_BUDGET: u16 = 256;

/// Rounds of re-serving, in one pass, the queues that got buffers while
/// their notifications were off.
const SETTLE_ROUNDS: usize = 8;

/// What one pass over a device did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Queues (bit i = queue i) whose driver wants an interrupt.
    pub notify: u64,
    /// Queues left with buffers when the pass ended (their budget spent):
    /// the transport wakes them again (writes their kick eventfd), so that
    /// they are served after whatever else waits, without a driver kick.
    pub pending: u64,
}

/// Where a queue's rings stood when a pass began.
#[derive(Clone, Copy, Debug, Default)]
struct Start {
    /// The next available position to read.
    avail: u16,
    /// The next used position to write.
    used: u16,
}

impl Start {
    fn of(queue: &Queue) -> Self {
        Start { avail: queue.next_avail(), used: queue.next_used() }
    }
}

/// One pass: serves what woke the device, then [`settle`]s its queues.
pub fn serve(
    backend: &mut dyn VirtioBackend,
    wakeup: Wakeup,
    queues: &mut [&mut Queue],
    mem: &GuestMemoryMmap,
) -> Served {
    let start: smallvec::SmallVec<[Start; 4]> = queues.iter().map(|q| Start::of(q)).collect();
    let used = backend.process(wakeup, queues, mem);
    settle(backend, queues, mem, used, &start)
}

/// After a backend ran: re-arms every ready queue's notifications (with
/// VIRTIO_RING_F_EVENT_IDX this tells the driver how far we have read, so
/// it kicks again only past that point), runs the backend again for a queue
/// that has buffers once notifications are back on (the race notification
/// suppression opens: the driver did not kick for them), and says which
/// queues the driver wants interrupted: those the backend says it used or
/// whose used index moved, and with EVENT_IDX only those whose used_event
/// was passed ([`wants_interrupt`]). `start` holds where each queue's rings
/// stood when the pass began: a queue that has taken [`PASS_BUDGET`]
/// chains since is not run again but left `pending`.
fn settle(
    backend: &mut dyn VirtioBackend,
    queues: &mut [&mut Queue],
    mem: &GuestMemoryMmap,
    mut used: u64,
    start: &[Start],
) -> Served {
    // A queue is served again when buffers are there once notifications
    // are back on: the driver does not kick for buffers it added while we
    // had them off, so nobody else would. Where a pass takes nothing (a
    // receive queue whose buffers wait for host data), that queue is left
    // for the backend's own wakeup, so a waiting queue does not spin.
    // Where a pass has spent its budget, or the rounds run out, the queue
    // is pending: the transport wakes it again, so no wakeup is lost.
    let start_of = |q: &Queue, i: usize| start.get(i).copied().unwrap_or_else(|| Start::of(q));
    let taken = |q: &Queue, i: usize| q.next_avail().wrapping_sub(start_of(q, i).avail);
    let mut stalled = 0u64;
    let mut pending = 0u64;
    for round in 0..=SETTLE_ROUNDS {
        let mut again = 0u64;
        for (i, q) in queues.iter_mut().enumerate() {
            if !q.ready() || (stalled | pending) & (1 << i) != 0 {
                continue;
            }
            if q.enable_notification(mem).unwrap_or(false) {
                if round == SETTLE_ROUNDS || taken(q, i) >= PASS_BUDGET {
                    pending |= 1 << i;
                } else {
                    again |= 1 << i;
                }
            }
        }
        if again == 0 {
            break;
        }
        for i in 0..queues.len() {
            if again & (1 << i) != 0 {
                let before = queues[i].next_avail();
                used |= backend.process(Wakeup::Queue(i as u16), queues, mem);
                if queues[i].next_avail() == before {
                    stalled |= 1 << i;
                }
            }
        }
    }
    let mut notify = 0;
    for (i, q) in queues.iter().enumerate() {
        let before = start_of(q, i).used;
        if (used & (1 << i) != 0 || q.next_used() != before) && wants_interrupt(q, mem, before) {
            notify |= 1 << i;
        }
    }
    Served { notify, pending }
}

/// Whether the driver wants an interrupt for the used buffers `queue` put
/// from used position `before` on: always without VIRTIO_RING_F_EVENT_IDX
/// (the ring's NO_INTERRUPT flag is a hint we do not take, as virtio-queue
/// does not), and with it when the driver's used_event is among those
/// positions (virtio 1.x, 2.7.10). virtio-queue's `needs_notification`
/// makes the same test but counts only the buffers its own `add_used` put,
/// and [`chain::answer_all`] writes the used ring itself.
fn wants_interrupt(queue: &Queue, mem: &GuestMemoryMmap, before: u16) -> bool {
    if !queue.event_idx_enabled() {
        return true;
    }
    // The used index we published must be visible before used_event is
    // read: the driver writes used_event and then reads the used index.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    // used_event follows the available ring's entries.
    let at = queue.avail_ring().checked_add(4 + 2 * u64::from(queue.size()));
    let used_event = at.and_then(|at| mem.load::<u16>(GuestAddress(at), std::sync::atomic::Ordering::Relaxed).ok());
    let Some(used_event) = used_event.map(u16::from_le) else { return true };
    let now = queue.next_used();
    now.wrapping_sub(used_event).wrapping_sub(1) < now.wrapping_sub(before)
}

/// Reads `data.len()` bytes of a little-endian configuration structure
/// `config` at `offset`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::chain::answer_all;
    use crate::virtio::chain::tests::{desc, memory, within, WRITE};
    use crate::virtio::rng::Rng;
    use std::time::Duration;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    /// A backend whose driver adds a buffer for each one the device uses:
    /// the available index never stops advancing.
    pub(crate) struct Endless {
        pub(crate) avail: GuestAddress,
        pub(crate) answered: u64,
    }
    impl VirtioBackend for Endless {
        fn device_type(&self) -> u32 {
            device_type::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn process_queue(&mut self, _: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
            let (avail, answered) = (self.avail, &mut self.answered);
            answer_all(queue, mem, |_| {
                // The driver puts descriptor 0 back in the ring at once:
                // ring[idx % 16] = 0, then idx + 1.
                let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
                mem.write_obj(0u16, avail.unchecked_add(4 + 2 * u64::from(idx % 16))).unwrap();
                mem.write_obj(idx.wrapping_add(1), avail.unchecked_add(2)).unwrap();
                *answered += 1;
                0
            })
            .used
        }
    }

    /// With EVENT_IDX the driver does not kick for buffers it adds while
    /// notifications are off; a buffer added after the backend drained the
    /// queue, but before notifications came back on, must still be served.
    #[test]
    fn a_buffer_added_during_processing_is_served_without_a_kick() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 64, WRITE)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let (mut rng, _) = Rng::new();
        let used = rng.process(Wakeup::Queue(0), &mut [&mut q], &mem);
        assert_eq!(vq.used().idx().load(), 1);
        // The driver adds another buffer now: it sees notifications off
        // (avail_event not yet moved past its old index) and does not kick.
        vq.add_desc_chains(&[desc(0x10_1000, 64, WRITE)], 1).unwrap();
        settle(&mut rng, &mut [&mut q], &mem, used, &[Start::default()]);
        assert_eq!(vq.used().idx().load(), 2, "the second buffer was left behind");
    }

    /// A queue whose buffers the backend leaves for later (receive buffers
    /// waiting for host data) is not served over and over.
    #[test]
    fn a_queue_the_backend_leaves_alone_does_not_spin() {
        struct Idle(u32);
        impl VirtioBackend for Idle {
            fn device_type(&self) -> u32 {
                device_type::RNG
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &[16]
            }
            fn features(&self) -> u64 {
                VIRTIO_F_VERSION_1
            }
            fn process_queue(&mut self, _: u16, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
                self.0 += 1;
                false
            }
        }
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 64, WRITE)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let mut idle = Idle(0);
        assert_eq!(settle(&mut idle, &mut [&mut q], &mem, 0, &[Start::default()]), Served::default());
        assert_eq!(idle.0, 1, "served {} times", idle.0);
    }

    /// A driver that adds a buffer for each one the device uses: the
    /// available index never stops advancing. Each pass still ends, within
    /// its budget, and leaves the queue pending for the next pass.
    #[test]
    fn a_driver_adding_buffers_for_ever_gets_a_pass_within_the_budget() {
        let answered = within(Duration::from_secs(30), || {
            let mem = memory();
            let vq = MockSplitQueue::new(&mem, 16);
            vq.add_desc_chains(&[desc(0x10_0000, 64, WRITE)], 0).unwrap();
            let mut q: Queue = vq.create_queue().unwrap();
            let mut endless = Endless { avail: vq.avail_addr(), answered: 0 };
            let mut passes = Vec::new();
            for _ in 0..3 {
                let served = serve(&mut endless, Wakeup::Queue(0), &mut [&mut q], &mem);
                assert_eq!(served, Served { notify: 1, pending: 1 }, "the queue must be served again");
                assert_eq!(vq.avail().idx().load(), q.next_avail().wrapping_add(1), "a buffer is left waiting");
                passes.push(endless.answered - passes.iter().sum::<u64>());
            }
            passes
        });
        for n in answered {
            assert!(n >= u64::from(PASS_BUDGET) && n < 2 * u64::from(PASS_BUDGET), "a pass answered {n} chains");
        }
    }

    /// With EVENT_IDX the driver asks for an interrupt once the used index
    /// passes its used_event, and for no other: the device counts the
    /// buffers it used in the pass, as the spec's test needs.
    #[test]
    fn with_event_idx_the_driver_is_interrupted_when_its_used_event_is_passed() {
        let mem = memory();
        // virtio-queue's mock lays the used ring over the end of the
        // available ring: with 256 entries, the first 30 used elements
        // leave used_event alone.
        let vq = MockSplitQueue::new(&mem, 256);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * 256);
        mem.write_obj(5u16, used_event).unwrap();
        let (mut rng, _) = Rng::new();
        let chains = |first: u16, n: u16| {
            let descs: Vec<_> = (0..n).map(|i| desc(0x10_0000 + 0x100 * u64::from(first + i), 8, WRITE)).collect();
            vq.add_desc_chains(&descs, first).unwrap();
        };
        chains(0, 4);
        assert_eq!(serve(&mut rng, Wakeup::Queue(0), &mut [&mut q], &mem).notify, 0, "used 0..4 is short of 5");
        chains(4, 2);
        assert_eq!(serve(&mut rng, Wakeup::Queue(0), &mut [&mut q], &mem).notify, 1, "used 4..6 passes 5");
        chains(6, 1);
        assert_eq!(serve(&mut rng, Wakeup::Queue(0), &mut [&mut q], &mem).notify, 0, "5 was passed already");
        // The driver moves used_event to where the used index stands.
        mem.write_obj(7u16, used_event).unwrap();
        chains(7, 1);
        assert_eq!(serve(&mut rng, Wakeup::Queue(0), &mut [&mut q], &mem).notify, 1);
        assert_eq!(vq.used().idx().load(), 8);
        // Without EVENT_IDX, every pass that used a buffer interrupts.
        q.set_event_idx(false);
        chains(8, 1);
        assert_eq!(serve(&mut rng, Wakeup::Queue(0), &mut [&mut q], &mem).notify, 1);
        assert_eq!(serve(&mut rng, Wakeup::Queue(0), &mut [&mut q], &mem).notify, 0, "nothing was used");
    }

    /// A backend that puts buffers in the used ring but does not say so
    /// still gets its driver interrupted: the used index moved.
    #[test]
    fn a_used_index_that_moved_interrupts_even_if_the_backend_did_not_say_so() {
        struct Quiet;
        impl VirtioBackend for Quiet {
            fn device_type(&self) -> u32 {
                device_type::RNG
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &[16]
            }
            fn features(&self) -> u64 {
                VIRTIO_F_VERSION_1
            }
            fn process_queue(&mut self, _: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
                answer_all(queue, mem, |_| 0);
                false
            }
        }
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 8, WRITE)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(serve(&mut Quiet, Wakeup::Queue(0), &mut [&mut q], &mem), Served { notify: 1, pending: 0 });
    }
}
