//! A control-plane proxy between a vhost-user frontend and our daemon that
//! holds back `SET_VRING_ENABLE` until `SET_FEATURES` has gone through.
//!
//! QEMU's vhost-user-net frontend enables its rings as soon as the guest
//! driver picks its queue pairs, before it sends `SET_FEATURES`. The vhost
//! crate refuses `SET_VRING_ENABLE` until `VHOST_USER_F_PROTOCOL_FEATURES`
//! has been acked, and drops the connection; without that feature QEMU
//! refuses the device. So the daemon talks to this proxy over a socket
//! (for every device: other frontends simply pass through), and the proxy
//! forwards every message both ways unchanged
//! (with its file descriptors), except that an early `SET_VRING_ENABLE` is
//! kept until `SET_FEATURES` has been forwarded, then forwarded in order.
//! If the frontend asked for a reply to it, the proxy acknowledges it at
//! once, and forwards it with the request for a reply cleared.
//!
//! Only control messages pass here; the queues (shared memory, eventfds)
//! never do.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
/// Backend-to-frontend request: the device's config space changed.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
const VERSION: u32 = 0x1;
const REPLY_FLAG: u32 = 0x4;
const NEED_REPLY_FLAG: u32 = 0x8;
const HEADER_LEN: usize = 12;
/// Larger than any vhost-user message (a memory table of 8 regions, a
/// config space): anything bigger is a broken peer.
const MAX_PAYLOAD: usize = 64 * 1024;
/// File descriptors per message (a memory table sends one per region).
const MAX_FDS: usize = 32;
/// Early `SET_VRING_ENABLE`s held at most: a few per ring is all a
/// frontend sends before `SET_FEATURES`; one that sends more is broken or
/// hostile and must not make us hold messages (and their fds) without end.
const MAX_HELD: usize = 64;

/// One message: header fields, payload, and the fds that came with it.
pub(super) struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Receives one message; None at end of stream.
pub(super) fn recv(sock: &UnixStream) -> std::io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HEADER_LEN {
        let n = recv_with_fds(sock, &mut header[got..], &mut fds)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a vhost-user header cut short"));
        }
        got += n;
    }
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a vhost-user message of {size} bytes (request {request})"),
        ));
    }
    let mut payload = vec![0u8; size];
    let mut got = 0;
    while got < size {
        let n = recv_with_fds(sock, &mut payload[got..], &mut fds)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a vhost-user message cut short"));
        }
        got += n;
    }
    Ok(Some(Message { request, flags, payload, fds }))
}

/// recvmsg into `buf`, collecting any SCM_RIGHTS descriptors.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for MAX_FDS descriptors, aligned for cmsghdr.
    let mut control = [0u64; (MAX_FDS * 4 + 32) / 8];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at a live iovec and control buffer of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: msg was filled in by recvmsg; the CMSG macros walk the control
    // buffer within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg points at a complete header inside the control buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is the header size; a pure computation.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: cmsg is a complete control message; CMSG_DATA is its data.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: the message's data is data_len bytes inside the buffer.
            let bytes = unsafe { std::slice::from_raw_parts(data, data_len) };
            for chunk in bytes.chunks_exact(std::mem::size_of::<RawFd>()) {
                let fd = RawFd::from_ne_bytes(chunk.try_into().unwrap_or_default());
                // SAFETY: the kernel just gave us this descriptor.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    // Checked after the descriptors that did arrive are owned (and so
    // closed when dropped), and over the whole message, which may take
    // several reads.
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(too_many_fds());
    }
    Ok(n as usize)
}

fn too_many_fds() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "more descriptors than a vhost-user message carries")
}

/// Sends one message with its descriptors.
pub(super) fn send(sock: &UnixStream, m: &Message) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + m.payload.len());
    bytes.extend_from_slice(&m.request.to_le_bytes());
    bytes.extend_from_slice(&m.flags.to_le_bytes());
    bytes.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&m.payload);
    send_with_fds(sock, &bytes, &m.fds)
}

/// Writes `bytes`, with `fds` attached to the first of them.
fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    if fds.is_empty() {
        let mut s = sock;
        return s.write_all(bytes);
    }
    // The control buffer below holds MAX_FDS descriptors, no more.
    if fds.len() > MAX_FDS {
        return Err(too_many_fds());
    }
    // sendmsg only reads through iov_base.
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    let fd_bytes = fds.len() * std::mem::size_of::<RawFd>();
    let mut control = [0u64; (MAX_FDS * 4 + 32) / 8];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // SAFETY: the control buffer is larger than CMSG_SPACE for MAX_FDS, and
    // there are at most MAX_FDS descriptors (checked above).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: a pure size computation.
    let cmsg_len = unsafe { libc::CMSG_LEN(fd_bytes as u32) } as usize;
    // SAFETY: cmsg points at the start of our zeroed control buffer.
    let header = unsafe { &mut *cmsg };
    header.cmsg_level = libc::SOL_SOCKET;
    header.cmsg_type = libc::SCM_RIGHTS;
    header.cmsg_len = cmsg_len;
    // SAFETY: CMSG_DATA points inside the control buffer, with room for the fds.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    let raw: Vec<u8> = fds.iter().flat_map(|fd| fd.as_raw_fd().to_ne_bytes()).collect();
    // SAFETY: raw holds fd_bytes bytes; the data area has room for them.
    unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), data, raw.len()) };
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptors went with the first byte; the rest is plain data.
    let mut s = sock;
    s.write_all(&bytes[n as usize..])
}

