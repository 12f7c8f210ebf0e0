//! The vsock device driven as a guest driver would drive it, through
//! MockSplitQueue queues, against real Unix sockets on the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::virtio::chain::tests::{memory, within, WRITE};

const GUEST_CID: u64 = 3;
const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

/// A guest driver's view: rx and tx queues in guest memory.
struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    rx: MockSplitQueue<'m, GuestMemoryMmap>,
    tx: MockSplitQueue<'m, GuestMemoryMmap>,
    queues: Vec<Queue>,
    rx_next_desc: u16,
    tx_next_desc: u16,
    rx_used_seen: u16,
    rx_size: u16,
    buf: u64,
}

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Self {
        Self::with_rx_size(mem, 64)
    }

    /// A driver whose receive queue has `rx_size` entries (at most 1024).
    fn with_rx_size(mem: &'m GuestMemoryMmap, rx_size: u16) -> Self {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), rx_size);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x8000), 64);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x10000), 64);
        let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap(), ev.create_queue().unwrap()];
        Driver { mem, rx, tx, queues, rx_next_desc: 0, tx_next_desc: 0, rx_used_seen: 0, rx_size, buf: 0x10_0000 }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.buf;
        self.buf += len.next_multiple_of(0x1000);
        a
    }

    fn process(&mut self, dev: &mut Vsock, wakeup: Wakeup) -> u64 {
        let mut qs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        dev.process(wakeup, &mut qs, self.mem)
    }

    /// Posts `n` receive buffers of `size` bytes.
    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(size));
            let d = RawDescriptor::from(SplitDescriptor::new(addr, size, WRITE, 0));
            self.rx.add_desc_chains(&[d], self.rx_next_desc).unwrap();
            self.rx_next_desc += 1;
        }
    }

    /// Sends one packet (header and payload in two descriptors).
    fn send(&mut self, dev: &mut Vsock, h: Header, payload: &[u8]) {
        let hdr = self.alloc(HEADER_LEN as u64);
        self.mem.write_slice(&h.to_bytes(), GuestAddress(hdr)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(hdr, HEADER_LEN as u32, 0, 0))];
        if !payload.is_empty() {
            let data = self.alloc(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(data)).unwrap();
            descs[0] = RawDescriptor::from(SplitDescriptor::new(hdr, HEADER_LEN as u32, NEXT, self.tx_next_desc + 1));
            descs.push(RawDescriptor::from(SplitDescriptor::new(data, payload.len() as u32, 0, 0)));
        }
        self.tx.add_desc_chains(&descs, self.tx_next_desc).unwrap();
        self.tx_next_desc += descs.len() as u16;
        self.process(dev, Wakeup::Queue(TX as u16));
    }

    /// Packets the device has put in receive buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used_idx = self.rx.used().idx().load();
        while self.rx_used_seen != used_idx {
            let elem = self.rx.used().ring().ref_at(usize::from(self.rx_used_seen % self.rx_size)).unwrap().load();
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let d = SplitDescriptor::from(self.rx.desc_table().load(elem.id() as u16).unwrap());
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, d.addr()).unwrap();
            let h = Header::parse(&raw);
            let mut payload = vec![0u8; elem.len() as usize - HEADER_LEN];
            self.mem.read_slice(&mut payload, d.addr().unchecked_add(HEADER_LEN as u64)).unwrap();
            out.push((h, payload));
        }
        out
    }
}

