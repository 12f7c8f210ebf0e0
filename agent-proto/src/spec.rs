//! OCI runtime specs for the host side: the shape containerd's defaults
//! have (new PID, UTS, IPC and mount namespaces; proc, dev, devpts, shm and
//! sysfs mounts; masked and read-only paths), as JSON for CreateContainer
//! and ExecProcess.

/// What a container looks like, beyond its command.
#[derive(Clone, Debug, Default)]
pub struct SpecOptions {
    /// The hostname (a new UTS namespace is asked for anyway).
    pub hostname: Option<String>,
    /// User ID and group ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
    /// A terminal.
    pub terminal: bool,
    /// `linux.resources` as JSON, if any.
    pub resources: Option<String>,
    /// Environment entries beyond PATH.
    pub env: Vec<String>,
    /// Disks (by virtio serial) to mount in the container.
    pub disks: Vec<DiskMount>,
    /// With a terminal, its size at start: rows, columns.
    pub console_size: Option<(u32, u32)>,
    /// Directories of the sandbox's shared filesystem bind-mounted in the
    /// container (volumes).
    pub shared: Vec<SharedMount>,
}

/// A mount `source` naming a directory of the sandbox's shared filesystem
/// (virtio-fs, tag [`SHARED_TAG`]) by its path relative to the share's
/// root (`vessel-shared:PATH`): the agent bind-mounts it.
pub const SHARED_SOURCE_PREFIX: &str = "vessel-shared:";

/// The virtio-fs tag of the sandbox's shared filesystem.
pub const SHARED_TAG: &str = "vessel-shared";

/// A directory of the shared filesystem bind-mounted in a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedMount {
    /// Its path relative to the share's root.
    pub path: String,
    /// Where it is mounted in the container.
    pub destination: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl SharedMount {
    /// The OCI mount object.
    fn json(&self) -> String {
        let options =
            if self.read_only { r#"["rbind","ro","nosuid","nodev"]"# } else { r#"["rbind","rw","nosuid","nodev"]"# };
        format!(
            r#"{{"destination":{},"type":"bind","source":{},"options":{options}}}"#,
            json_string(&self.destination),
            json_string(&format!("{SHARED_SOURCE_PREFIX}{}", self.path)),
        )
    }
}

/// A mount `source` naming a virtio disk by its serial
/// (`vessel-disk:SERIAL`): the agent mounts the guest's block device that
/// has that serial, waiting for it to appear if it was just hot-plugged.
pub const DISK_SOURCE_PREFIX: &str = "vessel-disk:";

/// A disk mounted in a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskMount {
    /// The disk's virtio serial.
    pub serial: String,
    /// Where it is mounted in the container.
    pub destination: String,
    /// Its filesystem (`ext4`).
    pub fstype: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl DiskMount {
    /// The OCI mount object.
    fn json(&self) -> String {
        let options = if self.read_only { r#"["ro","nosuid","nodev"]"# } else { r#"["rw","nosuid","nodev"]"# };
        format!(
            r#"{{"destination":{},"type":{},"source":{},"options":{options}}}"#,
            json_string(&self.destination),
            json_string(&self.fstype),
            json_string(&format!("{DISK_SOURCE_PREFIX}{}", self.serial)),
        )
    }
}

/// A JSON string literal (RFC 8259 escaping).
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_strings(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| json_string(s)).collect();
    format!("[{}]", quoted.join(","))
}

/// containerd's default capabilities: bounding, effective and permitted
/// (the inheritable and ambient sets are empty).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The OCI `process` object, with containerd's default capabilities.
pub fn process_json(args: &[&str], o: &SpecOptions) -> String {
    let mut env = vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin"];
    env.extend(o.env.iter().map(String::as_str));
    let caps = json_strings(&DEFAULT_CAPABILITIES);
    let console = o
        .console_size
        .map(|(rows, columns)| format!(r#""consoleSize":{{"height":{rows},"width":{columns}}},"#))
        .unwrap_or_default();
    format!(
        r#"{{"terminal":{},{console}"user":{{"uid":{},"gid":{}}},"args":{},"env":{},"cwd":"/","noNewPrivileges":true,
            "capabilities":{{"bounding":{caps},"effective":{caps},"permitted":{caps}}},
            "rlimits":[{{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}}]}}"#,
        o.terminal,
        o.uid,
        o.gid,
        json_strings(args),
        json_strings(&env)
    )
}

/// A runtime spec in the shape containerd's defaults have on cgroup v2:
/// new PID, UTS, IPC, mount and cgroup namespaces, proc/dev/devpts/shm/
/// sysfs/cgroup mounts, masked and read-only paths.
pub fn spec_json(args: &[&str], o: &SpecOptions) -> Vec<u8> {
    let hostname = json_string(o.hostname.as_deref().unwrap_or("vessel"));
    let resources = o.resources.as_ref().map(|r| format!(r#","resources":{r}"#)).unwrap_or_default();
    let disks: String = o.disks.iter().map(|d| format!(",{}", d.json())).collect();
    let disks = disks + &o.shared.iter().map(|m| format!(",{}", m.json())).collect::<String>();
    format!(
        r#"{{"ociVersion":"1.0.2","process":{},"root":{{"path":"rootfs"}},"hostname":{hostname},
        "mounts":[
          {{"destination":"/proc","type":"proc","source":"proc","options":["nosuid","noexec","nodev"]}},
          {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}},
          {{"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620"]}},
          {{"destination":"/dev/shm","type":"tmpfs","source":"shm","options":["nosuid","noexec","nodev","mode=1777","size=65536k"]}},
          {{"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]}},
          {{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["nosuid","noexec","nodev","relatime","ro"]}}{disks}
        ],
        "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"ipc"}},{{"type":"uts"}},{{"type":"mount"}},{{"type":"cgroup"}}],
          "maskedPaths":["/proc/kcore","/proc/keys","/sys/firmware"],
          "readonlyPaths":["/proc/sys","/proc/sysrq-trigger"]{resources}}}}}"#,
        process_json(args, o)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_for_json() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), r#""a\"b\\c\u000a\u0001""#);
        let spec = String::from_utf8(spec_json(&["echo", "say \"hi\""], &SpecOptions::default())).unwrap();
        assert!(spec.contains(r#""args":["echo","say \"hi\""]"#), "{spec}");
    }

    #[test]
    fn disk_mounts_name_the_disk_by_serial() {
        let disk =
            DiskMount { serial: "data-1".into(), destination: "/data".into(), fstype: "ext4".into(), read_only: true };
        let spec =
            String::from_utf8(spec_json(&["true"], &SpecOptions { disks: vec![disk], ..Default::default() })).unwrap();
        let want =
            r#"{"destination":"/data","type":"ext4","source":"vessel-disk:data-1","options":["ro","nosuid","nodev"]}"#;
        assert!(spec.contains(want), "{spec}");
    }
}
