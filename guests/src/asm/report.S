/*
 * report: prints, one item per line on COM1, what the VMM handed it:
 * boot protocol, command line, memory map, initrd (with a checksum of its
 * bytes), ACPI RSDP and MADT, then starts the other CPUs the way Linux
 * does (INIT + 2x STARTUP IPI), and probes an unhandled port and an
 * unhandled MMIO address. Ends with "done", the boot-timer byte and a
 * reset. Every number is printed as 0x + 16 lowercase hex digits.
 *
 * Both entries (GUEST_ENTRIES, long-mode.h) set up the same state, then
 * run the one 64-bit reporting routine, main64: our own identity page
 * tables for the first 4 GiB (the local APIC and the MMIO probe live above
 * 3 GiB), our own stack, RSI = boot_params or hvm_start_info, EBP = BOOT_*
 * kind (main64 moves them to RBX and R12).
 *
 * Instruction count matters: on our nested "PVM" test hypervisor guest
 * code runs through an instruction emulator at roughly 1.5-2 million
 * instructions per second, so loops over data (the initrd sum) work on
 * 8 bytes per step and waits are bounded by time (TSC), not by iterations.
 *
 * Fixed low-memory addresses written (everything else lies in our own
 * image: page tables and GDT in .data, the stack in .bss):
 *   0x10000..0x10fff  real-mode trampoline for the application processors
 *   0x11000           AP spinlock (byte), 0x11004 AP counter (dword)
 *   below 0x12000     AP stack, a few bytes (used only under the lock)
 * The VMM's zero page (0x7000), stack, page tables (0x9000-0xbfff), command
 * line (0x20000) and ACPI tables (0xe0000) are only read, never written.
 */
#include "long-mode.h"

    .intel_syntax noprefix

/* Application-processor startup. */
#define TRAMPOLINE_ADDR     0x10000
#define SIPI_VECTOR         (TRAMPOLINE_ADDR >> 12)  /* CS = 0x1000, IP = 0 */
#define AP_LOCK_ADDR        0x11000
#define AP_COUNT_ADDR       0x11004
#define AP_STACK_TOP        0x12000
#define AP_WAIT_TSC_TICKS   5000000000  /* about 2 s at 2.5 GHz */
#define AP_WAIT_POLLS       100000000

/* xAPIC interrupt command (the LAPIC_* registers: long-mode.h). */
#define ICR_DELIVERY_PENDING 0x1000     /* delivery status: send pending */
#define ICR_LEVEL_TRIGGER   0x8000
#define ICR_LEVEL_ASSERT    0x4000
#define ICR_ALL_BUT_SELF    0xc0000     /* destination shorthand */
#define ICR_DM_INIT         0x500
#define ICR_DM_STARTUP      0x600

/* Probes of what the VMM does with accesses nobody handles. */
#define PROBE_PORT          0x610
#define PROBE_MMIO_ADDR     0xd0000000
#define PROBE_MMIO_VALUE    0x12345678

/* struct boot_params ("zero page") offsets, Documentation/arch/x86/zero-page.rst. */
#define BP_ACPI_RSDP_ADDR   0x070       /* u64 */
#define BP_EXT_RAMDISK_IMAGE 0x0c0      /* u32, bits 63:32 of ramdisk_image */
#define BP_EXT_RAMDISK_SIZE 0x0c4       /* u32, bits 63:32 of ramdisk_size */
#define BP_E820_ENTRIES     0x1e8       /* u8 */
#define BP_RAMDISK_IMAGE    0x218       /* hdr.ramdisk_image, u32 */
#define BP_RAMDISK_SIZE     0x21c       /* hdr.ramdisk_size, u32 */
#define BP_E820_TABLE       0x2d0       /* struct boot_e820_entry[128] */
#define BP_E820_MAX         128
#define E820_ENTRY_SIZE     20          /* addr u64, size u64, type u32 (packed) */

