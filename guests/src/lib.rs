//! Tiny x86-64 test guests for vessel's VMM, built from assembly at build
//! time (see `build.rs` and `src/asm/`).
//!
//! Five programs, each in three formats (PVH ELF, Linux 64-bit ELF,
//! bzImage-shaped), all linked at 1 MiB:
//!
//! * [`Program::Hello`] writes `vessel test guest: hello\n` to COM1 (port
//!   0x3f8), byte 123 to the boot-timer port 0x440, then resets: `out 0x64,
//!   0xfe` (i8042 reset line) and `out 0xf4, 0` (QEMU's `isa-debug-exit`),
//!   then halts with interrupts off.
//! * [`Program::Report`] prints one line per item of what the VMM gave it:
//!   `boot:`, `cmdline:`, `e820:` entries, `initrd:`, `initrd-sum:`,
//!   `rsdp:`, `madt:` entries, `cpu <id> up` from each started AP, `smp:`,
//!   `pio:`, `mmio:`, `done`; then the same boot-timer byte and reset. See
//!   `src/asm/report.S` for the exact format and the low-memory addresses
//!   it uses (0x10000..0x11fff).
//! * [`Program::Spin`] writes `vessel test guest: spin\n`, the boot-timer
//!   byte, then an increasing byte to port 0x80 forever (never ends).
//! * [`Program::Virtio`] drives one virtio-rng device over virtio-mmio
//!   (modern, register layout version 2): the window and IOAPIC pin from
//!   `virtio_mmio.device=<size>@<base>:<gsi>` on the command line (default
//!   `4K@0xd0000000:5`; an empty slot, device ID 0, is read again for
//!   about 2 s, so a test can hot-plug a device), feature negotiation (VERSION_1 only), queue 0 with
//!   one 64-byte device-writable buffer, a notify, and the used-buffer
//!   interrupt (edge, active high, vector 0x30). It prints `virtio: magic`,
//!   `virtio: features`, `virtio: queue max`, `virtio: status`,
//!   `virtio: irq` (or `virtio: no interrupt` after about 2 s),
//!   `virtio: used`, `virtio: data`, then resets the device (Status = 0)
//!   and prints `virtio: reset status`, `done`, then the boot-timer byte and
//!   resets the machine. The driver is generic enough to drive a vsock
//!   device's receive queue too, and a virtio-fs device (ID 26): its tag
//!   and request-queue count from the config space (`virtio: fs tag`),
//!   queues 0 and 1, one FUSE_INIT request on queue 1 (`virtio: fs init`
//!   prints the reply's major and minor). See `src/asm/virtio.S` for the exact format and the memory it
//!   uses (only its own image, above 1 MiB).
//!
//!   With the word `virtio.repeat` on the command line (and an interrupt
//!   for the first request), it keeps the device instead of resetting it:
//!   forever, the same buffer offered again (avail.idx + 1), a notify, the
//!   interrupt, `virtio: again idx <used.idx> data <buffer bytes 0..7>`,
//!   then about 1 ms of busy waiting (a line every ~2 ms on our nested
//!   KVM). A wait that times out prints `virtio: no interrupt` and
//!   finishes. For snapshot and restore tests: each line shows a used index
//!   one higher and, from virtio-rng, fresh bytes. Not for virtio-fs.
//! * [`Program::Count`] writes `vessel test guest: count\n`, the boot-timer
//!   byte, then forever `count 0x<16 hex digits>\n` from 1 up, one more each
//!   line, with a counted busy wait between lines (a line every ~1 ms on our
//!   nested KVM). The counter is a qword in the guest's `.data`, incremented
//!   and printed from memory, so a snapshot restore that loses memory or
//!   registers shows as a break in the sequence. Never ends.
//!
//! Entries: the 32-bit entry (PVH, and the bzImage's `code32_start`) is at
//! 0x100000; the 64-bit entry of the Linux boot protocol is at 0x100200.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[cfg(test)]
mod elf;

