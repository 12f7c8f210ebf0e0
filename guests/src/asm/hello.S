/*
 * hello: the smallest useful guest. Prints one line on COM1, signals the
 * boot timer and stops the VM, as fast as possible: no stack, no page
 * tables, no memory writes at all.
 *
 * On a nested software hypervisor every guest instruction may go through
 * an emulator (see MACHINE-NOTES.md), so the line is written with one
 * `mov`/`out` pair per byte rather than a loop.
 *
 * The same body is expanded twice, once per entry (see common.h for the
 * layout): both entry conventions only need flat segments and the code
 * reachable at its link address.
 */
#include "common.h"

    .intel_syntax noprefix


/*
 * Interrupts are already off at both entries, and nothing here depends on
 * EFLAGS.DF or on any register value.
 */
.macro HELLO_BODY
    mov     dx, COM1_PORT
    OUT_TEXT "vessel test guest: hello"
    mov     al, '\n'
    out     dx, al
    FINISH
.endm

    .section .text.head, "ax"

/*
 * LOAD_ADDR + 0: 32-bit entry (PVH, or the bzImage's code32_start).
 * Protected mode, paging off, flat 4 GiB CS/DS.
 */
    .code32
    .globl  entry32
entry32:
    HELLO_BODY

/*
 * LOAD_ADDR + 0x200: 64-bit entry of the Linux boot protocol. Long mode,
 * identity-mapped low memory, flat segments.
 */
    .org    ENTRY64_OFFSET, 0xf4    /* pad with hlt */
    .code64
    .globl  entry64
entry64:
    HELLO_BODY
