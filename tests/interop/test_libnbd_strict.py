"""python3-libnbd 1.14 against the engine, strict mode at its default (every check on).

The scripts run with Debian's python (nbdsh() helper) and print one JSON line; the tests
check it and the image file on disk. The last part turns strict mode off to send requests
a server must refuse, and checks the errno and that the connection keeps working.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import file_extents, nbdsh_json, require_libnbd_python

from .helpers import (
    CONST_A,
    CONST_B,
    IMAGE_SIZE,
    ISLAND_BIG,
    ISLAND_CONST_A,
    ISLAND_CONST_B,
    KiB,
    MiB,
    allocated_bytes,
    assert_tiles,
    clip,
    expected_runs,
    libnbd_handle,
    make_islands_image,
    merge,
    read_range,
)

pytestmark = pytest.mark.interop

# Strict-mode flags of libnbd 1.14 (all set by default).
STRICT_ALL = 0x1F


@pytest.fixture(autouse=True)
def _libnbd() -> None:
    require_libnbd_python()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_islands_image(tmp_path / "disk.raw")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ basic I/O


def test_default_strict_mode_and_flags(serve, image: Path) -> None:
    server = serve(image)
    out = nbdsh_json(server.uri(), """
print(json.dumps({
    "strict": h.get_strict_mode(), "size": h.get_size(), "ro": h.is_read_only(),
    "flush": h.can_flush(), "fua": h.can_fua(), "trim": h.can_trim(), "zero": h.can_zero(),
    "fast_zero": h.can_fast_zero(), "df": h.can_df(), "cache": h.can_cache(),
    "multi_conn": h.can_multi_conn(), "structured": h.get_structured_replies_negotiated(),
    "min": h.get_block_size(nbd.SIZE_MINIMUM), "pref": h.get_block_size(nbd.SIZE_PREFERRED),
    "max": h.get_block_size(nbd.SIZE_MAXIMUM),
}))
""")
    assert out == {
        "strict": STRICT_ALL, "size": IMAGE_SIZE, "ro": False, "flush": True, "fua": True,
        "trim": True, "zero": True, "fast_zero": True, "df": True, "cache": True,
        "multi_conn": True, "structured": True, "min": 1, "pref": 4096, "max": 32 * MiB,
    }


def test_pread_pwrite_flush(serve, image: Path) -> None:
    server = serve(image)
    island_a = read_range(image, *ISLAND_CONST_A)
    big = read_range(image, *ISLAND_BIG)
    out = nbdsh_json(server.uri(), f"""
import hashlib
res = {{}}
res["island_a"] = (h.pread({ISLAND_CONST_A[1]}, {ISLAND_CONST_A[0]})
                  == bytes([{CONST_A}]) * {ISLAND_CONST_A[1]})
res["big_sha"] = hashlib.sha256(h.pread({ISLAND_BIG[1]}, {ISLAND_BIG[0]})).hexdigest()
res["hole"] = h.pread(1 << 20, 40 << 20) == bytes(1 << 20)
h.pwrite(b"\\x11" * 300000, 3 << 20)
h.pwrite(b"\\x22" * 4096, (64 << 20) - 4096)  # the last block of the export
h.pwrite(b"\\x33" * 7, 5)  # tiny and unaligned
h.flush()
res["back"] = h.pread(300000, 3 << 20) == b"\\x11" * 300000
res["last"] = h.pread(4096, (64 << 20) - 4096) == b"\\x22" * 4096
res["tiny"] = h.pread(7, 5) == b"\\x33" * 7
payload = bytes(range(256)) * (32 * 4096)  # 32 MiB: the advertised maximum
h.pwrite(payload, 24 << 20)
res["big_write"] = h.pread(32 << 20, 24 << 20) == payload
print(json.dumps(res))
""")
    assert out == {"island_a": True, "big_sha": sha(big), "hole": True, "back": True,
                   "last": True, "tiny": True, "big_write": True}
    assert island_a == bytes([CONST_A]) * ISLAND_CONST_A[1]
    assert read_range(image, 3 * MiB, 300000) == b"\x11" * 300000
    assert read_range(image, IMAGE_SIZE - 4096, 4096) == b"\x22" * 4096
    assert read_range(image, 5, 7) == b"\x33" * 7
    assert read_range(image, 24 * MiB, 32 * MiB) == bytes(range(256)) * (32 * 4096)
    assert image.stat().st_size == IMAGE_SIZE


def test_fua_writes_zeroes_and_trims(serve, image: Path) -> None:
    server = serve(image)
    out = nbdsh_json(server.uri(), """
