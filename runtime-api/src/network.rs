//! A sandbox's network, Kata's tcfilter model: the sandbox is created in a
//! network namespace holding a veth (as a CNI plugin leaves it). vessel adds
//! a TAP in that namespace, redirects every frame between the veth and the
//! TAP with tc mirred in both directions, gives the guest's NIC the veth's
//! MAC, and hands the veth's addresses and routes to the guest through the
//! agent. The host side never routes: the guest owns the veth's identity.
//!
//! The namespace's configuration is read and changed with iproute2 (`ip`,
//! `tc`) under `nsenter --net`, which is what CNI plugins leave behind for
//! inspection anyway.

use std::path::{Path, PathBuf};
use std::process::Command;

use agent_proto::agent::{IPAddress, Interface, Route};
use serde::Deserialize;

use crate::config::NetworkConfig;

/// The TAP vessel adds next to the veth of a sandbox's `index`th network
/// interface (`vessel-tap0` for the one it is created with).
pub fn tap_name(index: usize) -> String {
    format!("vessel-tap{index}")
}

/// Why the network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command could not be run at all.
    #[error("cannot run {command} (it needs iproute2 and util-linux)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// `ip -j` printed something that is not what it documents.
    #[error("cannot read the output of {command}")]
    Parse {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The interface is not in the namespace, or is not usable.
    #[error("interface {interface:?} in {netns}: {why}")]
    Interface {
        /// The interface.
        interface: String,
        /// The namespace.
        netns: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A thread could not enter the namespace.
    #[error("cannot enter the network namespace {0}")]
    Enter(PathBuf, #[source] std::io::Error),
}

/// What the guest is to be given: its NIC's MAC, and the interface and
/// routes to send the agent once it is up.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The namespace.
    pub netns: PathBuf,
    /// The veth.
    pub interface: String,
    /// The TAP beside it.
    pub tap: String,
    /// The veth's MAC, for the guest's NIC.
    pub mac: [u8; 6],
    /// UpdateInterface's request.
    pub guest_interface: Interface,
    /// UpdateRoutes' request.
    pub guest_routes: Vec<Route>,
}

fn run(netns: &Path, program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let net = format!("--net={}", netns.display());
    let command = format!("nsenter {net} {program} {}", args.join(" "));
    let out = Command::new("nsenter")
        .arg(&net)
        .arg(program)
        .args(args)
        .output()
        .map_err(|source| NetworkError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetworkError::Failed { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json<T: for<'de> Deserialize<'de>>(netns: &Path, args: &[&str]) -> Result<T, NetworkError> {
    let text = run(netns, "ip", args)?;
    serde_json::from_str(&text)
        .map_err(|source| NetworkError::Parse { command: format!("ip {}", args.join(" ")), source })
}

#[derive(Deserialize)]
struct Link {
    address: Option<String>,
    mtu: Option<u32>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    local: String,
    prefixlen: u32,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct RouteInfo {
    dst: String,
    gateway: Option<String>,
    protocol: Option<String>,
    prefsrc: Option<String>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text.split(':').map(|p| u8::from_str_radix(p, 16).ok()).collect::<Option<_>>()?;
    parts.try_into().ok()
}

/// Reads the veth's identity, then adds the TAP `tap` and the redirects.
/// Undone by [`teardown`].
pub fn setup(config: &NetworkConfig, tap: &str) -> Result<Plan, NetworkError> {
    let (netns, interface) = (config.netns.as_path(), config.interface.as_str());
    let bad = |why: String| NetworkError::Interface { interface: interface.into(), netns: netns.into(), why };
    let links: Vec<Link> = json(netns, &["-j", "addr", "show", "dev", interface])?;
    let link = links.into_iter().next().ok_or_else(|| bad("not found".into()))?;
    let mac_text = link.address.ok_or_else(|| bad("it has no MAC address".into()))?;
    let mac = parse_mac(&mac_text).ok_or_else(|| bad(format!("its MAC {mac_text:?} is not an Ethernet address")))?;
    // Link-local addresses belong to the link, not to the configuration:
    // the guest's kernel makes its own.
    let addresses = link
        .addr_info
        .iter()
        .filter(|a| a.scope.as_deref() != Some("link"))
        .map(|a| IPAddress { address: a.local.clone(), prefix_len: a.prefixlen, ..Default::default() })
        .collect();
    let mut guest_routes = Vec::new();
    for family in ["-4", "-6"] {
        let routes: Vec<RouteInfo> = json(netns, &["-j", family, "route", "show", "dev", interface])?;
        // The kernel's routes for the interface's own subnets come back by
        // themselves when the addresses are set.
        for r in routes.into_iter().filter(|r| r.protocol.as_deref() != Some("kernel")) {
            guest_routes.push(Route {
                dest: r.dst,
                gateway: r.gateway.unwrap_or_default(),
                device: interface.into(),
                source: r.prefsrc.unwrap_or_default(),
                ..Default::default()
            });
        }
    }
    let mtu = link.mtu.unwrap_or(1500).to_string();
    let guest_interface = Interface {
        name: interface.into(),
        hw_addr: mac_text,
        addresses,
        mtu: link.mtu.unwrap_or(1500),
        up: true,
        ..Default::default()
    };

    run(netns, "ip", &["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
    let redirected = (|| {
        run(netns, "ip", &["link", "set", tap, "mtu", &mtu, "up"])?;
        for (from, to) in [(interface, tap), (tap, interface)] {
            run(netns, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
            let filter =
                ["filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0", "0"];
            let action = ["action", "mirred", "egress", "redirect", "dev", to];
            run(netns, "tc", &[&filter[..], &action[..]].concat())?;
        }
        Ok(())
    })();
    let plan =
        Plan { netns: netns.into(), interface: interface.into(), tap: tap.into(), mac, guest_interface, guest_routes };
    if let Err(e) = redirected {
        teardown(config, tap);
        return Err(e);
    }
    Ok(plan)
}

/// Removes the TAP (and with it its redirect) and the veth's ingress
/// redirect. Best effort: what is already gone is not an error, and what
/// cannot be removed is logged.
pub fn teardown(config: &NetworkConfig, tap: &str) {
    let interface = config.interface.as_str();
    for (program, args) in [("ip", vec!["link", "del", tap]), ("tc", vec!["qdisc", "del", "dev", interface, "ingress"])]
    {
        if let Err(e) = run(&config.netns, program, &args) {
            tracing::debug!(error = %e, "network teardown");
        }
    }
}

/// Runs `f` on a thread that entered the network namespace `netns` (the
/// rest of the process stays where it is): a TAP it opens, or threads it
/// starts, live there.
pub fn within<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetworkError> {
    let ns = std::fs::File::open(netns).map_err(|e| NetworkError::Enter(netns.into(), e))?;
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we hold
        // open; it touches no memory of ours.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(NetworkError::Enter(path, std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| Err(NetworkError::Enter(netns.into(), std::io::Error::other("the thread panicked"))))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print_and_bad_ones_are_refused() {
        let mac = parse_mac("02:AB:cd:00:11:ff").unwrap();
        assert_eq!(mac, [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]);
        assert_eq!(format_mac(&mac), "02:ab:cd:00:11:ff");
        for bad in ["", "02:ab", "02:ab:cd:00:11:ff:00", "zz:ab:cd:00:11:ff", "02:ab:cd:00:11:1ff"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn ip_json_output_is_read_as_iproute2_prints_it() {
        let links: Vec<Link> = serde_json::from_str(
            r#"[{"ifindex":2,"ifname":"eth0","flags":["UP"],"mtu":1400,"address":"02:00:00:00:00:01",
                "addr_info":[{"family":"inet","local":"10.0.0.2","prefixlen":24,"scope":"global"},
                             {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#,
        )
        .unwrap();
        assert_eq!(links[0].mtu, Some(1400));
        assert_eq!(links[0].addr_info.len(), 2);
        let routes: Vec<RouteInfo> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.0.0.1","flags":[]},
                {"dst":"10.0.0.0/24","protocol":"kernel","scope":"link","prefsrc":"10.0.0.2","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(routes[0].gateway.as_deref(), Some("10.0.0.1"));
        assert_eq!(routes[1].protocol.as_deref(), Some("kernel"));
    }
}
