"""Several hosts on one machine: a central host (web, API, beat; no storage) and two storage
nodes (engine workers only) on 127.0.0.2 and 127.0.0.3, each with its own storage root and
port, sharing one PostgreSQL database and one Redis. Every check goes through the central
API and real NBD clients dialling each node's own address."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require, wait_until

from .cluster import Cluster, run_cluster

pytestmark = [pytest.mark.slow, pytest.mark.interop]
MiB = 1 << 20
DOWN_AFTER = 6  # APPLIANCE_NODE_DOWN_AFTER of the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require("redis-server", "nbdinfo", "nbdcopy", "qemu-io")
    with run_cluster(tmp_path_factory.mktemp("cluster"), down_after=DOWN_AFTER) as running:
        yield running


def api(cluster: Cluster, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return cluster.central.request(method, path, body)


def node_row(cluster: Cluster, name: str) -> dict[str, Any]:
    status, body = api(cluster, "GET", f"/nodes/{name}/")
    assert status == 200, body
    return body


def create_image(cluster: Cluster, name: str, node: str, size: int = 64 * MiB) -> dict:
    status, image = api(cluster, "POST", "/images/", {"name": name, "size": size, "node": node})
    assert status == 201, image
    assert image["node"] == node
    return image


def publish(cluster: Cluster, name: str, image: dict) -> dict:
    status, export = api(cluster, "POST", "/exports/", {"name": name, "image": image["id"]})
    assert status == 201, export
    return export


def served(uri: str) -> bool:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                          timeout=30).returncode == 0


def size_of(uri: str) -> int | None:
    result = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                            timeout=30)
    return int(result.stdout) if result.returncode == 0 else None


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)


def sessions_settled(cluster: Cluster, export_id: int, timeout: float = 20) -> bool:
    """True once the export's recorded sessions are all closed and stay the same for 1 s."""
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = api(cluster, "GET", f"/sessions/?export={export_id}&page_size=1000")
        assert status == 200, body
        now = sorted((s["id"], s["active"]) for s in body["results"])
        if now == last and not any(active for _, active in now):
            return True
        last = now
        time.sleep(1)
    return False


def test_both_nodes_register_and_are_up(cluster: Cluster) -> None:
    status, body = api(cluster, "GET", "/nodes/")
    assert status == 200, body
    rows = {n["name"]: n for n in body.get("results", body)}
    assert set(rows) == {"node-a", "node-b"}  # the central host stores nothing
    for name, node in cluster.nodes.items():
        assert rows[name]["status"] == "up", rows[name]
        assert rows[name]["nbd_host"] == node.address
        assert rows[name]["nbd_port"] == node.port


def test_images_and_exports_on_each_node_are_served_at_its_address(
        cluster: Cluster, tmp_path: Path) -> None:
    exports = {}
    for name, node in cluster.nodes.items():
        before = {n: other.files() for n, other in cluster.nodes.items()}
        image = create_image(cluster, f"disk-{name}", name)
        # the file is on that node's storage root, and only there
        (new,) = node.files() - before[name]
        assert all(other.files() == before[n] for n, other in cluster.nodes.items()
                   if n != name)
        assert (node.storage_root / new).stat().st_size == 64 * MiB
        export = publish(cluster, f"vol-{name}", image)
        assert export["node"] == name
        assert export["uri"] == node.uri(f"vol-{name}")
        assert export["available"] is True
        exports[name] = export
    assert not (cluster.central.var_dir / "images").exists() or not any(
        (cluster.central.var_dir / "images").iterdir())

    for index, (name, node) in enumerate(cluster.nodes.items()):
        uri = exports[name]["uri"]
        assert wait_until(lambda uri=uri: served(uri), timeout=20), uri
        byte = 0x41 + index
        done = qemu_io(uri, f"write -P {byte:#x} 1M 2M", f"read -P {byte:#x} 1M 2M")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Pattern verification failed" not in done.stdout
        copy = tmp_path / f"{name}.raw"
        subprocess.run(["nbdcopy", uri, str(copy)], check=True, capture_output=True,
                       timeout=60)
        data = copy.read_bytes()
        assert len(data) == 64 * MiB
        assert data[MiB:3 * MiB] == bytes([byte]) * (2 * MiB)
        assert data[:MiB] == bytes(MiB)
        assert data[3 * MiB:] == bytes(61 * MiB)
        # an address that is not this node's does not serve the export
        for other in cluster.nodes.values():
            if other is not node:
                assert not served(other.uri(f"vol-{name}"))


