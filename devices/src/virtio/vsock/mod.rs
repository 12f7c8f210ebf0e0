//! virtio-vsock with a Unix-socket host side, in Firecracker's "hybrid"
//! convention:
//! - the host connects to the socket at `uds_path`, writes `CONNECT <port>\n`
//!   and, once the guest accepts, reads `OK <host port>\n`; then the stream
//!   carries the connection's bytes;
//! - a guest connection to the host (CID 2) on port P is delivered as a
//!   connection to the Unix socket `<uds_path>_P`.
//!
//! Host sockets are watched through one epoll fd (the backend fd), so
//! guest-initiated connections and host data arrive without polling. Flow
//! control follows the spec: we never send the guest more than its
//! advertised buffer has room for, and we advertise what we can hold for it.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::debug;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use self::packet::{op, Header, HEADER_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::chain::{Buffers, ChainReader};
use super::{
    device_type, read_config_bytes, VirtioBackend, Wakeup, PASS_BUDGET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// The host's context ID.
pub const HOST_CID: u64 = 2;
const RX: usize = 0;
const TX: usize = 1;
/// The event queue: the device tells the driver of transport resets here.
const EVENT: usize = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio spec 5.10.6.7): every
/// connection is gone, and the guest CID is to be read again.
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// Receive buffer we advertise per connection: the most guest data we
/// hold for a host socket that is slow to read it.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload we put in one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Control packets waiting for receive buffers, beyond which we stop
/// taking the guest's transmissions (it must post receive buffers).
const MAX_PENDING_CONTROL: usize = 1024;
/// First port we hand out to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most connections at once, as in Firecracker: each costs an fd and up to
/// `BUF_ALLOC` of buffers. Guest requests past it are answered with RST,
/// host connections past it are closed.
const MAX_CONNECTIONS: usize = 1023;
/// Most host connections that have not sent their `CONNECT` line yet;
/// more are closed as they are accepted, so the listener is still drained
/// (it is level-triggered: left readable, it would spin the event loop).
const MAX_HANDSHAKES: usize = 64;
/// Epoll token of the listening socket.
const LISTENER_TOKEN: u64 = u64::MAX;

/// How to make a vsock device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// The host-side Unix socket.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved.
    #[error("guest CID {0} is reserved; use 3 or more")]
    ReservedCid(u64),
    /// The Unix socket could not be bound.
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// epoll failed.
    #[error("cannot set up the vsock event queue")]
    Epoll(#[source] std::io::Error),
}

/// Counters a stats call reads.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Connections established.
    pub connections: AtomicU64,
    /// Bytes from guest to host.
    pub tx_bytes: AtomicU64,
    /// Bytes from host to guest.
    pub rx_bytes: AtomicU64,
    /// Malformed or refused packets.
    pub errors: AtomicU64,
}

super::counter_set!(VsockCounters { connections, tx_bytes, rx_bytes, errors });

/// Ports identifying a connection: ours (host side) and the guest's.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