fn guest_header(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn device(tag: &str) -> (Vsock, PathBuf) {
    let path = std::env::temp_dir().join(format!("vessel-vsock-{tag}-{}", std::process::id()));
    let (dev, _) = Vsock::new(&VsockConfig { guest_cid: GUEST_CID, uds_path: path.clone() }).unwrap();
    (dev, path)
}

/// Waits for the host side to have an event, then serves it.
fn serve_host(drv: &mut Driver, dev: &mut Vsock) {
    // Wait (bounded) until the backend fd reports work, as the event loop would.
    let mut poll = libc::pollfd { fd: dev.backend_fd().unwrap(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd for at most 2 s.
    unsafe { libc::poll(&mut poll, 1, 2000) };
    drv.process(dev, Wakeup::Backend);
}

#[test]
fn guest_connects_to_a_host_port_and_data_flows_both_ways() {
    let mem = memory();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("g2h");
    let listener = UnixListener::bind(port_path(&uds, 1234)).unwrap();
    drv.post_rx(8, 4096);

    drv.send(&mut dev, guest_header(5000, 1234, op::REQUEST, 0), &[]);
    let got = drv.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port, got[0].0.dst_cid),
        (op::RESPONSE, 1234, 5000, GUEST_CID)
    );
    assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    drv.send(&mut dev, guest_header(5000, 1234, op::RW, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    serve_host(&mut drv, &mut dev);
    let got = drv.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.len, got[0].1.as_slice()), (op::RW, 5, &b"world"[..]));
    assert_eq!(got[0].0.fwd_cnt, 5, "we forwarded the guest's 5 bytes");

    // The guest shuts down both ways: the host sees EOF and the guest an RST.
    let mut h = guest_header(5000, 1234, op::SHUTDOWN, 0);
    h.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    drv.send(&mut dev, h, &[]);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(drv.received().iter().map(|p| p.0.op).collect::<Vec<_>>(), vec![op::RST]);
    assert!(dev.conns.is_empty());
    std::fs::remove_file(port_path(&uds, 1234)).unwrap();
}

#[test]
fn host_connects_with_the_connect_handshake() {
    let mem = memory();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("h2g");
    drv.post_rx(8, 4096);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    serve_host(&mut drv, &mut dev); // accept
    serve_host(&mut drv, &mut dev); // the line
    let got = drv.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!((req.op, req.dst_port, req.dst_cid, req.src_cid), (op::REQUEST, 1024, GUEST_CID, HOST_CID));

    drv.send(&mut dev, guest_header(1024, req.src_port, op::RESPONSE, 0), &[]);
    let mut line = [0u8; 64];
    let n = host.read(&mut line).unwrap();
    assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {}\n", req.src_port));

    host.write_all(b"ping").unwrap();
    serve_host(&mut drv, &mut dev);
    let got = drv.received();
    assert_eq!(got[0].1, b"ping");
    assert_eq!(got[0].0.fwd_cnt, 0, "the OK line is not guest data");
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn a_refused_guest_connection_gets_rst_and_bad_packets_do_no_harm() {
    let mem = memory();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("bad");
    drv.post_rx(16, 4096);
    // Nobody listens on port 9.
    drv.send(&mut dev, guest_header(5000, 9, op::REQUEST, 0), &[]);
    assert_eq!(drv.received()[0].0.op, op::RST);
    // Spoofed source CID: dropped without answer.
    let mut spoof = guest_header(5000, 9, op::REQUEST, 0);
    spoof.src_cid = 7;
    drv.send(&mut dev, spoof, &[]);
    assert!(drv.received().is_empty());
    // Length beyond the chain, unknown type, unknown op: RST.
    drv.send(&mut dev, guest_header(5000, 9, op::RW, 4096), b"tiny");
    let mut dgram = guest_header(5000, 9, op::REQUEST, 0);
    dgram.type_ = 2;
    drv.send(&mut dev, dgram, &[]);
    drv.send(&mut dev, guest_header(5000, 9, 99, 0), &[]);
    assert_eq!(drv.received().iter().map(|p| p.0.op).collect::<Vec<_>>(), vec![op::RST; 3]);
    // Data for a connection that does not exist: RST.
    drv.send(&mut dev, guest_header(5000, 9, op::RW, 3), b"abc");
    assert_eq!(drv.received()[0].0.op, op::RST);
    assert!(dev.counters.errors.load(Ordering::Relaxed) >= 4);
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn host_data_respects_the_guest_credit() {
    let mem = memory();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("credit");
    let listener = UnixListener::bind(port_path(&uds, 77)).unwrap();
    drv.post_rx(32, 4096);
    let mut req = guest_header(6000, 77, op::REQUEST, 0);
    req.buf_alloc = 1000;
    drv.send(&mut dev, req, &[]);
    drv.received();
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 3000]).unwrap();
    serve_host(&mut drv, &mut dev);
    let total: usize = drv.received().iter().map(|p| p.1.len()).sum();
    assert_eq!(total, 1000, "only the guest's buffer's worth");
    // The guest consumed it all: 2000 more.
    let mut update = guest_header(6000, 77, op::CREDIT_UPDATE, 0);
    update.buf_alloc = 2000;
    update.fwd_cnt = 1000;
    drv.send(&mut dev, update, &[]);
    let total: usize = drv.received().iter().map(|p| p.1.len()).sum();
    assert_eq!(total, 2000);
    std::fs::remove_file(port_path(&uds, 77)).unwrap();
}

#[test]
fn a_guest_ignoring_our_credit_is_reset() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("flood");
    let listener = UnixListener::bind(port_path(&uds, 78)).unwrap();
    drv.post_rx(32, 4096);
    drv.send(&mut dev, guest_header(6001, 78, op::REQUEST, 0), &[]);
    drv.received();
    // The host never reads; the guest sends far past BUF_ALLOC.
    let (_host, _) = listener.accept().unwrap();
    let chunk = vec![1u8; 60 * 1024];
    // The host socket buffer takes some first (about 200 KiB); then ours fills.
    for _ in 0..14 {
        drv.send(&mut dev, guest_header(6001, 78, op::RW, chunk.len() as u32), &chunk);
    }
    let ops: Vec<u16> = drv.received().iter().map(|p| p.0.op).collect();
    assert!(ops.contains(&op::RST), "{ops:?}");
    assert!(dev.conns.is_empty());
    std::fs::remove_file(port_path(&uds, 78)).unwrap();
}