/* struct hvm_start_info offsets (SI_MAGIC: long-mode.h). */
#define SI_VERSION          4           /* u32; memmap fields need version >= 1 */
#define SI_NR_MODULES       12          /* u32 */
#define SI_MODLIST_PADDR    16          /* u64 -> hvm_modlist_entry[] */
#define SI_RSDP_PADDR       32          /* u64 */
#define SI_MEMMAP_PADDR     40          /* u64 -> hvm_memmap_table_entry[] */
#define SI_MEMMAP_ENTRIES   48          /* u32 */
#define MEMMAP_ENTRY_SIZE   24          /* addr u64, size u64, type u32, reserved u32 */
#define MEMMAP_MAX          1024
#define MOD_PADDR           0           /* hvm_modlist_entry.paddr, u64 */
#define MOD_SIZE            8           /* hvm_modlist_entry.size, u64 */

#define CMDLINE_MAX         4096        /* bzImage header cmdline_size is 4095 */

/* ACPI. */
#define RSDP_SIGNATURE      0x2052545020445352  /* "RSD PTR " */
#define RSDP_REVISION       15          /* u8 */
#define RSDP_RSDT           16          /* u32 */
#define RSDP_LENGTH         20          /* u32, revision >= 2 */
#define RSDP_XSDT           24          /* u64, revision >= 2 */
#define RSDP_V1_SIZE        20          /* bytes covered by the first checksum */
#define SDT_LENGTH          4           /* u32, in every table header */
#define SDT_HEADER_SIZE     36
#define SDT_MAX_LENGTH      0x100000    /* sanity bound for table lengths */
#define MADT_SIGNATURE      0x43495041  /* "APIC" */
#define MADT_ENTRIES        44          /* header + local APIC address + flags */
#define MADT_LAPIC          0           /* type, len 8: uid u8, apic id u8, flags u32 */
#define MADT_IOAPIC         1           /* type, len 12: id u8, rsvd u8, address u32, gsi base u32 */
#define MADT_LAPIC_ENABLED  1

/* IF_ABOVE_4G reg, label: jump to label if reg is not mapped by our tables. */
.macro IF_ABOVE_4G reg, label
    mov     r11, \reg
    shr     r11, 32
    jnz     \label
.endm

/* ------------------------------------------------------------------------ */
    GUEST_ENTRIES main64

/*
 * main64: RSI = boot_params or hvm_start_info, EBP = BOOT_* kind.
 * Register use: RBX = boot pointer, R12 = kind; helpers preserve every
 * register except flags and R11 (scratch for IF_ABOVE_4G and byte_sum).
 */
main64:
    mov     rbx, rsi
    mov     r12d, ebp

/* --- boot: which entry ran --------------------------------------------- */
    cmp     r12d, BOOT_PVH
    jne     1f
    PRINT   "boot: pvh\n"
    jmp     .Lboot_done
1:  cmp     r12d, BOOT_LINUX64
    jne     2f
    PRINT   "boot: linux64\n"
    jmp     .Lboot_done
2:  PRINT   "boot: linux32\n"
.Lboot_done:

/* --- cmdline: NUL-terminated string --------------------------------------- */
    PRINT   "cmdline: "
    CMDLINE_POINTER
    test    rsi, rsi
    jz      .Lcmdline_done
    IF_ABOVE_4G rsi, .Lcmdline_unmapped
    mov     ecx, CMDLINE_MAX
    call    puts_bounded
    jmp     .Lcmdline_done
.Lcmdline_unmapped:
    PRINT   "(above 4 GiB, not read)"
.Lcmdline_done:
    PRINT   "\n"

/* --- e820: the memory map ---------------------------------------------- */
    /* RSI = first entry, ECX = number of entries, EDX = entry size. */
    cmp     r12d, BOOT_PVH
    je      1f
    movzx   ecx, byte ptr [rbx + BP_E820_ENTRIES]
    cmp     ecx, BP_E820_MAX
    jbe     3f
    mov     ecx, BP_E820_MAX
