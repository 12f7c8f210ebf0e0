//! The QEMU TCG fallback (DESIGN.md, tiers 3 and 4): a Linux guest on
//! QEMU's `microvm` machine with the TCG accelerator, for hosts without
//! usable hardware KVM. Our own device backends plug in over vhost-user,
//! which needs guest RAM in a shared memfd and the modern virtio-mmio
//! transport.

use std::path::PathBuf;

/// The QEMU binary (Debian: `qemu-system-x86`).
pub const QEMU: &str = "qemu-system-x86_64";

/// What every TCG guest gets on its kernel command line. Without the TSC
/// options the distribution kernel can hang calibrating the TSC under TCG.
/// `panic=-1` reboots at once on a panic, which `-no-reboot` turns into
/// QEMU exiting; `reboot=t` makes that reboot a triple fault: the default
/// (the ACPI reset register, then the keyboard controller, then the BIOS)
/// left about 3 panics in 10 hanging on microvm.
pub const BASE_CMDLINE: &str = "console=ttyS0 tsc_early_khz=2000000 tsc=reliable no_timer_check panic=-1 reboot=t";

/// QEMU's `-sandbox` setting for every guest it runs.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A running QEMU, killed (and reaped) when dropped, so that no guest
/// outlives whoever started it.
#[derive(Debug)]
pub struct Qemu(pub std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A guest to boot under QEMU TCG.
#[derive(Clone, Debug)]
pub struct TcgMachine {
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// vCPUs (`-smp`).
    pub vcpus: u8,
    /// Guest RAM in MiB (`-m`).
    pub mem_mib: u64,
    /// Appended to [`BASE_CMDLINE`].
    pub cmdline: String,
    /// Guest RAM in a shared memfd and modern (virtio 1.x) virtio-mmio:
    /// both needed by any vhost-user device.
    pub vhost_user: bool,
    /// More QEMU arguments: devices, chardevs, drives.
    pub extra_args: Vec<String>,
}

impl TcgMachine {
    /// The full QEMU command line, program excluded; the guest's serial
    /// console is QEMU's stdio.
    pub fn args(&self) -> Vec<String> {
        let mut machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on".to_string();
        let mut memory: Vec<String> = Vec::new();
        if self.vhost_user {
            machine.push_str(",memory-backend=mem");
            memory.extend([
                "-object".into(),
                format!("memory-backend-memfd,id=mem,size={}M,share=on", self.mem_mib),
                "-global".into(),
                "virtio-mmio.force-legacy=false".into(),
            ]);
        }
        let cmdline = format!("{BASE_CMDLINE} {}", self.cmdline).trim_end().to_string();
        let (mem, smp) = (format!("{}M", self.mem_mib), self.vcpus.to_string());
        let kernel = self.kernel.display().to_string();
        let initrd = self.initrd.display().to_string();
        let mut all: Vec<String> = vec![];
        for pair in [
            ["-M", &machine],
            ["-accel", "tcg"],
            ["-cpu", "qemu64"],
            ["-m", &mem],
            ["-smp", &smp],
            ["-serial", "stdio"],
            ["-kernel", &kernel],
            ["-initrd", &initrd],
            ["-append", &cmdline],
        ] {
            all.extend(pair.map(String::from));
        }
        all.extend(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"].map(String::from));
        // QEMU runs an untrusted guest: its own seccomp filter, with no
        // obsolete syscalls, no privilege changes, no new processes and
        // no scheduler or affinity changes.
        all.extend(["-sandbox", SANDBOX].map(String::from));
        all.extend(memory);
        all.extend(self.extra_args.iter().cloned());
        all
    }
}

/// `value` as one QEMU option value (`key=value` in a `,`-separated
/// list): QEMU reads a doubled comma as a comma in the value, and a single
/// one as the start of the next option, so a path with a comma would end
/// early and what follows would be read as options.
pub fn opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// A QEMU object ID for the device served on `socket`: each socket serves
/// one device, so two devices of one model get two IDs.
fn socket_id(socket: &std::path::Path) -> String {
    let name = socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' }).collect();
    format!("vu-{name}")
}

/// QEMU arguments attaching the vhost-user device `model`
/// (`vhost-user-blk`, `vhost-user-vsock-device`) served on `socket`.
pub fn vhost_user_device_args(socket: &std::path::Path, model: &str) -> Vec<String> {
    let id = socket_id(socket);
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={}", opt_value(&socket.display().to_string())),
        "-device".into(),
        format!("{model},chardev={id}"),
    ]
}

/// QEMU arguments attaching a vhost-user net device served on `socket`,
/// with `mac` (QEMU's vhost-user-net takes the MAC from its own property,
/// not from the backend).
pub fn vhost_user_net_args(socket: &std::path::Path, mac: &str) -> Vec<String> {
    let id = socket_id(socket);
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={}", opt_value(&socket.display().to_string())),
        "-netdev".into(),
        format!("vhost-user,id={id}-net,chardev={id}"),
        "-device".into(),
        format!("virtio-net-device,netdev={id}-net,mac={mac}"),
    ]
}

