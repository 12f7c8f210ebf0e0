/*
 * virtio: a minimal virtio-mmio driver for one virtio-rng device, to prove
 * the VMM's virtio-mmio transport end to end: register file, feature
 * negotiation, queue setup, a notification, the device filling a
 * device-writable buffer, and the used-buffer interrupt through the IOAPIC.
 * Virtio 1.x ("modern"), MMIO register layout version 2 (virtio spec 4.2.2),
 * split virtqueue.
 *
 * The device: `virtio_mmio.device=<size>@<base>:<gsi>` on the command line
 * (the first one; Linux's syntax, base in hex with 0x or decimal, gsi in
 * decimal); without it, base 0xd0000000 and GSI 5. The GSI is an IOAPIC pin,
 * edge-triggered, active high; queue 0 is used with 8 entries (fewer if
 * QueueNumMax is smaller).
 *
 * Output on COM1, every number as 0x + 16 lowercase hex digits:
 *   virtio: magic <MagicValue> version <Version> device <DeviceID>
 *   virtio: features <DeviceFeatures, 64 bits>
 *   virtio: fs tag <tag text> request queues <num_request_queues>
 *                                                      (virtio-fs only)
 *   virtio: queue max <QueueNumMax>                    (each queue set up)
 *   virtio: status <Status after DRIVER_OK>            (expected 0xf)
 *   virtio: irq <interrupts taken> isr <InterruptStatus, ORed over them>
 *     or, when none came within about 2 s:  virtio: no interrupt
 *   virtio: used idx <used.idx> id <used.ring[0].id> len <used.ring[0].len>
 *   virtio: data <buffer bytes 0..7> <bytes 8..15>     (little endian)
 *   virtio: fs init <reply bytes 16..23>               (virtio-fs only:
 *                                                      FUSE major, minor)
 *   virtio: reset status <Status after writing 0>      (expected 0)
 *   done
 * then the boot-timer byte and a reset (FINISH). On a failed check it
 * prints `virtio: error <what>` and goes straight to `done`; an unexpected
 * CPU exception prints `virtio: exception <vector> rip <rip> error <code>`
 * and finishes without `done`.
 *
 * Repeat mode, for snapshot and restore tests: with the word
 * `virtio.repeat` on the command line, and once the first request has had
 * its interrupt, the driver does not reset the device after the `data`
 * line; forever, it offers the same device-writable buffer again (the
 * next avail ring entry, avail.idx + 1), notifies, waits for the
 * interrupt as for the first request, and prints
 *   virtio: again idx <used.idx> data <buffer bytes 0..7>
 * then busy-waits about 1 ms (REPEAT_DELAY_PAUSES) and goes on. A wait
 * that times out prints `virtio: no interrupt` and finishes (FINISH,
 * without `done`). So virtio-rng shows a used index one higher each line
 * and fresh random bytes. Not for virtio-fs (one FUSE_INIT per session):
 * there it prints `virtio: error virtio.repeat is not for virtio-fs`. If
 * the first request had no interrupt, the guest goes on as without the
 * word (reset, `done`).
 *
 * Sequence (virtio spec 3.1.1 and 4.2.3): check magic, version 2 and a
 * non-zero device ID (an empty hotplug slot, ID 0, is read again for
 * about 2 s, until a device is plugged into it); reset (Status = 0, wait for it to read 0);
 * ACKNOWLEDGE; DRIVER; read the device features; accept only
 * VIRTIO_F_VERSION_1; FEATURES_OK and check it stuck; set up queue 0
 * (QueueSel, QueueNumMax, QueueNum, the three ring addresses, QueueReady);
 * DRIVER_OK. Then: interrupts (IDT, 8259s masked, local APIC, IOAPIC
 * entry), one 64-byte device-writable descriptor in the avail ring,
 * avail.idx = 1, QueueNotify = 0, and `sti; hlt` until the interrupt
 * handler has run. The handler reads InterruptStatus, writes it to
 * InterruptACK, sends the local APIC EOI and counts. A periodic local-APIC
 * timer (10 ms on KVM) wakes the wait so that it can give up after about
 * 2 s of TSC (as report.S's AP wait), or after WAIT_WAKES wake-ups if the
 * TSC does not advance. Last, the driver resets the device (Status = 0) and
 * reads Status back, as Linux does on unbind: the device runs on, and any
 * device works, so the same guest drives a vsock device whose receive
 * buffer takes a host's connection request, then resets it mid-connection.
 *
 * A virtio-fs device (ID 26) gets what its driver needs instead: the tag
 * and request-queue count read from its config space (byte and 32-bit
 * reads), queue 0 (high priority, left empty) and queue 1 (requests) set
 * up, and on queue 1 one FUSE_INIT request (a 104-byte device-readable
 * descriptor: fuse_in_header, unique FUSE_UNIQUE, and fuse_init_in 7.31,
 * no flags) chained to a 256-byte device-writable one for the reply,
 * notified on queue 1. The `used` and `data` lines are then queue 1's and
 * the reply's fuse_out_header (len and error, then unique).
 *
 * Register accesses to the device are all 32-bit, as virtio-mmio requires.
 * Instruction count matters (see report.S): no loops but the command-line
 * scan, the bounded waits and one `rep stosq`.
 *
 * Guest-physical memory written: only our own image (see guest.ld; .bss
 * right after .data): the virtqueues, the buffers and the IDT in nine
 * 4 KiB-aligned .bss pages (virtq_desc, virtq_avail, virtq_used,
 * virtio_buffer, fuse_request, hiprio_rings (3), idt, zeroed at start),
 * the stack, and a few variables in
 * .data (the repeat flag and the queue size among them). Nothing below
 * 1 MiB is written. MMIO: the device window, the local
 * APIC (0xfee00000), the IOAPIC (0xfec00000); ports: COM1, the 8259 masks
 * (0x21, 0xa1) and FINISH's ports.
 */