FUA = nbd.CMD_FLAG_FUA
h.pwrite(b"\\x44" * 65536, 2 << 20, FUA)
h.zero(65536, 20 << 20, FUA)
h.zero(65536, (20 << 20) + 65536, FUA | nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 8 << 20, FUA)
print(json.dumps({
    "w": h.pread(65536, 2 << 20) == b"\\x44" * 65536,
    "z": h.pread(131072, 20 << 20) == bytes(131072),
    "t": h.pread(65536, 8 << 20) == bytes(65536),
}))
""")
    assert out == {"w": True, "z": True, "t": True}
    assert read_range(image, 2 * MiB, 64 * KiB) == b"\x44" * 64 * KiB
    assert read_range(image, 20 * MiB, 128 * KiB) == bytes(128 * KiB)
    assert read_range(image, 20 * MiB + 128 * KiB, 4) == bytes([CONST_B]) * 4
    assert read_range(image, 8 * MiB, 64 * KiB) == bytes(64 * KiB)


def test_trim_punches_a_hole(serve, image: Path) -> None:
    server = serve(image)
    before = allocated_bytes(image)
    out = nbdsh_json(server.uri(), f"""
h.trim({MiB}, {ISLAND_BIG[0]})
print(json.dumps(h.pread(4096, {ISLAND_BIG[0] + 4096}) == bytes(4096)))
""")
    assert out is True
    assert clip(file_extents(image), *ISLAND_BIG) == [(*ISLAND_BIG, False)]
    assert allocated_bytes(image) <= before - MiB + 64 * KiB


def test_zero_without_flags_may_punch(serve, image: Path) -> None:
    server = serve(image)
    base, length = ISLAND_CONST_B
    out = nbdsh_json(server.uri(), f"""
h.zero({length}, {base})
print(json.dumps(h.pread({length}, {base}) == bytes({length})))
""")
    assert out is True
    assert read_range(image, base, length) == bytes(length)
    assert clip(file_extents(image), base, length) == [(base, length, False)]


def test_zero_with_no_hole_keeps_the_range_allocated(serve, image: Path) -> None:
    server = serve(image)
    base, length = ISLAND_CONST_B
    before = allocated_bytes(image)
    out = nbdsh_json(server.uri(), f"""
h.zero({length}, {base}, nbd.CMD_FLAG_NO_HOLE)
print(json.dumps(h.pread({length}, {base}) == bytes({length})))
""")
    assert out is True
    assert read_range(image, base, length) == bytes(length)
    assert allocated_bytes(image) >= before, "NO_HOLE zeroing freed the blocks"


@pytest.mark.parametrize("no_hole", [False, True], ids=["fast", "fast+no-hole"])
def test_zero_with_fast_zero(serve, image: Path, no_hole: bool) -> None:
    server = serve(image)
    base, length = ISLAND_CONST_B
    flags = "nbd.CMD_FLAG_FAST_ZERO" + (" | nbd.CMD_FLAG_NO_HOLE" if no_hole else "")
    out = nbdsh_json(server.uri(), f"""
import errno
try:
    h.zero({length}, {base}, {flags})
    res = {{"errno": None}}
except nbd.Error as e:
    res = {{"errno": errno.errorcode.get(e.errnum, e.errnum)}}
res["zero"] = h.pread({length}, {base}) == bytes({length})
res["old"] = h.pread({length}, {base}) == bytes([{CONST_B}]) * {length}
print(json.dumps(res))
""")
    # Either done (reads as zero) or refused quickly with ENOTSUP leaving the data alone.
    assert out in ({"errno": None, "zero": True, "old": False},
                   {"errno": "ENOTSUP", "zero": False, "old": True}), out
    # A sparse file on a local file system can always zero fast.
    assert out["errno"] is None
    assert read_range(image, base, length) == bytes(length)


def test_cache(serve, image: Path) -> None:
    server = serve(image)
    big = read_range(image, *ISLAND_BIG)
    out = nbdsh_json(server.uri(), f"""
