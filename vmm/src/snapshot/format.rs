//! The snapshot's description file: what the machine was and the state of
//! everything in it but its memory. It is untrusted input when read back
//! (anyone who can write the directory wrote it), so it is read whole,
//! checked against its header and checksum, parsed strictly, and every
//! value checked before a VM is made from it.
//!
//! Layout, little-endian:
//!
//! ```text
//! 0   16  magic: "vessel snapshot\n"
//! 16   4  format version (FORMAT_VERSION)
//! 20   4  CRC-32 (IEEE) of the payload
//! 24   8  payload length in bytes
//! 32   -  payload: the Description as JSON
//! ```

use devices::legacy::SerialRegisters;
use devices::virtio::mmio::TransportState;
use serde::{Deserialize, Serialize};

use super::kvm_state::{StateError, VcpuState, VmState};
use crate::config::{DeviceConfig, MAX_VCPUS, MAX_VIRTIO_SLOTS};

/// The first bytes of every description file.
pub const MAGIC: &[u8; 16] = b"vessel snapshot\n";
/// The version this build writes and reads. A change to the description
/// or to what the restore expects of it bumps it.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// A description larger than this is refused unread (a real one is tens
/// of KiB per vCPU).
pub const MAX_DESCRIPTION: u64 = 64 << 20;

/// Everything about the machine but its memory's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Description {
    /// A random ID, also in the memory file's trailer: the two files of
    /// one snapshot carry the same.
    pub id: u64,
    /// Guest RAM in bytes; the memory file holds exactly this much.
    pub mem_size: u64,
    /// One state per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The interrupt controllers, the PIT and the clock.
    pub vm: VmState,
    /// COM1's registers.
    pub serial: SerialRegisters,
    /// Every virtio-mmio slot in slot order: the boot devices, then the
    /// hotplug slots.
    pub slots: Vec<SlotState>,
    /// How many of `slots` are hotplug slots (the last ones).
    pub hotplug_slots: u8,
}

/// One virtio-mmio slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotState {
    /// The device in it (None: an empty hotplug slot).
    pub device: Option<DeviceConfig>,
    /// Its transport's registers.
    pub transport: TransportState,
}