#include "long-mode.h"

    .intel_syntax noprefix

/* The device, unless the command line says otherwise. */
#define DEFAULT_BASE        0xd0000000
#define DEFAULT_GSI         5
#define MMIO_WINDOW         0x1000
#define IOAPIC_PINS         24

/* virtio-mmio registers (virtio spec 4.2.2), all 32-bit. */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000   /* "virt" */
#define VIRTIO_MMIO_VERSION             0x004   /* 2 = modern */
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090   /* the avail ring */
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0   /* the used ring */
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG              0x100   /* the device's config space */

#define VIRTIO_MAGIC        0x74726976  /* "virt", little endian */
#define VIRTIO_MMIO_MODERN  2

/* Device status bits (virtio spec 2.1). */
#define STATUS_ACKNOWLEDGE  1
#define STATUS_DRIVER       2
#define STATUS_DRIVER_OK    4
#define STATUS_FEATURES_OK  8

#define VIRTIO_F_VERSION_1  32          /* feature bit */

/* virtio-fs (virtio spec 5.11) and the FUSE request it carries. */
#define DEVICE_FS           26
#define FS_TAG_LEN          36          /* config: u8 tag[36]; le32 num_request_queues */
#define FUSE_INIT           26          /* opcode */
#define FUSE_UNIQUE         0x5a        /* our request's ID, echoed in the reply */
#define FUSE_IN_HEADER_LEN  40
#define FUSE_INIT_IN_LEN    64          /* major, minor, max_readahead, flags, flags2, unused[11] */
#define FUSE_REPLY_LEN      256         /* the reply buffer */

/* Split virtqueue (virtio spec 2.7). */
#define QUEUE_SIZE          8
#define VIRTQ_DESC_F_NEXT   1
#define VIRTQ_DESC_F_WRITE  2
#define DESC_SIZE           16
#define DESC_ADDR           0           /* struct virtq_desc: u64 */
#define DESC_LEN            8           /* u32 */
#define DESC_FLAGS          12          /* u16 */
#define DESC_NEXT           14          /* u16 */
#define AVAIL_FLAGS         0           /* struct virtq_avail: u16 */
#define AVAIL_IDX           2           /* u16 */
#define AVAIL_RING          4           /* u16[queue size] */
#define USED_IDX            2           /* struct virtq_used: flags u16, idx u16 */
#define USED_RING           4           /* struct virtq_used_elem[]: id u32, len u32 */
#define BUFFER_LEN          64

/* Interrupts. */
#define VECTOR_VIRTIO       0x30
#define VECTOR_TIMER        0x31
#define VECTOR_SPURIOUS     0xff
#define IDT_ENTRIES         256
#define GATE_INTERRUPT      0x8e00      /* present, DPL 0, 64-bit interrupt gate */
#define EXCEPTIONS          32
/* Exceptions that push an error code: 8, 10-14, 17, 21, 29, 30. */
#define ERROR_CODE_VECTORS  0x60227d00
#define PIC1_DATA           0x21        /* 8259 interrupt mask registers */
#define PIC2_DATA           0xa1
#define LAPIC_ID            0x020       /* bits 31:24 */
#define LAPIC_TPR           0x080
#define LAPIC_DIVIDE_BY_16  0x3
#define TIMER_COUNT         625000      /* 10 ms at KVM's 1 GHz APIC bus / 16 */
#define IOAPIC_BASE         0xfec00000
#define IOAPIC_REGSEL       0x00
#define IOAPIC_WINDOW       0x10
#define IOAPIC_REDIRECTION  0x10        /* + 2 * pin: low dword; + 1: high */
/* Redirection entry, low dword: vector, fixed delivery, physical
 * destination, active high, edge, unmasked: the vector alone. */
#define WAIT_TSC_TICKS      5000000000  /* about 2 s at 2.5 GHz */
#define WAIT_WAKES          400         /* 4 s of 10 ms timer ticks */
#define RESET_POLLS         1000
#define DEVICE_POLLS        2000        /* reads of an empty slot's device ID */
#define DEVICE_POLL_PAUSES  100000      /* between two of them */

