//! `vessel device serve`: one virtio backend on a vhost-user socket.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::rng::Rng;
use devices::virtio::vhost_user;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::VirtioBackend;

#[derive(Subcommand, Debug)]
pub(crate) enum ServeCommand {
    /// A file-backed block device.
    Blk {
        /// The vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// The disk image.
        #[arg(long)]
        file: PathBuf,
        /// Refuse writes (and tell the driver so).
        #[arg(long)]
        read_only: bool,
        /// The disk's ID (serial), at most 20 bytes; the file name by default.
        #[arg(long)]
        id: Option<String>,
        /// Open the file with O_DIRECT (bypass the host's page cache).
        #[arg(long)]
        direct: bool,
    },
    /// A vsock device whose host side is a Unix socket (hybrid convention:
    /// `CONNECT <port>` to reach the guest; guest connections to port P go
    /// to `<uds>_P`).
    Vsock {
        /// The vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// The guest's context ID (3 or more).
        #[arg(long)]
        guest_cid: u64,
        /// The host-side Unix socket.
        #[arg(long)]
        uds: PathBuf,
    },
    /// A network card on a TAP device (created if missing).
    Net {
        /// The vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// The TAP interface.
        #[arg(long)]
        tap: String,
        /// The guest's MAC address (aa:bb:cc:dd:ee:ff); a fixed local one by default.
        #[arg(long, value_parser = parse_mac, default_value = "52:54:00:12:34:56")]
        mac: [u8; 6],
    },
    /// An entropy device fed by the host's getrandom.
    Rng {
        /// The vhost-user socket to listen on.
        #[arg(long)]
        socket: PathBuf,
    },
}

pub(crate) fn run(cmd: ServeCommand) -> anyhow::Result<()> {
    match cmd {
        ServeCommand::Blk { socket, file, read_only, id, direct } => {
            let (block, _counters) = Block::open(&BlockConfig { path: file, read_only, id, direct })?;
            serve_until_term("blk", Box::new(block), &socket)
        }
        ServeCommand::Vsock { socket, guest_cid, uds } => {
            let (vsock, _counters) = Vsock::new(&VsockConfig { guest_cid, uds_path: uds })?;
            serve_until_term("vsock", Box::new(vsock), &socket)
        }
        ServeCommand::Net { socket, tap, mac } => {
            let (net, _counters) = Net::new(&NetConfig { tap, mac })?;
            serve_until_term("net", Box::new(net), &socket)
        }
        ServeCommand::Rng { socket } => {
            let (rng, _counters) = Rng::new();
            serve_until_term("rng", Box::new(rng), &socket)
        }
    }
}

/// Serves `backend` on a thread under the vhost-user seccomp filter until
/// the frontend disconnects; a SIGTERM meanwhile removes the socket and
/// ends the process. The signal is taken here, on the unfiltered main
/// thread (the serving threads block it): the filter allows no unlink.
fn serve_until_term(kind: &'static str, backend: Box<dyn VirtioBackend>, socket: &Path) -> anyhow::Result<()> {
    let term = sigterm_set();
    // SAFETY: blocks SIGTERM in this thread with a set made just above;
    // the threads it starts inherit the mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &term, std::ptr::null_mut()) };
    anyhow::ensure!(rc == 0, "cannot block SIGTERM: {}", std::io::Error::from_raw_os_error(rc));
    let server = vhost_user::spawn(kind, backend, socket, vmm::seccomp::confine_vhost_user)?;
    let tick = libc::timespec { tv_sec: 0, tv_nsec: 100_000_000 };
    while !server.is_finished() {
        // SAFETY: waits for a signal of `term` with a timeout; both live
        // for the call, and no siginfo is asked for.
        let got = unsafe { libc::sigtimedwait(&term, std::ptr::null_mut(), &tick) };
        if got == libc::SIGTERM {
            let _ = devices::host_socket::remove_socket(socket);
            std::process::exit(0);
        }
    }
    server.join().map_err(|_| anyhow::anyhow!("the serving thread panicked"))??;
    Ok(())
}

fn sigterm_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: empties `set`, a live local.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: adds a valid signal number to `set`, a live local.
    unsafe { libc::sigaddset(&mut set, libc::SIGTERM) };
    set
}

/// Parses a MAC address written as six colon-separated hex bytes.
pub(crate) fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bytes: Result<Vec<u8>, _> = parts.iter().map(|p| u8::from_str_radix(p, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 && parts.iter().all(|p| p.len() == 2) => Ok([b[0], b[1], b[2], b[3], b[4], b[5]]),
        _ => Err(format!("{text:?} is not a MAC address like 52:54:00:12:34:56")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!(parse_mac("52:54:00:12:34:5f"), Ok([0x52, 0x54, 0, 0x12, 0x34, 0x5f]));
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:5f:00").is_err());
        assert!(parse_mac("5:54:00:12:34:5f").is_err());
        assert!(parse_mac("zz:54:00:12:34:5f").is_err());
    }
}
