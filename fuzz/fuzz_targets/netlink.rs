//! The agent's rtnetlink parsing (agent/src/netlink.rs) on an arbitrary
//! receive buffer: messages split, then each parsed as the agent would
//! parse a reply of its type.
#![no_main]

use agent::netlink::{attributes, is_kernel_route, messages, parse_address, parse_link, parse_route};
use libfuzzer_sys::fuzz_target;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

fuzz_target!(|data: &[u8]| {
    let Ok(messages) = messages(data) else { return };
    for (kind, payload) in messages {
        match kind {
            RTM_NEWLINK => {
                if let Ok(link) = parse_link(payload) {
                    std::hint::black_box(format!("{link:?}"));
                }
            }
            RTM_NEWADDR => {
                if let Ok(Some(address)) = parse_address(payload) {
                    std::hint::black_box(format!("{address:?}"));
                }
            }
            RTM_NEWROUTE => {
                if let Ok(Some(route)) = parse_route(payload) {
                    std::hint::black_box(is_kernel_route(&route));
                }
            }
            _ => {
                let _ = attributes(payload, 4);
            }
        }
    }
});
