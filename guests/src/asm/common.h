/*
 * Shared definitions for vessel's test guests.
 *
 * Every guest is linked at LOAD_ADDR (1 MiB), physical address = virtual
 * address, and is laid out the same way:
 *
 *   LOAD_ADDR + 0x000  entry32: 32-bit protected-mode entry, paging off.
 *                      This is the PVH entry (the ELF note points here) and
 *                      the bzImage code32_start.
 *   LOAD_ADDR + 0x200  entry64: 64-bit entry of the Linux boot protocol
 *                      (linux64.elf's e_entry; for a bzImage the protocol
 *                      puts the 64-bit entry at load address + 0x200).
 *
 * The macro below uses only instructions that mean the same in 16-, 32-
 * and 64-bit mode, so it can be expanded under any .codeNN.
 */
#ifndef VESSEL_GUESTS_COMMON_H
#define VESSEL_GUESTS_COMMON_H

#define LOAD_ADDR           0x100000
#define ENTRY64_OFFSET      0x200

/* I/O ports. */
#define COM1_PORT           0x3f8   /* 8250 UART data register */
#define BOOT_TIMER_PORT     0x440   /* vessel's boot-timer port */
#define BOOT_TIMER_VALUE    123     /* byte written there when the guest is done */
#define I8042_COMMAND_PORT  0x64
#define I8042_CMD_RESET     0xfe    /* pulse the CPU reset line */
#define DEBUG_EXIT_PORT     0xf4    /* QEMU -device isa-debug-exit,iobase=0xf4 */

/* Boot kinds, as the report guest records them. */
#define BOOT_PVH            0
#define BOOT_LINUX64        1
#define BOOT_LINUX32        2

/* hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
#define PVH_START_MAGIC     0x336ec578

#ifdef __ASSEMBLER__

/*
 * FINISH: tell the host the guest is done, then stop.
 *   1. byte BOOT_TIMER_VALUE to the boot-timer port (vessel records the
 *      boot time);
 *   2. i8042 "pulse reset line" command: vessel's VMM exits the VM on it;
 *   3. a write to QEMU's isa-debug-exit port, which makes QEMU exit
 *      (status (0 << 1) | 1 = 1); other VMMs ignore the port;
 *   4. if nobody stopped the VM, halt forever with interrupts off.
 */
.macro FINISH
    mov     al, BOOT_TIMER_VALUE
    mov     dx, BOOT_TIMER_PORT
    out     dx, al
    mov     al, I8042_CMD_RESET
    out     I8042_COMMAND_PORT, al
    xor     eax, eax
    out     DEBUG_EXIT_PORT, al
.Lfinish_halt\@:
    cli
    hlt
    jmp     .Lfinish_halt\@
.endm

/*
 * OUT_TEXT "text": `mov al, <char>; out dx, al` for each character, two
 * instructions per byte and no loop. The instructions are spelled as raw
 * bytes (B0 ib = mov al, imm8; EE = out dx, al) because gas does not
 * substitute macro arguments inside character constants.
 */
.macro OUT_TEXT text
    .irpc c, "\text"
    .byte   0xb0
    .ascii  "\c"
    .byte   0xee
    .endr
.endm

#endif /* __ASSEMBLER__ */
#endif /* VESSEL_GUESTS_COMMON_H */