3:  lea     rsi, [rbx + BP_E820_TABLE]
    mov     edx, E820_ENTRY_SIZE
    jmp     .Le820_print
1:  xor     ecx, ecx
    mov     edx, MEMMAP_ENTRY_SIZE
    cmp     dword ptr [rbx + SI_VERSION], 1     /* memmap is a version 1 field */
    jb      .Le820_print
    mov     rsi, [rbx + SI_MEMMAP_PADDR]
    test    rsi, rsi
    jz      .Le820_print
    IF_ABOVE_4G rsi, .Le820_print
    mov     ecx, [rbx + SI_MEMMAP_ENTRIES]
    cmp     ecx, MEMMAP_MAX
    jbe     .Le820_print
    mov     ecx, MEMMAP_MAX
.Le820_print:
    test    ecx, ecx
    jz      .Le820_done
.Le820_entry:
    PRINT   "e820: "
    mov     rax, [rsi]                  /* addr */
    call    put_hex
    call    put_space
    mov     rax, [rsi + 8]              /* size */
    call    put_hex
    call    put_space
    mov     eax, [rsi + 16]             /* type */
    call    put_hex
    call    put_newline
    add     rsi, rdx
    dec     ecx
    jnz     .Le820_entry
.Le820_done:

/* --- initrd: address, size, byte sum ------------------------------------ */
    /* R14 = address, R15 = size. */
    cmp     r12d, BOOT_PVH
    je      1f
    mov     r14d, [rbx + BP_RAMDISK_IMAGE]
    mov     eax, [rbx + BP_EXT_RAMDISK_IMAGE]
    shl     rax, 32
    or      r14, rax
    mov     r15d, [rbx + BP_RAMDISK_SIZE]
    mov     eax, [rbx + BP_EXT_RAMDISK_SIZE]
    shl     rax, 32
    or      r15, rax
    jmp     .Linitrd_print
1:  xor     r14d, r14d                  /* PVH: the first module, if any */
    xor     r15d, r15d
    cmp     dword ptr [rbx + SI_NR_MODULES], 0
    je      .Linitrd_print
    mov     rax, [rbx + SI_MODLIST_PADDR]
    test    rax, rax
    jz      .Linitrd_print
    IF_ABOVE_4G rax, .Linitrd_print
    mov     r14, [rax + MOD_PADDR]
    mov     r15, [rax + MOD_SIZE]
.Linitrd_print:
    PRINT   "initrd: "
    mov     rax, r14
    call    put_hex
    call    put_space
    mov     rax, r15
    call    put_hex
    call    put_newline

    PRINT   "initrd-sum: "
    mov     rax, r14
    add     rax, r15                    /* end of the initrd */
    jc      .Linitrd_unmapped
    mov     r11, 0x100000000
    cmp     rax, r11
    ja      .Linitrd_unmapped
    mov     rsi, r14
    mov     rcx, r15
    call    byte_sum
    call    put_hex
    jmp     .Linitrd_done
.Linitrd_unmapped:
    PRINT   "(above 4 GiB, not read)"
.Linitrd_done:
    call    put_newline

/* --- ACPI: RSDP, root table, MADT ---------------------------------------- */
    /* The RSDP: from boot_params / start_info, else the BIOS-area scan. */
    cmp     r12d, BOOT_PVH
    jne     1f
    mov     r13, [rbx + SI_RSDP_PADDR]
    jmp     2f
1:  mov     r13, [rbx + BP_ACPI_RSDP_ADDR]
2:  test    r13, r13
    jnz     .Lrsdp_found
    mov     eax, 0xe0000                /* ACPI spec: 16-byte boundaries */
    mov     rdx, RSDP_SIGNATURE         /* in 0xe0000..0xfffff */