struct Connection {
    stream: UnixStream,
    state: State,
    /// Bytes not yet taken by the host socket: guest data, after the first
    /// `own_bytes`, which are ours (the `OK <port>` reply).
    to_host: Vec<u8>,
    own_bytes: usize,
    /// Bytes we have sent the guest.
    tx_cnt: u32,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes of guest data we have passed to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// The host socket may have data for the guest.
    readable: bool,
    /// The guest will send no more / receive no more.
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    /// The host socket reached end of file.
    host_eof: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            to_host: Vec::new(),
            own_bytes: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            readable: true,
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_eof: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes what the host socket takes now; the rest waits for EPOLLOUT.
    fn flush_to_host(&mut self) -> std::io::Result<usize> {
        let mut written = 0;
        while written < self.to_host.len() {
            match self.stream.write(&self.to_host[written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.to_host.drain(..written);
        // Only guest data counts towards the credit we give back.
        let own = written.min(self.own_bytes);
        self.own_bytes -= own;
        self.fwd_cnt = self.fwd_cnt.wrapping_add((written - own) as u32);
        Ok(written)
    }
}

/// A host connection that has not said which port it wants yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    /// Epoll token (the stream's fd) to connection.
    by_token: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    /// Control packets (no payload) waiting for receive buffers.
    control: VecDeque<Header>,
    next_host_port: u32,
    scratch: Vec<u8>,
    counters: Arc<VsockCounters>,
}

impl Vsock {
    /// Listens on `config.uds_path` (replacing a stale socket file).
    pub fn new(config: &VsockConfig) -> Result<(Self, Arc<VsockCounters>), VsockError> {
        if config.guest_cid <= HOST_CID {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let listener = crate::host_socket::bind_private(&config.uds_path)
            .map_err(|e| VsockError::Listen(config.uds_path.clone(), e))?;
        listener.set_nonblocking(true).map_err(|e| VsockError::Listen(config.uds_path.clone(), e))?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))
            .map_err(VsockError::Epoll)?;
        let counters = Arc::new(VsockCounters::default());
        let vsock = Vsock {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            scratch: vec![0u8; MAX_PAYLOAD],
            counters: counters.clone(),
        };
        Ok((vsock, counters))
    }

    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.conns.get(&key).map_or(0, |c| c.fwd_cnt),
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        let mut h = self.header(key, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(h);
    }

    fn watch(&self, fd: RawFd, token: u64, events: EventSet) {
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)) {
            debug!("vsock: cannot watch fd {fd}: {e}");
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_token.remove(&(fd as u64));
        }
    }

    fn add_connection(&mut self, key: Key, stream: UnixStream, state: State) {
        let fd = stream.as_raw_fd();
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.watch(fd, fd as u64, events);
        self.by_token.insert(fd as u64, key);
        self.conns.insert(key, Connection::new(stream, state));
    }

    /// Takes the guest's transmissions until the queue is empty, too many
    /// answers wait for receive buffers, or the pass's budget is spent.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut reader = ChainReader::new(queue, mem);
        let mut used = false;
        for _ in 0..PASS_BUDGET {
            if self.control.len() >= MAX_PENDING_CONTROL {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            match reader.split(chain) {
                Ok(buffers) => self.handle_tx(&buffers),
                Err(_) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = queue.add_used(mem, head, 0);
            used = true;
        }
        used
    }

    fn handle_tx(&mut self, buffers: &Buffers) {
        let mut raw = [0u8; HEADER_LEN];
        if buffers.read_at(0, &mut raw).is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let h = Header::parse(&raw);
        let key = Key { local_port: h.dst_port, peer_port: h.src_port };
        // Packets not from this guest to the host are dropped: the guest
        // cannot speak for another context.
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let payload_len = u64::from(h.len);
        if h.type_ != TYPE_STREAM
            || payload_len > buffers.readable_len() - HEADER_LEN as u64
            || h.len as usize > MAX_PAYLOAD
        {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            if h.op != op::RST {
                self.control.push_back(Header { len: 0, op: op::RST, ..self.header(key, op::RST) });
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => self.guest_connect(key, &h),
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::Connecting => {
                    c.state = State::Established;
                    let reply = format!("OK {}\n", key.local_port);
                    c.to_host.extend_from_slice(reply.as_bytes());
                    c.own_bytes = reply.len();
                    if c.flush_to_host().is_err() {
                        self.reset(key);
                    } else {
                        self.counters.connections.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => self.reset(key),
            },
            op::RW => {
                let Some(c) = self.conns.get_mut(&key).filter(|c| c.state == State::Established) else {
                    self.reset(key);
                    return;
                };
                // A guest that ignores our credit could make us hold
                // unbounded data: that connection is reset.
                if c.to_host.len() + h.len as usize > BUF_ALLOC as usize {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    self.reset(key);
                    return;
                }
                let start = c.to_host.len();
                c.to_host.resize(start + h.len as usize, 0);
                if buffers.read_at(HEADER_LEN as u64, &mut c.to_host[start..]).is_err() {
                    c.to_host.truncate(start);
                    self.reset(key);
                    return;
                }
                self.counters.tx_bytes.fetch_add(u64::from(h.len), Ordering::Relaxed);
                self.after_host_write(key);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.send_control(key, op::CREDIT_UPDATE, 0);
                }
            }
            op::SHUTDOWN => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.peer_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                    c.peer_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                    self.after_host_write(key);
                }
            }
            op::RST => self.remove(key),
            _ => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.reset(key);
            }
        }
    }

    /// Tells the guest the connection is gone and forgets it.
    fn reset(&mut self, key: Key) {
        self.send_control(key, op::RST, 0);
        self.remove(key);
    }

    fn guest_connect(&mut self, key: Key, request: &Header) {
        if self.conns.contains_key(&key) {
            self.reset(key);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            debug!("vsock: guest connection to port {} refused: {MAX_CONNECTIONS} connections open", key.local_port);
            self.send_control(key, op::RST, 0);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                self.add_connection(key, stream, State::Established);
                if let Some(c) = self.conns.get_mut(&key) {
                    c.peer_buf_alloc = request.buf_alloc;
                    c.peer_fwd_cnt = request.fwd_cnt;
                }
                self.counters.connections.fetch_add(1, Ordering::Relaxed);
                self.send_control(key, op::RESPONSE, 0);
            }
            Err(e) => {
                debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.send_control(key, op::RST, 0);
            }
        }
    }

    /// After guest data was queued or a shutdown arrived: push data to the
    /// host, pass on a half-close, finish a connection both sides closed,
    /// and keep the guest's view of our buffer fresh.
    fn after_host_write(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.flush_to_host().is_err() {
            self.reset(key);
            return;
        }
        if c.peer_shut_send && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            if c.host_eof || c.peer_shut_rcv {
                // Nothing more can flow either way.
                self.reset(key);
                return;
            }
        }
        let unreported = c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent);
        if unreported >= BUF_ALLOC / 4 {
            self.send_control(key, op::CREDIT_UPDATE, 0);
        }
    }

    /// Serves the host side: new connections, handshakes, data, hangups.
    fn process_host(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                let (token, set) = (ev.data(), ev.event_set());
                if token == LISTENER_TOKEN {
                    self.accept_all();
                } else if self.handshakes.contains_key(&token) {
                    self.read_handshake(token);
                } else if let Some(&key) = self.by_token.get(&token) {
                    if set.contains(EventSet::OUT) {
                        self.after_host_write(key);
                    }
                    if let Some(c) = self.conns.get_mut(&key) {
                        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                            c.readable = true;
                        }
                        if set.contains(EventSet::ERROR) {
                            self.reset(key);
                        }
                    }
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // Only our user reaches the guest's ports.
                    if !crate::host_socket::peer_is_same_user(&stream).unwrap_or(false) {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.watch(fd, fd as u64, EventSet::IN | EventSet::READ_HANG_UP);
                    self.handshakes.insert(fd as u64, Handshake { stream, line: Vec::new() });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads `CONNECT <port>\n` byte by byte (no data past the line may be
    /// consumed: it belongs to the connection).
    fn read_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(1) if hs.line.len() < MAX_CONNECT_LINE => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EOF, an overlong line, an error: drop it.
                _ => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else { return };
        let _ = self.epoll.ctl(ControlOperation::Delete, hs.stream.as_raw_fd(), EpollEvent::default());
        let Some(port) = port.filter(|_| self.conns.len() < MAX_CONNECTIONS) else {
            // A bad line, or too many connections: the host sees end of file.
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let local_port = self.allocate_host_port();
        let key = Key { local_port, peer_port: port };
        self.add_connection(key, hs.stream, State::Connecting);
        if let Some(c) = self.conns.get_mut(&key) {
            // No data moves until the guest accepts.
            c.readable = false;
        }
        self.send_control(key, op::REQUEST, 0);
    }

    fn allocate_host_port(&mut self) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    /// Fills receive buffers: control packets first, then host data as
    /// the guest's credit allows.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        // A connection reaching end of file queues a control packet, which
        // goes before more data: the fill starts over. Each restart has
        // taken one connection's end of file, so this ends (a loop, not a
        // recursion per connection).
        loop {
            let (filled, again) = self.fill_rx(queue, mem);
            used |= filled;
            if !again {
                return used;
            }
        }
    }

    /// One fill of the receive buffers. Returns whether buffers were used,
    /// and whether a connection's end of file queued a control packet
    /// (then the caller fills again).
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (bool, bool) {
        let mut reader = ChainReader::new(queue, mem);
        let mut used = false;
        while let Some(h) = self.control.front().copied() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { return (used, false) };
            let head = chain.head_index();
            let len = match reader.split(chain) {
                Ok(b) if b.writable_len() >= HEADER_LEN as u64 => {
                    self.control.pop_front();
                    b.write_at(0, &h.to_bytes()).map_or(0, |()| HEADER_LEN as u32)
                }
                // A receive buffer too small for a header is returned empty.
                _ => 0,
            };
            let _ = queue.add_used(mem, head, len);
            used = true;
        }
        let ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.readable && c.state == State::Established && !c.peer_shut_rcv)
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            while let Some(c) = self.conns.get_mut(&key) {
                let credit = c.peer_credit() as usize;
                if credit == 0 || !c.readable {
                    break;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else { return (used, false) };
                let head = chain.head_index();
                let buffers = match reader.split(chain) {
                    Ok(b) if b.writable_len() > HEADER_LEN as u64 => b,
                    _ => {
                        let _ = queue.add_used(mem, head, 0);
                        used = true;
                        continue;
                    }
                };
                let room = (buffers.writable_len() as usize - HEADER_LEN).min(credit).min(MAX_PAYLOAD);
                let n = match c.stream.read(&mut self.scratch[..room]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                        c.readable = e.kind() == ErrorKind::Interrupted;
                        queue.go_to_previous_position();
                        continue;
                    }
                    Err(_) => 0,
                };
                if n == 0 {
                    // End of file: the host will send no more.
                    queue.go_to_previous_position();
                    c.readable = false;
                    c.host_eof = true;
                    if c.peer_shut_send && c.to_host.is_empty() {
                        self.reset(key);
                    } else {
                        self.send_control(key, op::SHUTDOWN, SHUTDOWN_SEND);
                    }
                    return (used, true);
                }
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                let mut h = self.header(key, op::RW);
                h.len = n as u32;
                if let Some(c) = self.conns.get_mut(&key) {
                    c.fwd_cnt_sent = c.fwd_cnt;
                }
                let ok = buffers.write_at(0, &h.to_bytes()).is_ok()
                    && buffers.write_at(HEADER_LEN as u64, &self.scratch[..n]).is_ok();
                let _ = queue.add_used(mem, head, if ok { (HEADER_LEN + n) as u32 } else { 0 });
                used = true;
                self.counters.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        (used, false)
    }
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to the Unix socket at `path` without waiting. A listener whose
/// backlog is full refuses at once (EAGAIN) instead of stalling the event
/// loop, as `UnixStream::connect` would; the caller treats any error as a
/// refused connection (an AF_UNIX connect completes or fails at once, it
/// never answers EINPROGRESS).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use rustix::net::{connect, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let fd = socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)?;
    connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(UnixStream::from(fd))
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.trim_end_matches('\r').parse().ok()
}