h.cache({4 * MiB}, {ISLAND_BIG[0]})
h.cache(4096, {IMAGE_SIZE - 4096})
print(json.dumps(__import__("hashlib").sha256(h.pread({ISLAND_BIG[1]}, {ISLAND_BIG[0]}))
                 .hexdigest()))
""")
    assert out == sha(big)


# ------------------------------------------------------------------ block status


BLOCK_STATUS_SCRIPT = """
def status(count, offset, flags=0):
    got = []
    def cb(meta, off, entries, err):
        assert meta == nbd.CONTEXT_BASE_ALLOCATION, meta
        got.append([off, list(entries)])
        return 0
    g.block_status(count, offset, cb, flags)
    return got

def full_map(offset, end):
    runs = []
    calls = 0
    while offset < end:
        (off, entries), = status(end - offset, offset)
        assert off == offset
        calls += 1
        for i in range(0, len(entries), 2):
            length = min(entries[i], end - offset)
            runs.append([offset, length, entries[i + 1]])
            offset += length
            if offset >= end:
                break
    return runs, calls
"""


def test_block_status_matches_the_file(serve, image: Path) -> None:
    server = serve(image)
    uri = server.uri()
    out = nbdsh_json(uri, libnbd_handle("g", uri, meta=True) + BLOCK_STATUS_SCRIPT + f"""
whole, calls = full_map(0, {IMAGE_SIZE})
part, _ = full_map({MiB + 100}, {9 * MiB + 12345})
print(json.dumps({{"whole": whole, "part": part, "calls": calls,
                  "can_meta": g.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)}}))
""")
    assert out["can_meta"] is True
    for runs in (out["whole"], out["part"]):
        assert all(flags in (0, 3) for _, _, flags in runs), runs  # data, or hole+zero
    whole = [(o, n, flags == 0) for o, n, flags in out["whole"]]
    assert_tiles(whole, 0, IMAGE_SIZE)
    assert merge(whole) == merge(file_extents(image)) == expected_runs()
    assert out["calls"] <= 2, "the engine should describe the whole small image at once"
    part = [(o, n, flags == 0) for o, n, flags in out["part"]]
    assert_tiles(part, MiB + 100, 8 * MiB + 12245)
    assert merge(part) == clip(file_extents(image), MiB + 100, 8 * MiB + 12245)


def test_block_status_req_one(serve, image: Path) -> None:
    server = serve(image)
    uri = server.uri()
    out = nbdsh_json(uri, libnbd_handle("g", uri, meta=True) + BLOCK_STATUS_SCRIPT + f"""
REQ_ONE = nbd.CMD_FLAG_REQ_ONE
print(json.dumps({{
    "start": status({IMAGE_SIZE}, 0, REQ_ONE),
    "in_hole": status({IMAGE_SIZE - 2 * MiB}, {2 * MiB}, REQ_ONE),
    "short": status(1000, {40 * MiB}, REQ_ONE),
    "in_data": status(4096, {ISLAND_BIG[0] + 8192}, REQ_ONE),
    "no_req_one_short": status(1000, {40 * MiB}),
}}))
""")
    # Exactly one extent each, never longer than asked, describing the right status.
    assert out["start"] == [[0, [64 * KiB, 0]]]
    assert out["in_hole"] == [[2 * MiB, [ISLAND_BIG[0] - 2 * MiB, 3]]]
    assert out["short"] == [[40 * MiB, [1000, 3]]]
    assert out["in_data"] == [[ISLAND_BIG[0] + 8192, [4096, 0]]]
    off, entries = out["no_req_one_short"][0]
    assert off == 40 * MiB
    assert entries[1] == 3
    assert entries[0] >= 1000


# ------------------------------------------------------------------ structured reads


STRUCTURED_SCRIPT = """
import hashlib
def structured(count, offset, flags=0):
    chunks = []
    buf = bytearray(count)
    def cb(subbuf, off, status, err):
        data = bytes(subbuf)
        chunks.append([off, len(data), status, data == bytes(len(data))])
        buf[off - offset:off - offset + len(data)] = data
        return 0
    data = h.pread_structured(count, offset, cb, flags)
    assert data == bytes(buf)
    return {"chunks": chunks, "sha": hashlib.sha256(data).hexdigest()}
