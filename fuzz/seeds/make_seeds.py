#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets that need structure to get
anywhere (rings and descriptors, handshakes, netlink messages, tar layers,
kernel headers) into fuzz/seeds/<target>/. Run from anywhere; the seeds are
committed, so this only needs running again when an input format changes.
scripts/fuzz.sh passes each target's seeds to cargo fuzz run."""

import io
import os
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))

# vessel_fuzz::memory / vessel_fuzz::queue: 64 KiB of guest memory from the
# input; a queue of 16 at `base`: descriptors, then avail (+0x100) and used
# (+0x200) rings.
MEM_SIZE = 0x10000
NEXT, WRITE, INDIRECT = 1, 2, 4


class Memory:
    def __init__(self, size=MEM_SIZE):
        self.b = bytearray(size)
        self.top = 0

    def put(self, addr, data):
        self.b[addr:addr + len(data)] = data
        self.top = max(self.top, addr + len(data))

    def desc(self, table, index, addr, length, flags=0, nxt=0):
        self.put(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def avail(self, ring, heads):
        self.put(ring, struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads))

    def bytes(self):
        return bytes(self.b[:max(self.top, 0x400)])


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# virtio_net: [units][units*8 bytes of host frames: len byte + bytes][memory]
def net():
    frame = bytes(12) + bytes.fromhex("ffffffffffff020000000002") + b"\x08\x00" + b"x" * 36
    frames = bytes([len(frame)]) + frame
    frames += bytes(-len(frames) % 8)
    m = Memory()
    m.desc(0, 0, 0x2000, 2048, WRITE)                 # rx: one buffer
    m.avail(0x100, [0])
    m.put(0x3000, bytes(12) + frame[12:])             # tx: a frame with its header
    m.desc(0x400, 0, 0x3000, 12, NEXT, 1)
    m.desc(0x400, 1, 0x3010, len(frame) - 12, 0)
    m.put(0x3010, frame[12:])
    m.desc(0x400, 2, 0x3100, 4, 0)                    # a runt
    m.avail(0x500, [0, 2])
    write("virtio_net", "frames-both-ways", bytes([len(frames) // 8]) + frames + m.bytes())


# vsock_host: [n][n bytes the host writes][memory: rx at 0, tx at 0x400]
def vsock_header(src_port, dst_port, op, length=0, flags=0, src_cid=3, dst_cid=2, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd_cnt)


REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
HOST_PORT = 1 << 30


def vsock_memory(packets):
    m = Memory()
    for i in range(4):                                # rx buffers
        m.desc(0, i, 0x2000 + 0x1000 * i, 0x1000, WRITE)
    m.avail(0x100, [0, 1, 2, 3])
    for i, p in enumerate(packets):
        m.put(0x8000 + 0x100 * i, p)
        m.desc(0x400, i, 0x8000 + 0x100 * i, len(p), 0)
    m.avail(0x500, list(range(len(packets))))
    return m.bytes()


def vsock():
    script = b"CONNECT 1234\nhello from the host"
    packets = [
        vsock_header(1234, HOST_PORT, RESPONSE),
        vsock_header(1234, HOST_PORT, RW, 4) + b"ping",
        vsock_header(1234, HOST_PORT, CREDIT_REQUEST),
        vsock_header(1234, HOST_PORT, SHUTDOWN, flags=2),
    ]
    write("vsock_host", "host-connects", bytes([len(script)]) + script + vsock_memory(packets))
    script = b"\nhello from the listener"
    packets = [
        vsock_header(5000, 1024, REQUEST),
        vsock_header(5000, 1024, RW, 2) + b"hi",
        vsock_header(5000, 1024, CREDIT_UPDATE),
        vsock_header(5001, 1025, REQUEST),
    ]
    write("vsock_host", "guest-connects", bytes([len(script)]) + script + vsock_memory(packets))
    script = b"CONNECT 4294967296\n"
    write("vsock_host", "bad-handshake", bytes([len(script)]) + script + vsock_memory([vsock_header(1, 2, RST)]))


# chain_reader, answer_all: [size exp][table:3][avail:3][used:3][memory, region by region]
def chains():
    m = Memory(0x4000 + 0x2000 + 0x1000)
    t = 0x100
    m.desc(t, 0, 0x1000, 16, NEXT, 1)                 # readable then writable
    m.desc(t, 1, 0x4ff0, 32, WRITE | NEXT, 2)         # in the second region
    m.desc(t, 2, 0x1000, 0, WRITE)                    # empty
    m.desc(t, 3, 0x3ff0, 32, 0)                       # across adjacent regions
    m.desc(t, 4, 0x1000, 8, WRITE | NEXT, 5)          # readable after writable
    m.desc(t, 5, 0x1000, 8, 0)
    m.desc(t, 6, 0x800, 3 * 16, INDIRECT)             # an indirect table
    m.desc(0x800, 0, 0x1100, 10, NEXT, 1)
    m.desc(0x800, 1, 0x5000, 10, WRITE | NEXT, 2)
    m.desc(0x800, 2, 0x7000, 10, WRITE)               # in the gap
    m.desc(t, 7, 0x1200, 4, NEXT, 7)                  # a loop
    m.avail(0x300, [0, 3, 4, 6, 7, 20])
    m.top = max(m.top, 0x6000)
    head = bytes([4]) + struct.pack("<I", t)[:3] + struct.pack("<I", 0x300)[:3] + struct.pack("<I", 0x400)[:3]
    for target in ("chain_reader", "answer_all"):
        write(target, "every-kind-of-chain", head + m.bytes())
    # The table across the two adjacent regions: every chain takes the slow walk.
    head = bytes([2]) + struct.pack("<I", 0x3ff0)[:3] + struct.pack("<I", 0x300)[:3] + struct.pack("<I", 0x400)[:3]
    m.desc(0x3ff0, 0, 0x1000, 16, 0)
    m.desc(0x3ff0, 1, 0x1000, 16, WRITE)
    m.avail(0x300, [0, 1])
    for target in ("chain_reader", "answer_all"):
        write(target, "table-across-regions", head + m.bytes())


# legacy_bus: ops (see the target)
def bus():
    def rw(write_, size_log, addr, value=0, near=False):
        op = (1 if write_ else 0) | size_log << 2 | (0x10 if near else 0)
        out = bytes([op]) + struct.pack("<H", addr)
        return out + (struct.pack("<Q", value) if write_ else b"")

    ops = b"".join([
        rw(True, 0, 0x3f8, ord("A")), rw(False, 0, 0x3fd), rw(True, 0, 0x3fb, 0x80), rw(True, 1, 0x3f8, 1),
        rw(True, 0, 0x3fb, 0x03), rw(True, 0, 0x3f9, 0x0f), rw(False, 0, 0x3fa), rw(False, 2, 0x3fc),
        rw(True, 0, 0x64, 0x20), rw(False, 0, 0x60), rw(True, 0, 0x64, 0xaa), rw(False, 0, 0x60),
        rw(True, 0, 0x64, 0x60), rw(True, 0, 0x60, 0x47), rw(True, 0, 0x64, 0xfe), rw(False, 0, 0x64),
        rw(True, 0, 0x440, 123), rw(False, 0, 0x441), rw(False, 3, 0x3fc),
        bytes([2]) + struct.pack("<QQ", 0x1000, 0x10), rw(True, 2, 4, 0xdeadbeef, near=True),
        rw(False, 2, 4, near=True), rw(False, 3, 0xc, near=True),
        bytes([2]) + struct.pack("<QQ", 0x1008, 0x10), bytes([2]) + struct.pack("<QQ", 2**64 - 8, 0x10),
        bytes([3 | 0x10]), bytes([3]) + struct.pack("<H", 0x60), rw(False, 0, 0x60),
    ])
    write("legacy_bus", "every-device", ops)


# vhost_user_proxy: the frontend's byte stream
def vhost():
    def msg(request, flags=1, payload=b""):
        return struct.pack("<III", request, flags, len(payload)) + payload

    stream = b"".join([
        msg(1), msg(3), msg(15, payload=struct.pack("<Q", 0)),
        msg(18, 1 | 8, struct.pack("<II", 0, 1)), msg(18, 1, struct.pack("<II", 1, 1)),
        msg(2, payload=struct.pack("<Q", 1 << 30)), msg(18, 1 | 8, struct.pack("<II", 0, 0)),
        msg(21), msg(24, payload=bytes(40)),
    ])
    write("vhost_user_proxy", "early-enables", stream)
    write("vhost_user_proxy", "too-many-held", msg(18, 9, bytes(8)) * 66 + msg(2, payload=bytes(8)))


# netlink: a receive buffer of rtnetlink messages
def netlink():
    def attr(kind, data):
        a = struct.pack("<HH", 4 + len(data), kind) + data
        return a + bytes(-len(a) % 4)

    def nlmsg(kind, payload):
        m = struct.pack("<IHHII", 16 + len(payload), kind, 2, 1, 0) + payload
        return m + bytes(-len(m) % 4)

    link = struct.pack("<BBHiII", 0, 0, 1, 2, 1, 0) + attr(3, b"eth0\0") + attr(1, bytes.fromhex("020000000001")) + attr(4, struct.pack("<I", 1500))
    addr = struct.pack("<BBBBI", 2, 24, 0, 0, 2) + attr(1, bytes([10, 0, 0, 2])) + attr(2, bytes([10, 0, 0, 2]))
    addr6 = struct.pack("<BBBBI", 10, 64, 0, 0, 2) + attr(1, bytes(15) + b"\1")
    route = struct.pack("<BBBBBBBBI", 2, 0, 0, 0, 254, 4, 0, 1, 0) + attr(5, bytes([10, 0, 0, 1])) + attr(4, struct.pack("<I", 2)) + attr(15, struct.pack("<I", 254))
    kernel = struct.pack("<BBBBBBBBI", 2, 24, 0, 0, 254, 2, 253, 1, 0) + attr(1, bytes([10, 0, 0, 0])) + attr(7, bytes([10, 0, 0, 2])) + attr(4, struct.pack("<I", 2))
    buf = nlmsg(16, link) + nlmsg(20, addr) + nlmsg(20, addr6) + nlmsg(24, route) + nlmsg(24, kernel) + nlmsg(3, struct.pack("<i", 0))
    write("netlink", "dump-replies", buf)
    write("netlink", "error", nlmsg(2, struct.pack("<i", -17) + bytes(16)))


# oci_layers: [count][u16 len + layer]...[last layer]
def layer(entries, fmt=tarfile.PAX_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for name, kind, mode, uid, data in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid = mode, uid, uid
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, data
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, data
            else:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return out.getvalue()


def layers(*ls):
    out = bytes([len(ls) - 1])
    for l in ls[:-1]:
        out += struct.pack("<H", len(l)) + l
    return out + ls[-1]


def oci():
    base = layer([
        ("bin", "dir", 0o755, 0, b""), ("bin/sh", "file", 0o4755, 0, b"#!"), ("sbin", "sym", 0o777, 0, "bin"),
        ("bin/sh2", "hard", 0o4755, 0, "bin/sh"), ("home/u", "dir", 0o700, 999, b""),
        ("home/u/notes", "file", 0o640, 999, b"mine"), ("etc/gone", "file", 0o644, 0, b"x"),
        ("var/cache/a", "file", 0o644, 0, b"a"), ("tmp", "dir", 0o1777, 0, b""), ("./", "dir", 0o755, 0, b""),
    ])
    top = layer([
        ("etc/.wh.gone", "file", 0o644, 0, b""), ("var/cache/b", "file", 0o644, 0, b"b"),
        ("var/cache/.wh..wh..opq", "file", 0o644, 0, b""), ("sbin/su", "file", 0o4755, 0, b"su"),
        ("g", "file", 0o644, 0, b"g"), (".wh.g", "file", 0o644, 0, b""),
    ], tarfile.GNU_FORMAT)
    replace = layer([("usr/bin/sh", "file", 0o755, 0, b"new"), ("bin", "sym", 0o777, 0, "usr/bin"),
                     ("var/cache", "file", 0o600, 0, b"a file now"), ("home/u/notes", "dir", 0o755, 0, b"")])
    write("oci_layers", "layers-and-whiteouts", layers(base, top, replace))
    links = [("etc", "sym", 0o777, 0, "/tmp"), ("up", "sym", 0o777, 0, "../.."), ("d/f", "file", 0o644, 0, b"")]
    for n, evil in enumerate([
        ("etc/.wh.keep", "file", 0, 0, b""), ("../escape", "file", 0o644, 0, b"e"), ("up/x", "file", 0o644, 0, b"x"),
        ("l", "hard", 0o644, 0, "../outside/keep"), ("d/.wh..", "file", 0, 0, b""),
        ("up/.wh..wh..opq", "file", 0, 0, b""), ("up/outside/keep", "file", 0o644, 0, b"changed"),
    ]):
        write("oci_layers", f"escape-{n}", layers(layer(links, tarfile.USTAR_FORMAT), layer([evil], tarfile.USTAR_FORMAT)))


# kernel_loader: an ELF with a PVH note, a plain ELF, a bzImage
def elf(pvh):
    note = b""
    if pvh:
        desc = struct.pack("<I", 0x100000)
        note = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    code = b"\xf4" * 16
    phnum = 2 if pvh else 1
    phoff, ehsize = 64, 64
    data_off = phoff + 56 * phnum
    eh = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    eh += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, phoff, 0, 0, ehsize, 56, phnum, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, data_off, 0x100000, 0x100000, len(code), len(code) + 4096, 0x1000)
    if pvh:
        ph += struct.pack("<IIQQQQQQ", 4, 4, data_off + len(code), 0, 0, len(note), len(note), 4)
    return eh + ph + code + note


def bzimage():
    setup_sects = 1
    img = bytearray(512 * (setup_sects + 1))
    img[0x1f1] = setup_sects
    img[0x1fe:0x200] = b"\x55\xaa"
    img[0x200:0x202] = bytes([0xeb, 0x66])           # jmp to the header's end (0x268)
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = struct.pack("<H", 0x020f)
    img[0x211] = 1                                    # loadflags: LOADED_HIGH
    img[0x214:0x218] = struct.pack("<I", 0x100000)    # code32_start
    img[0x22c:0x230] = struct.pack("<I", 0x37ffffff)
    img[0x230:0x234] = struct.pack("<I", 0x200000)    # kernel_alignment
    img[0x236:0x238] = struct.pack("<H", 1)           # XLF_KERNEL_64
    img[0x238:0x23c] = struct.pack("<I", 2047)        # cmdline_size
    return bytes(img) + b"\xf4" * 512


def kernels():
    write("kernel_loader", "elf-pvh", elf(True))
    write("kernel_loader", "elf", elf(False))
    write("kernel_loader", "bzimage", bzimage())


if __name__ == "__main__":
    net()
    vsock()
    chains()
    bus()
    vhost()
    netlink()
    oci()
    kernels()