def test_grow_clone_and_delete_on_node_b_from_the_central_api(cluster: Cluster) -> None:
    node = cluster.nodes["node-b"]
    others = {n: o.files() for n, o in cluster.nodes.items() if n != "node-b"}
    before = node.files()
    image = create_image(cluster, "grow-me", "node-b")
    (filename,) = node.files() - before
    export = publish(cluster, "grow-vol", image)
    assert wait_until(lambda: served(export["uri"]), timeout=20)

    status, grown = api(cluster, "POST", f"/images/{image['id']}/grow", {"size": 96 * MiB})
    assert status == 200, grown
    assert grown["size"] == 96 * MiB
    assert (node.storage_root / filename).stat().st_size == 96 * MiB
    assert wait_until(lambda: size_of(export["uri"]) == 96 * MiB, timeout=20)

    # a refusal on the node reaches the API as the same error
    status, body = api(cluster, "POST", f"/images/{image['id']}/grow", {"size": 32 * MiB})
    assert status == 400, body
    assert body["code"] == "shrink_not_forced"
    status, body = api(cluster, "DELETE", f"/images/{image['id']}/")
    assert status == 409, body
    assert body["code"] == "image_in_use"

    status, clone = api(cluster, "POST", f"/images/{image['id']}/clone", {"name": "grow-copy"})
    assert status == 201, clone
    assert clone["node"] == "node-b"
    assert clone["size"] == 96 * MiB
    (clone_file,) = node.files() - before - {filename}

    # The engine records the sessions of the clients above as they close; an export
    # deleted while one is being written can fail (a race of export_delete, not of nodes).
    assert sessions_settled(cluster, export["id"])
    assert api(cluster, "DELETE", f"/exports/{export['id']}/")[0] == 204
    for victim, file in ((image, filename), (clone, clone_file)):
        status, body = api(cluster, "DELETE", f"/images/{victim['id']}/")
        assert status == 204, body
        assert not (node.storage_root / file).exists()
        assert api(cluster, "GET", f"/images/{victim['id']}/")[0] == 404
    assert node.files() == before
    assert {n: o.files() for n, o in cluster.nodes.items() if n != "node-b"} == others


def test_moving_an_image_from_node_a_to_node_b_while_a_client_reads_it(cluster: Cluster,
                                                                       tmp_path: Path) -> None:
    node_a, node_b = cluster.nodes["node-a"], cluster.nodes["node-b"]
    image = create_image(cluster, "traveller", "node-a")
    export = publish(cluster, "travel-vol", image)
    uri_a = export["uri"]
    assert uri_a == node_a.uri("travel-vol")
    assert wait_until(lambda: served(uri_a), timeout=20)
    written = qemu_io(uri_a, "write -P 0x5a 8M 3M", "write -P 0xa5 40M 1M")
    assert written.returncode == 0, written.stdout + written.stderr
    before = qemu_io(uri_a, "read -P 0x5a 8M 3M", "read -P 0xa5 40M 1M")  # read before
    assert before.returncode == 0
    assert "Pattern verification failed" not in before.stdout
    files_a = node_a.files()

    status, body = api(cluster, "POST", f"/images/{image['id']}/move", {"node": "node-b"})
    assert status == 202, body
    assert body["moving_to"] == "node-b"

    def moved() -> dict:
        return api(cluster, "GET", f"/images/{image['id']}/")[1]

    assert wait_until(lambda: moved()["node"] == "node-b" and not moved()["moving_to"],
                      timeout=60), moved()
    assert moved()["move_error"] == ""
    status, after_export = api(cluster, "GET", f"/exports/{export['id']}/")
    assert status == 200
    assert after_export["node"] == "node-b"
    uri_b = after_export["uri"]
    assert uri_b == node_b.uri("travel-vol")
    assert wait_until(lambda: served(uri_b), timeout=20)
    after = qemu_io(uri_b, "read -P 0x5a 8M 3M", "read -P 0xa5 40M 1M", "read -P 0 0 8M")
    assert after.returncode == 0, after.stdout + after.stderr
    assert "Pattern verification failed" not in after.stdout
    # node-a withdraws it when its engine applies the switch, pushed to it after commit
    assert wait_until(lambda: not served(uri_a), timeout=20)
    # the old copy is gone from node-a; node-b's copy holds only the data (sparse)
    assert wait_until(lambda: len(node_a.files()) == len(files_a) - 1, timeout=20)
    new_files = [node_b.storage_root / f for f in node_b.files()]
    newest = max(new_files, key=lambda p: p.stat().st_mtime)
    assert newest.stat().st_blocks * 512 < 8 * MiB
    copy = tmp_path / "moved.raw"
    subprocess.run(["nbdcopy", uri_b, str(copy)], check=True, capture_output=True, timeout=60)
    data = copy.read_bytes()
    assert data[8 * MiB:11 * MiB] == b"\x5a" * (3 * MiB)
    assert data[40 * MiB:41 * MiB] == b"\xa5" * MiB


