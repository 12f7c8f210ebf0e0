//! Generates the protocol's messages and ttrpc service from
//! `protos/agent.proto` with the pure-Rust protobuf parser (no `protoc`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let generated = out.join("generated");
    std::fs::create_dir_all(&generated).expect("create OUT_DIR/generated");
    ttrpc_codegen::Codegen::new()
        .out_dir(&generated)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .run()
        .expect("generate the agent protocol from protos/agent.proto");
    // The generated files open with inner attributes and inner doc comments
    // (`#![allow(...)]`, `//!`), which `include!` cannot take; lib.rs puts
    // the allowances on the modules instead.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = generated.join(name);
        let text = std::fs::read_to_string(&path).expect("read generated code");
        let kept: String =
            text.lines().filter(|l| !l.starts_with("#![") && !l.starts_with("//!")).map(|l| format!("{l}\n")).collect();
        std::fs::write(out.join(name), kept).expect("write generated code");
    }
}
