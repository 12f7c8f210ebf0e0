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
 * `pause` instructions between two lines. With the 25 serial bytes of a
 * line (about 12 us each on our nested KVM), one line every ~1 ms here
 * (see the guests crate docs for the measured figure).
 */
#define COUNT_DELAY_PAUSES  20000

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