"""


@pytest.mark.parametrize(("offset", "length"), [
    (0, 12 * MiB),  # from the start, four islands and their holes
    (MiB - 1000, 700 * KiB + 2000),  # unaligned edges cutting islands and holes
    (30 * MiB, 4 * MiB),  # only a hole
    (IMAGE_SIZE - 3 * MiB, 3 * MiB),  # a hole then data up to the end
], ids=["start", "unaligned", "hole-only", "end"])
def test_pread_structured_sends_holes_as_holes(serve, image: Path, offset: int,
                                               length: int) -> None:
    server = serve(image)
    out = nbdsh_json(server.uri(), STRUCTURED_SCRIPT + f"""
print(json.dumps(dict(structured({length}, {offset}),
                      data=nbd.READ_DATA, hole=nbd.READ_HOLE)))
""")
    chunks = out["chunks"]
    assert {status for _, _, status, _ in chunks} <= {out["data"], out["hole"]}
    runs = [(off, n, status == out["data"]) for off, n, status, _ in chunks]
    assert_tiles(runs, offset, length)
    # Holes of the file arrive as OFFSET_HOLE chunks, data as OFFSET_DATA chunks.
    assert merge(sorted(runs)) == clip(file_extents(image), offset, length)
    for off, n, status, all_zero in chunks:
        if status == out["hole"]:
            assert all_zero, (off, n)
    assert out["sha"] == sha(read_range(image, offset, length))


def test_df_flag_gives_one_data_chunk(serve, image: Path) -> None:
    server = serve(image)
    out = nbdsh_json(server.uri(), STRUCTURED_SCRIPT + f"""
DF = nbd.CMD_FLAG_DF
print(json.dumps({{"data": nbd.READ_DATA, "small": structured(65536, {MiB + 200 * KiB}, DF),
                  "big": structured({4 * MiB}, 0, DF), "can_df": h.can_df()}}))
""")
    assert out["can_df"] is True
    small_off, big_off = MiB + 200 * KiB, 0
    assert out["small"]["chunks"] == [[small_off, 65536, out["data"], False]]
    assert out["big"]["chunks"] == [[big_off, 4 * MiB, out["data"], False]]
    assert out["small"]["sha"] == sha(read_range(image, small_off, 65536))
    assert out["big"]["sha"] == sha(read_range(image, big_off, 4 * MiB))


# ------------------------------------------------------------------ concurrency


def test_many_aio_commands_in_flight(serve, image: Path) -> None:
    server = serve(image)
    count, size, stride = 64, 64 * KiB, 128 * KiB
    base = 32 * MiB
    assert read_range(image, *ISLAND_CONST_A) == bytes([CONST_A]) * ISLAND_CONST_A[1]
    out = nbdsh_json(server.uri(), f"""
N, SIZE, STRIDE, BASE = {count}, {size}, {stride}, {base}
def pattern(i):
    return bytes([(i * 7 + 1) % 256]) * (SIZE - 16) + i.to_bytes(16, "big")
writes = [h.aio_pwrite(nbd.Buffer.from_bytearray(pattern(i)), BASE + i * STRIDE)
          for i in range(N)]
flush = h.aio_flush()
peak_w = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
ok_w = all(h.aio_command_completed(c) for c in writes) and h.aio_command_completed(flush)
bufs = [nbd.Buffer(SIZE) for _ in range(N)]
reads = [h.aio_pread(bufs[i], BASE + i * STRIDE) for i in range(N)]
extra = nbd.Buffer({ISLAND_CONST_A[1]})
reads.append(h.aio_pread(extra, {ISLAND_CONST_A[0]}))
hole = nbd.Buffer(SIZE)
reads.append(h.aio_pread(hole, BASE + SIZE))  # gap between two writes: still a hole
peak_r = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
ok_r = all(h.aio_command_completed(c) for c in reads)
good = [bytes(bufs[i].to_bytearray()) == pattern(i) for i in range(N)]
print(json.dumps({{"peak_w": peak_w, "peak_r": peak_r, "ok_w": ok_w, "ok_r": ok_r,
                  "good": good,
                  "extra": bytes(extra.to_bytearray()) == bytes([{CONST_A}]) * len(extra),
                  "hole": bytes(hole.to_bytearray()) == bytes(SIZE)}}))