#[test]
fn a_driver_reset_closes_the_guests_connections_and_asks_the_next_driver_for_the_hosts() {
    let mem = memory();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("reset");
    let listener = UnixListener::bind(port_path(&uds, 79)).unwrap();
    drv.post_rx(8, 4096);
    drv.send(&mut dev, guest_header(6002, 79, op::REQUEST, 0), &[]);
    assert_eq!(drv.received()[0].0.op, op::RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // A host connection the guest has not answered yet.
    let mut early = UnixStream::connect(&uds).unwrap();
    early.write_all(b"CONNECT 1024\n").unwrap();
    serve_host(&mut drv, &mut dev); // accept
    serve_host(&mut drv, &mut dev); // the line
    assert_eq!(drv.received()[0].0.op, op::REQUEST);
    while dev.epoll.wait(0, &mut [EpollEvent::default(); 8]).unwrap() > 0 {}

    VirtioBackend::reset(&mut dev);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "the host side did not see end of file");
    assert_eq!((dev.conns.len(), dev.by_token.len()), (1, 1), "only the unanswered connection is kept");
    // Nothing of the old connection is left in the epoll set.
    let mut poll = libc::pollfd { fd: dev.backend_fd().unwrap(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd, without waiting.
    assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0, "the backend fd still reports work");

    // A new driver is asked for the unanswered connection again, and
    // connects to the same port again.
    let mut drv = Driver::new(&mem);
    drv.post_rx(8, 4096);
    drv.process(&mut dev, Wakeup::Queue(RX as u16));
    let req = drv.received()[0].0;
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024));
    drv.send(&mut dev, guest_header(1024, req.src_port, op::RESPONSE, 0), &[]);
    early.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = [0u8; 32];
    let n = early.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {}\n", req.src_port).as_bytes());
    drv.send(&mut dev, guest_header(6002, 79, op::REQUEST, 0), &[]);
    assert_eq!(drv.received()[0].0.op, op::RESPONSE);
    assert!(listener.accept().is_ok());
    std::fs::remove_file(port_path(&uds, 79)).unwrap();
}

/// Held by the tests that open many fds, so that one's count of this
/// process's fds does not see another's.
static MANY_FDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd lists this process's fds").count()
}

