/*
 * The ELF note that marks an image as PVH-bootable (the x86/HVM direct boot
 * ABI, also used by QEMU and Firecracker): an entry in a PT_NOTE segment
 * with name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), whose descriptor is
 * the 32-bit physical address of the 32-bit entry point. Only the pvh.elf
 * images are linked with this object.
 *
 * The note is 4-byte aligned: QEMU pads the name to the PT_NOTE segment's
 * alignment, so a larger alignment would shift where it reads the entry.
 */
    .section .note.Xen, "a", @note
    .balign 4
    .long   4f - 3f             /* n_namesz: "Xen\0" */
    .long   6f - 5f             /* n_descsz: 4 bytes */
    .long   18                  /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
3:  .asciz  "Xen"
4:  .balign 4
5:  .long   entry32             /* physical address of the 32-bit entry */
6:  .balign 4
