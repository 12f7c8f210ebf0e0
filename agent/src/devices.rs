//! Which device nodes a container may open or create: the spec's
//! `linux.resources.devices` list as a cgroup v2 device program
//! (BPF_PROG_TYPE_CGROUP_DEVICE), loaded with bpf(2) and attached to the
//! container's cgroup.
//!
//! The list is read as runc reads it: everything is denied to begin with,
//! and the last rule that matches an access decides. The devices every
//! container needs come after the spec's rules, so they always stay
//! allowed: null, zero, full, random, urandom, tty, ptmx and the pts
//! terminals. Nothing else is (no block device, no `mknod` of one).
//!
//! An allow rule matches an access that is wholly within its `access`; a
//! deny rule matches one that touches it at all, so that denying "w" is
//! never undone by an earlier "rwm" for an access asking for "rw".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
use serde::{Deserialize, Serialize};

/// One rule, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    /// Allow or deny.
    pub allow: bool,
    /// `BPF_DEVCG_DEV_BLOCK` or `BPF_DEVCG_DEV_CHAR`; None for both.
    pub kind: Option<u32>,
    /// None: any major.
    pub major: Option<u32>,
    /// None: any minor.
    pub minor: Option<u32>,
    /// `BPF_DEVCG_ACC_*` bits.
    pub access: u32,
}

/// A rule the agent cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// A device type the cgroup cannot tell.
    #[error("device rule type {0:?} is not a (all), b or c")]
    Type(String),
    /// An access letter other than r, w, m.
    #[error("device rule access {0:?} is not made of r, w and m")]
    Access(String),
    /// A major or minor out of range.
    #[error("device rule {what} {value} is neither -1 (any) nor a device number")]
    Number {
        /// "major" or "minor".
        what: &'static str,
        /// The value.
        value: i64,
    },
    /// bpf(2) refused to load the program.
    #[error("loading the device program (verifier log: {log})")]
    Load {
        /// The verifier's log.
        log: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cgroup could not be opened or the program not attached.
    #[error("attaching the device program to {0}")]
    Attach(String, #[source] std::io::Error),
}

const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// The devices every container may use, after the spec's rules.
const DEFAULT_ALLOWED: [(u32, u32, Option<u32>); 8] = [
    (DEV_CHAR, 1, Some(3)), // null
    (DEV_CHAR, 1, Some(5)), // zero
    (DEV_CHAR, 1, Some(7)), // full
    (DEV_CHAR, 1, Some(8)), // random
    (DEV_CHAR, 1, Some(9)), // urandom
    (DEV_CHAR, 5, Some(0)), // tty
    (DEV_CHAR, 5, Some(2)), // ptmx
    (DEV_CHAR, 136, None),  // pts/*
];

/// The spec's rules, checked.
pub fn check(rules: &[LinuxDeviceCgroup]) -> Result<Vec<DeviceRule>, DevicesError> {
    let number = |what, v: Option<i64>| match v {
        None | Some(-1) => Ok(None),
        Some(v) => u32::try_from(v).map(Some).map_err(|_| DevicesError::Number { what, value: v }),
    };
    rules
        .iter()
        .map(|r| {
            let kind = match r.typ() {
                None | Some(LinuxDeviceType::A) => None,
                Some(LinuxDeviceType::B) => Some(DEV_BLOCK),
                Some(LinuxDeviceType::C) => Some(DEV_CHAR),
                Some(other) => return Err(DevicesError::Type(other.as_str().to_string())),
            };
            let text = r.access().clone().unwrap_or_default();
            let access = match text.as_str() {
                "" => ACC_ALL,
                _ => text.chars().try_fold(0, |acc, c| match c {
                    'r' => Ok(acc | ACC_READ),
                    'w' => Ok(acc | ACC_WRITE),
                    'm' => Ok(acc | ACC_MKNOD),
                    _ => Err(DevicesError::Access(text.clone())),
                })?,
            };
            Ok(DeviceRule {
                allow: r.allow(),
                kind,
                major: number("major", r.major())?,
                minor: number("minor", r.minor())?,
                access,
            })
        })
        .collect()
}

/// The spec's rules followed by the defaults.
fn with_defaults(rules: &[DeviceRule]) -> Vec<DeviceRule> {
    let defaults = DEFAULT_ALLOWED.iter().map(|&(kind, major, minor)| DeviceRule {
        allow: true,
        kind: Some(kind),
        major: Some(major),
        minor,
        access: ACC_ALL,
    });
    rules.iter().copied().chain(defaults).collect()
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const ALU32_MOV_K: u8 = 0xb4;
const ALU32_MOV_X: u8 = 0xbc;
const JNE_K: u8 = 0x55;
const JNE_X: u8 = 0x5d;
const JEQ_K: u8 = 0x15;
const EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | src << 4, off, imm }
}

