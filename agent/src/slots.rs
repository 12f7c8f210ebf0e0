//! virtio-mmio slots (DESIGN.md, Hotplug): the windows the kernel was told
//! about, found by address in /proc/iomem, and binding them to the
//! virtio-mmio driver so that Linux probes a device the host attached
//! after boot (or unbinding before the host takes it away).

use std::path::{Path, PathBuf};

use agent_proto::agent::VirtioSlot;

use crate::container::Error;

const DEVICES: &str = "/sys/bus/platform/devices";
const DRIVER: &str = "/sys/bus/platform/drivers/virtio-mmio";

/// The virtio-mmio windows in an /proc/iomem text: (address, name).
/// ACPI-described windows are named `LNRO0005:NN`, command-line ones
/// `virtio-mmio.N`.
pub fn parse_iomem(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|line| {
            let (range, name) = line.trim().split_once(" : ")?;
            let name = name.trim();
            if !(name.starts_with("LNRO0005:") || name.starts_with("virtio-mmio.")) {
                return None;
            }
            let start = u64::from_str_radix(range.split_once('-')?.0, 16).ok()?;
            Some((start, name.to_string()))
        })
        .collect()
}

fn slot(address: u64, name: &str) -> VirtioSlot {
    let dir = Path::new(DEVICES).join(name);
    let bound = dir.join("driver").exists();
    let device_id = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .and_then(|e| std::fs::read_to_string(e.path().join("device")).ok())
        .and_then(|id| u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    VirtioSlot { address, name: name.to_string(), bound, device_id, ..Default::default() }
}

/// Every virtio-mmio window.
pub fn list() -> Result<Vec<VirtioSlot>, Error> {
    let iomem =
        std::fs::read_to_string("/proc/iomem").map_err(|e| Error::Failed(format!("reading /proc/iomem: {e}")))?;
    Ok(parse_iomem(&iomem).iter().map(|(address, name)| slot(*address, name)).collect())
}

fn write(file: PathBuf, name: &str) -> Result<(), Error> {
    std::fs::write(&file, name).map_err(|e| write_error(&file, name, &e))
}

fn write_error(file: &Path, name: &str, e: &std::io::Error) -> Error {
    Error::Failed(format!("writing {name} to {}: {e}", file.display()))
}

/// Binds (after an unbind, if it was bound: a rescan) or unbinds the
/// window at `address`.
pub fn update(address: u64, bind: bool) -> Result<VirtioSlot, Error> {
    let iomem =
        std::fs::read_to_string("/proc/iomem").map_err(|e| Error::Failed(format!("reading /proc/iomem: {e}")))?;
    let slots = parse_iomem(&iomem);
    let (_, name) = slots.iter().find(|(a, _)| *a == address).ok_or_else(|| {
        let known: Vec<String> = slots.iter().map(|(a, n)| format!("{a:#x} ({n})")).collect();
        Error::NotFound(format!("no virtio-mmio window at {address:#x} (there are: {})", known.join(", ")))
    })?;
    if slot(address, name).bound {
        write(Path::new(DRIVER).join("unbind"), name)?;
    }
    if bind {
        // The driver's probe refuses an empty slot (device ID 0) with
        // ENODEV, which the write returns: that is "nothing there", not a
        // failure. Any other error is one.
        let file = Path::new(DRIVER).join("bind");
        if let Err(e) = std::fs::write(&file, name) {
            if e.raw_os_error() != Some(libc::ENODEV) {
                return Err(write_error(&file, name, &e));
            }
        }
    }
    Ok(slot(address, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_found_in_iomem() {
        let text = "00000000-00000fff : Reserved\n\
                    d0000000-d0000fff : LNRO0005:00\n\
                    \x20 d0000000-d0000fff : virtio-mmio\n\
                    feb00000-feb001ff : virtio-mmio.3\n\
                    fee00000-fee00fff : Local APIC\n";
        assert_eq!(
            parse_iomem(text),
            vec![(0xd000_0000, "LNRO0005:00".to_string()), (0xfeb0_0000, "virtio-mmio.3".to_string())]
        );
    }
}