""")
    assert out["ok_w"] is True
    assert out["ok_r"] is True
    assert out["peak_w"] > 1, out
    assert out["peak_r"] > 1, out
    assert out["good"] == [True] * count
    assert out["extra"] is True
    assert out["hole"] is True
    for i in range(count):
        expected = bytes([(i * 7 + 1) % 256]) * (size - 16) + i.to_bytes(16, "big")
        assert read_range(image, base + i * stride, size) == expected, i
        assert read_range(image, base + i * stride + size, size) == bytes(size), i


def test_many_fua_writes_and_flushes_in_flight(serve, image: Path) -> None:
    """FUA writes and flushes complete out of order with the reads queued behind them."""
    server = serve(image)
    count, size = 150, 16 * KiB  # more than the engine offloads at once per connection
    base = 36 * MiB
    out = nbdsh_json(server.uri(), f"""
N, SIZE, BASE = {count}, {size}, {base}
cookies = []
for i in range(N):
    data = nbd.Buffer.from_bytearray(bytes([i % 251 + 1]) * SIZE)
    cookies.append(h.aio_pwrite(data, BASE + i * SIZE, flags=nbd.CMD_FLAG_FUA))
    if i % 25 == 0:
        cookies.append(h.aio_flush())
    if i % 10 == 0:
        cookies.append(h.aio_pread(nbd.Buffer(4096), {ISLAND_CONST_B[0]}))
while h.aio_in_flight() > 0:
    h.poll(-1)
done = [h.aio_command_completed(c) for c in cookies]
back = h.pread(N * SIZE, BASE)
good = [back[i * SIZE:(i + 1) * SIZE] == bytes([i % 251 + 1]) * SIZE for i in range(N)]
print(json.dumps({{"done": all(done), "n": len(done), "good": good}}))
""")
    assert out["done"] is True
    assert out["n"] == count + count // 25 + count // 10
    assert out["good"] == [True] * count
    data = read_range(image, base, count * size)
    for i in range(count):
        assert data[i * size:(i + 1) * size] == bytes([i % 251 + 1]) * size, i


def test_second_connection_sees_writes_after_flush(serve, image: Path) -> None:
    server = serve(image)
    uri = server.uri()
    out = nbdsh_json(uri, libnbd_handle("g", uri) + """
res = {"multi_conn": [h.can_multi_conn(), g.can_multi_conn()]}
h.pwrite(b"\\x5c" * 8192, 3 << 20)
h.flush()
res["g_sees_h"] = g.pread(8192, 3 << 20) == b"\\x5c" * 8192
g.pwrite(b"\\xc5" * 4096, (3 << 20) + 4096, nbd.CMD_FLAG_FUA)
res["h_sees_g"] = h.pread(8192, 3 << 20) == b"\\x5c" * 4096 + b"\\xc5" * 4096
# Interleaved writes on both connections, then one flush each.
for i in range(16):
    (h if i % 2 else g).pwrite(bytes([i + 1]) * 4096, (4 << 20) + i * 4096)
h.flush()
g.flush()
expect = b"".join(bytes([i + 1]) * 4096 for i in range(16))
res["both"] = [h.pread(65536, 4 << 20) == expect, g.pread(65536, 4 << 20) == expect]
g.shutdown()
print(json.dumps(res))
""")
    assert out == {"multi_conn": [True, True], "g_sees_h": True, "h_sees_g": True,
                   "both": [True, True]}
    assert read_range(image, 3 * MiB, 8192) == b"\x5c" * 4096 + b"\xc5" * 4096
    assert read_range(image, 4 * MiB, 64 * KiB) == b"".join(
        bytes([i + 1]) * 4096 for i in range(16))


# ------------------------------------------------------------------ strict mode off

# Each case: (python expression run with strict mode 0, expected errno name or None).
NEGATIVE_CASES = {
    "read-past-end": ("h.pread(4096, SIZE - 100)", "EINVAL"),
    "read-offset-past-end": ("h.pread(512, SIZE + 4096)", "EINVAL"),
    "write-past-end": ("h.pwrite(b'x' * 4096, SIZE - 100)", "ENOSPC"),
    "zero-past-end": ("h.zero(4096, SIZE - 100)", "ENOSPC"),
    "trim-past-end": ("h.trim(4096, SIZE - 100)", "EINVAL"),
    "cache-past-end": ("h.cache(4096, SIZE - 100)", "EINVAL"),
    "unknown-flag": ("h.pread(512, 0, 0x40)", "EINVAL"),
    "flag-on-wrong-command": ("h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)", "EINVAL"),
    "no-hole-on-write": ("h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_NO_HOLE)", "EINVAL"),
    "read-40MiB": ("h.pread(40 << 20, 0)", "EINVAL"),
    "write-40MiB": ("h.pwrite(b'\\x77' * (40 << 20), 0)", "EINVAL"),
    "block-status-without-context": (
        "h.block_status(4096, 0, lambda *a: 0)", "EINVAL"),
    "zero-length-read": ("h.pread(0, 0)", None),
    "zero-length-write": ("h.pwrite(b'', 0)", None),
}

NEGATIVE_SCRIPT = """
import errno
SIZE = h.get_size()
h.set_strict_mode(0)
FIRST = h.pread(4096, 0)
try:
    result = {expr}
    res = {{"errno": None, "result": len(result) if isinstance(result, bytes) else None}}
