//! The vhost-user control-plane proxy (`vhost_user/reorder.rs`) fed an
//! arbitrary frontend byte stream. What reaches the daemon is checked
//! against a model: every whole message in order, except that
//! `SET_VRING_ENABLE`s before the first `SET_FEATURES` (64 at most) come
//! right after it, their need-reply flag cleared; a message too large or
//! cut short ends the stream. Each of those held with need-reply set is
//! acknowledged to the frontend.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Once;

use devices::virtio::vhost_user::{reorder_proxy, BackendChannel};
use libfuzzer_sys::fuzz_target;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 0x8;
const HEADER: usize = 12;
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_HELD: usize = 64;
/// An acknowledgement: a header and a u64.
const ACK_LEN: usize = HEADER + 8;

/// (bytes the daemon should get, acknowledgements the frontend should get)
fn model(mut input: &[u8]) -> (Vec<u8>, usize) {
    let (mut forwarded, mut held, mut acks, mut features) = (Vec::new(), Vec::<Vec<u8>>::new(), 0, false);
    while input.len() >= HEADER {
        let word = |i: usize| u32::from_le_bytes([input[i], input[i + 1], input[i + 2], input[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD || input.len() < HEADER + size {
            break;
        }
        let mut message = input[..HEADER + size].to_vec();
        input = &input[HEADER + size..];
        if request == SET_VRING_ENABLE && !features {
            if flags & NEED_REPLY != 0 {
                acks += 1;
                message[4..8].copy_from_slice(&(flags & !NEED_REPLY).to_le_bytes());
            }
            if held.len() >= MAX_HELD {
                break;
            }
            held.push(message);
            continue;
        }
        forwarded.extend_from_slice(&message);
        if request == SET_FEATURES && !features {
            features = true;
            held.drain(..).for_each(|h| forwarded.extend_from_slice(&h));
        }
    }
    (forwarded, acks)
}

fuzz_target!(|data: &[u8]| {
    static SIGPIPE: Once = Once::new();
    // A peer that closes early must be an error, not the end of the process.
    // SAFETY: ignoring SIGPIPE changes no memory.
    SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let (frontend, frontend_peer) = UnixStream::pair().expect("socketpair");
    let (backend, backend_peer) = UnixStream::pair().expect("socketpair");
    let input = data.to_vec();
    let qemu = std::thread::spawn(move || {
        let _ = (&frontend_peer).write_all(&input);
        let _ = frontend_peer.shutdown(Shutdown::Write);
        let mut answers = Vec::new();
        let _ = (&frontend_peer).read_to_end(&mut answers);
        answers
    });
    let daemon = std::thread::spawn(move || {
        let mut got = Vec::new();
        let _ = (&backend_peer).read_to_end(&mut got);
        got
    });
    let _ = reorder_proxy(frontend, backend, &BackendChannel::default());
    let got = daemon.join().expect("daemon thread");
    let answers = qemu.join().expect("frontend thread");
    let (forwarded, acks) = model(data);
    assert_eq!(got, forwarded, "the daemon got other bytes than the model says");
    assert_eq!(answers.len(), acks * ACK_LEN, "acknowledgements");
});