impl VirtioBackend for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn process(&mut self, wakeup: Wakeup, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> u64 {
        // Host work is taken in even with no queues (no driver yet, or
        // after a reset): a listener left readable would spin the loop.
        if wakeup == Wakeup::Backend {
            self.process_host();
        }
        if queues.len() < 2 {
            return 0;
        }
        let mut used = 0u64;
        // New receive buffers (or event-queue buffers, which we keep) need
        // only the fill below.
        if wakeup == Wakeup::Queue(TX as u16) && queues[TX].ready() && self.process_tx(queues[TX], mem) {
            used |= 1 << TX;
        }
        if queues[RX].ready() && self.process_rx(queues[RX], mem) {
            used |= 1 << RX;
        }
        // Answers may have made room for transmissions held back.
        if self.control.is_empty() && queues[TX].ready() && self.process_tx(queues[TX], mem) {
            used |= 1 << TX;
            if self.process_rx(queues[RX], mem) {
                used |= 1 << RX;
            }
        }
        used
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    /// A restored device has none of the connections the driver knew: it
    /// tells the driver so with a transport reset event, which makes the
    /// guest close them all (its applications see ECONNRESET and dial
    /// again). The event takes one of the buffers the driver keeps on the
    /// event queue; a driver that left none there is not told.
    fn restored(&mut self, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> u64 {
        let Some(queue) = queues.get_mut(EVENT) else { return 0 };
        if !queue.ready() {
            return 0;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            debug!("no event buffer for the transport reset after a restore");
            return 0;
        };
        let head = chain.head_index();
        let written = ChainReader::new(queue, mem)
            .split(chain)
            .and_then(|buffers| buffers.write_at(0, &EVENT_TRANSPORT_RESET.to_le_bytes()));
        let len = if written.is_ok() { 4 } else { 0 };
        match queue.add_used(mem, head, len) {
            Ok(()) => 1 << EVENT,
            Err(_) => 0,
        }
    }

    /// Runs on the vCPU thread that wrote the status register, under the
    /// vCPU seccomp filter: no `epoll_ctl` here (`remove` would make one).
    /// Dropping a stream closes its fd, and closing the only fd of a socket
    /// takes it out of the epoll set; no stream here is ever duplicated.
    fn reset(&mut self) {
        // The guest's connections die with its driver: their host sides
        // see end of file. A host connection still waiting for the guest's
        // answer is asked again of the next driver: a driver resets the
        // device as it starts, and a host that connected before that must
        // not lose its connection.
        self.conns.retain(|_, c| c.state == State::Connecting);
        let conns = &self.conns;
        self.by_token.retain(|_, key| conns.contains_key(key));
        self.control.clear();
        let waiting: Vec<Key> = self.conns.keys().copied().collect();
        for key in waiting {
            self.send_control(key, op::REQUEST, 0);
        }
    }
}

#[cfg(test)]
mod tests;