/// What came back for `requests` connection requests from the guest, sent
/// in batches (a fresh driver each: MockSplitQueue does not wrap its
/// rings): the ops answered, the most fds opened at once, the slowest pass.
fn request_connections(dev: &mut Vsock, port: u32, requests: u32) -> (Vec<u16>, usize, Duration) {
    const BATCH: u32 = 25;
    let mem = memory();
    let fds_before = open_fds();
    let (mut ops, mut most_fds, mut slowest) = (Vec::new(), 0, Duration::ZERO);
    for batch in 0..requests.div_ceil(BATCH) {
        let mut drv = Driver::new(&mem);
        let n = BATCH.min(requests - batch * BATCH);
        drv.post_rx(n as usize, 64);
        for i in 0..n {
            let start = std::time::Instant::now();
            drv.send(dev, guest_header(10_000 + batch * BATCH + i, port, op::REQUEST, 0), &[]);
            slowest = slowest.max(start.elapsed());
        }
        ops.extend(drv.received().iter().map(|p| p.0.op));
        most_fds = most_fds.max(open_fds().saturating_sub(fds_before));
    }
    (ops, most_fds, slowest)
}

#[test]
fn connections_past_the_cap_get_rst_and_the_fd_count_stays_bounded() {
    let _many_fds = MANY_FDS.lock().unwrap_or_else(|p| p.into_inner());
    let (ops, most_fds, slowest) = within(Duration::from_secs(120), || {
        let (mut dev, uds) = device("cap");
        let listener = UnixListener::bind(port_path(&uds, 80)).unwrap();
        // A listener that never accepts, with room in its backlog for more
        // than the cap (the kernel trims it to net.core.somaxconn).
        rustix::net::listen(&listener, 4096).unwrap();
        let got = request_connections(&mut dev, 80, 5000);
        assert_eq!(dev.conns.len(), MAX_CONNECTIONS);
        std::fs::remove_file(port_path(&uds, 80)).unwrap();
        got
    });
    let responses = ops.iter().filter(|&&o| o == op::RESPONSE).count();
    let resets = ops.iter().filter(|&&o| o == op::RST).count();
    assert_eq!((responses, resets), (MAX_CONNECTIONS, 5000 - MAX_CONNECTIONS), "answers: {ops:?}");
    // Other tests in this process open fds too: some slack.
    assert!(most_fds <= MAX_CONNECTIONS + 64, "{most_fds} fds opened");
    assert!(slowest < Duration::from_millis(100), "a pass took {slowest:?}");
}

#[test]
fn a_listener_with_a_full_backlog_refuses_at_once_instead_of_stalling_the_pass() {
    let (ops, _, slowest) = within(Duration::from_secs(30), || {
        let (mut dev, uds) = device("backlog");
        let listener = UnixListener::bind(port_path(&uds, 81)).unwrap();
        rustix::net::listen(&listener, 1).unwrap();
        let got = request_connections(&mut dev, 81, 20);
        std::fs::remove_file(port_path(&uds, 81)).unwrap();
        got
    });
    assert_eq!(ops.len(), 20, "every request is answered: {ops:?}");
    assert_eq!(ops[0], op::RESPONSE, "the backlog takes the first: {ops:?}");
    assert_eq!(ops[19], op::RST, "a full backlog refuses: {ops:?}");
    assert!(slowest < Duration::from_millis(100), "a pass took {slowest:?}");
}

