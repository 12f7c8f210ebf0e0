//! A small synchronous rtnetlink client: links, addresses and routes of
//! the guest, which is all the agent's network RPCs need.
//!
//! Written against the netlink wire format rather than the `rtnetlink`
//! crate: that crate is async and would bring a tokio runtime into PID 1
//! for a handful of request/acknowledge exchanges. Every reply is parsed
//! with bounds checks; a malformed one is an error, never a panic.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;

const RT_TABLE_MAIN: u8 = 254;
const RTPROT_KERNEL: u8 = 2;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
/// In a delete request: a route of any scope.
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_UNICAST: u8 = 1;

const HEADER: usize = 16;

/// A netlink exchange that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened, or sending or receiving failed.
    #[error("netlink {0} failed")]
    Io(&'static str, #[source] std::io::Error),
    /// The kernel's reply did not parse.
    #[error("a malformed netlink reply: {0}")]
    Malformed(String),
    /// The kernel refused a request.
    #[error("{what}")]
    Refused {
        /// The request ("adding 10.0.0.2/24").
        what: String,
        /// The errno the kernel answered with.
        #[source]
        source: Box<NetlinkError>,
    },
    /// The errno in a kernel's error reply.
    #[error(transparent)]
    Errno(std::io::Error),
}

fn malformed(what: impl Into<String>) -> NetlinkError {
    NetlinkError::Malformed(what.into())
}

fn refused(what: String) -> impl FnOnce(NetlinkError) -> NetlinkError {
    move |source| NetlinkError::Refused { what, source: Box::new(source) }
}