#define CMDLINE_MAX         4096
/* Repeat mode: turns of a `pause` loop between two requests, about 1 ms on
 * our nested KVM (0.75 us a turn there); with the request's round trip a
 * line every ~2 ms (2-3 ms on average on a loaded machine). Counted, not
 * timed, so that a restored TSC cannot stretch it. */
#define REPEAT_DELAY_PAUSES 1400

/* ERROR "text": print `virtio: error <text>` and end with `done`. */
.macro ERROR text
    PRINT   "virtio: error \text\n"
    jmp     .Ldone
.endm

/* ------------------------------------------------------------------------ */
    GUEST_ENTRIES main64

/*
 * main64: RSI = boot_params or hvm_start_info, EBP = BOOT_* kind.
 * R15 = the device's register window, R14D = its device ID, R13D = the
 * queue that carries the request (0, or 1 for virtio-fs) throughout.
 */
main64:
    mov     rbx, rsi
    mov     r12d, ebp

    /* Zero the virtqueue, the buffer and the IDT (.bss is not loaded). */
    mov     edi, offset bss_pages
    mov     ecx, (bss_pages_end - bss_pages) / 8
    xor     eax, eax
    rep stosq

    call    parse_cmdline
    jc      .Lbad_cmdline
    lea     rdi, [rip + repeat_word]
    call    cmdline_has_word
    mov     [rip + repeat_mode], al
    mov     r15, [rip + virtio_base]

/* --- identify: magic, version, device ID --------------------------------- */
    PRINT   "virtio: magic "
    mov     eax, [r15 + VIRTIO_MMIO_MAGIC_VALUE]
    mov     r8d, eax
    call    put_hex
    PRINT   " version "
    mov     eax, [r15 + VIRTIO_MMIO_VERSION]
    mov     r9d, eax
    call    put_hex
    PRINT   " device "
    mov     eax, [r15 + VIRTIO_MMIO_DEVICE_ID]
    test    eax, eax
    jnz     1f
    call    wait_for_device             /* an empty slot: one may be plugged */
1:  call    put_hex
    call    put_newline
    cmp     r8d, VIRTIO_MAGIC
    jne     .Lno_device
    cmp     r9d, VIRTIO_MMIO_MODERN
    jne     .Lnot_modern
    test    eax, eax
    jz      .Lno_device
    mov     r14d, eax

/* --- reset, ACKNOWLEDGE, DRIVER ---------------------------------------- */
    mov     dword ptr [r15 + VIRTIO_MMIO_STATUS], 0
    mov     ecx, RESET_POLLS
1:  mov     eax, [r15 + VIRTIO_MMIO_STATUS]
    test    eax, eax
    jz      2f
    dec     ecx
    jnz     1b
    ERROR   "reset not complete"
2:  mov     dword ptr [r15 + VIRTIO_MMIO_STATUS], STATUS_ACKNOWLEDGE
    mov     dword ptr [r15 + VIRTIO_MMIO_STATUS], STATUS_ACKNOWLEDGE + STATUS_DRIVER

/* --- features: read all 64, accept VERSION_1 only ----------------------- */
    mov     dword ptr [r15 + VIRTIO_MMIO_DEVICE_FEATURES_SEL], 1
    mov     eax, [r15 + VIRTIO_MMIO_DEVICE_FEATURES]
    shl     rax, 32
    mov     dword ptr [r15 + VIRTIO_MMIO_DEVICE_FEATURES_SEL], 0
    mov     ecx, [r15 + VIRTIO_MMIO_DEVICE_FEATURES]
    or      rax, rcx
    PRINT   "virtio: features "
    call    put_hex
    call    put_newline
    bt      rax, VIRTIO_F_VERSION_1
    jnc     .Lno_version_1
    mov     dword ptr [r15 + VIRTIO_MMIO_DRIVER_FEATURES_SEL], 0
    mov     dword ptr [r15 + VIRTIO_MMIO_DRIVER_FEATURES], 0
    mov     dword ptr [r15 + VIRTIO_MMIO_DRIVER_FEATURES_SEL], 1
    mov     dword ptr [r15 + VIRTIO_MMIO_DRIVER_FEATURES], 1 << (VIRTIO_F_VERSION_1 - 32)
    mov     dword ptr [r15 + VIRTIO_MMIO_STATUS], STATUS_ACKNOWLEDGE + STATUS_DRIVER + STATUS_FEATURES_OK
    mov     eax, [r15 + VIRTIO_MMIO_STATUS]
    test    eax, STATUS_FEATURES_OK
    jz      .Lfeatures_rejected

/* --- virtio-fs: the config space, and the high-priority queue 0 ------- */
    xor     r13d, r13d
    cmp     r14d, DEVICE_FS
    jne     1f
    call    print_fs_config
    xor     ecx, ecx
    mov     edi, offset hiprio_rings
    call    setup_queue
    jc      .Lno_queue
    mov     r13d, 1

/* --- the request queue: 0, or 1 for virtio-fs ------------------------------ */
1:  mov     ecx, r13d
    mov     edi, offset virtq_desc
    call    setup_queue
    jc      .Lno_queue