/// The frontend's backend-request channel (`SET_BACKEND_REQ_FD`), kept by
/// the proxy so that the host can tell the frontend of a config change.
///
/// The vhost crate's own `Backend` channel has no way to send
/// `CONFIG_CHANGE_MSG`, and the daemon's copy of the channel is its own;
/// the message is a bare 12-byte header, so the proxy writes it itself.
#[derive(Clone, Default)]
pub struct BackendChannel(Arc<Mutex<Option<UnixStream>>>);

impl BackendChannel {
    /// Tells the frontend that the device's config space changed; it then
    /// rereads it (`GET_CONFIG`) and interrupts the driver.
    pub fn config_changed(&self) -> std::io::Result<()> {
        let channel = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stream) = channel.as_ref() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the frontend opened no backend channel (it did not take VHOST_USER_PROTOCOL_F_BACKEND_REQ)",
            ));
        };
        let message =
            Message { request: BACKEND_CONFIG_CHANGE_MSG, flags: VERSION, payload: Vec::new(), fds: Vec::new() };
        send(stream, &message)
    }

    /// Keeps a copy of the channel a `SET_BACKEND_REQ_FD` message carries.
    fn keep(&self, m: &Message) {
        if m.request != SET_BACKEND_REQ_FD {
            return;
        }
        if let Some(fd) = m.fds.first().and_then(|fd| fd.try_clone().ok()) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(UnixStream::from(fd));
        }
    }
}

