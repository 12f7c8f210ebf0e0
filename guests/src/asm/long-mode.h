/*
 * The 64-bit runtime shared by the guests that run real code (report,
 * virtio): both entries brought into the same long-mode state, a serial
 * printer, our own GDT, identity page tables for the first 4 GiB, and a
 * stack. Each piece is a macro that the program expands once, where it
 * wants the code or data to live:
 *
 *   GUEST_ENTRIES main   .text.head: entry32 (LOAD_ADDR + 0) and entry64
 *                        (LOAD_ADDR + 0x200), both ending in a jump to
 *                        `main` in long mode with
 *                          RSI = boot_params or hvm_start_info,
 *                          EBP = BOOT_PVH / BOOT_LINUX64 / BOOT_LINUX32,
 *                          RSP = stack_top, CR3 = our page tables,
 *                          interrupts off, DF clear;
 *   PRINT_ROUTINES       putc, puts, put_hex, put_space, put_newline;
 *   LONG_MODE_DATA       the GDT, the page tables (.data) and a 16 KiB
 *                        stack (.bss).
 *
 * Our page tables map 0..4 GiB with 2 MiB pages: the VMM's map covers only
 * 1 GiB, while the local APIC, the IOAPIC and MMIO devices live above
 * 3 GiB, and 1 GiB pages may be unavailable. They are built at assembly
 * time, in .data, so entering costs no loop. Nothing else shares the
 * stack, so .bss needs no clearing for it (a bzImage's flat binary does
 * not carry .bss).
 *
 * Register conventions of the print routines: each preserves every
 * register except flags.
 */
#ifndef VESSEL_GUESTS_LONG_MODE_H
#define VESSEL_GUESTS_LONG_MODE_H

#include "common.h"

/* Control registers, MSRs, page tables. */
#define CR0_PE              0x00000001
#define CR0_PG              0x80000000
#define CR4_PAE             0x20
#define MSR_EFER            0xc0000080
#define EFER_LME            0x100
#define PTE_PRESENT         0x01
#define PTE_WRITE           0x02
#define PTE_PWT             0x08
#define PTE_PCD             0x10
#define PTE_LARGE           0x80        /* 2 MiB page in a page directory */
#define GDT_CODE64          0x08
#define GDT_DATA            0x10

/* xAPIC registers (MMIO). */
#define LAPIC_BASE          0xfee00000
#define LAPIC_EOI           0x0b0       /* end of interrupt: write 0 */
#define LAPIC_SVR           0x0f0       /* spurious-interrupt vector register */
#define LAPIC_SVR_ENABLE    0x100       /* APIC software enable */
#define LAPIC_ICR_LOW       0x300
#define LAPIC_ICR_HIGH      0x310
#define LAPIC_LVT_TIMER     0x320
#define LAPIC_TIMER_INITIAL 0x380       /* initial count */
#define LAPIC_TIMER_DIVIDE  0x3e0       /* divide configuration */
#define LVT_MASKED          0x10000
#define LVT_TIMER_PERIODIC  0x20000

/* hvm_start_info offsets used by the entry (see report.S for the rest). */
#define SI_MAGIC            0           /* u32 PVH_START_MAGIC */
#define SI_CMDLINE_PADDR    24          /* u64 */

/* boot_params offsets of the command line pointer. */
#define BP_EXT_CMD_LINE_PTR 0x0c8       /* u32, bits 63:32 of cmd_line_ptr */
#define BP_CMD_LINE_PTR     0x228       /* hdr.cmd_line_ptr, u32 */

#ifdef __ASSEMBLER__

/*
 * CMDLINE_POINTER: rsi = the command line's guest-physical address (0 when
 * none), read from hvm_start_info or boot_params. Expects r12d = boot kind
 * and rbx = the boot structure, as the entries leave them; clobbers rax.
 */
.macro CMDLINE_POINTER
    cmp     r12d, BOOT_PVH
    jne     .Lcmdline_bp\@
    mov     rsi, [rbx + SI_CMDLINE_PADDR]
    jmp     .Lcmdline_done\@
.Lcmdline_bp\@:
    mov     esi, [rbx + BP_CMD_LINE_PTR]
    mov     eax, [rbx + BP_EXT_CMD_LINE_PTR]
    shl     rax, 32
    or      rsi, rax
.Lcmdline_done\@:
.endm

/* PRINT "text": write a literal string to COM1; preserves all registers. */
.macro PRINT text
    .pushsection .rodata
.Lstring\@:
    .asciz  "\text"
    .popsection
    push    rsi
    lea     rsi, [rip + .Lstring\@]
    call    puts
    pop     rsi
.endm

/*
 * GUEST_ENTRIES main: both entries, in .text.head; leaves the assembler in
 * .text, .code64.
 */
.macro GUEST_ENTRIES main
    .section .text.head, "ax"

/*
 * LOAD_ADDR + 0: 32-bit entry, protected mode, paging off, flat CS/DS,
 * interrupts off.
 *   PVH:           EBX = address of hvm_start_info (starts with its magic).
 *   Linux 32-bit:  ESI = address of boot_params, EBX = 0 (the protocol of
 *                  a bzImage entered at code32_start).
 * Entering long mode: CR3 = our PML4, CR4.PAE, EFER.LME, then CR0.PG
 * (IA-32e mode is now active, in compatibility mode); a far jump through
 * our GDT loads a 64-bit code segment.
 */
    .code32
    .globl  entry32