/// A test guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// Prints one line, signals the boot timer and resets, as fast as possible.
    Hello,
    /// Reports boot protocol, command line, memory map, initrd, ACPI, SMP and
    /// unhandled PIO/MMIO behaviour on the serial port.
    Report,
    /// Prints one line, signals the boot timer, then writes to port 0x80 in
    /// a loop forever: for pause, resume and stop tests.
    Spin,
    /// Drives a virtio-rng (or vsock, or virtio-fs) device through the
    /// virtio-mmio transport: init sequence, one request, its interrupt, a
    /// device reset; reports each step. With `virtio.repeat` on the command
    /// line, repeats the request forever instead of the reset.
    Virtio,
    /// Prints one line, signals the boot timer, then forever a line with a
    /// counter kept in guest memory, one more each line: for snapshot and
    /// restore tests.
    Count,
}

impl Program {
    /// Every program.
    pub const ALL: [Program; 5] = [Program::Hello, Program::Report, Program::Spin, Program::Virtio, Program::Count];
}

/// The file format (and so the boot protocol) of a guest image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ELF64 with a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note: PVH boot, entered
    /// in 32-bit protected mode with EBX = `hvm_start_info`.
    Pvh,
    /// ELF64 without the note, e_entry = the 64-bit entry: Linux 64-bit boot
    /// protocol, RSI = `boot_params`.
    Linux64Elf,
    /// Linux real-mode header + flat kernel loaded at 1 MiB; 64-bit entry at
    /// load address + 0x200 (Linux 64-bit boot protocol).
    BzImage,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 3] = [Format::Pvh, Format::Linux64Elf, Format::BzImage];
}

macro_rules! guest {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $file))
    };
}

/// The bytes of a guest image.
pub fn image(program: Program, format: Format) -> &'static [u8] {
    match (program, format) {
        (Program::Hello, Format::Pvh) => guest!("hello-pvh.elf"),
        (Program::Hello, Format::Linux64Elf) => guest!("hello-linux64.elf"),
        (Program::Hello, Format::BzImage) => guest!("hello.bzimage"),
        (Program::Report, Format::Pvh) => guest!("report-pvh.elf"),
        (Program::Report, Format::Linux64Elf) => guest!("report-linux64.elf"),
        (Program::Report, Format::BzImage) => guest!("report.bzimage"),
        (Program::Spin, Format::Pvh) => guest!("spin-pvh.elf"),
        (Program::Spin, Format::Linux64Elf) => guest!("spin-linux64.elf"),
        (Program::Spin, Format::BzImage) => guest!("spin.bzimage"),
        (Program::Virtio, Format::Pvh) => guest!("virtio-pvh.elf"),
        (Program::Virtio, Format::Linux64Elf) => guest!("virtio-linux64.elf"),
        (Program::Virtio, Format::BzImage) => guest!("virtio.bzimage"),
        (Program::Count, Format::Pvh) => guest!("count-pvh.elf"),
        (Program::Count, Format::Linux64Elf) => guest!("count-linux64.elf"),
        (Program::Count, Format::BzImage) => guest!("count.bzimage"),
    }
}

/// The file name of a guest image, e.g. `report-pvh.elf`, `hello.bzimage`.
pub fn file_name(program: Program, format: Format) -> &'static str {
    match (program, format) {
        (Program::Hello, Format::Pvh) => "hello-pvh.elf",
        (Program::Hello, Format::Linux64Elf) => "hello-linux64.elf",
        (Program::Hello, Format::BzImage) => "hello.bzimage",
        (Program::Report, Format::Pvh) => "report-pvh.elf",
        (Program::Report, Format::Linux64Elf) => "report-linux64.elf",
        (Program::Report, Format::BzImage) => "report.bzimage",
        (Program::Spin, Format::Pvh) => "spin-pvh.elf",
        (Program::Spin, Format::Linux64Elf) => "spin-linux64.elf",
        (Program::Spin, Format::BzImage) => "spin.bzimage",
        (Program::Virtio, Format::Pvh) => "virtio-pvh.elf",
        (Program::Virtio, Format::Linux64Elf) => "virtio-linux64.elf",
        (Program::Virtio, Format::BzImage) => "virtio.bzimage",
        (Program::Count, Format::Pvh) => "count-pvh.elf",
        (Program::Count, Format::Linux64Elf) => "count-linux64.elf",
        (Program::Count, Format::BzImage) => "count.bzimage",
    }
}