/* --- DRIVER_OK ---------------------------------------------------------------- */
    mov     dword ptr [r15 + VIRTIO_MMIO_STATUS], STATUS_ACKNOWLEDGE + STATUS_DRIVER + STATUS_FEATURES_OK + STATUS_DRIVER_OK
    mov     eax, [r15 + VIRTIO_MMIO_STATUS]
    PRINT   "virtio: status "
    call    put_hex
    call    put_newline

/* --- interrupts: IDT, 8259s off, local APIC, IOAPIC pin -> VECTOR_VIRTIO -- */
    call    setup_idt
    mov     al, 0xff                    /* mask every 8259 input: the GSI */
    out     PIC1_DATA, al               /* also reaches the master 8259, */
    out     PIC2_DATA, al               /* which LINT0 (ExtINT) may pass on */
    mov     edi, LAPIC_BASE
    mov     dword ptr [rdi + LAPIC_TPR], 0
    mov     eax, [rdi + LAPIC_SVR]
    mov     al, VECTOR_SPURIOUS
    or      eax, LAPIC_SVR_ENABLE
    mov     [rdi + LAPIC_SVR], eax
    mov     edx, [rdi + LAPIC_ID]       /* destination: ourselves */
    and     edx, 0xff000000             /* bits 63:56 of the entry */
    mov     ecx, [rip + virtio_gsi]
    lea     ecx, [IOAPIC_REDIRECTION + 2 * rcx]
    mov     edi, IOAPIC_BASE
    lea     eax, [rcx + 1]              /* high dword first, while masked */
    mov     [rdi + IOAPIC_REGSEL], eax
    mov     [rdi + IOAPIC_WINDOW], edx
    mov     [rdi + IOAPIC_REGSEL], ecx
    mov     dword ptr [rdi + IOAPIC_WINDOW], VECTOR_VIRTIO

/* --- one request (a device-writable buffer, or FUSE_INIT), notified ----- */
    cmp     r14d, DEVICE_FS
    jne     1f
    call    build_fuse_init
    jmp     2f
1:  mov     edi, offset virtq_desc      /* descriptor 0 */
    mov     eax, offset virtio_buffer
    mov     [rdi + DESC_ADDR], rax
    mov     dword ptr [rdi + DESC_LEN], BUFFER_LEN
    mov     word ptr [rdi + DESC_FLAGS], VIRTQ_DESC_F_WRITE
    mov     word ptr [rdi + DESC_NEXT], 0
2:  mov     edi, offset virtq_avail
    mov     word ptr [rdi + AVAIL_RING], 0      /* ring[0] = descriptor 0 */
    mfence                              /* the entry before the index */
    mov     word ptr [rdi + AVAIL_IDX], 1
    mfence                              /* the index before the notify */
    call    notify_and_wait
    test    eax, eax
    jnz     1f
    PRINT   "virtio: no interrupt\n"
    jmp     2f
1:  PRINT   "virtio: irq "
    call    put_hex
    PRINT   " isr "
    mov     eax, [rip + irq_isr]
    call    put_hex
    call    put_newline
2:

/* --- what the device did: the used ring and the buffer ------------------ */
    mov     edi, offset virtq_used
    PRINT   "virtio: used idx "
    movzx   eax, word ptr [rdi + USED_IDX]
    call    put_hex
    PRINT   " id "
    mov     eax, [rdi + USED_RING]      /* used.ring[0].id */
    call    put_hex
    PRINT   " len "
    mov     eax, [rdi + USED_RING + 4]  /* used.ring[0].len */
    call    put_hex
    call    put_newline
    mov     edi, offset virtio_buffer
    PRINT   "virtio: data "
    mov     rax, [rdi]
    call    put_hex
    call    put_space
    mov     rax, [rdi + 8]
    call    put_hex
    call    put_newline
    cmp     r14d, DEVICE_FS
    jne     1f
    PRINT   "virtio: fs init "
    mov     rax, [rdi + 16]             /* fuse_init_out: major, minor */
    call    put_hex
    call    put_newline
1:  cmp     byte ptr [rip + repeat_mode], 0
    je      1f
    cmp     r14d, DEVICE_FS
    je      .Lrepeat_fs
    cmp     dword ptr [rip + irq_count], 0
    jne     .Lrepeat                    /* never comes back */
1:

/* --- reset: the driver lets go of the device, as unbind or kexec do ------ */
    mov     dword ptr [r15 + VIRTIO_MMIO_STATUS], 0
    mov     eax, [r15 + VIRTIO_MMIO_STATUS]
    PRINT   "virtio: reset status "
    call    put_hex
    call    put_newline

.Ldone:
    PRINT   "done\n"
    FINISH

.Lbad_cmdline:
    ERROR   "bad virtio_mmio.device"
.Lno_device:
    ERROR   "no virtio device"
.Lnot_modern:
    ERROR   "not a version 2 (modern) device"