/// QEMU arguments attaching a virtio-fs device with `tag`, served by the
/// vhost-user daemon (virtiofsd) listening on `socket`.
pub fn vhost_user_fs_args(socket: &std::path::Path, tag: &str) -> Vec<String> {
    let id = socket_id(socket);
    vec![
        "-chardev".into(),
        format!("socket,id={id},path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-fs-device,chardev={id},tag={tag}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_user_guests_get_shared_memory_and_modern_mmio() {
        let m = TcgMachine {
            kernel: "/k".into(),
            initrd: "/i".into(),
            vcpus: 2,
            mem_mib: 256,
            cmdline: "quiet".into(),
            vhost_user: true,
            extra_args: vec!["-device".into(), "virtio-rng-device".into()],
        };
        let args = m.args().join(" ");
        assert!(args.contains("-M microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem"), "{args}");
        assert!(args.contains("memory-backend-memfd,id=mem,size=256M,share=on"), "{args}");
        assert!(args.contains("virtio-mmio.force-legacy=false"), "{args}");
        assert!(args.contains(&format!("-append {BASE_CMDLINE} quiet")), "{args}");
        assert!(args.ends_with("-device virtio-rng-device"), "{args}");
        let plain = TcgMachine { vhost_user: false, cmdline: String::new(), extra_args: vec![], ..m }.args();
        let joined = plain.join(" ");
        assert!(joined.starts_with("-M microvm,x-option-roms=off,isa-serial=on,rtc=on -accel tcg -cpu qemu64 -m 256M"));
        assert!(joined.contains("-serial stdio -kernel /k -initrd /i"), "{joined}");
        assert!(
            joined.ends_with(&format!("-nodefaults -no-user-config -nographic -no-reboot -sandbox {SANDBOX}")),
            "{joined}"
        );
        assert!(!joined.contains("memfd"), "{joined}");
        let append = plain.iter().position(|a| a == "-append").map(|i| plain[i + 1].as_str());
        assert_eq!(append, Some(BASE_CMDLINE));
    }

    #[test]
    fn two_devices_of_one_model_get_two_ids() {
        let a = vhost_user_device_args(std::path::Path::new("/run/x/disk-a.sock"), "vhost-user-blk");
        let b = vhost_user_device_args(std::path::Path::new("/run/x/disk b.sock"), "vhost-user-blk");
        assert_eq!(a[1], "socket,id=vu-disk-a.sock,path=/run/x/disk-a.sock");
        assert_eq!(a[3], "vhost-user-blk,chardev=vu-disk-a.sock");
        assert_eq!(b[3], "vhost-user-blk,chardev=vu-disk_b.sock");
        let net = vhost_user_net_args(std::path::Path::new("/n.sock"), "52:54:00:00:00:01").join(" ");
        assert!(net.contains("-chardev socket,id=vu-n.sock,path=/n.sock -netdev"), "{net}");
        assert!(net.contains("-netdev vhost-user,id=vu-n.sock-net,chardev=vu-n.sock"), "{net}");
    }

    #[test]
    fn commas_in_socket_paths_are_doubled() {
        // "/run/a,server=on/x.sock" must stay one path, not become a path
        // "/run/a" and an option.
        let path = std::path::Path::new("/run/a,server=on/x.sock");
        let blk = vhost_user_device_args(path, "vhost-user-blk");
        assert_eq!(blk[1], "socket,id=vu-x.sock,path=/run/a,,server=on/x.sock");
        let net = vhost_user_net_args(path, "52:54:00:00:00:01");
        assert_eq!(net[1], "socket,id=vu-x.sock,path=/run/a,,server=on/x.sock");
        assert_eq!(opt_value("a,,b"), "a,,,,b");
    }
}
