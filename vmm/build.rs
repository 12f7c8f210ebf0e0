//! Compiles the per-thread seccomp filters (src/seccomp/rules.rs) into BPF
//! at build time, so the running VMM only loads and installs them.

use std::path::PathBuf;

include!("src/seccomp/rules.rs");

fn main() {
    println!("cargo:rerun-if-changed=src/seccomp/rules.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (name, f) in thread_filters() {
        let program: seccompiler::BpfProgram = f.try_into().expect("filter compiles to BPF");
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        std::fs::write(out.join(format!("{name}.bpf")), bytes).expect("write BPF");
    }
}