except nbd.Error as e:
    res = {{"errno": errno.errorcode.get(e.errnum, e.errnum)}}
# The connection is still in sync: ordinary requests work and return the right data.
res["after_read"] = h.pread(4096, 0) == FIRST and h.pread(8192, 40 << 20) == bytes(8192)
h.pwrite(b"\\x99" * 512, 10 << 20)
res["after_write"] = h.pread(512, 10 << 20) == b"\\x99" * 512
res["dead"] = h.aio_is_dead()
print(json.dumps(res))
"""


@pytest.mark.parametrize("case", list(NEGATIVE_CASES))
def test_refused_requests_keep_the_connection_working(serve, image: Path, case: str) -> None:
    expr, expected = NEGATIVE_CASES[case]
    first = read_range(image, 0, 4096)
    server = serve(image)
    out = nbdsh_json(server.uri(), NEGATIVE_SCRIPT.format(expr=expr))
    assert out["errno"] == expected, out
    assert out["after_read"] is True, out
    assert out["after_write"] is True, out
    assert out["dead"] is False
    # A refused request changed nothing (the 40 MiB write included).
    assert read_range(image, 0, 4096) == first
    assert read_range(image, 10 * MiB, 512) == b"\x99" * 512


@pytest.mark.parametrize(("count", "offset"), [
    (4096, IMAGE_SIZE - 100),
    (1, IMAGE_SIZE),
    (0, 0),  # no extent could describe it: descriptors must have a nonzero length
], ids=["past-end", "at-end", "zero-length"])
def test_block_status_refused_requests(serve, image: Path, count: int, offset: int) -> None:
    server = serve(image)
    uri = server.uri()
    out = nbdsh_json(uri, libnbd_handle("g", uri, meta=True) + BLOCK_STATUS_SCRIPT + f"""
import errno
g.set_strict_mode(0)
try:
    status({count}, {offset})
    res = {{"errno": None}}
except nbd.Error as e:
    res = {{"errno": errno.errorcode.get(e.errnum, e.errnum)}}
res["after"] = status(4096, 0)
res["dead"] = g.aio_is_dead()
print(json.dumps(res))
""")
    assert out == {"errno": "EINVAL", "after": [[0, [4096, 0]]], "dead": False}


@pytest.mark.parametrize("expr", [
    "h.pwrite(b'x' * 4096, 0)",
    "h.pwrite(b'x' * 4096, 0, nbd.CMD_FLAG_FUA)",
    "h.zero(4096, 0)",
    "h.trim(4096, 0)",
    "h.pwrite(b'x' * 4096, SIZE - 100)",
], ids=["write", "write-fua", "zero", "trim", "write-past-end"])
def test_writes_to_a_read_only_export_get_eperm(serve, image: Path, expr: str) -> None:
    first = read_range(image, 0, 4096)
    server = serve(image, "--read-only")
    script = f"""
import errno
SIZE = h.get_size()
res = {{"ro": h.is_read_only()}}
h.set_strict_mode(0)
try:
    {expr}
    res["errno"] = None
except nbd.Error as e:
    res["errno"] = errno.errorcode.get(e.errnum, e.errnum)
res["after"] = h.pread(4096, 0) == {first!r}
print(json.dumps(res))
"""
    out = nbdsh_json(server.uri(), script)
    assert out == {"ro": True, "errno": "EPERM", "after": True}
    assert read_range(image, 0, 4096) == first
