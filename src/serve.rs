//! `vessel device serve`: one virtio backend on a vhost-user socket.

use std::ffi::CString;
use std::os::raw::{c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use clap::Subcommand;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::rng::Rng;
use devices::virtio::vhost_user;
use devices::virtio::vsock::{Vsock, VsockConfig};

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

/// The socket to remove when SIGTERM arrives.
static SOCKET: OnceLock<CString> = OnceLock::new();

extern "C" fn on_sigterm(_num: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    if let Some(path) = SOCKET.get() {
        // SAFETY: unlink(2) on a NUL-terminated path that lives forever;
        // async-signal-safe.
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: _exit is async-signal-safe and runs no destructors.
    unsafe { libc::_exit(0) };
}

fn remove_socket_on_sigterm(socket: &Path) -> anyhow::Result<()> {
    let path = CString::new(socket.as_os_str().as_bytes()).context("socket path contains a NUL byte")?;
    let _ = SOCKET.set(path);
    vmm_sys_util::signal::register_signal_handler(libc::SIGTERM, on_sigterm)
        .map_err(|e| anyhow::anyhow!("cannot handle SIGTERM: {e}"))
}

pub(crate) fn run(cmd: ServeCommand) -> anyhow::Result<()> {
    match cmd {
        ServeCommand::Blk { socket, file, read_only, id } => {
            let (block, _counters) = Block::open(&BlockConfig { path: file, read_only, id })?;
            remove_socket_on_sigterm(&socket)?;
            vhost_user::serve("blk", Box::new(block), &socket)?;
        }
        ServeCommand::Vsock { socket, guest_cid, uds } => {
            let (vsock, _counters) = Vsock::new(&VsockConfig { guest_cid, uds_path: uds })?;
            remove_socket_on_sigterm(&socket)?;
            vhost_user::serve("vsock", Box::new(vsock), &socket)?;
        }
        ServeCommand::Net { socket, tap, mac } => {
            let (net, _counters) = Net::new(&NetConfig { tap, mac })?;
            remove_socket_on_sigterm(&socket)?;
            vhost_user::serve("net", Box::new(net), &socket)?;
        }
        ServeCommand::Rng { socket } => {
            let (rng, _counters) = Rng::new();
            remove_socket_on_sigterm(&socket)?;
            vhost_user::serve("rng", Box::new(rng), &socket)?;
        }
    }
    Ok(())
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
