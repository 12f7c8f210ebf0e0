//! Builds the test guests from `src/asm` into `OUT_DIR`.
//!
//! For each program (`hello`, `report`, `spin`, `virtio`, `count`):
//! 1. `cc -x assembler-with-cpp` assembles `src/asm/<program>.S` (and, once,
//!    `pvh-note.S`);
//! 2. `ld` links it with `src/asm/guest.ld` at 1 MiB, twice:
//!    `<program>-pvh.elf` with the PVH note and e_entry = the 32-bit entry,
//!    `<program>-linux64.elf` without the note and e_entry = the 64-bit
//!    entry;
//! 3. `objcopy -O binary` turns the linux64 ELF into the flat
//!    "protected-mode kernel", and this script puts a Linux real-mode header
//!    (setup sectors) in front of it: `<program>.bzimage`.
//!
//! The tools can be overridden with `VESSEL_GUESTS_CC`, `VESSEL_GUESTS_LD`
//! and `VESSEL_GUESTS_OBJCOPY` (e.g. `x86_64-linux-gnu-gcc` on other hosts).

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "src/elf.rs"]
mod elf;

/// The guest programs: `src/asm/<name>.S`.
const PROGRAMS: [&str; 5] = ["hello", "report", "spin", "virtio", "count"];
/// Where every guest is linked and where a bzImage's kernel is loaded.
const LOAD_ADDR: u64 = 0x10_0000;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let asm_dir = manifest_dir.join("src").join("asm");

    println!("cargo:rerun-if-changed=src/asm");
    println!("cargo:rerun-if-changed=src/elf.rs");
    let tools = Tools::from_env();

    let note = tools.assemble(&asm_dir, "pvh-note", &out_dir);
    for program in PROGRAMS {
        let object = tools.assemble(&asm_dir, program, &out_dir);
        let script = asm_dir.join("guest.ld");

        let pvh = out_dir.join(format!("{program}-pvh.elf"));
        tools.link(&script, "entry32", &[&object, &note], &pvh);

        let linux64 = out_dir.join(format!("{program}-linux64.elf"));
        tools.link(&script, "entry64", &[&object], &linux64);

        let flat = out_dir.join(format!("{program}.bin"));
        run(Command::new(&tools.objcopy).args(["-O", "binary"]).arg(&linux64).arg(&flat));

        let elf_image = read(&linux64);
        let end = elf::load_end(&elf_image)
            .unwrap_or_else(|| panic!("cannot read the program headers of {}", linux64.display()));
        let init_size = u32::try_from((end - LOAD_ADDR).next_multiple_of(4096)).expect("guest footprint fits in u32");
        let kernel = read(&flat);
        let version = format!("vessel-guests {program} {}", env::var("CARGO_PKG_VERSION").unwrap_or_default());
        let image = bzimage(&kernel, init_size, &version);
        let path = out_dir.join(format!("{program}.bzimage"));
        fs::write(&path, image).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// The external tools, `cc`, `ld` and `objcopy` unless overridden.
struct Tools {
    cc: String,
    ld: String,
    objcopy: String,
}

impl Tools {
    fn from_env() -> Self {
        let tool = |var: &str, default: &str| {
            println!("cargo:rerun-if-env-changed={var}");
            env::var(var).unwrap_or_else(|_| default.to_owned())
        };
        Tools {
            cc: tool("VESSEL_GUESTS_CC", "cc"),
            ld: tool("VESSEL_GUESTS_LD", "ld"),
            objcopy: tool("VESSEL_GUESTS_OBJCOPY", "objcopy"),
        }
    }

    /// `src/asm/<name>.S` -> `OUT_DIR/<name>.o`, through the C preprocessor.
    fn assemble(&self, asm_dir: &Path, name: &str, out_dir: &Path) -> PathBuf {
        let object = out_dir.join(format!("{name}.o"));
        run(Command::new(&self.cc)
            .args(["-c", "-m64", "-nostdinc", "-x", "assembler-with-cpp"])
            .arg("-I")
            .arg(asm_dir)
            .arg("-o")
            .arg(&object)
            .arg(asm_dir.join(format!("{name}.S"))));
        object
    }

    /// Links `objects` with the linker script into one RWX segment (`-N`),
    /// with `entry` as e_entry.
    fn link(&self, script: &Path, entry: &str, objects: &[&Path], output: &Path) {
        run(Command::new(&self.ld)
            .args(["-m", "elf_x86_64", "-N", "-static", "-nostdlib", "--build-id=none", "-e", entry])
            .arg("-T")
            .arg(script)
            .arg("-o")
            .arg(output)
            .args(objects));
    }
}

/// Runs a command; panics with the command line and its output if it cannot
/// be started or fails.
fn run(command: &mut Command) {
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    let output = match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "building the test guests needs `{}`, which was not found ({e}).\n\
             Install a C compiler with GNU as and binutils (Debian: `apt-get install gcc binutils`), \
             or point VESSEL_GUESTS_CC / VESSEL_GUESTS_LD / VESSEL_GUESTS_OBJCOPY at x86-64 tools.\n\
             Command: {line}",
            command.get_program().to_string_lossy()
        ),
        Err(e) => panic!("cannot run `{line}`: {e}"),
    };
    if !output.status.success() {
        panic!(
            "`{line}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Wraps a flat 64-bit kernel in a Linux real-mode header: the "bzImage"
/// layout of Documentation/arch/x86/boot.rst, boot protocol 2.12.
///
/// The file is `(SETUP_SECTS + 1) * 512` bytes of setup (boot sector + setup
/// sectors; the header lives at 0x1f1..0x268) followed by the kernel, which
/// the loader copies to `code32_start` = 1 MiB. The kernel is not
/// compressed and not relocatable; its 64-bit entry is at +0x200, like
/// Linux's `startup_64`. The setup code itself is only a halt loop: a
/// loader that runs the real-mode setup (as QEMU does) stops there.
fn bzimage(kernel: &[u8], init_size: u32, version: &str) -> Vec<u8> {
    const SETUP_SECTS: u8 = 1;
    const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const PROTOCOL_VERSION: u16 = 0x020c; // 2.12: xloadflags
    const LOADED_HIGH: u8 = 0x01; // loadflags: kernel at 0x100000
    const XLF_KERNEL_64: u16 = 0x0001; // xloadflags: 64-bit entry at +0x200
    const CMDLINE_SIZE: u32 = 4095; // what the report guest reads at most
    const REAL_MODE_STUB: usize = 0x270; // after the 2.12 header
    const VERSION_STRING: usize = 0x280;

    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup_len];
    let mut put = |offset: usize, value: &[u8]| image[offset..offset + value.len()].copy_from_slice(value);

    let syssize = u32::try_from(kernel.len().div_ceil(16)).expect("kernel size fits in u32");
    put(0x1f1, &[SETUP_SECTS]); // setup_sects
    put(0x1f4, &syssize.to_le_bytes()); // syssize, in 16-byte paragraphs
    put(0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: "normal"
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    let jump = u8::try_from(REAL_MODE_STUB - 0x202).expect("short jump");
    put(0x200, &[0xeb, jump]); // jump: `jmp short` to the real-mode stub
    put(0x202, &HDRS_MAGIC.to_le_bytes()); // header
    put(0x206, &PROTOCOL_VERSION.to_le_bytes()); // version
    put(0x20c, &0x1000u16.to_le_bytes()); // start_sys_seg (obsolete; as Linux)
    let version_ptr = u16::try_from(VERSION_STRING - 0x200).expect("in the setup");
    put(0x20e, &version_ptr.to_le_bytes()); // kernel_version, minus 0x200
    put(0x211, &[LOADED_HIGH]); // loadflags
    put(0x212, &0x8000u16.to_le_bytes()); // setup_move_size (as Linux)
    put(0x214, &u32::try_from(LOAD_ADDR).expect("below 4 GiB").to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x10_0000u32.to_le_bytes()); // kernel_alignment: 1 MiB
    put(0x234, &[0]); // relocatable_kernel: no, load at pref_address
    put(0x235, &[20]); // min_alignment: 2^20
    put(0x236, &XLF_KERNEL_64.to_le_bytes()); // xloadflags
    put(0x238, &CMDLINE_SIZE.to_le_bytes()); // cmdline_size
    put(0x258, &LOAD_ADDR.to_le_bytes()); // pref_address
    put(0x260, &init_size.to_le_bytes()); // init_size: code + data + .bss
                                          // Real-mode stub: cli; hlt; jmp short -3 (back to the hlt).
    put(REAL_MODE_STUB, &[0xfa, 0xf4, 0xeb, 0xfd]);
    let mut text = version.as_bytes().to_vec();
    text.push(0);
    assert!(VERSION_STRING + text.len() <= setup_len, "version string too long");
    put(VERSION_STRING, &text);

    image.extend_from_slice(kernel);
    image
}