3:  cmp     [rax], rdx
    je      4f
    add     eax, 16
    cmp     eax, 0x100000
    jb      3b
    xor     eax, eax
4:  mov     r13, rax
.Lrsdp_found:
    PRINT   "rsdp: "
    mov     rax, r13
    call    put_hex
    call    put_newline

    xor     r10d, r10d                  /* R10 = MADT address, 0 = none */
    test    r13, r13
    jz      .Lmadt
    IF_ABOVE_4G r13, .Lmadt

    /* RSDP checksums: the first 20 bytes, and (revision >= 2) all of it. */
    mov     rsi, r13
    mov     ecx, RSDP_V1_SIZE
    call    byte_sum
    test    al, al
    jnz     .Lrsdp_bad
    cmp     byte ptr [r13 + RSDP_REVISION], 2
    jb      .Lrsdp_ok
    mov     ecx, [r13 + RSDP_LENGTH]
    cmp     ecx, SDT_MAX_LENGTH
    ja      .Lrsdp_bad
    call    byte_sum
    test    al, al
    jz      .Lrsdp_ok
.Lrsdp_bad:
    PRINT   "acpi: bad checksum "
    mov     rsi, r13
    mov     ecx, 8
    call    put_bytes
    call    put_newline
.Lrsdp_ok:

    /* Root table: the XSDT (8-byte entries) if revision >= 2, else the RSDT
     * (4-byte entries). R8 = entry size. */
    cmp     byte ptr [r13 + RSDP_REVISION], 2
    jb      1f
    mov     rax, [r13 + RSDP_XSDT]
    mov     r8d, 8
    test    rax, rax
    jnz     2f
1:  mov     eax, [r13 + RSDP_RSDT]
    mov     r8d, 4
2:  test    rax, rax
    jz      .Lmadt
    IF_ABOVE_4G rax, .Lmadt
    mov     rsi, rax
    call    check_table                 /* also bounds its length: */
    jc      .Lmadt                      /* CF = length unusable */

    /* Walk the root table's entries: R15 = cursor, R9 = end. Check every
     * table's checksum; remember the first "APIC" table. */
    mov     ecx, [rsi + SDT_LENGTH]
    lea     r9, [rsi + rcx]
    lea     r15, [rsi + SDT_HEADER_SIZE]
.Lroot_entry:
    lea     rax, [r15 + r8]
    cmp     rax, r9
    ja      .Lmadt
    cmp     r8d, 8
    je      1f
    mov     eax, [r15]
    jmp     2f
1:  mov     rax, [r15]
2:  add     r15, r8
    test    rax, rax
    jz      .Lroot_entry
    IF_ABOVE_4G rax, .Lroot_entry
    mov     rsi, rax
    call    check_table
    jc      .Lroot_entry
    cmp     dword ptr [rsi], MADT_SIGNATURE
    jne     .Lroot_entry
    test    r10, r10
    jnz     .Lroot_entry
    mov     r10, rsi
    jmp     .Lroot_entry

    /* MADT entries: R15 = cursor, R9 = end, R14 = enabled local APICs. */
.Lmadt:
    xor     r14d, r14d
    test    r10, r10
    jnz     1f
    PRINT   "madt: none\n"
    jmp     .Lsmp
1:  mov     ecx, [r10 + SDT_LENGTH]
    lea     r9, [r10 + rcx]
    lea     r15, [r10 + MADT_ENTRIES]
.Lmadt_entry:
    lea     rax, [r15 + 2]              /* room for type and length? */
    cmp     rax, r9
    ja      .Lsmp
    movzx   ecx, byte ptr [r15 + 1]     /* entry length */
    cmp     ecx, 2
    jb      .Lsmp                       /* malformed: stop */
    lea     rax, [r15 + rcx]
    cmp     rax, r9
    ja      .Lsmp
    cmp     byte ptr [r15], MADT_LAPIC
    jne     1f
    cmp     ecx, 8
    jb      .Lmadt_next
    test    byte ptr [r15 + 4], MADT_LAPIC_ENABLED
    jz      .Lmadt_next
    inc     r14d
    PRINT   "madt: lapic "
    movzx   eax, byte ptr [r15 + 3]     /* APIC ID */
    call    put_hex
    call    put_newline
    jmp     .Lmadt_next