/// The program: r2 type, r3 access, r4 major, r5 minor from the context
/// (`struct bpf_cgroup_dev_ctx`), then the rules from last to first,
/// each returning its verdict when it matches, then deny.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for rule in with_defaults(rules).iter().rev() {
        // Tests that jump to the rule's end when it does not match (the
        // offsets are filled in once its length is known).
        let mut body = Vec::new();
        if let Some(kind) = rule.kind {
            body.push(insn(JNE_K, 2, 0, 0, kind as i32));
        }
        if rule.access != ACC_ALL || !rule.allow {
            body.push(insn(ALU32_MOV_X, 1, 3, 0, 0));
            body.push(insn(ALU32_AND_K, 1, 0, 0, rule.access as i32));
            match rule.allow {
                // Every bit asked for is allowed.
                true => body.push(insn(JNE_X, 1, 3, 0, 0)),
                // Any bit asked for is denied.
                false => body.push(insn(JEQ_K, 1, 0, 0, 0)),
            }
        }
        if let Some(major) = rule.major {
            body.push(insn(JNE_K, 4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            body.push(insn(JNE_K, 5, 0, 0, minor as i32));
        }
        body.push(insn(ALU32_MOV_K, 0, 0, 0, i32::from(rule.allow)));
        body.push(insn(EXIT, 0, 0, 0, 0));
        let len = body.len();
        for (i, ins) in body.iter_mut().enumerate() {
            if matches!(ins.code, JNE_K | JNE_X | JEQ_K) {
                ins.off = (len - i - 1) as i16;
            }
        }
        p.extend(body);
    }
    p.push(insn(ALU32_MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The fields of `union bpf_attr` BPF_PROG_LOAD uses, padded to the size
/// this kernel ABI has grown to (the rest must be zero).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u64; 12],
}

#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    rest: [u32; 11],
}

/// Loads the program for `rules` and attaches it to `cgroup`, so that
/// no other program can be attached below it.
pub fn apply(cgroup: &Path, rules: &[DeviceRule]) -> Result<(), DevicesError> {
    let insns = program(rules);
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"vessel_devices\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
        rest: [0; 12],
    };
    // SAFETY: attr points at instructions, a license and a log buffer
    // that live across the call; its size is given.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, size_of::<ProgLoad>()) };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
        return Err(DevicesError::Load { log, source });
    }
    // SAFETY: bpf returned a new descriptor that nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attach_err = |e| DevicesError::Attach(cgroup.display().to_string(), e);
    let dir = std::fs::File::open(cgroup).map_err(attach_err)?;
    let attr = ProgAttach {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        // No flags: the program cannot be overridden below.
        attach_flags: 0,
        replace_bpf_fd: 0,
        rest: [0; 11],
    };
    // SAFETY: attr is a valid BPF_PROG_ATTACH argument of the size given;
    // both descriptors are open.
    let r =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &attr as *const ProgAttach, size_of::<ProgAttach>()) };
    if r != 0 {
        return Err(attach_err(std::io::Error::last_os_error()));
    }
    // The cgroup holds the program now.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one access the way the kernel would (only the
    /// opcodes it uses).
    fn run(p: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> bool {
        let ctx = [access << 16 | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            let jump = |taken: bool, pc: &mut usize| {
                if taken {
                    *pc += i.off as usize;
                }
            };
            match i.code {
                LDX_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                ALU32_AND_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                ALU32_RSH_K => r[dst] = (r[dst] as u32 >> i.imm) as u64,
                ALU32_MOV_K => r[dst] = i.imm as u32 as u64,
                ALU32_MOV_X => r[dst] = r[src] as u32 as u64,
                JNE_K => jump(r[dst] != i.imm as u64, &mut pc),
                JNE_X => jump(r[dst] != r[src], &mut pc),
                JEQ_K => jump(r[dst] == i.imm as u64, &mut pc),
                EXIT => return r[0] == 1,
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    fn rules(json: &str) -> Vec<DeviceRule> {
        check(&serde_json::from_str::<Vec<LinuxDeviceCgroup>>(json).unwrap()).unwrap()
    }

    #[test]
    fn containerds_list_allows_the_defaults_and_nothing_else() {
        let p = program(&rules(r#"[{"allow":false,"access":"rwm"}]"#));
        assert!(run(&p, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3));
        assert!(run(&p, DEV_CHAR, ACC_MKNOD, 1, 9));
        assert!(run(&p, DEV_CHAR, ACC_READ, 136, 7));
        assert!(!run(&p, DEV_BLOCK, ACC_MKNOD, 253, 0));
        assert!(!run(&p, DEV_BLOCK, ACC_READ, 254, 0));
        assert!(!run(&p, DEV_CHAR, ACC_READ, 10, 200));
        // No list at all: the same.
        assert!(!run(&program(&[]), DEV_BLOCK, ACC_MKNOD, 253, 0));
        assert!(run(&program(&[]), DEV_CHAR, ACC_WRITE, 1, 3));
    }

    #[test]
    fn the_last_matching_rule_wins() {
        let list = rules(
            r#"[{"allow":false,"access":"rwm"},{"allow":true,"type":"b","major":254,"access":"rw"},
                {"allow":false,"type":"b","major":254,"minor":1,"access":"w"},{"allow":true,"type":"c","access":"m"}]"#,
        );
        let p = program(&list);
        assert!(run(&p, DEV_BLOCK, ACC_READ | ACC_WRITE, 254, 0));
        assert!(!run(&p, DEV_BLOCK, ACC_MKNOD, 254, 0));
        assert!(run(&p, DEV_BLOCK, ACC_READ, 254, 1));
        // Denying "w" also denies "rw".
        assert!(!run(&p, DEV_BLOCK, ACC_READ | ACC_WRITE, 254, 1));
        assert!(run(&p, DEV_CHAR, ACC_MKNOD, 10, 200));
        assert!(!run(&p, DEV_CHAR, ACC_READ, 10, 200));
        // A later deny of everything leaves only the defaults.
        let p = program(&rules(r#"[{"allow":true,"access":"rwm"},{"allow":false}]"#));
        assert!(!run(&p, DEV_BLOCK, ACC_READ, 8, 0));
        assert!(run(&p, DEV_CHAR, ACC_READ, 1, 5));
    }

    #[test]
    fn rules_the_cgroup_cannot_tell_are_refused() {
        let bad = |json: &str| {
            let list: Vec<LinuxDeviceCgroup> = serde_json::from_str(json).unwrap();
            check(&list).unwrap_err().to_string()
        };
        assert!(bad(r#"[{"allow":true,"type":"p"}]"#).contains("type"));
        assert!(bad(r#"[{"allow":true,"access":"rx"}]"#).contains("\"rx\""));
        assert!(bad(r#"[{"allow":true,"major":-2}]"#).contains("major -2"));
    }
}
