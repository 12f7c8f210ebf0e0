/*
 * count: a guest whose progress shows, for snapshot and restore tests.
 * Prints `vessel test guest: count` on COM1, signals the boot timer, then
 * forever one line per step:
 *
 *   count 0x<16 lowercase hex digits>
 *
 * starting at 0x0000000000000001 and one more each line. The counter is a
 * qword in .data, incremented in memory and printed from memory, so a
 * restore that loses guest memory starts the count again (or prints
 * garbage) and one that loses registers crashes or strays: either shows
 * as a gap in the sequence. Between two lines, a busy wait of
 * COUNT_DELAY_PAUSES `pause` instructions (no exits) spaces them out.
 * Never ends by itself. Memory written: the counter and the stack, both
 * in our own image.
 */
#include "long-mode.h"

    .intel_syntax noprefix

/*
 * Turns of the `pause` loop between two lines. Counted, not timed: a
 * delay read off the TSC would hang or race after a restore that got the
 * TSC wrong, and this guest is for telling such restores apart by their
 * counts alone. On our nested KVM, where this code runs at a few million
 * instructions a second, a turn takes about 0.75 us, and with the 25
 * serial bytes of a line a line comes every 0.8-1.1 ms (1.3-1.5 ms on
 * average over 2 s on a loaded machine, measured 2026-12). On hardware
 * KVM, where a `pause` takes tens of nanoseconds, the loop is over in well
 * under 0.1 ms and the serial port sets the pace.
 */
#define COUNT_DELAY_PAUSES  800

    GUEST_ENTRIES main64

/* main64: nothing of the boot structures is needed. */
main64:
    PRINT   "vessel test guest: count\n"
    mov     al, BOOT_TIMER_VALUE
    mov     dx, BOOT_TIMER_PORT
    out     dx, al

.Lstep:
    inc     qword ptr [rip + counter]
    PRINT   "count "
    mov     rax, [rip + counter]
    call    put_hex
    call    put_newline
    mov     ecx, COUNT_DELAY_PAUSES
1:  pause
    dec     ecx
    jnz     1b
    jmp     .Lstep

    PRINT_ROUTINES

    LONG_MODE_DATA

    .data
    .balign 8
counter:                                /* the last count printed */
    .quad   0
