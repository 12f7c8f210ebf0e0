//! Just enough of 64-bit little-endian ELF to read a section by name (a
//! kernel module's `.modinfo`) and to tell a static x86_64 executable from
//! anything else. Every offset read from the file is bounds-checked.

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?)).ok()
}

/// Whether `b` starts like a 64-bit little-endian ELF file.
pub(crate) fn is_elf64le(b: &[u8]) -> bool {
    b.len() >= 64 && b[..4] == *b"\x7fELF" && b[4] == 2 && b[5] == 1
}

/// The contents of the section called `name`.
pub(crate) fn section<'a>(b: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if !is_elf64le(b) {
        return None;
    }
    let shoff = u64_at(b, 0x28)?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    let shstrndx = usize::from(u16_at(b, 0x3e)?);
    if shentsize < 64 {
        return None;
    }
    let header = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(b, h)? as usize, u64_at(b, h.checked_add(24)?)?, u64_at(b, h.checked_add(32)?)?))
    };
    let data = |off: usize, size: usize| b.get(off..off.checked_add(size)?);
    let (_, str_off, str_size) = header(shstrndx)?;
    let names = data(str_off, str_size)?;
    (0..shnum).find_map(|i| {
        let (name_off, off, size) = header(i)?;
        let rest = names.get(name_off..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        (&rest[..end] == name.as_bytes()).then(|| data(off, size)).flatten()
    })
}

/// Whether the executable asks for a program interpreter (PT_INTERP), i.e.
/// is dynamically linked. None if `b` is not a 64-bit ELF file.
pub(crate) fn has_interpreter(b: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if !is_elf64le(b) {
        return None;
    }
    let phoff = u64_at(b, 0x20)?;
    let phentsize = usize::from(u16_at(b, 0x36)?);
    let phnum = usize::from(u16_at(b, 0x38)?);
    let mut found = false;
    for i in 0..phnum {
        let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
        found |= u32_at(b, h)? == PT_INTERP;
    }
    Some(found)
}

/// Why a file cannot run as a guest's `/init` (no dynamic loader in the
/// initramfs, no other architecture), or Ok if it is a static x86_64
/// executable: `ET_EXEC`, or `ET_DYN` with an entry point (static-pie, what
/// Rust builds with `crt-static`), and no program interpreter.
pub(crate) fn check_static_x86_64(b: &[u8]) -> Result<(), &'static str> {
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    const EM_X86_64: u16 = 62;
    if !is_elf64le(b) {
        return Err("it is not a 64-bit little-endian ELF file");
    }
    if u16_at(b, 0x12) != Some(EM_X86_64) {
        return Err("it is built for another machine than x86_64");
    }
    let entry = u64_at(b, 0x18).unwrap_or(0);
    match u16_at(b, 0x10) {
        Some(ET_EXEC) => {}
        Some(ET_DYN) if entry != 0 => {}
        _ => return Err("it is not an executable"),
    }
    match has_interpreter(b) {
        Some(false) => Ok(()),
        Some(true) => Err("it is dynamically linked (it asks for a program interpreter)"),
        None => Err("its program headers cannot be read"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal x86_64 ELF64 executable (`ET_EXEC`) with the given
    /// sections (name, contents) and, if `interp`, one PT_INTERP program
    /// header.
    pub(crate) fn build(sections: &[(&str, &[u8])], interp: bool) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        // Program header table right after the ELF header.
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&(if interp { 3u32 } else { 1u32 }).to_le_bytes());
        b.extend_from_slice(&ph);
        // Section names: index 0 is the null section, the last is .shstrtab.
        let mut strtab = vec![0u8];
        let mut placed = Vec::new();
        for (name, data) in sections {
            let name_off = strtab.len();
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
            placed.push((name_off, b.len(), data.len()));
            b.extend_from_slice(data);
        }
        let shstr_name = strtab.len();
        strtab.extend_from_slice(b".shstrtab\0");
        let str_off = b.len();
        b.extend_from_slice(&strtab);
        placed.push((shstr_name, str_off, strtab.len()));
        let shoff = b.len();
        b.extend_from_slice(&[0u8; 64]);
        for (name_off, off, size) in &placed {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&(*name_off as u32).to_le_bytes());
            sh[24..32].copy_from_slice(&(*off as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&(*size as u64).to_le_bytes());
            b.extend_from_slice(&sh);
        }
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&((placed.len() + 1) as u16).to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&(placed.len() as u16).to_le_bytes());
        b
    }

    #[test]
    fn finds_sections_and_interpreters() {
        let elf = build(&[(".text", b"code"), (".modinfo", b"name=x\0depends=a,b\0")], true);
        assert_eq!(section(&elf, ".modinfo"), Some(&b"name=x\0depends=a,b\0"[..]));
        assert_eq!(section(&elf, ".text"), Some(&b"code"[..]));
        assert_eq!(section(&elf, ".data"), None);
        assert_eq!(has_interpreter(&elf), Some(true));
        assert_eq!(has_interpreter(&build(&[], false)), Some(false));
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn static_x86_64_executables() {
        assert_eq!(check_static_x86_64(&build(&[], false)), Ok(()));
        let err = check_static_x86_64(&build(&[], true)).unwrap_err();
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(check_static_x86_64(b"#!/bin/sh\n").unwrap_err().contains("not a 64-bit little-endian ELF"));
        let mut arm = build(&[], false);
        arm[0x12..0x14].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        assert!(check_static_x86_64(&arm).unwrap_err().contains("another machine"));
        // ET_DYN: a static-pie executable has an entry point, a library none.
        let mut pie = build(&[], false);
        pie[0x10..0x12].copy_from_slice(&3u16.to_le_bytes());
        assert!(check_static_x86_64(&pie).unwrap_err().contains("not an executable"));
        pie[0x18..0x20].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(check_static_x86_64(&pie), Ok(()));
        let mut object = build(&[], false);
        object[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        assert!(check_static_x86_64(&object).unwrap_err().contains("not an executable"));
    }

    #[test]
    fn truncated_or_lying_files_give_none() {
        let elf = build(&[(".modinfo", b"name=x\0")], false);
        for len in [0, 10, 63, 64, 100, elf.len() - 1] {
            let _ = section(&elf[..len], ".modinfo");
            let _ = has_interpreter(&elf[..len]);
        }
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(section(&bad, ".modinfo"), None);
        let mut bad = elf;
        bad[0x3c..0x3e].copy_from_slice(&u16::MAX.to_le_bytes());
        let _ = section(&bad, ".modinfo");
    }
}