/// Writes every image into `dir` (created if missing) under its
/// [`file_name`]; returns the paths written.
pub fn write_all(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for program in Program::ALL {
        for format in Format::ALL {
            let path = dir.join(file_name(program, format));
            fs::write(&path, image(program, format))?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use elf::{Note, ProgramHeader, EM_X86_64, PT_LOAD, PT_NOTE};

    const LOAD_ADDR: u64 = 0x10_0000;
    const ENTRY32: u64 = LOAD_ADDR;
    const ENTRY64: u64 = LOAD_ADDR + 0x200;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn elf_formats() -> impl Iterator<Item = (Program, Format)> {
        Program::ALL.into_iter().flat_map(|p| [(p, Format::Pvh), (p, Format::Linux64Elf)])
    }

    fn headers(image: &[u8]) -> Vec<ProgramHeader> {
        elf::program_headers(image).expect("program headers")
    }

    fn xen_notes<'a>(image: &'a [u8]) -> Vec<Note<'a>> {
        headers(image)
            .iter()
            .filter(|h| h.kind == PT_NOTE)
            .flat_map(|h| elf::notes(image, h).expect("notes"))
            .filter(|n| n.name == b"Xen\0")
            .collect()
    }

    fn load_segment(image: &[u8]) -> ProgramHeader {
        let loads: Vec<_> = headers(image).into_iter().filter(|h| h.kind == PT_LOAD).collect();
        assert_eq!(loads.len(), 1, "one PT_LOAD segment: {loads:?}");
        loads[0]
    }

    fn u16_at(image: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(image[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(image: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(image[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(image: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(image[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn elf_images_are_x86_64_and_loaded_at_1_mib() {
        for (program, format) in elf_formats() {
            let image = image(program, format);
            assert_eq!(elf::machine(image), Some(EM_X86_64), "{program:?} {format:?}");
            let load = load_segment(image);
            assert_eq!(load.paddr, LOAD_ADDR, "{program:?} {format:?}");
            assert!(load.memsz >= load.filesz);
        }
    }

    /// Every guest, .bss included, lies in [1 MiB, 2 MiB): the VMM keeps
    /// its own structures out of that range (the virtio guest's queues and
    /// buffer live in its .bss).
    #[test]
    fn images_fit_below_2_mib() {
        for (program, format) in elf_formats() {
            let end = elf::load_end(image(program, format)).unwrap();
            assert!(end <= 0x20_0000, "{program:?} {format:?} ends at {end:#x}");
        }
    }

    #[test]
    fn entry_points() {
        for program in Program::ALL {
            assert_eq!(elf::entry(image(program, Format::Pvh)), Some(ENTRY32));
            assert_eq!(elf::entry(image(program, Format::Linux64Elf)), Some(ENTRY64));
        }
    }

    #[test]
    fn pvh_note_only_in_pvh_images() {
        for program in Program::ALL {
            let pvh = image(program, Format::Pvh);
            let notes = xen_notes(pvh);
            assert_eq!(notes.len(), 1, "{program:?}: {notes:?}");
            assert_eq!(notes[0].kind, XEN_ELFNOTE_PHYS32_ENTRY);
            assert_eq!(notes[0].desc, &(ENTRY32 as u32).to_le_bytes());

            let linux = image(program, Format::Linux64Elf);
            assert!(headers(linux).iter().all(|h| h.kind != PT_NOTE), "{program:?}");
        }
    }

    /// QEMU pads the note name to the PT_NOTE segment's alignment, so that
    /// must be 4 (the note's own alignment) for it to find the entry.
    #[test]
    fn pvh_note_is_4_byte_aligned() {
        for program in Program::ALL {
            let pvh = image(program, Format::Pvh);
            let note = headers(pvh).into_iter().find(|h| h.kind == PT_NOTE).unwrap();
            assert_eq!(note.align, 4, "{program:?}");
        }
    }

    #[test]
    fn bzimage_header() {
        for program in Program::ALL {
            let bz = image(program, Format::BzImage);
            let setup_sects = bz[0x1f1];
            assert!(setup_sects >= 1);
            let setup_len = (usize::from(setup_sects) + 1) * 512;
            let kernel_len = bz.len() - setup_len;
            assert_eq!(u16_at(bz, 0x1fe), 0xaa55, "boot_flag");
            assert_eq!(u32_at(bz, 0x202), 0x5372_6448, "HdrS");
            assert!(u16_at(bz, 0x206) >= 0x020c, "version");
            assert_eq!(bz[0x211] & 1, 1, "loadflags LOADED_HIGH");
            assert_eq!(u32_at(bz, 0x214), LOAD_ADDR as u32, "code32_start");
            assert_eq!(u32_at(bz, 0x1f4) as usize, kernel_len.div_ceil(16), "syssize");
            assert_eq!(bz[0x234], 0, "not relocatable");
            assert_eq!(u32_at(bz, 0x230), 0x10_0000, "kernel_alignment");
            assert_eq!(u16_at(bz, 0x236) & 1, 1, "xloadflags XLF_KERNEL_64");
            assert_eq!(u32_at(bz, 0x238), 4095, "cmdline_size");
            assert_eq!(u64_at(bz, 0x258), LOAD_ADDR, "pref_address");
            let init_size = u32_at(bz, 0x260) as usize;
            assert!(init_size >= kernel_len && init_size % 4096 == 0, "init_size {init_size:#x}");
            let version = 0x200 + usize::from(u16_at(bz, 0x20e));
            assert!(bz[version..].starts_with(b"vessel-guests "), "kernel_version");
        }
    }

    /// The bzImage's kernel is exactly what the linux64 ELF loads, and its
    /// init_size covers the ELF's whole memory footprint (.bss included).
    #[test]
    fn bzimage_kernel_matches_linux64_elf() {
        for program in Program::ALL {
            let bz = image(program, Format::BzImage);
            let kernel = &bz[(usize::from(bz[0x1f1]) + 1) * 512..];
            let elf_image = image(program, Format::Linux64Elf);
            let load = load_segment(elf_image);
            assert_eq!(kernel, elf::segment_bytes(elf_image, &load).unwrap(), "{program:?}");
            let footprint = elf::load_end(elf_image).unwrap() - LOAD_ADDR;
            assert_eq!(u64::from(u32_at(bz, 0x260)), footprint.next_multiple_of(4096), "{program:?}");
        }
    }

    /// Both entries are where the layout puts them: the 64-bit entry at
    /// +0x200 follows hlt padding.
    #[test]
    fn entry64_at_offset_0x200() {
        for program in Program::ALL {
            let bz = image(program, Format::BzImage);
            let kernel = &bz[(usize::from(bz[0x1f1]) + 1) * 512..];
            assert_eq!(kernel[0x1ff], 0xf4, "{program:?}: hlt padding before entry64");
            assert_ne!(kernel[0x200], 0xf4, "{program:?}: code at entry64");
        }
    }

    #[test]
    fn file_names_are_distinct() {
        let mut names: Vec<_> = Program::ALL.into_iter().flat_map(|p| Format::ALL.map(|f| file_name(p, f))).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Program::ALL.len() * Format::ALL.len());
        assert_eq!(file_name(Program::Report, Format::Pvh), "report-pvh.elf");
        assert_eq!(file_name(Program::Hello, Format::BzImage), "hello.bzimage");
        assert_eq!(file_name(Program::Virtio, Format::Linux64Elf), "virtio-linux64.elf");
    }

    #[test]
    fn write_all_writes_every_image() {
        let dir = std::env::temp_dir().join(format!("vessel-guests-test-{}", std::process::id()));
        let paths = write_all(&dir).unwrap();
        assert_eq!(paths.len(), Program::ALL.len() * Format::ALL.len());
        for program in Program::ALL {
            for format in Format::ALL {
                let path = dir.join(file_name(program, format));
                assert!(paths.contains(&path));
                assert_eq!(fs::read(&path).unwrap(), image(program, format));
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