/// Forwards between `frontend` and `backend` until either side closes.
pub fn run(frontend: UnixStream, backend: UnixStream, channel: &BackendChannel) -> std::io::Result<()> {
    let frontend_out = Arc::new(Mutex::new(frontend.try_clone()?));
    let backend_in = backend.try_clone()?;
    // Replies (and anything else) from our daemon go straight back.
    let to_frontend = frontend_out.clone();
    let replies = std::thread::Builder::new().name("vhost-user-proxy".into()).spawn(move || {
        while let Ok(Some(m)) = recv(&backend_in) {
            let out = to_frontend.lock().unwrap_or_else(|e| e.into_inner());
            if send(&out, &m).is_err() {
                break;
            }
        }
        let _ = to_frontend.lock().unwrap_or_else(|e| e.into_inner()).shutdown(std::net::Shutdown::Both);
    })?;
    let mut features_forwarded = false;
    let mut held: Vec<Message> = Vec::new();
    let result = loop {
        let mut m = match recv(&frontend) {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if m.request == SET_VRING_ENABLE && !features_forwarded {
            if m.flags & NEED_REPLY_FLAG != 0 {
                let ack = Message {
                    request: m.request,
                    flags: VERSION | REPLY_FLAG,
                    payload: 0u64.to_le_bytes().to_vec(),
                    fds: Vec::new(),
                };
                if let Err(e) = send(&frontend_out.lock().unwrap_or_else(|e| e.into_inner()), &ack) {
                    break Err(e);
                }
                m.flags &= !NEED_REPLY_FLAG;
            }
            if held.len() >= MAX_HELD {
                break Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("more than {MAX_HELD} SET_VRING_ENABLE messages before SET_FEATURES"),
                ));
            }
            held.push(m);
            continue;
        }
        channel.keep(&m);
        let is_features = m.request == SET_FEATURES;
        if let Err(e) = send(&backend, &m) {
            break Err(e);
        }
        if is_features && !features_forwarded {
            features_forwarded = true;
            if let Some(e) = held.drain(..).find_map(|h| send(&backend, &h).err()) {
                break Err(e);
            }
        }
    };
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = replies.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::within;
    use std::io::Read;
    use std::time::Duration;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Message {
        Message { request, flags, payload: payload.to_vec(), fds: Vec::new() }
    }

    #[test]
    fn an_early_ring_enable_waits_for_set_features_and_fds_travel() {
        let (frontend, proxy_front) = UnixStream::pair().unwrap();
        let (proxy_back, backend) = UnixStream::pair().unwrap();
        let proxy = std::thread::spawn(move || run(proxy_front, proxy_back, &BackendChannel::default()));

        // An fd travels with its message.
        let (r, mut w) = UnixStream::pair().unwrap();
        let mut with_fd = message(5, VERSION, &[1, 2, 3]);
        with_fd.fds.push(OwnedFd::from(r));
        send(&frontend, &with_fd).unwrap();
        let got = recv(&backend).unwrap().unwrap();
        assert_eq!((got.request, got.payload.as_slice(), got.fds.len()), (5, &[1u8, 2, 3][..], 1));
        w.write_all(b"x").unwrap();
        let mut passed = UnixStream::from(got.fds.into_iter().next().unwrap());
        let mut byte = [0u8; 1];
        passed.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");

        // Enable before features: acked at once, delivered after features.
        send(&frontend, &message(SET_VRING_ENABLE, VERSION | NEED_REPLY_FLAG, &[0, 0, 0, 0, 1, 0, 0, 0])).unwrap();
        let ack = recv(&frontend).unwrap().unwrap();
        assert_eq!((ack.request, ack.flags & REPLY_FLAG, ack.payload), (SET_VRING_ENABLE, REPLY_FLAG, vec![0; 8]));
        send(&frontend, &message(SET_FEATURES, VERSION, &[0; 8])).unwrap();
        assert_eq!(recv(&backend).unwrap().unwrap().request, SET_FEATURES);
        let enable = recv(&backend).unwrap().unwrap();
        assert_eq!((enable.request, enable.flags & NEED_REPLY_FLAG), (SET_VRING_ENABLE, 0));

        // Replies flow back; closing the frontend ends the proxy.
        send(&backend, &message(1, VERSION | REPLY_FLAG, &[9; 8])).unwrap();
        assert_eq!(recv(&frontend).unwrap().unwrap().payload, vec![9; 8]);
        drop(frontend);
        proxy.join().unwrap().unwrap();
        assert!(recv(&backend).unwrap().is_none());
    }

    #[test]
    fn the_backend_channel_is_kept_and_carries_a_config_change() {
        let (frontend, proxy_front) = UnixStream::pair().unwrap();
        let (proxy_back, backend) = UnixStream::pair().unwrap();
        let channel = BackendChannel::default();
        let kept = channel.clone();
        let proxy = std::thread::spawn(move || run(proxy_front, proxy_back, &kept));
        let err = channel.config_changed().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotConnected);

        // The frontend's end of its backend channel, and the one it sends.
        let (frontend_channel, sent) = UnixStream::pair().unwrap();
        let mut set = message(SET_BACKEND_REQ_FD, VERSION, &[]);
        set.fds.push(OwnedFd::from(sent));
        send(&frontend, &set).unwrap();
        // The daemon still gets it, descriptor and all.
        let got = recv(&backend).unwrap().unwrap();
        assert_eq!((got.request, got.fds.len()), (SET_BACKEND_REQ_FD, 1));

        channel.config_changed().unwrap();
        let change = recv(&frontend_channel).unwrap().unwrap();
        assert_eq!((change.request, change.flags, change.payload.len()), (BACKEND_CONFIG_CHANGE_MSG, VERSION, 0));
        drop(frontend);
        proxy.join().unwrap().unwrap();
    }

    #[test]
    fn oversized_messages_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut header = Vec::new();
        for word in [1u32, VERSION, (MAX_PAYLOAD + 1) as u32] {
            header.extend_from_slice(&word.to_le_bytes());
        }
        (&a).write_all(&header).unwrap();
        let err = recv(&b).err().expect("refused");
        assert!(err.to_string().contains("65537"), "{err}");
    }

    #[test]
    fn a_message_with_too_many_descriptors_is_refused() {
        let fds = |n: usize| -> Vec<OwnedFd> { (0..n).map(|_| OwnedFd::from(UnixStream::pair().unwrap().0)).collect() };
        let (a, b) = UnixStream::pair().unwrap();
        let mut m = message(5, VERSION, &[0; 4]);
        m.fds = fds(MAX_FDS + 1);
        assert_eq!(send(&a, &m).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        // Header and payload in two writes, each within one read's limit:
        // the message still carries too many in all.
        let header = [5u32, VERSION, 4].map(u32::to_le_bytes).concat();
        send_with_fds(&a, &header, &fds(MAX_FDS / 2 + 1)).unwrap();
        send_with_fds(&a, &[0; 4], &fds(MAX_FDS / 2 + 1)).unwrap();
        assert_eq!(recv(&b).err().map(|e| e.kind()), Some(std::io::ErrorKind::InvalidData));
    }

    #[test]
    fn a_frontend_that_never_sends_set_features_cannot_make_the_proxy_hold_without_end() {
        let (frontend, proxy_front) = UnixStream::pair().unwrap();
        let (proxy_back, backend) = UnixStream::pair().unwrap();
        let proxy = std::thread::spawn(move || run(proxy_front, proxy_back, &BackendChannel::default()));
        for _ in 0..=MAX_HELD {
            // The proxy may have given up already: later sends can fail.
            let _ = send(&frontend, &message(SET_VRING_ENABLE, VERSION, &[0, 0, 0, 0, 1, 0, 0, 0]));
        }
        // The old proxy held them all and waited on: that fails here.
        let result = within(Duration::from_secs(10), move || proxy.join().unwrap());
        let err = result.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        // Nothing held reached the daemon, and the proxy let go of it.
        assert!(recv(&backend).unwrap().is_none());
    }
}
