//! virtio-net on arbitrary guest memory, with frames arriving from the
//! host side: a `SOCK_SEQPACKET` socket stands in for the TAP, so both the
//! transmit path (guest frames out) and the receive path (host frames into
//! guest buffers) run. Input: one byte, then that many 8-byte units of
//! host frames (each a length byte and its bytes), then guest memory.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use devices::virtio::net::{Net, NET_HDR_LEN};
use devices::virtio::{VirtioBackend, Wakeup};
use libfuzzer_sys::fuzz_target;

/// A non-blocking `SOCK_SEQPACKET` pair: (the device's end, ours).
fn tap_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair writes two descriptors into the array it is given.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both are new descriptors nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    let Some((&units, rest)) = data.split_first() else { return };
    let (mut frames, memory) = rest.split_at((usize::from(units) * 8).min(rest.len()));
    let mem = vessel_fuzz::memory(memory);
    let mut rx = vessel_fuzz::queue(0);
    let mut tx = vessel_fuzz::queue(0x400);
    let (mut net, counters, slot) = Net::placeholder([2, 0, 0, 0, 0, 1]).expect("net");
    let (device_end, host_end) = tap_pair();
    slot.insert_file(File::from(device_end)).expect("insert the stand-in TAP");
    while let Some((&len, rest)) = frames.split_first() {
        let (frame, rest) = rest.split_at(usize::from(len).min(rest.len()));
        frames = rest;
        // SAFETY: `frame` is a live buffer of its length.
        unsafe { libc::send(host_end.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    }
    for wakeup in [Wakeup::Backend, Wakeup::Queue(1), Wakeup::Queue(0)] {
        net.process(wakeup, &mut [&mut rx, &mut tx], &mem);
    }
    // What the guest sent: whole frames behind a zeroed header.
    let mut buf = vec![0u8; 70_000];
    let mut sent = 0u64;
    loop {
        // SAFETY: `buf` is a live writable buffer of its length.
        let n = unsafe { libc::recv(host_end.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { break };
        assert!(n >= NET_HDR_LEN, "a runt frame of {n} bytes went out");
        assert!(buf[..NET_HDR_LEN].iter().all(|b| *b == 0), "a guest header went out unzeroed");
        sent += 1;
    }
    assert_eq!(sent, counters.tx_packets.load(std::sync::atomic::Ordering::Relaxed));
    // The link going down mid-stream: frames are dropped, nothing breaks.
    slot.remove();
    net.process(Wakeup::Queue(1), &mut [&mut rx, &mut tx], &mem);
    let mut config = [0u8; 8];
    net.read_config(0, &mut config);
});
