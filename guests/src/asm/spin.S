/*
 * spin: a guest that never ends by itself, for tests of pause, resume and
 * stop. Prints `vessel test guest: spin` on COM1, signals the boot timer,
 * then writes an ever-increasing byte to port 0x80 forever. Every write is
 * a port-I/O exit, so the VMM's exit counters show whether it is running.
 */
#include "common.h"

    .intel_syntax noprefix

#define SPIN_PORT 0x80

.macro SPIN_BODY
    mov     dx, COM1_PORT
    OUT_TEXT "vessel test guest: spin"
    mov     al, '\n'
    out     dx, al
    mov     al, BOOT_TIMER_VALUE
    mov     dx, BOOT_TIMER_PORT
    out     dx, al
    xor     eax, eax
.Lspin\@:
    inc     al
    out     SPIN_PORT, al
    jmp     .Lspin\@
.endm

    .section .text.head, "ax"

    /* LOAD_ADDR + 0: 32-bit entry (PVH, bzImage code32_start). */
    .code32
    .globl  entry32
entry32:
    SPIN_BODY

    /* LOAD_ADDR + 0x200: 64-bit entry of the Linux boot protocol. */
    .org    ENTRY64_OFFSET, 0xf4
    .code64
    .globl  entry64
entry64:
    SPIN_BODY