fn last_os_error(op: &'static str) -> NetlinkError {
    NetlinkError::Io(op, std::io::Error::last_os_error())
}

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff` (empty if it has none).
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
}

/// An address on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The interface's index.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

/// A route in the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Destination and prefix length; None for the default route.
    pub dest: Option<(IpAddr, u8)>,
    /// The gateway, for a route through one.
    pub gateway: Option<IpAddr>,
    /// The output interface's index.
    pub oif: u32,
    /// The preferred source address.
    pub source: Option<IpAddr>,
    /// Who made it (`RTPROT_*`: 2 is the kernel, for an address's subnet).
    pub protocol: u8,
}

/// A netlink route socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends an attribute.
fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align(buf.len()), 0);
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The address family (`AF_INET` or `AF_INET6`) of `ip`.
pub fn family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn parse_ip(family: u8, data: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), data.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}

/// The attributes after a fixed-size header, as (type, data) pairs.
pub fn attributes(payload: &[u8], fixed: usize) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut rest = payload.get(fixed..).ok_or_else(|| malformed("a message shorter than its header"))?;
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return Err(malformed(format!("an attribute of length {len} with {} bytes left", rest.len())));
        }
        out.push((kind, &rest[4..len]));
        rest = rest.get(align(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Splits a receive buffer into messages: (type, payload).
pub fn messages(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut rest = buf;
    let mut out = Vec::new();
    while rest.len() >= HEADER {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < HEADER || len > rest.len() {
            return Err(malformed(format!("a message of length {len} with {} bytes left", rest.len())));
        }
        out.push((kind, &rest[HEADER..len]));
        rest = rest.get(align(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

fn mac_string(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses a link message.
pub fn parse_link(payload: &[u8]) -> Result<Link, NetlinkError> {
    let fixed = payload.get(..16).ok_or_else(|| malformed("a link message shorter than ifinfomsg"))?;
    let index = i32::from_ne_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]) as u32;
    let flags = u32::from_ne_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    let mut link =
        Link { index, name: String::new(), mac: String::new(), mtu: 0, up: flags & libc::IFF_UP as u32 != 0 };
    for (kind, data) in attributes(payload, 16)? {
        match kind {
            IFLA_IFNAME => link.name = String::from_utf8_lossy(data).trim_end_matches('\0').to_string(),
            IFLA_ADDRESS => link.mac = mac_string(data),
            IFLA_MTU if data.len() == 4 => link.mtu = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
            _ => {}
        }
    }
    Ok(link)
}

/// Parses an address message.
pub fn parse_address(payload: &[u8]) -> Result<Option<Address>, NetlinkError> {
    let fixed = payload.get(..8).ok_or_else(|| malformed("an address message shorter than ifaddrmsg"))?;
    let (fam, prefix) = (fixed[0], fixed[1]);
    let index = u32::from_ne_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let attrs = attributes(payload, 8)?;
    // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on a
    // point-to-point link, and the address elsewhere.
    let find = |k| attrs.iter().find(|(kind, _)| *kind == k).and_then(|(_, d)| parse_ip(fam, d));
    Ok(find(IFA_LOCAL).or_else(|| find(IFA_ADDRESS)).map(|ip| Address { index, ip, prefix }))
}

/// Parses a route message; None for a route outside the main table or not
/// unicast.
pub fn parse_route(payload: &[u8]) -> Result<Option<Route>, NetlinkError> {
    let fixed = payload.get(..12).ok_or_else(|| malformed("a route message shorter than rtmsg"))?;
    let (fam, dst_len, table, protocol, kind) = (fixed[0], fixed[1], fixed[4], fixed[5], fixed[7]);
    let mut route = Route { family: fam, dest: None, gateway: None, oif: 0, source: None, protocol };
    let mut table = u32::from(table);
    for (k, data) in attributes(payload, 12)? {
        match k {
            RTA_DST => route.dest = parse_ip(fam, data).map(|ip| (ip, dst_len)),
            RTA_GATEWAY => route.gateway = parse_ip(fam, data),
            RTA_PREFSRC => route.source = parse_ip(fam, data),
            RTA_OIF if data.len() == 4 => route.oif = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
            RTA_TABLE if data.len() == 4 => table = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
            _ => {}
        }
    }
    Ok((table == u32::from(RT_TABLE_MAIN) && kind == RTN_UNICAST).then_some(route))
}

impl Netlink {
    /// Opens a route socket.
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: socket() takes integers.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(last_os_error("socket"));
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is valid (pid 0: the
        // kernel picks one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: a valid sockaddr_nl of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as _,
            )
        };
        if r != 0 {
            return Err(last_os_error("bind"));
        }
        Ok(Netlink { fd, seq: 0 })
    }

    /// Sends one request and collects the replies' payloads until the
    /// acknowledgement or the end of a dump.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(HEADER + body.len());
        msg.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: msg is a valid buffer of its length.
        if unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(last_os_error("send"));
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is a valid writable buffer of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(last_os_error("recv"));
            }
            for (kind, payload) in messages(&buf[..n as usize])? {
                // Both end the reply with an error code: 0, or a negative
                // errno (a dump can fail part-way, and says so in DONE).
                let code = match kind {
                    NLMSG_ERROR => payload.get(..4).ok_or_else(|| malformed("a truncated error reply"))?,
                    NLMSG_DONE => payload.get(..4).unwrap_or(&[0; 4]),
                    other => {
                        replies.push((other, payload.to_vec()));
                        continue;
                    }
                };
                return match i32::from_ne_bytes([code[0], code[1], code[2], code[3]]).wrapping_neg() {
                    0 => Ok(replies),
                    e => Err(NetlinkError::Errno(std::io::Error::from_raw_os_error(e))),
                };
            }
        }
    }

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let body = [0u8; 16];
        let replies = self.request(RTM_GETLINK, NLM_F_DUMP, &body).map_err(refused("listing links".into()))?;
        replies.iter().filter(|(k, _)| *k == RTM_NEWLINK).map(|(_, p)| parse_link(p)).collect()
    }

    /// Every address.
    pub fn addresses(&mut self) -> Result<Vec<Address>, NetlinkError> {
        let body = [0u8; 8];
        let replies = self.request(RTM_GETADDR, NLM_F_DUMP, &body).map_err(refused("listing addresses".into()))?;
        let mut out = Vec::new();
        for (_, p) in replies.iter().filter(|(k, _)| *k == RTM_NEWADDR) {
            out.extend(parse_address(p)?);
        }
        Ok(out)
    }

    /// Every unicast route of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let body = [0u8; 12];
        let replies = self.request(RTM_GETROUTE, NLM_F_DUMP, &body).map_err(refused("listing routes".into()))?;
        let mut out = Vec::new();
        for (_, p) in replies.iter().filter(|(k, _)| *k == RTM_NEWROUTE) {
            out.extend(parse_route(p)?);
        }
        Ok(out)
    }

    /// Sets a link's state, MTU (when Some) and name (when Some).
    pub fn set_link(&mut self, index: u32, up: bool, mtu: Option<u32>, name: Option<&str>) -> Result<(), NetlinkError> {
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        body.extend_from_slice(&(index as i32).to_ne_bytes());
        let flags = if up { libc::IFF_UP as u32 } else { 0 };
        body.extend_from_slice(&flags.to_ne_bytes());
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        if let Some(mtu) = mtu {
            attr(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
        }
        if let Some(name) = name {
            let mut bytes = name.as_bytes().to_vec();
            bytes.push(0);
            attr(&mut body, IFLA_IFNAME, &bytes);
        }
        self.request(RTM_NEWLINK, 0, &body).map(|_| ()).map_err(refused(format!("setting link {index}")))
    }

    fn address_message(address: &Address) -> Vec<u8> {
        let mut body = vec![family(&address.ip), address.prefix, 0, RT_SCOPE_UNIVERSE];
        body.extend_from_slice(&address.index.to_ne_bytes());
        let ip = ip_bytes(&address.ip);
        attr(&mut body, IFA_LOCAL, &ip);
        attr(&mut body, IFA_ADDRESS, &ip);
        body
    }

    /// Adds an address.
    pub fn add_address(&mut self, address: &Address) -> Result<(), NetlinkError> {
        let body = Self::address_message(address);
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body)
            .map(|_| ())
            .map_err(refused(format!("adding {}/{}", address.ip, address.prefix)))
    }

    /// Removes an address.
    pub fn delete_address(&mut self, address: &Address) -> Result<(), NetlinkError> {
        let body = Self::address_message(address);
        self.request(RTM_DELADDR, 0, &body)
            .map(|_| ())
            .map_err(refused(format!("removing {}/{}", address.ip, address.prefix)))
    }

    fn route_message(route: &Route, scope: u8) -> Vec<u8> {
        let dst_len = route.dest.map_or(0, |(_, len)| len);
        let protocol = if route.protocol == 0 { RTPROT_STATIC } else { route.protocol };
        let mut body = vec![route.family, dst_len, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST];
        body.extend_from_slice(&0u32.to_ne_bytes());
        if let Some((ip, _)) = &route.dest {
            attr(&mut body, RTA_DST, &ip_bytes(ip));
        }
        if let Some(gw) = &route.gateway {
            attr(&mut body, RTA_GATEWAY, &ip_bytes(gw));
        }
        if let Some(src) = &route.source {
            attr(&mut body, RTA_PREFSRC, &ip_bytes(src));
        }
        attr(&mut body, RTA_OIF, &route.oif.to_ne_bytes());
        body
    }

    /// Adds a route.
    pub fn add_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        let scope = if route.gateway.is_some() { RT_SCOPE_UNIVERSE } else { RT_SCOPE_LINK };
        let body = Self::route_message(route, scope);
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &body)
            .map(|_| ())
            .map_err(refused(format!("adding route {route:?}")))
    }

    /// Removes a route.
    pub fn delete_route(&mut self, route: &Route) -> Result<(), NetlinkError> {
        // Whatever scope the route was made with.
        let body = Self::route_message(route, RT_SCOPE_NOWHERE);
        self.request(RTM_DELROUTE, 0, &body).map(|_| ()).map_err(refused(format!("removing route {route:?}")))
    }
}

/// Whether a route was made by the kernel for an address's subnet.
pub fn is_kernel_route(route: &Route) -> bool {
    route.protocol == RTPROT_KERNEL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_and_bad_lengths_are_errors() {
        let mut buf = vec![0u8; 16];
        attr(&mut buf, IFLA_IFNAME, b"eth0\0");
        attr(&mut buf, IFLA_MTU, &1500u32.to_ne_bytes());
        let attrs = attributes(&buf, 16).unwrap();
        assert_eq!(attrs, vec![(IFLA_IFNAME, &b"eth0\0"[..]), (IFLA_MTU, &1500u32.to_ne_bytes()[..])]);
        let link = parse_link(&buf).unwrap();
        assert_eq!((link.name.as_str(), link.mtu), ("eth0", 1500));
        let mut bad = vec![0u8; 16];
        bad.extend_from_slice(&[200, 0, 3, 0, b'x']);
        assert!(attributes(&bad, 16).unwrap_err().to_string().contains("length 200"));
        assert!(parse_link(&[0u8; 3]).is_err());
        assert!(messages(&[255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err()
            .to_string()
            .contains("length 255"));
    }

    #[test]
    fn route_messages_parse_back() {
        let route = Route {
            family: libc::AF_INET as u8,
            dest: Some(("10.0.0.0".parse().unwrap(), 24)),
            gateway: Some("10.0.1.1".parse().unwrap()),
            oif: 7,
            source: None,
            protocol: RTPROT_STATIC,
        };
        let body = Netlink::route_message(&route, RT_SCOPE_UNIVERSE);
        assert_eq!(parse_route(&body).unwrap(), Some(route));
        // An IPv6 route with neither destination nor gateway keeps its family.
        let link_default = Route {
            family: libc::AF_INET6 as u8,
            dest: None,
            gateway: None,
            oif: 2,
            source: None,
            protocol: RTPROT_STATIC,
        };
        let body = Netlink::route_message(&link_default, RT_SCOPE_NOWHERE);
        assert_eq!(parse_route(&body).unwrap(), Some(link_default));
        let address = Address { index: 3, ip: "fd00::5".parse().unwrap(), prefix: 64 };
        assert_eq!(parse_address(&Netlink::address_message(&address)).unwrap(), Some(address));
    }
}
