//! The network RPCs: guest interfaces (addresses, MTU, link state, name)
//! and routes, over [`crate::netlink`].

use std::net::IpAddr;

use agent_proto::agent::{IPAddress, Interface, Route as ProtoRoute};

use crate::container::Error;
use crate::netlink::{self, is_kernel_route, Address, Link, Netlink, Route};

fn parse_ip(text: &str, what: &str) -> Result<IpAddr, Error> {
    text.parse().map_err(|_| Error::Invalid(format!("{what} {text:?} is not an IP address")))
}

fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Every interface with its addresses.
pub fn list_interfaces() -> Result<Vec<Interface>, Error> {
    let mut nl = Netlink::open().map_err(Error::failed)?;
    let links = nl.links().map_err(Error::failed)?;
    let addresses = nl.addresses().map_err(Error::failed)?;
    Ok(links.iter().map(|l| to_interface(l, &addresses)).collect())
}

fn to_interface(link: &Link, addresses: &[Address]) -> Interface {
    Interface {
        name: link.name.clone(),
        hw_addr: link.mac.clone(),
        addresses: addresses
            .iter()
            .filter(|a| a.index == link.index)
            .map(|a| IPAddress { address: a.ip.to_string(), prefix_len: u32::from(a.prefix), ..Default::default() })
            .collect(),
        mtu: link.mtu,
        up: link.up,
        ..Default::default()
    }
}