def test_an_upload_through_the_central_api_lands_on_node_b(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    node_b = cluster.nodes["node-b"]
    payload = bytearray(16 * MiB)
    payload[2 * MiB:3 * MiB] = bytes(range(256)) * 4096
    request = urllib.request.Request(
        f"{cluster.central.api}/images/import?name=uploaded-b&node=node-b",
        data=bytes(payload), method="POST",
        headers={"Authorization": f"Token {cluster.central.token}",
                 "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 201
        image = json.loads(response.read())
    assert image["node"] == "node-b"
    export = publish(cluster, "uploaded-vol", image)
    assert export["uri"] == node_b.uri("uploaded-vol")
    assert wait_until(lambda: served(export["uri"]), timeout=20)
    copy = tmp_path / "uploaded.raw"
    subprocess.run(["nbdcopy", export["uri"], str(copy)], check=True, capture_output=True,
                   timeout=60)
    assert copy.read_bytes() == payload
    # TLS to node-b's own address: the nodes' shared server certificate names it
    status, issued = api(cluster, "POST", "/tls/client-certificates/", {"name": "cluster-user"})
    assert status == 201, issued
    certs = tmp_path / "certs"
    certs.mkdir()
    for key, filename in (("ca_pem", "ca-cert.pem"), ("cert_pem", "client-cert.pem"),
                          ("key_pem", "client-key.pem")):
        (certs / filename).write_text(issued[key])
    tls_uri = export["uri"].replace("nbd://", "nbds://") + f"?tls-certificates={certs}"
    assert tls_uri.startswith(f"nbds://{node_b.address}:")
    assert wait_until(lambda: served(tls_uri), timeout=30), tls_uri


def test_stopping_node_b_marks_it_down_while_node_a_serves(cluster: Cluster) -> None:
    exports = {e["name"]: e for e in api(cluster, "GET", "/exports/?page_size=100")[1]["results"]}
    vol_a, vol_b = exports["vol-node-a"], exports["vol-node-b"]
    image_b = api(cluster, "GET", f"/images/{vol_b['image']}/")[1]
    node_b = cluster.nodes["node-b"]

    stopped_at = time.monotonic()
    assert node_b.terminate() == 0, node_b.stack.log("worker")[-3000:]
    assert wait_until(lambda: node_row(cluster, "node-b")["status"] == "down",
                      timeout=DOWN_AFTER + 10)
    # the last heartbeat came at most one beat (5 s) before the stop
    assert time.monotonic() - stopped_at < DOWN_AFTER + 10
    assert node_row(cluster, "node-a")["status"] == "up"

    status, body = api(cluster, "GET", f"/exports/{vol_b['id']}/")
    assert status == 200, body
    assert body["available"] is False
    assert not served(vol_b["uri"])
    status, body = api(cluster, "GET", f"/exports/{vol_a['id']}/")
    assert status == 200, body
    assert body["available"] is True

    # node-a keeps serving what a client wrote before
    done = qemu_io(vol_a["uri"], "read -P 0x41 1M 2M")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pattern verification failed" not in done.stdout

    # an operation on node-b's image is refused at once, not after the remote timeout
    started = time.monotonic()
    status, body = api(cluster, "POST", f"/images/{image_b['id']}/grow", {"size": 128 * MiB})
    assert status == 503, body
    assert body["code"] == "node_unavailable"
    assert time.monotonic() - started < 5
    # and placing a new image on it is refused
    status, body = api(cluster, "POST", "/images/", {"name": "nowhere", "size": 64 * MiB,
                                                      "node": "node-b"})
    assert status == 400, body
    assert body["code"] == "node_unavailable"