1:  cmp     byte ptr [r15], MADT_IOAPIC
    jne     .Lmadt_next
    cmp     ecx, 12
    jb      .Lmadt_next
    PRINT   "madt: ioapic "
    movzx   eax, byte ptr [r15 + 2]     /* IOAPIC ID */
    call    put_hex
    call    put_space
    mov     eax, [r15 + 4]              /* IOAPIC MMIO address */
    call    put_hex
    call    put_newline
.Lmadt_next:
    add     r15, rcx
    jmp     .Lmadt_entry

/* --- smp: start the other CPUs, count them ------------------------------- */
.Lsmp:
    cmp     r14d, 1
    jbe     .Lsmp_single
    mov     eax, r14d                   /* APs expected: all but us */
    dec     eax
    call    start_aps
    /* Take the AP lock and keep it: a late AP cannot print any more. */
    mov     edi, AP_LOCK_ADDR
1:  mov     al, 1
    xchg    al, [rdi]
    test    al, al
    jz      2f
    pause
    jmp     1b
2:  mov     edi, AP_COUNT_ADDR
    mov     eax, [rdi]
    jmp     .Lsmp_print
.Lsmp_single:
    xor     eax, eax
.Lsmp_print:
    PRINT   "smp: "
    call    put_hex
    call    put_newline

/* --- pio: read an unhandled port ------------------------------------------ */
    PRINT   "pio: "
    mov     dx, PROBE_PORT
    in      al, dx
    movzx   eax, al
    call    put_hex
    call    put_newline

/* --- mmio: write then read an unhandled guest-physical address ---------- */
    mov     edi, PROBE_MMIO_ADDR
    mov     dword ptr [rdi], PROBE_MMIO_VALUE
    mov     eax, [rdi]
    PRINT   "mmio: "
    call    put_hex
    call    put_newline

    PRINT   "done\n"
    FINISH

/* ------------------------------------------------------------------------ */
/*
 * start_aps: EAX = number of application processors expected.
 * Linux's sequence (arch/x86/kernel/smpboot.c, minus the waits that modern
 * CPUs and KVM do not need): software-enable the local APIC, send INIT,
 * then STARTUP twice, here to all CPUs but ourselves. An AP starts in real
 * mode at CS:IP = (vector << 8):0, i.e. at TRAMPOLINE_ADDR. Then wait,
 * bounded, until the APs' counter reaches EAX.
 */
start_aps:
    push    rax
    /* 1. The trampoline, its lock (free) and its counter (0). */
    lea     rsi, [rip + trampoline_start]
    mov     edi, TRAMPOLINE_ADDR
    mov     ecx, offset trampoline_end - trampoline_start
    rep movsb
    mov     edi, AP_LOCK_ADDR
    mov     dword ptr [rdi], 0
    mov     edi, AP_COUNT_ADDR
    mov     dword ptr [rdi], 0

    /* 2. Software-enable our local APIC (SVR bit 8), or it sends no IPI. */
    mov     edi, LAPIC_BASE
    or      dword ptr [rdi + LAPIC_SVR], LAPIC_SVR_ENABLE

    /* 3. INIT (level-triggered, assert): the APs reset and wait for a
     *    STARTUP. (Linux then waits 10 ms on old CPUs only.) */
    mov     dword ptr [rdi + LAPIC_ICR_HIGH], 0
    mov     dword ptr [rdi + LAPIC_ICR_LOW], ICR_ALL_BUT_SELF + ICR_LEVEL_TRIGGER + ICR_LEVEL_ASSERT + ICR_DM_INIT
    call    lapic_wait_icr

    /* 4. STARTUP, twice, as the MP spec says (an AP that is already
     *    running ignores the second one). */
    mov     ecx, 2
