//! A minimal reader for the little-endian ELF64 files this crate links:
//! the header's entry point, the program headers and the notes of a
//! PT_NOTE segment. Shared by `build.rs` (which sizes the bzImage's
//! `init_size` from the loadable segments) and the unit tests. Malformed
//! input gives `None`, never a panic.

/// Program header type of a loadable segment.
pub const PT_LOAD: u32 = 1;
/// Program header type of a segment of notes.
pub const PT_NOTE: u32 = 4;
/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;

/// The fields of an ELF64 program header that this crate looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    /// `p_type`, e.g. [`PT_LOAD`].
    pub kind: u32,
    /// `p_offset`: where the segment's bytes start in the file.
    pub offset: u64,
    /// `p_paddr`: the physical address it is loaded at.
    pub paddr: u64,
    /// `p_filesz`: bytes present in the file.
    pub filesz: u64,
    /// `p_memsz`: bytes occupied in memory (the rest is zero-filled).
    pub memsz: u64,
    /// `p_align`.
    pub align: u64,
}

/// One ELF note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// The name, including its terminating NUL (e.g. `b"Xen\0"`).
    pub name: &'a [u8],
    /// `n_type`.
    pub kind: u32,
    /// The descriptor bytes.
    pub desc: &'a [u8],
}

fn bytes<const N: usize>(image: &[u8], offset: u64) -> Option<[u8; N]> {
    let start = usize::try_from(offset).ok()?;
    image.get(start..start.checked_add(N)?)?.try_into().ok()
}

fn u16_at(image: &[u8], offset: u64) -> Option<u16> {
    bytes(image, offset).map(u16::from_le_bytes)
}

fn u32_at(image: &[u8], offset: u64) -> Option<u32> {
    bytes(image, offset).map(u32::from_le_bytes)
}

fn u64_at(image: &[u8], offset: u64) -> Option<u64> {
    bytes(image, offset).map(u64::from_le_bytes)
}

/// Checks the ELF64 little-endian magic and returns `e_machine`.
pub fn machine(image: &[u8]) -> Option<u16> {
    let ident: [u8; 6] = bytes(image, 0)?;
    // "\x7fELF", ELFCLASS64, ELFDATA2LSB.
    (ident == [0x7f, b'E', b'L', b'F', 2, 1]).then_some(())?;
    u16_at(image, 0x12)
}

/// `e_entry`.
pub fn entry(image: &[u8]) -> Option<u64> {
    machine(image)?;
    u64_at(image, 0x18)
}

/// All program headers.
pub fn program_headers(image: &[u8]) -> Option<Vec<ProgramHeader>> {
    machine(image)?;
    let phoff = u64_at(image, 0x20)?;
    let phentsize = u64::from(u16_at(image, 0x36)?);
    let phnum = u16_at(image, 0x38)?;
    (0..u64::from(phnum))
        .map(|i| {
            let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
            Some(ProgramHeader {
                kind: u32_at(image, at)?,
                offset: u64_at(image, at + 0x08)?,
                paddr: u64_at(image, at + 0x18)?,
                filesz: u64_at(image, at + 0x20)?,
                memsz: u64_at(image, at + 0x28)?,
                align: u64_at(image, at + 0x30)?,
            })
        })
        .collect()
}

/// The file bytes of a segment.
pub fn segment_bytes<'a>(image: &'a [u8], header: &ProgramHeader) -> Option<&'a [u8]> {
    let start = usize::try_from(header.offset).ok()?;
    let len = usize::try_from(header.filesz).ok()?;
    image.get(start..start.checked_add(len)?)
}

/// The notes of a PT_NOTE segment (4-byte aligned name and descriptor).
pub fn notes<'a>(image: &'a [u8], header: &ProgramHeader) -> Option<Vec<Note<'a>>> {
    let data = segment_bytes(image, header)?;
    let mut notes = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let namesz = usize::try_from(u32_at(data, at as u64)?).ok()?;
        let descsz = usize::try_from(u32_at(data, at as u64 + 4)?).ok()?;
        let kind = u32_at(data, at as u64 + 8)?;
        let name_start = at.checked_add(12)?;
        let desc_start = name_start.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let next = desc_start.checked_add(descsz.checked_next_multiple_of(4)?)?;
        notes.push(Note {
            name: data.get(name_start..name_start.checked_add(namesz)?)?,
            kind,
            desc: data.get(desc_start..desc_start.checked_add(descsz)?)?,
        });
        at = next;
    }
    Some(notes)
}

/// End of the highest loadable segment in memory (`p_paddr + p_memsz`).
pub fn load_end(image: &[u8]) -> Option<u64> {
    program_headers(image)?
        .iter()
        .filter(|header| header.kind == PT_LOAD)
        .map(|header| header.paddr.checked_add(header.memsz))
        .try_fold(0u64, |end, segment_end| Some(end.max(segment_end?)))
}
