//! vsock-probe: a guest-side tool for the tier-3 tests. It moves
//! deterministic byte streams over AF_VSOCK and prints their SHA-256, so a
//! test on the host can check every byte arrived.
//!
//! ```text
//! vsock-probe connect CID PORT SEND_BYTES SEED     # guest-initiated
//! vsock-probe listen PORT SEND_BYTES SEED          # host-initiated
//! vsock-probe parallel CID PORT CONNECTIONS BYTES  # many at once, each echoed
//! ```
//! Each stream connection sends SEND_BYTES of `vessel_tests::pattern(SEED)`,
//! shuts down its write side, reads to end of file, and prints
//! `VESSEL-VALUE: sent-sha256 <hex>`, `recv-sha256 <hex>` and `recv-bytes <n>`.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use agent_proto::link;
use vessel_tests::pattern::exchange;

/// A connected vsock stream, used through UnixStream's Read/Write (both
/// are plain stream sockets to the standard library).
fn connect(cid: u32, port: u32) -> std::io::Result<UnixStream> {
    link::vsock_connect(cid, port).map(UnixStream::from)
}

fn listen_accept(port: u32) -> std::io::Result<UnixStream> {
    let fd = link::vsock_listen(port, 1)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    println!("VESSEL-VALUE: listening {port}");
    // SAFETY: accept with no peer address wanted.
    let conn = unsafe { libc::accept4(raw, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if conn < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(conn) }))
}

fn num<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("vsock-probe: argument {i} ({what}) missing or invalid");
        std::process::exit(2)
    })
}

fn report(tag: &str, (sent, recv, bytes): (String, String, u64)) {
    println!("VESSEL-VALUE: {tag}sent-sha256 {sent}");
    println!("VESSEL-VALUE: {tag}recv-sha256 {recv}");
    println!("VESSEL-VALUE: {tag}recv-bytes {bytes}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("connect") => connect(num(&args, 2, "cid"), num(&args, 3, "port"))
            .and_then(|s| exchange(s, num(&args, 4, "bytes"), num(&args, 5, "seed")))
            .map(|r| report("", r)),
        Some("listen") => listen_accept(num(&args, 2, "port"))
            .and_then(|s| exchange(s, num(&args, 3, "bytes"), num(&args, 4, "seed")))
            .map(|r| report("", r)),
        Some("parallel") => {
            let (cid, port, n, bytes): (u32, u32, u64, u64) =
                (num(&args, 2, "cid"), num(&args, 3, "port"), num(&args, 4, "connections"), num(&args, 5, "bytes"));
            let threads: Vec<_> = (0..n)
                .map(|i| std::thread::spawn(move || connect(cid, port).and_then(|s| exchange(s, bytes, i))))
                .collect();
            let mut ok = 0;
            for (i, t) in threads.into_iter().enumerate() {
                match t.join() {
                    // The host echoes: what came back must be what went out.
                    Ok(Ok((sent, recv, got))) if sent == recv && got == bytes => ok += 1,
                    Ok(Ok((_, _, got))) => eprintln!("vsock-probe: connection {i}: {got} bytes back, or different"),
                    Ok(Err(e)) => eprintln!("vsock-probe: connection {i}: {e}"),
                    Err(_) => eprintln!("vsock-probe: connection {i} panicked"),
                }
            }
            println!("VESSEL-VALUE: parallel-ok {ok}");
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: vsock-probe connect CID PORT BYTES SEED | listen PORT BYTES SEED | parallel CID PORT N BYTES"
            );
            std::process::exit(2)
        }
    };
    if let Err(e) = result {
        println!("VESSEL-TEST-RESULT: fail vsock-probe: {e}");
        std::process::exit(1);
    }
}