.Lno_version_1:
    ERROR   "VIRTIO_F_VERSION_1 not offered"
.Lfeatures_rejected:
    PRINT   "virtio: error FEATURES_OK not kept, status "
    call    put_hex
    call    put_newline
    jmp     .Ldone
.Lno_queue:
    ERROR   "queue not available"
.Lrepeat_fs:
    ERROR   "virtio.repeat is not for virtio-fs"

/* --- repeat mode: the same buffer again, forever -------------------------- */
/*
 * The next avail ring entry (avail.idx modulo the queue size) gets
 * descriptor 0, still the 64-byte device-writable buffer; avail.idx + 1;
 * notify and wait; print the used index and the buffer's first 8 bytes;
 * a short busy wait; again. Only a wait that times out ends it.
 */
.Lrepeat:
    mov     edi, offset virtq_avail
    movzx   eax, word ptr [rdi + AVAIL_IDX]
    mov     r8d, eax                    /* R8D = avail.idx before */
    xor     edx, edx
    div     dword ptr [rip + queue_num] /* EDX = the ring entry */
    mov     word ptr [rdi + AVAIL_RING + 2 * rdx], 0    /* descriptor 0 */
    mfence                              /* the entry before the index */
    inc     r8d
    mov     [rdi + AVAIL_IDX], r8w      /* wraps at 16 bits, as it must */
    mfence                              /* the index before the notify */
    mov     dword ptr [rip + irq_count], 0
    call    notify_and_wait
    test    eax, eax
    jz      .Lrepeat_no_interrupt
    PRINT   "virtio: again idx "
    mov     edi, offset virtq_used
    movzx   eax, word ptr [rdi + USED_IDX]
    call    put_hex
    PRINT   " data "
    mov     rax, [rip + virtio_buffer]
    call    put_hex
    call    put_newline
    mov     ecx, REPEAT_DELAY_PAUSES
1:  pause
    dec     ecx
    jnz     1b
    jmp     .Lrepeat
.Lrepeat_no_interrupt:
    PRINT   "virtio: no interrupt\n"
    FINISH

/* ------------------------------------------------------------------------ */
/*
 * notify_and_wait: starts the wake-up timer, notifies queue R13D, and
 * waits with `sti; hlt` until the interrupt handler has counted an
 * interrupt, about 2 s of TSC have passed, or WAIT_WAKES wake-ups came.
 * Returns with interrupts off, the timer stopped and EAX = irq_count.
 * Clobbers RDX, RDI, R9, R10 and flags.
 */
notify_and_wait:
    mov     edi, LAPIC_BASE
    mov     dword ptr [rdi + LAPIC_TIMER_DIVIDE], LAPIC_DIVIDE_BY_16
    mov     dword ptr [rdi + LAPIC_LVT_TIMER], LVT_TIMER_PERIODIC + VECTOR_TIMER
    mov     dword ptr [rdi + LAPIC_TIMER_INITIAL], TIMER_COUNT
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     r9, WAIT_TSC_TICKS
    add     r9, rax                     /* R9 = deadline */
    mov     r10d, WAIT_WAKES
    mov     [r15 + VIRTIO_MMIO_QUEUE_NOTIFY], r13d
1:  cli
    cmp     dword ptr [rip + irq_count], 0
    jne     2f
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, r9
    jae     2f
    dec     r10d
    jz      2f
    sti                                 /* sti; hlt: no interrupt slips */
    hlt                                 /* in between (STI's shadow) */
    jmp     1b
2:  mov     edi, LAPIC_BASE             /* interrupts are off: stop the timer */
    mov     dword ptr [rdi + LAPIC_LVT_TIMER], LVT_MASKED + VECTOR_TIMER
    mov     dword ptr [rdi + LAPIC_TIMER_INITIAL], 0
    mov     eax, [rip + irq_count]
    ret

/*
 * wait_for_device: EAX = the device ID, read again until it is not 0 (a
 * device hot-plugged into the empty slot), for about 2 s of TSC or
 * DEVICE_POLLS reads, whichever ends first; 0 if none came. Keeps every
 * register but RAX and flags.
 */
wait_for_device:
    push    rcx
    push    rdx
    push    r9
    push    r10
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     r9, WAIT_TSC_TICKS
    add     r9, rax                     /* R9 = deadline */
    mov     r10d, DEVICE_POLLS
1:  mov     ecx, DEVICE_POLL_PAUSES     /* not an MMIO exit every instruction */
2:  pause
    dec     ecx
    jnz     2b
    mov     eax, [r15 + VIRTIO_MMIO_DEVICE_ID]
    test    eax, eax
    jnz     3f
    dec     r10d
    jz      3f
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    cmp     rax, r9
    jb      1b
    xor     eax, eax
3:  pop     r10
    pop     r9
    pop     rdx
    pop     rcx
    ret

/*
 * setup_queue: ECX = queue index, EDI = its rings: three 4 KiB pages below
 * 4 GiB (descriptors, avail ring, used ring). Prints `virtio: queue max`;
 * sets CF if the device has no such queue. Keeps every register but RAX,
 * RCX and flags.
 */
