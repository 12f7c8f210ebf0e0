//! A real `virtiofsd` (the Rust daemon, `cargo install virtiofsd`) for
//! the virtio-fs tests: found where the runtime finds it, started on a
//! socket of the test's own, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::wait_until;

/// The daemon's binary, as the runtime finds it
/// (`runtime_api::shared_fs::find_virtiofsd`: `$VESSEL_VIRTIOFSD`, PATH,
/// ~/.cargo/bin), or why there is none (a skip reason). QEMU's old C
/// daemon ("virtiofsd version 7.x") does not count.
pub fn binary() -> Result<PathBuf, String> {
    let bin = runtime_api::shared_fs::find_virtiofsd().map_err(|e| e.to_string())?;
    if !is_rust_virtiofsd(&bin) {
        return Err(format!("{} is not the Rust virtiofsd: `cargo install virtiofsd --locked`", bin.display()));
    }
    Ok(bin)
}

fn is_rust_virtiofsd(bin: &Path) -> bool {
    let Ok(out) = Command::new(bin).arg("--version").output() else { return false };
    let version = String::from_utf8_lossy(&out.stdout);
    version.strip_prefix("virtiofsd ").is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
}

/// A running daemon serving one directory on one socket.
pub struct Virtiofsd {
    child: Child,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts the daemon on `dir/virtiofsd.sock` sharing `shared`, with
    /// the config-space tag `tag` if given (then it offers
    /// VHOST_USER_PROTOCOL_F_CONFIG), and waits for its socket.
    pub fn start(dir: &Path, shared: &Path, tag: Option<&str>) -> anyhow::Result<Self> {
        let bin = binary().map_err(anyhow::Error::msg)?;
        let socket = dir.join("virtiofsd.sock");
        let log = dir.join("virtiofsd.log");
        let mut cmd = Command::new(&bin);
        cmd.arg("--socket-path").arg(&socket).arg("--shared-dir").arg(shared);
        // The test is about the frontend: no namespaces for the daemon,
        // which a container running the tests may not allow.
        cmd.args(["--sandbox", "none"]);
        if let Some(tag) = tag {
            cmd.args(["--tag", tag]);
        }
        let out = std::fs::File::create(&log).context("creating virtiofsd's log")?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let mut daemon = Virtiofsd { child, socket, log };
        if !wait_until(Duration::from_secs(10), || daemon.socket.exists()) {
            let exited = daemon.child.try_wait().ok().flatten();
            bail!("virtiofsd made no socket within 10 s (exit {exited:?}); log:\n{}", daemon.log_text());
        }
        Ok(daemon)
    }

    /// What the daemon has logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