/// Why a description file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its header or than the length it gives.
    #[error("the snapshot description is truncated: {got} bytes, the header says {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes the header calls for.
        want: u64,
    },
    /// Not a description file.
    #[error("not a vessel snapshot (the file does not start with the snapshot magic)")]
    Magic,
    /// Written by another version.
    #[error("the snapshot is format version {0}; this vessel reads version {FORMAT_VERSION} only")]
    Version(u32),
    /// The payload length is absurd.
    #[error("the snapshot description claims {0} bytes, more than the {MAX_DESCRIPTION} allowed")]
    TooLarge(u64),
    /// Bytes past the payload.
    #[error("the snapshot description has {0} bytes after its payload")]
    Trailing(usize),
    /// The payload does not match its checksum.
    #[error("the snapshot description is corrupt: checksum {got:#010x}, the header says {want:#010x}")]
    Checksum {
        /// Computed.
        got: u32,
        /// Recorded.
        want: u32,
    },
    /// The payload does not parse.
    #[error("the snapshot description does not parse")]
    Parse(#[source] serde_json::Error),
    /// A value is out of range or inconsistent.
    #[error("the snapshot description is inconsistent: {0}")]
    Invalid(String),
    /// A KVM structure has the wrong size.
    #[error("the snapshot description is inconsistent")]
    State(#[from] StateError),
}

impl Description {
    /// The file's bytes: header then payload.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses and checks a description file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let header =
            bytes.get(..HEADER_LEN).ok_or(FormatError::Truncated { got: bytes.len(), want: HEADER_LEN as u64 })?;
        if &header[..16] != MAGIC {
            return Err(FormatError::Magic);
        }
        let word = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let version = word(16);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        let want_crc = word(20);
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[24..32]);
        let len = u64::from_le_bytes(len);
        if len > MAX_DESCRIPTION {
            return Err(FormatError::TooLarge(len));
        }
        let payload = &bytes[HEADER_LEN..];
        let want_total = HEADER_LEN as u64 + len;
        if (payload.len() as u64) < len {
            return Err(FormatError::Truncated { got: bytes.len(), want: want_total });
        }
        if payload.len() as u64 > len {
            return Err(FormatError::Trailing(payload.len() - len as usize));
        }
        let got_crc = crc32fast::hash(payload);
        if got_crc != want_crc {
            return Err(FormatError::Checksum { got: got_crc, want: want_crc });
        }
        let description: Description = serde_json::from_slice(payload).map_err(FormatError::Parse)?;
        description.check()?;
        Ok(description)
    }

    /// Checks every value that does not need KVM to check.
    fn check(&self) -> Result<(), FormatError> {
        let invalid = |what: String| Err(FormatError::Invalid(what));
        let vcpus = self.vcpus.len();
        if vcpus == 0 || vcpus > usize::from(MAX_VCPUS) {
            return invalid(format!("{vcpus} vCPUs (1 to {MAX_VCPUS} allowed)"));
        }
        if self.mem_size < boot::layout::MIN_MEM_SIZE || self.mem_size % (1 << 20) != 0 {
            return invalid(format!("guest memory of {} bytes (a whole number of MiB, at least 2)", self.mem_size));
        }
        if self.slots.len() > MAX_VIRTIO_SLOTS {
            return invalid(format!("{} virtio-mmio slots (at most {MAX_VIRTIO_SLOTS})", self.slots.len()));
        }
        let hotplug = usize::from(self.hotplug_slots);
        if hotplug > self.slots.len() {
            return invalid(format!("{hotplug} hotplug slots among {} slots", self.slots.len()));
        }
        let boot_devices = self.slots.len() - hotplug;
        for (index, slot) in self.slots.iter().enumerate() {
            if index < boot_devices && slot.device.is_none() {
                return invalid(format!("boot slot {index} has no device"));
            }
            if slot.device.is_none() && (!slot.transport.queues.is_empty() || slot.transport.status != 0) {
                return invalid(format!("empty slot {index} has device registers"));
            }
            if let Some(DeviceConfig::VhostUser(_)) = slot.device {
                return invalid(format!("slot {index} holds a vhost-user device, which a snapshot cannot restore"));
            }
        }
        for vcpu in &self.vcpus {
            vcpu.check()?;
        }
        self.vm.check()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A description whose every field has the right size, for tests that
    /// spoil one thing at a time.
    pub(crate) fn sample() -> Description {
        use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
        use zerocopy::IntoBytes;
        let sized = |n: usize| vec![0u8; n];
        let vcpu = VcpuState {
            cpuid: vec![sized(40)],
            msrs: vec![sized(16)],
            regs: sized(144),
            sregs: sized(312),
            xsave: sized(4096),
            xcrs: sized(392),
            debug_regs: sized(128),
            lapic: sized(1024),
            mp_state: sized(4),
            events: sized(64),
        };
        let chips = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC]
            .map(|chip_id| kvm_irqchip { chip_id, ..Default::default() }.as_bytes().to_vec())
            .to_vec();
        Description {
            id: 0x1234_5678,
            mem_size: 16 << 20,
            vcpus: vec![vcpu],
            vm: VmState { irqchips: chips, pit: sized(112), clock: sized(48) },
            serial: SerialRegisters {
                baud_divisor: [12, 0],
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            slots: vec![SlotState { device: Some(DeviceConfig::Rng), transport: TransportState::default() }],
            hotplug_slots: 0,
        }
    }

    fn refused(bytes: &[u8]) -> String {
        match Description::decode(bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => crate::snapshot::tests::chain(&e),
        }
    }

    #[test]
    fn a_description_round_trips() {
        let d = sample();
        assert_eq!(Description::decode(&d.encode()).unwrap(), d);
    }

    #[test]
    fn truncated_corrupt_and_foreign_descriptions_are_refused_with_the_reason() {
        let good = sample().encode();
        for cut in [0, 10, 31, 32, good.len() / 2, good.len() - 1] {
            assert!(refused(&good[..cut]).contains("truncated"), "cut at {cut}: {}", refused(&good[..cut]));
        }
        let mut magic = good.clone();
        magic[0] = b'V';
        assert!(refused(&magic).contains("not a vessel snapshot"));
        let mut version = good.clone();
        version[16] = 2;
        assert!(refused(&version).contains("format version 2"), "{}", refused(&version));
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        assert!(refused(&flipped).contains("checksum"), "{}", refused(&flipped));
        let mut longer = good.clone();
        longer.push(b' ');
        assert!(refused(&longer).contains("1 bytes after its payload"), "{}", refused(&longer));
        let mut huge = good.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(refused(&huge).contains("more than"), "{}", refused(&huge));
    }

    /// Re-encodes with a valid header, as an attacker who can write the
    /// file would: the checks after the checksum must hold on their own.
    fn with_payload(payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn well_formed_but_inconsistent_descriptions_are_refused_by_what_is_wrong() {
        let spoil = |f: &dyn Fn(&mut Description)| {
            let mut d = sample();
            f(&mut d);
            refused(&d.encode())
        };
        assert!(spoil(&|d| d.vcpus.clear()).contains("0 vCPUs"));
        assert!(spoil(&|d| d.mem_size = 4096).contains("guest memory of 4096 bytes"));
        assert!(spoil(&|d| d.vcpus[0].regs.pop().map(drop).unwrap_or(())).contains("kvm_regs is 143 bytes"));
        assert!(spoil(&|d| d.vm.clock.push(0)).contains("kvm_clock_data is 49 bytes"));
        assert!(spoil(&|d| d.hotplug_slots = 3).contains("3 hotplug slots among 1"));
        assert!(spoil(&|d| d.slots[0].device = None).contains("boot slot 0 has no device"));
        assert!(refused(&with_payload(b"{\"mem_size\": 1}")).contains("does not parse"));
        assert!(refused(&with_payload(b"\xff\xfe")).contains("does not parse"));
        let mut json: serde_json::Value = serde_json::from_slice(&sample().encode()[32..]).unwrap();
        json["unknown_field"] = serde_json::Value::Bool(true);
        assert!(refused(&with_payload(&serde_json::to_vec(&json).unwrap())).contains("does not parse"));
    }
}
