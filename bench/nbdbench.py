#!/usr/bin/env python3
"""Side-by-side benchmark: nbdcore vs nbdkit (file plugin) vs qemu-nbd, same images, one run.

Every workload runs against each server for ``--rounds`` rounds; the table shows medians
and the ratio of nbdcore to each peer, taken round by round (the median of the rounds'
ratios, see ``paired_ratio``). Every workload but the memory row is interleaved
run by run inside a round, with every server up at once and the order rotating by one
each cycle (A, B, C, then B, C, A, ...): on a shared machine the speed drifts by more
than the servers differ within seconds. Page cache warm, loopback TCP. Usage::

    python bench/nbdbench.py [--rounds 3] [--quick] [--only seqread_fio,randread16]

The TLS rows (``*_tls``) run every server that can do TLS with TLS required, on a test PKI
made by tests/tlsutil.py: nbdcore ``--tls required``, ``nbdkit --tls=require`` and qemu-nbd
with a server ``tls-creds-x509`` object; client certificates are not asked for. The table
is printed and written to bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class Server:
    name: str
    argv: Callable[[Path, int], list[str]]
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    # Before start (image, port) and after the port opened (port): for the appliance engine.
    prepare: Callable[[Path, int], None] | None = None
    ready: Callable[[int], None] | None = None
    # The same server with TLS required (image, port, certificates directory); None if it
    # does not take part in the TLS rows.
    tls_argv: Callable[[Path, int, Path], list[str]] | None = None

    def start(self, image: Path, *, pin: bool = False, tls: Path | None = None) -> str:
        """Start on ``image``; with ``tls`` (a server certificates directory) TLS is
        required and the URI is nbds://."""
        self.port = free_port()
        # Latency is set by the loopback round trip more than by the server: with client
        # and server on separate cores every server is measured on equal terms.
        prefix = ["taskset", "-c", "0"] if pin else []
        if self.prepare is not None:
            self.prepare(image, self.port)
        if tls is not None:
            assert self.tls_argv is not None
            argv = self.tls_argv(image, self.port, tls)
        else:
            argv = self.argv(image, self.port)
        self.proc = subprocess.Popen(
            prefix + argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        if self.ready is not None:
            self.ready(self.port)
        return f"{'nbds' if tls else 'nbd'}://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def rss_kib(self, field: str = "VmHWM") -> int:
        """A memory figure of /proc/PID/status: VmHWM (peak resident), RssAnon, ..."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        return 0


class ApplianceEngine:
    """The engine as the appliance runs it: appliance.engine.runner with live metrics to a
    Redis of its own (no database), the export handed over through the Redis mailbox."""

    node = "bench"

    def __init__(self) -> None:
        self.redis_port = 0
        self.redis: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        if self.redis is None:
            self.redis_port = free_port()
            self.redis = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port),
                 "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(self.redis_port)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def argv(self, image: Path, port: int) -> list[str]:
        return [sys.executable, "-m", "appliance.engine.runner", "--node", self.node,
                "--port", str(port), "--redis-url", self.url(), "--no-database"]

    def prepare(self, image: Path, port: int) -> None:
        import redis

        sys.path.insert(0, str(ROOT))
        from appliance.engine.spec import EngineSpec, ExportSpec

        spec = EngineSpec(node=self.node, exports=(
            ExportSpec(name="", path=str(image), size=image.stat().st_size),))
        client = redis.Redis.from_url(self.url())
        client.delete(f"nbd:engine:{self.node}:heartbeat")
        client.set(f"nbd:engine:{self.node}:desired", spec.to_json())

    def ready(self, port: int) -> None:
        import redis

        client = redis.Redis.from_url(self.url())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            raw = client.get(f"nbd:engine:{self.node}:heartbeat")
            if raw and json.loads(raw).get("exports") == [""]:
                return
            time.sleep(0.05)
        raise RuntimeError("the appliance engine did not publish the export")

    def close(self) -> None:
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)


APPLIANCE_ENGINE = ApplianceEngine()

def nbdcore_argv(*extra: str) -> Callable[[Path, int], list[str]]:
    return lambda img, port: [sys.executable, "-m", "nbdcore", "serve", str(img), "--port",
                              str(port), *extra]


def nbdcore_tls_argv(*extra: str) -> Callable[[Path, int, Path], list[str]]:
    return lambda img, port, certs: [*nbdcore_argv(*extra)(img, port), "--tls", "required",
                                     "--tls-certificates", str(certs)]


def nbdkit_argv(img: Path, port: int) -> list[str]:
    return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(img)]


def nbdkit_tls_argv(img: Path, port: int, certs: Path) -> list[str]:
    return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "--tls=require",
            f"--tls-certificates={certs}", "file", str(img)]


def qemu_nbd_argv(img: Path, port: int) -> list[str]:
    return ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-e", "16", "-t",
            str(img)]


def qemu_nbd_tls_argv(img: Path, port: int, certs: Path) -> list[str]:
    # verify-peer=off: like the others, TLS without asking for a client certificate.
    return ["qemu-nbd", "--object",
            f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off",
            "--tls-creds", "tls0", *qemu_nbd_argv(img, port)[1:]]


SERVERS = [
    Server("nbdcore", nbdcore_argv(), tls_argv=nbdcore_tls_argv()),
    Server("nbdcore-w2", nbdcore_argv("--workers", "2"),
           tls_argv=nbdcore_tls_argv("--workers", "2")),
    Server("nbdcore-nosplice", nbdcore_argv("--no-splice")),
    Server("nbdcore-map", nbdcore_argv("--sendfile", "never")),
    Server("appliance", APPLIANCE_ENGINE.argv, prepare=APPLIANCE_ENGINE.prepare,
           ready=APPLIANCE_ENGINE.ready),
    Server("nbdkit", nbdkit_argv, tls_argv=nbdkit_tls_argv),
    Server("qemu-nbd", qemu_nbd_argv, tls_argv=qemu_nbd_tls_argv),
]


@dataclass
class BenchTls:
    """Certificates for the TLS rows: the servers' directory, and the client's (the CA
    only: the client checks the server, sends no certificate of its own)."""

    server_dir: Path
    client_dir: Path
    home: Path  # $HOME for fio: see fio_env()

    @classmethod
    def create(cls, tmp: Path) -> BenchTls:
        sys.path.insert(0, str(ROOT / "tests"))
        from tlsutil import make_test_pki  # needs `cryptography` (in .venv)

        pki = make_test_pki(tmp / "pki")
        home = tmp / "fio-home"
        shutil.copytree(pki.client("anonymous"), home / ".pki" / "libnbd")
        return cls(server_dir=pki.server_dir, client_dir=pki.client("anonymous"), home=home)

    def uri(self, uri: str) -> str:
        """nbds:// URI with the client's certificates directory (nbdcopy, nbdinfo)."""
        return f"{uri}?tls-certificates={self.client_dir}"

    def fio_env(self) -> dict[str, str]:
        """fio's nbd engine refuses local files in URIs (no ?tls-certificates=), so libnbd
        looks in its default places: $HOME/.pki/libnbd, or /etc/pki/libnbd only for root.
        Finding no directory it still negotiates TLS, without checking the server's
        certificate against our CA: the encryption measured is the same."""
        return {**os.environ, "HOME": str(self.home)}


TLS: list[BenchTls] = []  # set in main() when a TLS row is selected


@dataclass
class Workload:
    name: str
    title: str
    unit: str
    image: str  # key of the image to serve
    run: Callable[[str, Path], float]
    higher_is_better: bool = True
    # > 0: ``run`` is one short run; a round's sample of a server is the median of this
    # many runs, the servers taking turns run by run.
    runs: int = 0
    pin: bool = False  # server on CPU 0, client on CPU 1
    tls: bool = False  # servers with TLS required (those that have a tls_argv)
    results: dict[str, list[float]] = field(default_factory=dict)


def fio(uri: str, *args: str, runtime: int, pin: bool = False,
        env: dict[str, str] | None = None) -> dict:
    """fio's figures for all its jobs together."""
    return fio_jobs(uri, "--group_reporting", *args, runtime=runtime, pin=pin, env=env)[0]


def fio_jobs(uri: str, *args: str, runtime: int, pin: bool = False,
             env: dict[str, str] | None = None) -> list[dict]:
    """fio's figures, one entry per job unless ``--group_reporting`` is among ``args``."""
    prefix = ["taskset", "-c", "1"] if pin else []
    out = subprocess.run(
        [*prefix, "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
         f"--runtime={runtime}", "--time_based", *args],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout[out.stdout.index("{"):])["jobs"]


# Runs a sample of the sparse rows. Those copies take 30-90 ms, and one server's runs
# spread widely within a round (qemu-img's convert: 51-87 ms on 2026-12-07): with 9 runs
# a sample, three runs of the benchmark within half an hour put the same code's convert at
# 0.96x, 0.98x and 1.11x nbdkit. 21 runs add about a minute to the whole benchmark.
SPARSE_RUNS = 21

# Where qemu-img convert writes its copy: memory, not the images' file system. On ext4
# mounted with online discard (this machine's root), each run freeing the previous copy's
# 64 MiB made every other cycle about 70 ms slower (of 90), whoever ran first in it; the
# rotating order then handed most of the slow runs to the same server.
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())

