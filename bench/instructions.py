"""Instructions the engine spends per request, counted by valgrind's callgrind.

Wall-clock benchmarks on a shared two-core machine swing by 10-25% from run to run;
callgrind counts the user-space instructions the engine executes, which is the same
from one run to the next whatever else the machine is doing. Use it to judge a change
to the per-request path (kernel work, such as the copies of a read, is not counted).

    python bench/instructions.py [--requests 8000] [--tree PATH]

Each workload runs the engine (``--tree``, default this checkout) under callgrind twice:
once with a client that connects and does nothing, once with the client sending
``--requests`` requests in pipelined groups of 16. The difference divided by the number of
requests is what one request costs. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from nbdclient import NbdClient  # noqa: E402

from nbdcore.protocol.constants import Cmd  # noqa: E402

IMAGE_SIZE = 64 << 20
GROUP = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(port: int, requests: int, kind: str) -> None:
    """Pipelined 4 KiB requests at random aligned offsets, GROUP at a time."""
    deadline = time.monotonic() + 120  # valgrind starts Python slowly
    while True:
        try:
            client = NbdClient.connect(port, timeout=600)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    rnd = random.Random(1)
    with client:
        client.handshake("")
        for _ in range(0, requests, GROUP):
            cookies = []
            for _ in range(GROUP):
                offset = rnd.randrange(IMAGE_SIZE // 4096) * 4096
                if kind == "read":
                    cookies.append(client.send(Cmd.READ, offset, 4096))
                else:
                    cookies.append(client.send(Cmd.WRITE, offset, 4096, payload=b"w" * 4096))
            for cookie in cookies:
                assert client.wait(cookie).ok
        client.disconnect()


def count(tree: Path, image: Path, requests: int, kind: str, out: Path) -> int:
    """Instructions of one engine run that served ``requests`` requests of ``kind``."""
    port = free_port()
    engine = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         "-m", "nbdcore", "serve", str(image), "--port", str(port), "--spin-us", "0"],
        cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        drive(port, requests, kind)
    finally:
        engine.terminate()
        engine.wait(120)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose nbdcore is counted")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is missing: apt-get install valgrind", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="nbdinstr-") as d:
        tmp = Path(d)
        image = tmp / "disk.raw"
        image.write_bytes(os.urandom(IMAGE_SIZE))
        print(f"{'request':24} {'instructions':>12}")
        for kind in ("read", "write"):
            idle = count(Path(args.tree), image, 0, kind, tmp / f"{kind}-idle.out")
            busy = count(Path(args.tree), image, args.requests, kind, tmp / f"{kind}.out")
            print(f"{'4 KiB ' + kind + ', 16 in flight':24} {(busy - idle) / args.requests:12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
