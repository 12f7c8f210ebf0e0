//! virtio-vsock with a host side: a host connection that sends an
//! arbitrary `CONNECT` handshake and then data, and a host listener on
//! port 1024 that accepts the guest's connections and talks back. So the
//! handshake parser, connections in both directions, credit and shutdown
//! all run on guest-controlled packets (the `virtio_vsock` target has no
//! host side: its connections are all refused).
//!
//! Input: one byte N, N bytes the host connection writes (the handshake
//! line, then data; what follows its first newline is also what the host
//! writes into each connection the guest opens), then guest memory (the
//! receive queue at 0, transmit at 0x400, events at 0x800).
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{VirtioBackend, Wakeup};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

/// The device's socket, and a host listener for guest connections to
/// port 1024 (`<socket>_1024`).
fn host() -> &'static (PathBuf, UnixListener) {
    static HOST: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vessel-fuzz-vsock-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz directory");
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(dir.join("v.sock_1024")).expect("port 1024 listener");
        listener.set_nonblocking(true).expect("non-blocking listener");
        (uds, listener)
    })
}

fn drain(mut stream: &UnixStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let (script, memory) = rest.split_at(usize::from(n).min(rest.len()));
    let (uds, listener) = host();
    let (mut dev, _) = Vsock::new(&VsockConfig { guest_cid: 3, uds_path: uds.clone() }).expect("vsock");
    let mem = vessel_fuzz::memory(memory);
    let (mut rx, mut tx, mut ev) = (vessel_fuzz::queue(0), vessel_fuzz::queue(0x400), vessel_fuzz::queue(0x800));
    let host_conn = (!script.is_empty()).then(|| {
        let stream = UnixStream::connect(uds).expect("connect to the device");
        stream.set_nonblocking(true).expect("non-blocking");
        let _ = (&stream).write(script);
        stream
    });
    // The first pass accepts the host's connection, the second reads its
    // handshake; the transmit queue waits (every pass serves it), so that
    // the guest's packets can answer the handshake.
    let mut step = |dev: &mut Vsock, wakeup, tx_ready| {
        tx.set_ready(tx_ready);
        dev.process(wakeup, &mut [&mut rx, &mut tx, &mut ev], &mem);
    };
    step(&mut dev, Wakeup::Backend, false);
    step(&mut dev, Wakeup::Backend, false);
    step(&mut dev, Wakeup::Queue(1), true);
    let reply = script.iter().position(|b| *b == b'\n').map_or(script, |i| &script[i + 1..]);
    let mut accepted = Vec::new();
    while let Ok((stream, _)) = listener.accept() {
        stream.set_nonblocking(true).expect("non-blocking");
        let _ = (&stream).write(reply);
        accepted.push(stream);
    }
    for wakeup in [Wakeup::Backend, Wakeup::Queue(0), Wakeup::Queue(1), Wakeup::Backend, Wakeup::Queue(0)] {
        step(&mut dev, wakeup, true);
    }
    host_conn.iter().chain(&accepted).for_each(drain);
    // The host hangs up.
    drop(host_conn);
    drop(accepted);
    step(&mut dev, Wakeup::Backend, true);
    step(&mut dev, Wakeup::Queue(0), true);
    dev.reset();
});