CURRENT_SERVER: list[Server] = []  # the server the workload's run is talking to
# Per server, for every run of the many-clients row: the slowest client's IOPS over the
# clients' mean (1.00: all served alike; near 0: one starved).
SLOWEST_SHARE: dict[str, list[float]] = {}


def flood(uri: str, *, clients: int, bytes_each: int) -> None:
    """Raw NBD clients, each sending ``bytes_each`` of 4 MiB WRITEs as fast as TCP lets it
    (replies are read by a second thread). Whatever the clients push, the server must
    push back through TCP rather than buffer it: its resident size is the measure."""
    import struct
    import threading

    host, port = uri.split("//")[1].split("/")[0].rsplit(":", 1)
    chunk = 4 * MiB
    payload = bytes(chunk)

    def one(index: int) -> None:
        with socket.create_connection((host, int(port))) as sock:
            sock.recv(18, socket.MSG_WAITALL)
            sock.sendall(struct.pack(">I", 3))
            sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
            sock.recv(10, socket.MSG_WAITALL)
            base = 0  # every client rewrites the same 64 MiB; memory is what is measured
            reader = threading.Thread(target=_drain, args=(sock, bytes_each // chunk))
            reader.start()
            for i in range(bytes_each // chunk):
                header = struct.pack(">IHHQQI", 0x25609513, 0, 1, i, base + i * chunk, chunk)
                sock.sendall(header)
                sock.sendall(payload)
            reader.join()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _drain(sock: socket.socket, replies: int) -> None:
    for _ in range(replies):
        sock.recv(16, socket.MSG_WAITALL)


def timed(cmd: list[str]) -> float:
    """Seconds ``cmd`` takes."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def make_workloads(tmp: Path, runtime: int) -> list[Workload]:
    def seqread_nbdcopy(uri: str, image: Path) -> float:
        return image.stat().st_size / MiB / timed(["nbdcopy", uri, "null:"])

    def seqread_fio(uri: str, _: Path) -> float:
        job = fio(uri, "--rw=read", "--bs=1M", "--iodepth=8", runtime=runtime)
        return job["read"]["bw_bytes"] / MiB

    def seqwrite_fio(uri: str, _: Path) -> float:
        job = fio(uri, "--rw=write", "--bs=1M", "--iodepth=8", runtime=runtime)
        return job["write"]["bw_bytes"] / MiB

    def seqwrite_nbdcopy(uri: str, image: Path) -> float:
        source = tmp / "source.raw"
        return source.stat().st_size / MiB / timed(["nbdcopy", str(source), uri])

    def randread16(uri: str, _: Path) -> float:
        return fio(uri, "--rw=randread", "--bs=4k", "--iodepth=16", runtime=runtime)[
            "read"]["iops"]

    def randread1_p50(uri: str, _: Path) -> float:
        job = fio(uri, "--rw=randread", "--bs=4k", "--iodepth=1", runtime=runtime, pin=True)
        return job["read"]["clat_ns"]["percentile"]["50.000000"] / 1000

    def randwrite16(uri: str, _: Path) -> float:
        return fio(uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", runtime=runtime)[
            "write"]["iops"]

    def sparse_nbdcopy(uri: str, _: Path) -> float:
        return timed(["nbdcopy", uri, "null:"])

    def sparse_convert(uri: str, _: Path) -> float:
        out = SCRATCH / f"convert-out-{os.getpid()}.raw"
        try:
            return timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])
        finally:
            out.unlink(missing_ok=True)

    def memory_under_write_flood(uri: str, _: Path) -> float:
        """64 clients each push 64 MiB of WRITEs without reading replies; peak RSS in MiB."""
        flood(uri, clients=64, bytes_each=64 * MiB)
        return CURRENT_SERVER[0].rss_kib() / 1024

    def seqread_nbdcopy_tls(uri: str, image: Path) -> float:
        return image.stat().st_size / MiB / timed(["nbdcopy", TLS[0].uri(uri), "null:"])

    def randread16_tls(uri: str, _: Path) -> float:
        return fio(uri, "--rw=randread", "--bs=4k", "--iodepth=16", runtime=runtime,
                   env=TLS[0].fio_env())["read"]["iops"]

    def many_clients(uri: str, _: Path) -> float:
        jobs = fio_jobs(uri, "--rw=randread", "--bs=4k", "--iodepth=16", "--numjobs=8",
                        runtime=runtime)
        iops = [job["read"]["iops"] for job in jobs]
        SLOWEST_SHARE.setdefault(CURRENT_SERVER[0].name, []).append(
            min(iops) / statistics.mean(iops))
        return sum(iops)

    return [
        # nbdcopy's runs take under half a second: 7 of them weigh about what fio's 3 x 3 s do.
        Workload("seqread_nbdcopy", "seq read 1 GiB, nbdcopy -> null:", "MiB/s", "full",
                 seqread_nbdcopy, runs=7),
        Workload("seqread_fio", "seq read, fio 1M iodepth 8", "MiB/s", "full", seqread_fio,
                 runs=3),
        Workload("seqwrite_fio", "seq write, fio 1M iodepth 8", "MiB/s", "full", seqwrite_fio,
                 runs=3),
        Workload("seqwrite_nbdcopy", "seq write 1 GiB, nbdcopy file -> nbd", "MiB/s", "full",
                 seqwrite_nbdcopy, runs=7),
        Workload("randread16", "4K rand read, iodepth 16", "IOPS", "full", randread16, runs=3),
        Workload("randread1_p50", "4K rand read, iodepth 1, p50 (pinned)", "us", "full",
                 randread1_p50, higher_is_better=False, pin=True, runs=3),
        Workload("randwrite16", "4K rand write, iodepth 16", "IOPS", "full", randwrite16,
                 runs=3),
        Workload("sparse_nbdcopy", "sparse 8 GiB (64 MiB data), nbdcopy -> null:", "s",
                 "sparse", sparse_nbdcopy, higher_is_better=False, runs=SPARSE_RUNS),
        Workload("sparse_convert", "sparse 8 GiB, qemu-img convert -> raw", "s", "sparse",
                 sparse_convert, higher_is_better=False, runs=SPARSE_RUNS),
        Workload("many_clients", "8 clients x 4K rand read iodepth 16", "IOPS", "full",
                 many_clients, runs=3),
        Workload("memory_flood", "64 clients x 64 MiB writes in flight: peak RSS", "MiB",
                 "full", memory_under_write_flood, higher_is_better=False),
        Workload("seqread_nbdcopy_tls", "TLS: seq read 1 GiB, nbdcopy -> null:", "MiB/s",
                 "full", seqread_nbdcopy_tls, tls=True, runs=7),
        Workload("randread16_tls", "TLS: 4K rand read, iodepth 16", "IOPS", "full",
                 randread16_tls, tls=True, runs=3),
    ]


def make_images(tmp: Path, full_size: int) -> dict[str, Path]:
    full = tmp / "full.raw"
    source = tmp / "source.raw"
    block = os.urandom(MiB)
    with open(full, "wb") as f:
        for _ in range(full_size // MiB):
            f.write(block)
    shutil.copyfile(full, source)
    sparse = tmp / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(8 * GiB)
        step = 8 * GiB // 64
        for i in range(64):
            f.seek(i * step + (i * 7919 % 97) * MiB)
            f.write(block)
    return {"full": full, "sparse": sparse, "source": source}


def warm(path: Path) -> None:
    """Read every data extent of ``path`` so that its pages are in the page cache.

    Done before every sample, not once: on the virtual machines this ran on, the host
    takes back idle page cache within minutes (a fully read 1 GiB image kept about 120
    MiB of it a quarter of an hour later), and a sample that finds part of its image
    cold measures the disk, not the server. Holes are skipped, so the 8 GiB sparse image
    costs only its 64 MiB of data."""
    fd = os.open(path, os.O_RDONLY)
    buffer = memoryview(WARM_BUFFER)  # one buffer: no 4 MiB allocation freed per read
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            while start < end:
                start += os.preadv(fd, [buffer[: min(len(buffer), end - start)]], start) \
                    or end - start
            pos = end
    finally:
        os.close(fd)


WARM_BUFFER = bytearray(4 * MiB)


def settle(images: dict[str, Path]) -> None:
    """Before a sample: write back what earlier ones dirtied, so that the kernel's flusher
    does not land in the middle of this one, and bring every image into the page cache."""
    os.sync()
    for path in images.values():
        warm(path)


def start(server: Server, w: Workload, images: dict[str, Path]) -> str:
    return server.start(images[w.image], pin=w.pin,
                        tls=TLS[0].server_dir if w.tls else None)


def note_rss(server: Server, rss: dict[str, int]) -> None:
    """Peak resident size, and the largest anonymous part of it seen at a sample's end
    (nbdcore's resident size also holds the image pages it maps to send them)."""
    rss[server.name] = max(rss.get(server.name, 0), server.rss_kib())
    anon = f"{server.name} anon"
    rss[anon] = max(rss.get(anon, 0), server.rss_kib("RssAnon"))


def sample_alone(w: Workload, server: Server, images: dict[str, Path],
                 rss: dict[str, int]) -> float:
    """One sample of ``w`` on ``server``, the only server running."""
    settle(images)
    uri = start(server, w, images)
    CURRENT_SERVER[:] = [server]
    try:
        value = w.run(uri, images[w.image])
        note_rss(server, rss)
    finally:
        server.stop()
    return value


CYCLES = itertools.count()  # cycles of interleaved runs so far, for the rotating order


def sample_interleaved(w: Workload, servers: list[Server], images: dict[str, Path],
                       rss: dict[str, int]) -> dict[str, float]:
    """One sample of ``w`` per server: every server up at once, taking turns run by run
    for ``w.runs`` runs; each sample is its server's median.

    The order rotates by one server every cycle (A, B, C, then B, C, A, then C, A, B),
    so that no server always runs first after ``settle``: in a run of 2026-12-07 where
    the order was fixed, the engine under the appliance's runner, second in every cycle,
    beat the same engine run bare, first, by 6-14% on three rows."""
    runs: dict[str, list[float]] = {s.name: [] for s in servers}
    try:
        uris = {s.name: start(s, w, images) for s in servers}
        for _ in range(w.runs):
            settle(images)
            first = next(CYCLES) % len(servers)
            for server in servers[first:] + servers[:first]:
                os.sync()  # what the previous server's run wrote
                CURRENT_SERVER[:] = [server]
                runs[server.name].append(w.run(uris[server.name], images[w.image]))
        for server in servers:
            note_rss(server, rss)
    finally:
        for server in servers:
            server.stop()
    return {name: statistics.median(values) for name, values in runs.items()}


def fmt(value: float, unit: str) -> str:
    if unit in ("IOPS", "MiB/s", "MiB"):
        return f"{value:,.0f}"
    return f"{value:.3f}" if unit == "s" else f"{value:.1f}"


def runs_caption(workloads: list[Workload]) -> str:
    """How many runs a sample is the median of: "3 runs (7 for a, b; 9 for c)"."""
    by_runs: dict[int, list[str]] = {}
    for w in workloads:
        if w.results and w.runs:
            by_runs.setdefault(w.runs, []).append(w.name)
    if not by_runs:
        return "1 run"
    usual = max(by_runs, key=lambda runs: len(by_runs[runs]))
    others = "; ".join(f"{runs} for {', '.join(names)}"
                       for runs, names in sorted(by_runs.items()) if runs != usual)
    return f"{usual} runs" + (f" ({others})" if others else "")


def paired_ratio(w: Workload, name: str, peer: str) -> float | None:
    """``name`` against ``peer`` (> 1: ``name`` is better): the median over rounds of the
    ratio of their samples in the same round, or None if either has no usable sample.

    Within a round the servers ran interleaved, run by run, under the same conditions;
    from one round to the next the machine's speed drifts by more than the servers differ
    (8 clients on 2026-12-07: nbdcore 100k, 79k, 75k IOPS in its three rounds against
    nbdkit's 85k, 81k, 66k). A ratio of the two medians would pair samples of different
    rounds (there 79k against 81k: 0.97x, where the rounds gave 1.18x, 0.97x, 1.14x)."""
    ours, theirs = w.results.get(name, []), w.results.get(peer, [])
    if not ours or not theirs:
        return None
    ratios = [a / b if w.higher_is_better else b / a
              for a, b in zip(ours, theirs, strict=True) if a and b]
    return statistics.median(ratios) if ratios else None


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def report(workloads: list[Workload], rounds: int, rss: dict[str, int]) -> str:
    names = [s.name for s in SERVERS]
    lines = [
        f"Medians of {rounds} rounds; in a round, a server's sample is the median of "
        f"{runs_caption(workloads)}, the servers up at once and taking turns run by run, the "
        "order rotating by one every cycle (the memory row: one run per server alone); "
        "ratio = nbdcore / peer in the same round, median over rounds, oriented so that "
        "> 1.00 means nbdcore is better; "
        "\"appliance\" is the same engine run by the appliance's engine runner with live "
        "metrics to Redis. TLS rows: TLS required (nbdcore --tls required, nbdkit "
        "--tls=require, qemu-nbd tls-creds-x509), no client certificate; servers without "
        "TLS in the benchmark show -.",
        "",
        "| workload | unit | " + " | ".join(names)
        + " | vs nbdkit | vs qemu-nbd | appliance vs bare |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for w in workloads:
        if not w.results:
            continue
        med = {n: statistics.median(w.results[n]) for n in names if w.results.get(n)}
        cells = [fmt(med[n], w.unit) if n in med else "-" for n in names]
        ratios = [fmt_ratio(paired_ratio(w, "nbdcore", peer)) for peer in ("nbdkit", "qemu-nbd")]
        ratios.append(fmt_ratio(paired_ratio(w, "appliance", "nbdcore")))
        lines.append(f"| {w.title} | {w.unit} | " + " | ".join(cells) + " | "
                     + " | ".join(ratios) + " |")
    lines += ["", "Peak resident memory (VmHWM, KiB): "
              + ", ".join(f"{n} {rss.get(n, 0):,}" for n in names)
              + "; largest anonymous part at the end of a sample (RssAnon, KiB): "
              + ", ".join(f"{n} {rss.get(n + ' anon', 0):,}" for n in names)
              + ". The rest of nbdcore's is image pages mapped to be sent: page cache, "
              "up to 1 GiB per image (MAP_RESIDENT_BYTES)."]
    if SLOWEST_SHARE:
        lines += ["", "8 clients at once, the slowest client's IOPS over the clients' mean "
                  "(1.00: all served alike), lowest of all runs: "
                  + ", ".join(f"{n} {min(SLOWEST_SHARE[n]):.2f}" for n in names
                              if n in SLOWEST_SHARE) + "."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=3, help="seconds per fio job")
    parser.add_argument("--quick", action="store_true", help="256 MiB image, 2 s fio jobs")
    parser.add_argument("--only", default="", help="comma-separated workload names")
    parser.add_argument("--servers", default="nbdcore,appliance,nbdkit,qemu-nbd",
                        help="any of nbdcore, nbdcore-w2 (--workers 2), nbdcore-nosplice "
                             "(--no-splice), nbdcore-map (--sendfile never), appliance (the "
                             "engine under the appliance's runner, metrics on), nbdkit, "
                             "qemu-nbd")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "latest.md"))
    args = parser.parse_args()
    for tool in ("nbdcopy", "fio", "qemu-img", "qemu-nbd", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: run `make bench` (it installs the tools)", file=sys.stderr)
            return 1
    runtime = 2 if args.quick else args.runtime
    wanted = set(filter(None, args.servers.split(",")))
    SERVERS[:] = [s for s in SERVERS if s.name in wanted]
    with tempfile.TemporaryDirectory(prefix="nbdbench-", dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        images = make_images(tmp, (256 if args.quick else 1024) * MiB)
        workloads = make_workloads(tmp, runtime)
        if args.only:
            only = set(args.only.split(","))
            workloads = [w for w in workloads if w.name in only]
        if any(w.tls for w in workloads):
            TLS[:] = [BenchTls.create(tmp)]
        rss: dict[str, int] = {}
        for round_no in range(args.rounds):
            for w in workloads:
                servers = [s for s in SERVERS if not (w.tls and s.tls_argv is None)]
                if w.runs:
                    samples = sample_interleaved(w, servers, images, rss)
                else:
                    samples = {s.name: sample_alone(w, s, images, rss) for s in servers}
                for name, value in samples.items():
                    w.results.setdefault(name, []).append(value)
                    print(f"round {round_no + 1} {w.name:19} {name:9} "
                          f"{fmt(value, w.unit)} {w.unit}", flush=True)
    APPLIANCE_ENGINE.close()
    table = report(workloads, args.rounds, rss)
    print()
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.write_text(f"# nbdbench {stamp}\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