setup_queue:
    mov     [r15 + VIRTIO_MMIO_QUEUE_SEL], ecx
    mov     eax, [r15 + VIRTIO_MMIO_QUEUE_NUM_MAX]
    PRINT   "virtio: queue max "
    call    put_hex
    call    put_newline
    test    eax, eax
    jz      1f
    mov     ecx, QUEUE_SIZE
    cmp     eax, ecx
    cmovb   ecx, eax                    /* a smaller maximum: use it */
    mov     [r15 + VIRTIO_MMIO_QUEUE_NUM], ecx
    mov     [rip + queue_num], ecx      /* the last queue set up: the request queue */
    mov     [r15 + VIRTIO_MMIO_QUEUE_DESC_LOW], edi   /* high halves 0 */
    mov     dword ptr [r15 + VIRTIO_MMIO_QUEUE_DESC_HIGH], 0
    lea     eax, [rdi + 4096]
    mov     [r15 + VIRTIO_MMIO_QUEUE_DRIVER_LOW], eax
    mov     dword ptr [r15 + VIRTIO_MMIO_QUEUE_DRIVER_HIGH], 0
    lea     eax, [rdi + 8192]
    mov     [r15 + VIRTIO_MMIO_QUEUE_DEVICE_LOW], eax
    mov     dword ptr [r15 + VIRTIO_MMIO_QUEUE_DEVICE_HIGH], 0
    mov     dword ptr [r15 + VIRTIO_MMIO_QUEUE_READY], 1
    clc
    ret
1:  stc
    ret

/*
 * print_fs_config: `virtio: fs tag <tag> request queues <n>`; the tag's
 * bytes read one at a time up to the first NUL (at most FS_TAG_LEN).
 */
print_fs_config:
    push    rax
    push    rcx
    PRINT   "virtio: fs tag "
    xor     ecx, ecx
1:  mov     al, [r15 + VIRTIO_MMIO_CONFIG + rcx]
    test    al, al
    jz      2f
    call    putc
    inc     ecx
    cmp     ecx, FS_TAG_LEN
    jb      1b
2:  PRINT   " request queues "
    mov     eax, [r15 + VIRTIO_MMIO_CONFIG + FS_TAG_LEN]
    call    put_hex
    call    put_newline
    pop     rcx
    pop     rax
    ret

/*
 * build_fuse_init: FUSE_INIT in fuse_request (the rest of the page is
 * zero), descriptor 0 (device-readable, the request) chained to
 * descriptor 1 (device-writable, the reply in virtio_buffer).
 */
build_fuse_init:
    push    rax
    push    rdi
    mov     edi, offset fuse_request
    mov     dword ptr [rdi], FUSE_IN_HEADER_LEN + FUSE_INIT_IN_LEN  /* len */
    mov     dword ptr [rdi + 4], FUSE_INIT                          /* opcode */
    mov     qword ptr [rdi + 8], FUSE_UNIQUE                        /* unique */
    mov     dword ptr [rdi + FUSE_IN_HEADER_LEN], 7                 /* major */
    mov     dword ptr [rdi + FUSE_IN_HEADER_LEN + 4], 31            /* minor */
    mov     edi, offset virtq_desc
    mov     eax, offset fuse_request
    mov     [rdi + DESC_ADDR], rax
    mov     dword ptr [rdi + DESC_LEN], FUSE_IN_HEADER_LEN + FUSE_INIT_IN_LEN
    mov     word ptr [rdi + DESC_FLAGS], VIRTQ_DESC_F_NEXT
    mov     word ptr [rdi + DESC_NEXT], 1
    mov     eax, offset virtio_buffer
    mov     [rdi + DESC_SIZE + DESC_ADDR], rax
    mov     dword ptr [rdi + DESC_SIZE + DESC_LEN], FUSE_REPLY_LEN
    mov     word ptr [rdi + DESC_SIZE + DESC_FLAGS], VIRTQ_DESC_F_WRITE
    mov     word ptr [rdi + DESC_SIZE + DESC_NEXT], 0
    pop     rdi
    pop     rax
    ret

/* ------------------------------------------------------------------------ */
/*
 * parse_cmdline: RBX = boot pointer, R12 = BOOT_* kind. Finds the first
 * `virtio_mmio.device=<size>@<base>:<gsi>` (at the start or after a space)
 * and stores base and GSI in virtio_base and virtio_gsi; leaves the
 * defaults there if the command line or the parameter is missing. Sets CF
 * if the parameter is malformed or unusable (base 0, not 4-byte aligned or
 * its 4 KiB not below 4 GiB, GSI not a pin of the first IOAPIC). The size
 * is skipped: the registers we use all lie in the first 0x100 bytes.
 */
parse_cmdline:
    CMDLINE_POINTER
    test    rsi, rsi
    jz      .Lparse_default
    mov     rax, rsi
    shr     rax, 32
    jnz     .Lparse_default             /* not mapped: cannot read it */
    lea     r8, [rsi + CMDLINE_MAX]     /* R8 = the end, at most */

    /* RSI = the start of a word: does the key follow? */
