//! virtio-net's TAP backend against the host kernel's network stack: the
//! "guest" (queues driven here, as Linux's driver would) sends an ARP
//! request through the device and receives the kernel's reply. Runs in a
//! network namespace of its own; skipped, with the reason, without root,
//! /dev/net/tun or `ip`.

use std::time::Duration;

use anyhow::{ensure, Context};
use devices::virtio::net::{Net, NetConfig, NET_HDR_LEN};
use devices::virtio::{VirtioBackend, Wakeup};
use libtest_mimic::Arguments;
use vessel_tests::harness::{gate, trial};
use vessel_tests::netns::{unavailable, NetNs};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x73, 0x6c];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const WRITE: u16 = 2;

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f
}

/// Whether `frame` (vnet header included) is the kernel's ARP reply to us.
fn is_arp_reply(frame: &[u8]) -> bool {
    let e = &frame[NET_HDR_LEN.min(frame.len())..];
    e.len() >= 42
        && e[0..6] == GUEST_MAC
        && e[12..14] == [0x08, 0x06]
        && e[20..22] == [0, 2]
        && e[28..32] == HOST_IP
        && e[32..38] == GUEST_MAC
}

fn arp_round_trip() -> anyhow::Result<()> {
    let ns = NetNs::new("net")?;
    let mut net = ns.within(|| Ok(Net::new(&NetConfig { tap: "vtap0".into(), mac: GUEST_MAC })?.0))?;
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "vtap0"])?;
    ns.ip(&["link", "set", "vtap0", "up"])?;

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let mut queues: Vec<Queue> = vec![rxq.create_queue()?, txq.create_queue()?];
    // Eight receive buffers of 2 KiB.
    let rx_descs: Vec<RawDescriptor> =
        (0..8).map(|i| RawDescriptor::from(SplitDescriptor::new(0x10_0000 + i * 0x1000, 2048, WRITE, 0))).collect();
    for (i, d) in rx_descs.iter().enumerate() {
        rxq.add_desc_chains(std::slice::from_ref(d), i as u16).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let frame = arp_request();
    mem.write_slice(&frame, GuestAddress(0x20_0000))?;
    let tx = RawDescriptor::from(SplitDescriptor::new(0x20_0000, frame.len() as u32, 0, 0));
    txq.add_desc_chains(&[tx], 0).map_err(|e| anyhow::anyhow!("{e:?}"))?;

    let mut process = |net: &mut Net, wakeup| {
        let mut qs: Vec<&mut Queue> = queues.iter_mut().collect();
        net.process(wakeup, &mut qs, &mem)
    };
    let used = process(&mut net, Wakeup::Queue(1));
    ensure!(used & 2 != 0, "the transmit buffer was not used");
    ensure!(txq.used().idx().load() == 1, "the ARP request was not taken");

    // Wait for the reply as the event loop would: the backend fd wakes us.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut seen = 0u16;
    loop {
        let mut poll =
            libc::pollfd { fd: net.backend_fd().context("no backend fd")?, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd for at most 500 ms.
        unsafe { libc::poll(&mut poll, 1, 500) };
        process(&mut net, Wakeup::Backend);
        let idx = rxq.used().idx().load();
        while seen != idx {
            let elem = rxq.used().ring().ref_at(usize::from(seen)).map_err(|e| anyhow::anyhow!("{e:?}"))?.load();
            seen += 1;
            let mut got = vec![0u8; elem.len() as usize];
            let addr = GuestAddress(0x10_0000 + u64::from(elem.id()) * 0x1000);
            mem.read_slice(&mut got, addr)?;
            if is_arp_reply(&got) {
                let num_buffers = u16::from_le_bytes([got[10], got[11]]);
                ensure!(num_buffers == 1, "num_buffers {num_buffers}");
                return Ok(());
            }
        }
        ensure!(std::time::Instant::now() < deadline, "no ARP reply from the host kernel ({seen} other frames)");
    }
}

fn main() {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, gate(unavailable(), [trial("tap_arp_round_trip", arp_round_trip)])).exit();
}