/// Makes an interface look like `want`: found by MAC when `hw_addr` is
/// set (and renamed to `name` if that differs), else by name; its
/// addresses become exactly the listed ones; MTU when non-zero; up/down.
pub fn update_interface(want: &Interface) -> Result<Interface, Error> {
    let mut wanted = Vec::new();
    for a in &want.addresses {
        let ip = parse_ip(&a.address, "address")?;
        let prefix = u8::try_from(a.prefix_len)
            .ok()
            .filter(|p| *p <= max_prefix(&ip))
            .ok_or_else(|| Error::Invalid(format!("prefix length {} does not fit address {ip}", a.prefix_len)))?;
        wanted.push((ip, prefix));
    }
    let mut nl = Netlink::open().map_err(Error::failed)?;
    let links = nl.links().map_err(Error::failed)?;
    let link = if want.hw_addr.is_empty() {
        links.iter().find(|l| l.name == want.name)
    } else {
        links.iter().find(|l| l.mac.eq_ignore_ascii_case(&want.hw_addr))
    };
    let link = link.ok_or_else(|| {
        let known: Vec<String> = links.iter().map(|l| format!("{} ({})", l.name, l.mac)).collect();
        Error::NotFound(format!(
            "no interface named {:?} or with MAC {:?} (there are: {})",
            want.name,
            want.hw_addr,
            known.join(", ")
        ))
    })?;
    let index = link.index;
    let rename = (!want.name.is_empty() && want.name != link.name).then_some(want.name.as_str());
    if rename.is_some() {
        // The kernel renames only a link that is down; one that was up is
        // brought back up if the rename fails (the name is taken, say).
        if let Err(e) = nl.set_link(index, false, None, rename) {
            if link.up {
                let _ = nl.set_link(index, true, None, None);
            }
            return Err(Error::failed(e));
        }
    }
    let mtu = (want.mtu != 0).then_some(want.mtu);
    nl.set_link(index, want.up, mtu, None).map_err(Error::failed)?;
    let current: Vec<Address> =
        nl.addresses().map_err(Error::failed)?.into_iter().filter(|a| a.index == index).collect();
    for old in current.iter().filter(|a| !wanted.contains(&(a.ip, a.prefix))) {
        // IPv6 link-local addresses belong to the kernel.
        if matches!(old.ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        nl.delete_address(old).map_err(Error::failed)?;
    }
    for &(ip, prefix) in &wanted {
        if !current.iter().any(|a| a.ip == ip && a.prefix == prefix) {
            nl.add_address(&Address { index, ip, prefix }).map_err(Error::failed)?;
        }
    }
    let links = nl.links().map_err(Error::failed)?;
    let addresses = nl.addresses().map_err(Error::failed)?;
    let link =
        links.iter().find(|l| l.index == index).ok_or_else(|| Error::Failed(format!("link {index} vanished")))?;
    Ok(to_interface(link, &addresses))
}

/// The main table's routes.
pub fn list_routes() -> Result<Vec<ProtoRoute>, Error> {
    let mut nl = Netlink::open().map_err(Error::failed)?;
    let links = nl.links().map_err(Error::failed)?;
    let routes = nl.routes().map_err(Error::failed)?;
    Ok(routes.iter().map(|r| to_proto(r, &links)).collect())
}

fn to_proto(r: &Route, links: &[Link]) -> ProtoRoute {
    ProtoRoute {
        dest: r.dest.map_or("default".into(), |(ip, len)| format!("{ip}/{len}")),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: links.iter().find(|l| l.index == r.oif).map(|l| l.name.clone()).unwrap_or_default(),
        source: r.source.map(|s| s.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

fn from_proto(r: &ProtoRoute, links: &[Link]) -> Result<Route, Error> {
    let oif = links
        .iter()
        .find(|l| l.name == r.device)
        .map(|l| l.index)
        .ok_or_else(|| Error::NotFound(format!("route to {:?}: no interface named {:?}", r.dest, r.device)))?;
    let dest = match r.dest.as_str() {
        "default" | "" => None,
        text => {
            let (ip, len) = match text.split_once('/') {
                Some((ip, len)) => {
                    let ip = parse_ip(ip, "route destination")?;
                    let len =
                        len.parse::<u8>().ok().filter(|l| *l <= max_prefix(&ip)).ok_or_else(|| {
                            Error::Invalid(format!("route destination {text:?} has a bad prefix length"))
                        })?;
                    (ip, len)
                }
                None => {
                    let ip = parse_ip(text, "route destination")?;
                    (ip, max_prefix(&ip))
                }
            };
            Some((ip, len))
        }
    };
    let gateway = (!r.gateway.is_empty()).then(|| parse_ip(&r.gateway, "gateway")).transpose()?;
    let source = (!r.source.is_empty()).then(|| parse_ip(&r.source, "source")).transpose()?;
    // The request carries no family: it is the addresses', which must
    // agree (IPv4 when the route names none, as "default dev eth0" does).
    let families: Vec<u8> = [dest.map(|(ip, _)| ip), gateway, source].iter().flatten().map(netlink::family).collect();
    if families.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Invalid(format!("route to {:?} mixes IPv4 and IPv6 addresses", r.dest)));
    }
    let family = families.first().copied().unwrap_or(libc::AF_INET as u8);
    Ok(Route { family, dest, gateway, oif, source, protocol: 0 })
}

/// Replaces the routes on every device the request names with the listed
/// ones (routes the kernel made for addresses stay), link routes first so
/// that gateways are reachable when their routes are added.
pub fn update_routes(want: &[ProtoRoute]) -> Result<Vec<ProtoRoute>, Error> {
    let mut nl = Netlink::open().map_err(Error::failed)?;
    let links = nl.links().map_err(Error::failed)?;
    let mut wanted = want.iter().map(|r| from_proto(r, &links)).collect::<Result<Vec<_>, _>>()?;
    wanted.sort_by_key(|r| r.gateway.is_some());
    let devices: Vec<u32> = wanted.iter().map(|r| r.oif).collect();
    let mut kept = Vec::new();
    for old in nl.routes().map_err(Error::failed)? {
        if devices.contains(&old.oif) && !is_kernel_route(&old) {
            nl.delete_route(&old).map_err(Error::failed)?;
        } else {
            kept.push(old);
        }
    }
    for route in wanted {
        let same = |r: &Route| {
            r.family == route.family && r.dest == route.dest && r.gateway == route.gateway && r.oif == route.oif
        };
        // A kernel subnet route, or the same route listed twice.
        if !kept.iter().any(same) {
            nl.add_route(&route).map_err(Error::failed)?;
            kept.push(route);
        }
    }
    let routes = nl.routes().map_err(Error::failed)?;
    Ok(routes.iter().map(|r| to_proto(r, &links)).collect())
}