entry32:
    cld                                 /* DF is unspecified at entry */
    mov     ebp, BOOT_LINUX32
    test    ebx, ebx
    jz      1f
    cmp     dword ptr [ebx + SI_MAGIC], PVH_START_MAGIC
    jne     1f
    mov     ebp, BOOT_PVH
    mov     esi, ebx                    /* ESI = boot pointer from here on */
1:
    lgdt    [gdt_descriptor]
    mov     eax, offset pml4
    mov     cr3, eax
    mov     eax, cr4
    or      eax, CR4_PAE
    mov     cr4, eax
    mov     ecx, MSR_EFER
    rdmsr
    or      eax, EFER_LME
    wrmsr
    mov     eax, cr0
    or      eax, CR0_PG + CR0_PE
    mov     cr0, eax
    ljmp    GDT_CODE64, offset long_mode_from_32

/*
 * LOAD_ADDR + 0x200: 64-bit entry of the Linux boot protocol: long mode,
 * the VMM's identity map of (at least) the first 1 GiB, interrupts off,
 * RSI = address of boot_params. The VMM's GDT stays in use; we only switch
 * to our page tables (they map our code the same way, so the switch is
 * seamless) and to our stack.
 */
    .org    ENTRY64_OFFSET, 0xf4        /* pad with hlt */
    .code64
    .globl  entry64
entry64:
    cld
    mov     eax, offset pml4
    mov     cr3, rax
    mov     esp, offset stack_top
    mov     ebp, BOOT_LINUX64
    jmp     \main

    .text
    .code64
/* First 64-bit instruction after entry32: load data segments, zero-extend. */
long_mode_from_32:
    mov     ax, GDT_DATA
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     fs, ax
    mov     gs, ax
    mov     esi, esi                    /* upper halves are undefined */
    mov     ebp, ebp
    mov     esp, offset stack_top
    jmp     \main
.endm

/* PRINT_ROUTINES: the COM1 printer, in the current section. */
.macro PRINT_ROUTINES
/* putc: AL to COM1. */
putc:
    push    rdx
    mov     dx, COM1_PORT
    out     dx, al
    pop     rdx
    ret

/* puts: the NUL-terminated string at RSI. */
puts:
    push    rax
    push    rsi
1:  lodsb
    test    al, al
    jz      2f
    call    putc
    jmp     1b
2:  pop     rsi
    pop     rax
    ret

/* put_hex: RAX as "0x" and 16 lowercase hex digits. */
put_hex:
    push    rax
    push    rcx
    push    rdx
    mov     rdx, rax
    mov     al, '0'
    call    putc
    mov     al, 'x'
    call    putc
    mov     ecx, 16
1:  rol     rdx, 4                      /* next nibble, most significant first */
    mov     al, dl
    and     al, 0x0f
    add     al, '0'
    cmp     al, '9'
    jbe     2f
    add     al, 'a' - '9' - 1
2:  call    putc
    dec     ecx
    jnz     1b
    pop     rdx
    pop     rcx
    pop     rax
    ret

put_space:
    push    rax
    mov     al, ' '
    call    putc
    pop     rax
    ret

put_newline:
    push    rax
    mov     al, '\n'
    call    putc
    pop     rax
    ret
.endm

/*
 * LONG_MODE_DATA: GDT and page tables in .data, the stack in .bss; leaves
 * the assembler in .bss.
 */
.macro LONG_MODE_DATA
    .data
    .balign 8
/* GDT for the PVH path: null, 64-bit code (0x08), flat data (0x10). */
gdt:
    .quad   0
    .quad   0x00af9a000000ffff          /* code: L=1, P, DPL 0, execute/read */
    .quad   0x00cf92000000ffff          /* data: G, D/B, P, DPL 0, read/write */
gdt_end:
gdt_descriptor:
    .word   gdt_end - gdt - 1
    .long   gdt

/*
 * Identity map of 0..4 GiB, built by the assembler: PML4[0] -> PDPT,
 * PDPT[0..3] -> four page directories of 512 2 MiB pages each. The last
 * GiB (local APIC, IOAPIC, MMIO devices) is mapped uncached.
 */
    .balign 4096
pml4:
    .quad   pdpt + PTE_PRESENT + PTE_WRITE
    .fill   511, 8, 0
pdpt:
    .quad   page_directories + 0 * 4096 + PTE_PRESENT + PTE_WRITE
    .quad   page_directories + 1 * 4096 + PTE_PRESENT + PTE_WRITE
    .quad   page_directories + 2 * 4096 + PTE_PRESENT + PTE_WRITE
    .quad   page_directories + 3 * 4096 + PTE_PRESENT + PTE_WRITE
    .fill   508, 8, 0
page_directories:
    .set    page, 0
    .rept   3 * 512
    .quad   page + PTE_PRESENT + PTE_WRITE + PTE_LARGE
    .set    page, page + 0x200000
    .endr
    .rept   512
    .quad   page + PTE_PRESENT + PTE_WRITE + PTE_LARGE + PTE_PCD + PTE_PWT
    .set    page, page + 0x200000
    .endr

    .bss
    .balign 16
stack:
    .skip   16384
stack_top:
.endm

#endif /* __ASSEMBLER__ */
#endif /* VESSEL_GUESTS_LONG_MODE_H */