#[test]
fn a_thousand_connections_at_end_of_file_at_once_are_shut_down_in_one_pass_without_deep_recursion() {
    let _many_fds = MANY_FDS.lock().unwrap_or_else(|p| p.into_inner());
    const CONNS: u32 = 1000;
    let (mut dev, uds) = device("eof");
    let listener = UnixListener::bind(port_path(&uds, 82)).unwrap();
    rustix::net::listen(&listener, 4096).unwrap();
    let (ops, _, _) = request_connections(&mut dev, 82, CONNS);
    assert!(ops.iter().all(|&o| o == op::RESPONSE), "{ops:?}");
    // Every host side closes: each connection reaches end of file.
    for _ in 0..CONNS {
        drop(listener.accept().unwrap());
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut drv = Driver::with_rx_size(&mem, 1024);
    drv.post_rx(CONNS as usize, 64);
    // A small stack: the old code recursed once per connection at end of
    // file, and overflowed it.
    let mut queues = std::mem::take(&mut drv.queues);
    std::thread::scope(|scope| {
        let pass = || {
            let mut refs: Vec<&mut Queue> = queues.iter_mut().collect();
            dev.process(Wakeup::Backend, &mut refs, &mem)
        };
        std::thread::Builder::new().stack_size(256 << 10).spawn_scoped(scope, pass).unwrap().join().unwrap();
    });
    drv.queues = queues;
    let got = drv.received();
    assert_eq!(got.len(), CONNS as usize);
    assert!(got.iter().all(|p| p.0.op == op::SHUTDOWN && p.0.flags == SHUTDOWN_SEND), "{got:?}");
    std::fs::remove_file(port_path(&uds, 82)).unwrap();
}

#[test]
fn host_connections_that_never_say_connect_are_bounded_and_the_listener_is_drained() {
    let mem = memory();
    let mut drv = Driver::new(&mem);
    let (mut dev, uds) = device("silent");
    let mut hosts: Vec<UnixStream> = (0..100).map(|_| UnixStream::connect(&uds).unwrap()).collect();
    for _ in 0..5 {
        drv.process(&mut dev, Wakeup::Backend);
    }
    assert_eq!(dev.handshakes.len(), MAX_HANDSHAKES);
    let mut poll = libc::pollfd { fd: dev.backend_fd().unwrap(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd, without waiting.
    assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0, "the listener is left readable");
    // The ones past the bound were closed: they see end of file.
    let mut closed = 0;
    for h in &mut hosts {
        h.set_nonblocking(true).unwrap();
        if matches!(h.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 100 - MAX_HANDSHAKES);
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn the_host_socket_is_0600_whatever_the_umask_and_never_replaces_a_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = std::env::temp_dir().join(format!("vessel-vsock-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let uds = dir.join("v.sock");
    // umask is per process: other tests meanwhile create files with wider
    // modes, which only concerns their own temporary files.
    let old = rustix::process::umask(rustix::fs::Mode::empty());
    let made = Vsock::new(&VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() });
    rustix::process::umask(old);
    let (dev, _) = made.unwrap();
    assert_eq!(std::fs::symlink_metadata(&uds).unwrap().mode() & 0o777, 0o600);
    drop(dev);
    let file = dir.join("precious");
    std::fs::write(&file, b"data").unwrap();
    assert!(Vsock::new(&VsockConfig { guest_cid: GUEST_CID, uds_path: file.clone() }).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"data", "a regular file was replaced");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A restored device tells the driver its connections are gone: a
/// transport reset event in the driver's first event buffer. Without an
/// event buffer there is nothing to tell it with, and nothing is used.
#[test]
fn a_restored_device_sends_a_transport_reset_event() {
    let mem = memory();
    let (mut dev, path) = device("restored");
    let mut driver = Driver::new(&mem);
    let mut qs: Vec<&mut Queue> = driver.queues.iter_mut().collect();
    assert_eq!(dev.restored(&mut qs, &mem), 0, "an event was used without an event buffer");
    drop(qs);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x10000), 64);
    let event_buf = 0x1f_0000;
    mem.write_slice(&[0xffu8; 8], GuestAddress(event_buf)).unwrap();
    ev.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(event_buf, 8, WRITE, 0))], 0).unwrap();
    driver.queues[EVENT] = ev.create_queue().unwrap();
    let mut qs: Vec<&mut Queue> = driver.queues.iter_mut().collect();
    assert_eq!(dev.restored(&mut qs, &mem), 1 << EVENT);
    let used = ev.used().ring().ref_at(0).unwrap().load();
    assert_eq!((ev.used().idx().load(), used.id(), used.len()), (1, 0, 4));
    let mut event = [0u8; 8];
    mem.read_slice(&mut event, GuestAddress(event_buf)).unwrap();
    assert_eq!(event, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is id 0");
    let _ = std::fs::remove_file(path);
}
