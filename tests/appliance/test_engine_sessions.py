"""Real NBD clients against nbdcore serving an appliance image, recorded as ClientSessions.

An Observer collects ``ConnectionInfo.snapshot()`` at each callback, as the engine worker
will (issue 4); the test then hands them to ``session_record_from_engine`` in order.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from appliance_testing import MiB
from nbdclient import NbdClient

from appliance.exports.services import export_publish
from appliance.sessions.models import ClientSession
from appliance.sessions.selectors import session_feature_stats
from appliance.sessions.services import session_record_from_engine
from appliance.storage.services import image_create, image_path
from nbdcore import Export, ExportRegistry, NbdServer
from nbdcore.backends import SparseFile
from nbdcore.protocol.constants import Opt

pytestmark = [pytest.mark.django_db, pytest.mark.interop]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd binds only this one


class SnapshotObserver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.snapshots: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, conn: Any) -> None:
        with self.lock:
            self.snapshots.append((event, conn.snapshot()))

    def connection_opened(self, conn: Any) -> None:
        pass

    def handshake_finished(self, conn: Any) -> None:
        self._add("handshake", conn)

    def connection_closed(self, conn: Any) -> None:
        self._add("closed", conn)

    def record_all(self) -> list[ClientSession]:
        """Record every snapshot so far; the sessions in connection order."""
        with self.lock:
            taken, self.snapshots = self.snapshots, []
        for _, snapshot in taken:
            session_record_from_engine(snapshot=snapshot, engine_run="test")
        ids = sorted({s["id"] for _, s in taken})
        by_id = {s.connection_id: s for s in ClientSession.objects.filter(connection_id__in=ids)}
        return [by_id[i] for i in ids]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, SnapshotObserver]]:
    image = image_create(name="disk", size=16 * MiB)
    with open(image_path(image), "r+b") as f:
        f.seek(MiB)
        f.write(b"\x5a" * 65536)
    export_publish(image=image, name="vm1")
    observer = SnapshotObserver()
    backend = SparseFile(str(image_path(image)))
    server = NbdServer(ExportRegistry([Export("vm1", backend)]), port=0, observer=observer)
    host, port = server.start()
    try:
        yield f"nbd://{host}:{port}", observer
    finally:
        server.shutdown(timeout_s=5)


def run(*cmd: str) -> str:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"not installed: {cmd[0]}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def closed(observer: SnapshotObserver, count: int, timeout_s: float = 10.0) -> None:
    """Wait until ``count`` connections have closed (the engine reports it asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with observer.lock:
            if sum(1 for event, _ in observer.snapshots if event == "closed") >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"{count} connections did not close within {timeout_s} s")


def test_qemu_img_is_recorded_as_qemu(served) -> None:
    base, observer = served
    run("qemu-img", "map", "--output=json", f"{base}/vm1")
    closed(observer, 1)
    (session,) = observer.record_all()
    assert session.fingerprint == "qemu"
    assert session.structured_replies
    assert session.base_allocation
    assert session.no_zeroes
    assert session.export is not None
    assert session.export.name == "vm1"
    assert session.stats["ops"].get("BLOCK_STATUS", 0) >= 1
    assert session.disconnected_at is not None
    assert session.peer_address == "127.0.0.1"


def test_nbdinfo_is_recorded_as_libnbd(served) -> None:
    base, observer = served
    run("nbdinfo", f"{base}/vm1")
    closed(observer, 1)
    (session,) = observer.record_all()
    assert session.fingerprint == "libnbd"
    assert session.opt_info
    assert session.opt_list_meta_context
    assert not session.base_allocation


def test_nbdcopy_connections_are_recorded_as_libnbd(served, tmp_path: Path) -> None:
    base, observer = served
    run("nbdcopy", "--connections=2", f"{base}/vm1", str(tmp_path / "copy.raw"))
    closed(observer, 2)
    sessions = observer.record_all()
    assert len(sessions) >= 2
    assert {s.fingerprint for s in sessions} == {"libnbd"}
    assert sum(s.bytes_read for s in sessions) >= 65536
    assert sum(s.hole_bytes for s in sessions) > 0


def test_python_libnbd_is_recorded_as_libnbd(served) -> None:
    base, observer = served
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-libnbd is not installed")
    script = (
        "import nbd\n"
        "h = nbd.NBD()\n"
        "h.set_full_info(True)\n"
        f"h.connect_uri('{base}/vm1')\n"
        "h.pwrite(b'x' * 4096, 0)\n"
        "h.flush()\n"
        "h.shutdown()\n"
    )
    result = subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    closed(observer, 1)
    (session,) = observer.record_all()
    assert session.fingerprint == "libnbd"
    assert session.writes == 1
    assert session.bytes_written == 4096
    assert session.stats["ops"]["FLUSH"] == 1


def test_nbd_client_negotiation_is_recorded_as_nbd_client(served) -> None:
    base, observer = served
    port = int(base.rsplit(":", 1)[1])
    # What the kernel's nbd-client sends: flags, then GO with no info requests; then DISC.
    with NbdClient.connect(port) as client:
        client.read_greeting()
        client.send_client_flags(client.handshake_flags & 0x3)
        _, details = client.opt_go("vm1", infos=(), option=Opt.GO)
        assert details is not None
        assert details.size == 16 * MiB
        client.disconnect()
    closed(observer, 1)
    (session,) = observer.record_all()
    assert session.fingerprint == "nbd-client"
    assert not session.structured_replies
    assert session.opt_go
    assert session.via == "GO"


def test_feature_stats_over_real_clients(served) -> None:
    base, observer = served
    run("qemu-img", "info", f"{base}/vm1")
    run("nbdinfo", f"{base}/vm1")
    closed(observer, 2)
    observer.record_all()
    stats = session_feature_stats()
    assert stats["sessions"] == 2
    assert stats["features"]["structured_replies"]["share"] == 1.0
    assert stats["features"]["base_allocation"]["share"] == 0.5
    assert set(stats["by_fingerprint"]) == {"qemu", "libnbd"}