1:  mov     dword ptr [rdi + LAPIC_ICR_HIGH], 0
    mov     dword ptr [rdi + LAPIC_ICR_LOW], ICR_ALL_BUT_SELF + ICR_LEVEL_ASSERT + ICR_DM_STARTUP + SIPI_VECTOR
    call    lapic_wait_icr
    dec     ecx
    jnz     1b

    /* 5. Wait until the APs' counter reaches the expected count, for at
     *    most AP_WAIT_TSC_TICKS of the TSC, and at most AP_WAIT_POLLS polls
     *    in case the TSC does not advance. R8 = expected, R9 = deadline. */
    pop     r8
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     r9, AP_WAIT_TSC_TICKS
    add     r9, rax
    mov     edi, AP_COUNT_ADDR
    mov     ecx, AP_WAIT_POLLS
2:  cmp     [rdi], r8d
    jae     3f
    pause
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, r9
    jae     3f
    dec     ecx
    jnz     2b
3:  ret

/*
 * lapic_wait_icr: RDI = LAPIC base; spin while an IPI is pending, bounded
 * (KVM's local APIC delivers at once; real hardware within microseconds).
 */
lapic_wait_icr:
    push    rcx
    mov     ecx, 100000
1:  test    dword ptr [rdi + LAPIC_ICR_LOW], ICR_DELIVERY_PENDING
    jz      2f
    pause
    dec     ecx
    jnz     1b
2:  pop     rcx
    ret

/*
 * check_table: RSI = ACPI table (SDT header). Sets CF if its length is
 * shorter than a header or implausibly long (the table is then skipped);
 * otherwise checks that its bytes sum to 0 and prints
 * "acpi: bad checksum <signature>" if not. Preserves all registers.
 */
check_table:
    push    rax
    push    rcx
    mov     ecx, [rsi + SDT_LENGTH]
    cmp     ecx, SDT_HEADER_SIZE
    jb      2f
    cmp     ecx, SDT_MAX_LENGTH
    ja      2f
    call    byte_sum
    test    al, al
    jz      1f
    PRINT   "acpi: bad checksum "
    mov     ecx, 4
    call    put_bytes
    call    put_newline
1:  clc
    pop     rcx
    pop     rax
    ret
2:  PRINT   "acpi: bad length "
    mov     ecx, 4
    call    put_bytes
    call    put_newline
    stc
    pop     rcx
    pop     rax
    ret

/*
 * byte_sum: RAX = wrapping u64 sum of the RCX bytes at RSI.
 * Eight bytes per step: the even and the odd bytes of a qword are masked
 * into four 16-bit lanes each and added lane-wise into R8. A lane grows by
 * at most 2 * 255 per step, so R8 is folded into the sum every 128 steps,
 * before a lane can overflow. The last RCX mod 8 bytes are added one by one.
 */
byte_sum:
    push    rcx
    push    rdx
    push    rsi
    push    rdi
    push    r8
    push    r9
    push    r10
    xor     r10d, r10d                  /* R10 = the sum */
    mov     r9, 0x00ff00ff00ff00ff      /* R9 = lane mask */
    mov     rdi, rcx
    and     edi, 7                      /* RDI = tail bytes */
    mov     r11, rcx
    shr     r11, 3                      /* R11 = qwords left */
.Lsum_chunk:
    test    r11, r11
    jz      .Lsum_tail
    mov     ecx, 128                    /* RCX = qwords in this chunk */
    cmp     r11, rcx
    jae     1f
    mov     rcx, r11
1:  sub     r11, rcx
    xor     r8d, r8d
