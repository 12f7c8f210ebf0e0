//! Network namespaces of a test's own (`ip netns add`), deleted on drop:
//! the only place the test's interfaces and addresses exist.

use anyhow::{ensure, Context};

/// A named network namespace.
pub struct NetNs(pub String);

impl NetNs {
    /// `ip netns add vessel-<tag>-<pid>`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let ns = NetNs(format!("vessel-{tag}-{}", std::process::id()));
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns.0]).output();
        ip(&["netns", "add", &ns.0])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> <args>`, returning its output.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `program args...` inside the namespace (`ip netns exec`),
    /// returning its output.
    pub fn run(&self, command: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", self.0.as_str()];
        all.extend_from_slice(command);
        ip(&all)
    }

    /// Runs `f` on a thread that entered the namespace (the rest of the
    /// process stays where it is): what it opens, a TAP say, lives there.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || -> anyhow::Result<T> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only, with a namespace fd we hold.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Two network namespaces joined by a veth pair, as a CNI plugin leaves
/// them: `eth0` with `<net>.2/24` and a default route via `<net>.1` in the
/// first, its peer with `<net>.1/24` in the second.
pub fn veth_pair(tag: &str, net: &str) -> anyhow::Result<(NetNs, NetNs)> {
    let sandbox_ns = NetNs::new(&format!("{tag}-sbx"))?;
    let peer_ns = NetNs::new(&format!("{tag}-peer"))?;
    let n = std::process::id() % 10_000;
    let (veth, peer) = (format!("vs{tag}{n}"), format!("vp{tag}{n}"));
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
    ip(&["link", "set", &veth, "netns", &sandbox_ns.0])?;
    ip(&["link", "set", &peer, "netns", &peer_ns.0])?;
    sandbox_ns.ip(&["link", "set", &veth, "name", "eth0"])?;
    sandbox_ns.ip(&["addr", "add", &format!("{net}.2/24"), "dev", "eth0"])?;
    sandbox_ns.ip(&["link", "set", "eth0", "up"])?;
    sandbox_ns.ip(&["route", "add", "default", "via", &format!("{net}.1")])?;
    peer_ns.ip(&["addr", "add", &format!("{net}.1/24"), "dev", &peer])?;
    peer_ns.ip(&["link", "set", &peer, "up"])?;
    Ok((sandbox_ns, peer_ns))
}

/// Runs `ip <args>`, returning its output; a failure names the command
/// and says what ip said.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why network namespace and TAP tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a network namespace and a TAP device)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}