.Lparse_word:
    lea     rdi, [rip + cmdline_key]
    mov     rdx, rsi
3:  mov     al, [rdi]
    test    al, al
    jz      .Lparse_value               /* the whole key matched */
    cmp     rdx, r8
    jae     .Lparse_default
    cmp     al, [rdx]
    jne     4f
    inc     rdi
    inc     rdx
    jmp     3b
4:  /* No: skip to after the next space. */
    cmp     rsi, r8
    jae     .Lparse_default
    mov     al, [rsi]
    inc     rsi
    test    al, al
    jz      .Lparse_default
    cmp     al, ' '
    jne     4b
    jmp     .Lparse_word

    /* RDX = the value: <size> '@' <base> ':' <gsi>. */
.Lparse_value:
    mov     rsi, rdx
5:  cmp     rsi, r8                     /* skip the size */
    jae     .Lparse_bad
    lodsb
    cmp     al, '@'
    je      6f
    cmp     al, ' '
    jbe     .Lparse_bad
    jmp     5b
6:  call    parse_number
    jc      .Lparse_bad
    mov     rdx, rax                    /* RDX = base */
    cmp     byte ptr [rsi], ':'
    jne     .Lparse_bad
    inc     rsi
    call    parse_number
    jc      .Lparse_bad
    cmp     rax, IOAPIC_PINS
    jae     .Lparse_bad
    test    edx, 3                      /* 32-bit registers */
    jnz     .Lparse_bad
    test    rdx, rdx
    jz      .Lparse_bad
    mov     rcx, 0x100000000 - MMIO_WINDOW
    cmp     rdx, rcx
    ja      .Lparse_bad
    mov     [rip + virtio_base], rdx
    mov     [rip + virtio_gsi], eax
.Lparse_default:
    clc
    ret
.Lparse_bad:
    stc
    ret

/*
 * cmdline_has_word: RBX = boot pointer, R12 = BOOT_* kind, RDI = a
 * NUL-terminated word. EAX = 1 if the command line holds that word whole
 * (between the start or a space and a space, a control character or the
 * end), else 0. Keeps every register but RAX and flags.
 */
cmdline_has_word:
    push    rdx
    push    rsi
    push    r8
    push    r11
    CMDLINE_POINTER
    test    rsi, rsi
    jz      .Lword_absent
    mov     rax, rsi
    shr     rax, 32
    jnz     .Lword_absent               /* not mapped: cannot read it */
    lea     r8, [rsi + CMDLINE_MAX]     /* R8 = the end, at most */
    /* RSI = the start of a word: is it ours? */
.Lword_start:
    mov     r11, rdi
    mov     rdx, rsi
1:  mov     al, [r11]
    test    al, al
    jz      3f                          /* all of ours matched */
    cmp     rdx, r8
    jae     .Lword_absent
    cmp     al, [rdx]
    jne     4f
    inc     r11
    inc     rdx
    jmp     1b
3:  cmp     rdx, r8                     /* and the word ends there? */
    jae     .Lword_present
    cmp     byte ptr [rdx], ' '
    jbe     .Lword_present
4:  /* No: skip to after the next space. */
    cmp     rsi, r8
    jae     .Lword_absent
    mov     al, [rsi]
    inc     rsi
    test    al, al
    jz      .Lword_absent
    cmp     al, ' '
    jne     4b
    jmp     .Lword_start
.Lword_present:
    mov     eax, 1
    jmp     5f
.Lword_absent:
    xor     eax, eax
5:  pop     r11
    pop     r8
    pop     rsi
    pop     rdx
    ret

/*
 * parse_number: RSI = text; RAX = the number there, hex after "0x",
 * else decimal; RSI = after it. CF set if there are no digits.
 */
parse_number:
    push    rcx
    push    rdx
    xor     eax, eax
    mov     edx, 10                     /* RDX = base */
    cmp     word ptr [rsi], 'x' << 8 | '0'
    jne     1f
    add     rsi, 2
    mov     edx, 16
1:  mov     r11, rsi                    /* R11 = where the digits start */
2:  movzx   ecx, byte ptr [rsi]
    sub     ecx, '0'
    cmp     ecx, 9
    jbe     3f
    cmp     edx, 16
    jne     4f
    movzx   ecx, byte ptr [rsi]
    or      ecx, 0x20                   /* lower case */
    sub     ecx, 'a'
    cmp     ecx, 5
    ja      4f
    add     ecx, 10
3:  imul    rax, rdx
    add     rax, rcx
    inc     rsi
    jmp     2b
4:  cmp     rsi, r11                    /* CF = no digits (RSI == R11) */
    je      5f
    clc
    pop     rdx
    pop     rcx
    ret
5:  stc
    pop     rdx
    pop     rcx
    ret