2:  lodsq
    mov     rdx, rax
    and     rax, r9                     /* bytes 0, 2, 4, 6 */
    shr     rdx, 8
    and     rdx, r9                     /* bytes 1, 3, 5, 7 */
    add     r8, rax
    add     r8, rdx
    loop    2b
    mov     ecx, 4                      /* fold the four lanes */
3:  movzx   eax, r8w
    add     r10, rax
    shr     r8, 16
    loop    3b
    jmp     .Lsum_chunk
.Lsum_tail:
    test    edi, edi
    jz      .Lsum_done
4:  movzx   eax, byte ptr [rsi]
    add     r10, rax
    inc     rsi
    dec     edi
    jnz     4b
.Lsum_done:
    mov     rax, r10
    pop     r10
    pop     r9
    pop     r8
    pop     rdi
    pop     rsi
    pop     rdx
    pop     rcx
    ret

    PRINT_ROUTINES

/* puts_bounded: the string at RSI, up to its NUL or RCX bytes. */
puts_bounded:
    push    rax
    push    rcx
    push    rsi
    test    rcx, rcx
    jz      2f
1:  lodsb
    test    al, al
    jz      2f
    call    putc
    dec     rcx
    jnz     1b
2:  pop     rsi
    pop     rcx
    pop     rax
    ret

/* put_bytes: exactly RCX bytes from RSI (an ACPI signature). */
put_bytes:
    push    rax
    push    rcx
    push    rsi
1:  lodsb
    call    putc
    dec     rcx
    jnz     1b
    pop     rsi
    pop     rcx
    pop     rax
    ret

/* ------------------------------------------------------------------------ */
/*
 * The application processors' trampoline, copied to TRAMPOLINE_ADDR.
 * Position-independent 16-bit real-mode code: after STARTUP an AP runs at
 * CS = 0x1000, IP = 0, so CS-relative offsets are offsets from
 * trampoline_start. Each AP reads its initial APIC ID (CPUID.1:EBX[31:24]),
 * takes the spinlock, prints "cpu <id> up", counts itself, releases the
 * lock and halts forever. The stack is used only under the lock.
 */
    .code16
trampoline_start:
    cli
    cld
    mov     ax, cs
    mov     ds, ax
    mov     ss, ax
    mov     eax, 1
    cpuid
    shr     ebx, 24                     /* BL = initial APIC ID */
1:  mov     al, 1                       /* xchg with memory is atomic */
    xchg    al, byte ptr [AP_LOCK_ADDR - TRAMPOLINE_ADDR]
    test    al, al
    jz      2f
    pause
    jmp     1b
2:  mov     sp, AP_STACK_TOP - TRAMPOLINE_ADDR
    mov     si, offset ap_message_cpu - trampoline_start
    call    ap_puts
    mov     al, bl
    shr     al, 4
    call    ap_put_hex_digit
    mov     al, bl
    call    ap_put_hex_digit
    mov     si, offset ap_message_up - trampoline_start
    call    ap_puts
    inc     dword ptr [AP_COUNT_ADDR - TRAMPOLINE_ADDR]
    mov     byte ptr [AP_LOCK_ADDR - TRAMPOLINE_ADDR], 0
3:  cli
    hlt
    jmp     3b

ap_puts:                                /* DS:SI, NUL-terminated */
    mov     dx, COM1_PORT
1:  lodsb
    test    al, al
    jz      2f
    out     dx, al
    jmp     1b
2:  ret

ap_put_hex_digit:                       /* low nibble of AL */
    and     al, 0x0f
    add     al, '0'
    cmp     al, '9'
    jbe     1f
    add     al, 'a' - '9' - 1
1:  mov     dx, COM1_PORT
    out     dx, al
    ret

ap_message_cpu:
    .asciz  "cpu 0x00000000000000"      /* + 2 digits: 0x and 16 in all */
ap_message_up:
    .asciz  " up\n"
trampoline_end:
    .code64

/* ------------------------------------------------------------------------ */
    LONG_MODE_DATA