/*
 * setup_idt: gates for the exceptions (exception_stubs), VECTOR_VIRTIO,
 * VECTOR_TIMER and VECTOR_SPURIOUS in the (zeroed) IDT, then LIDT. The
 * gates use the code segment we run on (ours or the VMM's).
 */
setup_idt:
    mov     edi, offset idt
    mov     eax, offset exception_stubs
    mov     ecx, EXCEPTIONS
1:  call    set_gate
    add     rdi, 16
    add     eax, 8                      /* stubs are 8 bytes apart */
    dec     ecx
    jnz     1b
    mov     edi, offset idt + 16 * VECTOR_VIRTIO
    mov     eax, offset virtio_interrupt
    call    set_gate
    mov     edi, offset idt + 16 * VECTOR_TIMER
    mov     eax, offset timer_interrupt
    call    set_gate
    mov     edi, offset idt + 16 * VECTOR_SPURIOUS
    mov     eax, offset spurious_interrupt
    call    set_gate
    lidt    [rip + idt_descriptor]
    ret

/* set_gate: RDI = IDT entry, EAX = handler (below 4 GiB); keeps RAX. */
set_gate:
    push    rdx
    mov     [rdi], ax                   /* offset 15:0 */
    mov     dx, cs
    mov     [rdi + 2], dx               /* selector */
    mov     word ptr [rdi + 4], GATE_INTERRUPT
    mov     edx, eax
    shr     edx, 16
    mov     [rdi + 6], dx               /* offset 31:16 */
    mov     qword ptr [rdi + 8], 0      /* offset 63:32, reserved */
    pop     rdx
    ret

/*
 * virtio_interrupt: the device's interrupt. Reads InterruptStatus,
 * acknowledges exactly those bits, ends the interrupt at the local APIC,
 * counts it.
 */
virtio_interrupt:
    push    rax
    push    rdi
    mov     rdi, [rip + virtio_base]
    mov     eax, [rdi + VIRTIO_MMIO_INTERRUPT_STATUS]
    mov     [rdi + VIRTIO_MMIO_INTERRUPT_ACK], eax
    or      [rip + irq_isr], eax
    inc     dword ptr [rip + irq_count]
    mov     edi, LAPIC_BASE
    mov     dword ptr [rdi + LAPIC_EOI], 0
    pop     rdi
    pop     rax
    iretq

/* timer_interrupt: only wakes the wait loop. */
timer_interrupt:
    push    rdi
    mov     edi, LAPIC_BASE
    mov     dword ptr [rdi + LAPIC_EOI], 0
    pop     rdi
    iretq

/* spurious_interrupt: no EOI for the spurious vector. */
spurious_interrupt:
    iretq

/*
 * exception_stubs: one 8-byte stub per exception vector, pushing its
 * number. exception_common prints it with the faulting RIP and the error
 * code (0 if the exception has none) and finishes.
 */
    .balign 8
exception_stubs:
    .set    vector, 0
    .rept   EXCEPTIONS
    .balign 8
    push    vector
    jmp     exception_common
    .set    vector, vector + 1
    .endr

exception_common:
    pop     rax                         /* the vector */
    xor     edx, edx
    mov     ecx, ERROR_CODE_VECTORS
    bt      ecx, eax
    jnc     1f
    pop     rdx                         /* the error code */
1:  PRINT   "virtio: exception "
    call    put_hex
    PRINT   " rip "
    mov     rax, [rsp]
    call    put_hex
    PRINT   " error "
    mov     rax, rdx
    call    put_hex
    call    put_newline
    FINISH

    PRINT_ROUTINES

    .section .rodata
cmdline_key:
    .asciz  "virtio_mmio.device="
repeat_word:
    .asciz  "virtio.repeat"

/* ------------------------------------------------------------------------ */
    LONG_MODE_DATA

    .data
    .balign 8
virtio_base:                            /* the device's register window */
    .quad   DEFAULT_BASE
virtio_gsi:                             /* its IOAPIC pin */
    .long   DEFAULT_GSI
irq_count:                              /* virtio interrupts taken */
    .long   0
irq_isr:                                /* InterruptStatus, ORed */
    .long   0
queue_num:                              /* the request queue's size */
    .long   QUEUE_SIZE
repeat_mode:                            /* 1: `virtio.repeat` given */
    .byte   0
    .balign 8
idt_descriptor:
    .word   IDT_ENTRIES * 16 - 1
    .quad   idt

/* Zeroed by main64: the virtqueues, the buffers, the IDT. */
    .bss
    .balign 4096
bss_pages:
virtq_desc:                             /* struct virtq_desc[QUEUE_SIZE] */
    .skip   4096
virtq_avail:                            /* struct virtq_avail */
    .skip   4096
virtq_used:                             /* struct virtq_used */
    .skip   4096
virtio_buffer:                          /* the device-writable buffer */
    .skip   4096
fuse_request:                           /* virtio-fs: the FUSE_INIT request */
    .skip   4096
hiprio_rings:                           /* virtio-fs: queue 0's three pages */
    .skip   3 * 4096
idt:
    .skip   IDT_ENTRIES * 16
bss_pages_end:
