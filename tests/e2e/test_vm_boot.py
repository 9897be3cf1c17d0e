"""A VM boots from a disk provisioned through the API (issue 6).

The disk is built from Debian packages by ``tests/e2e/vm/build.py`` (syslinux, Debian's
kernel, a busybox initramfs; an ext4 data partition with a payload and its checksum),
imported through the API, exported, and booted by ``qemu-system-x86_64`` (TCG, no network)
with the export as its virtio disk over ``nbd://``. The guest's /init checks the payload,
prints what earlier boots wrote to ``boots.log``, appends a line and powers off; it waits for
a line on its serial console first, so the test can look at the running VM's session.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, require, wait_until

from .stack import Stack, start_stack
from .vm import build
from .vm.qemu import QEMU, Vm

pytestmark = [pytest.mark.slow, pytest.mark.interop]
BOOT_TIMEOUT = 120  # seconds to the guest's first marker under TCG on a busy machine
CACHE_DIR = ROOT / "var" / "cache" / "test-vm"


@pytest.fixture(scope="module")
def disk_image() -> Path:
    require(QEMU, "redis-server", "nbdcopy", "nbdinfo", "debugfs")
    missing = build.missing_tools()
    if missing:
        pytest.skip("cannot build the test VM image: " + ", ".join(missing))
    return build.cached_image(CACHE_DIR)


@pytest.fixture(scope="module")
def stack(disk_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("appliance"))
    yield running
    assert running.stop() == 0, running.log("worker")[-2000:]


def upload(stack: Stack, name: str, path: Path) -> dict[str, Any]:
    """POST /images/import?name=NAME with the raw file as the body."""
    size = path.stat().st_size
    with open(path, "rb") as body:
        req = urllib.request.Request(f"{stack.api}/images/import?name={name}", data=body,
                                     method="POST")
        req.add_header("Content-Type", "application/octet-stream")
        req.add_header("Content-Length", str(size))
        req.add_header("Authorization", f"Token {stack.token}")
        with urllib.request.urlopen(req, timeout=120) as response:
            assert response.status == 201
            return json.loads(response.read())


def export(stack: Stack, name: str, image: dict[str, Any]) -> dict[str, Any]:
    status, created = stack.request("POST", "/exports/", {"name": name, "image": image["id"]})
    assert status == 201, created
    status, body = stack.request("GET", f"/exports/{created['id']}")
    assert status == 200, body
    assert body["uri"].endswith(f"/{name}"), body
    uri = local_uri(body["uri"])
    assert wait_until(lambda: subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                                             timeout=30).returncode == 0, timeout=30), body
    return body


def local_uri(uri: str) -> str:
    """The export's URI as this machine reaches it (the appliance binds 127.0.0.1)."""
    host_port, _, name = uri.removeprefix("nbd://").partition("/")
    port = host_port.rsplit(":", 1)[1] if ":" in host_port else "10809"
    return f"nbd://127.0.0.1:{port}/{name}"


def export_sha256(uri: str) -> str:
    result = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return hashlib.sha256(result.stdout).hexdigest()


def boots_log(uri: str, tmp: Path) -> list[str]:
    """The lines of ``boots.log`` on the export's data partition, read on the host."""
    disk = tmp / "copy.img"
    subprocess.run(["nbdcopy", uri, str(disk)], check=True, capture_output=True, timeout=120)
    data = tmp / "data.ext4"
    with open(disk, "rb") as f:
        f.seek(build.DATA_START)
        data.write_bytes(f.read(build.DATA_SIZE))
    result = subprocess.run(["debugfs", "-R", "cat /boots.log", str(data)], capture_output=True,
                            text=True, timeout=60)
    return [line for line in result.stdout.splitlines() if line.strip()]


def boot(uri: str, label: str, log: Path, *, while_waiting: Any = None,
         while_holding: Any = None, timeout: float = BOOT_TIMEOUT) -> Vm:
    """Boot the VM from ``uri`` to power-off; the guest's boot is labelled ``label``.

    ``while_waiting(vm)`` runs while the guest waits before reading its payload and
    ``while_holding(vm)`` after it wrote its file, before it powers off.
    """
    with Vm(uri, log) as vm:
        assert vm.wait_for("VMTEST-WAITING", timeout), (
            f"the guest's marker did not appear\n{vm.report()}")
        if while_waiting:
            while_waiting(vm)
        vm.send(f"{label} hold" if while_holding else label)
        if while_holding:
            assert vm.wait_for("VMTEST-HOLDING", 60), vm.report()
            while_holding(vm)
            vm.send("poweroff")
        code = vm.wait(60)
        assert code == 0, f"qemu did not power off cleanly ({code})\n{vm.report()}"
        assert not vm.lines("VMTEST-FAIL"), vm.report()
        assert vm.lines("VMTEST-PAYLOAD-OK") == [""], vm.report()
        wrote = vm.lines(f"VMTEST-WROTE {label} ")
        assert len(wrote) == 1, vm.report()
        assert vm.lines("VMTEST-DONE") == [""], vm.report()
    return vm


def active_session(stack: Stack, export_id: int) -> dict[str, Any] | None:
    """The export's one active session with live counters (the VM is its only client)."""
    status, body = stack.request("GET", f"/sessions/?export={export_id}&active=true")
    assert status == 200, body
    live = [s for s in body["results"] if s.get("live")]
    return live[0] if len(live) == 1 else None


def bytes_read(stack: Stack, export_id: int) -> int:
    session = active_session(stack, export_id)
    return -1 if session is None else int(session["live"]["stats"]["bytes_read"])


@pytest.fixture(scope="module")
def original(stack: Stack, disk_image: Path) -> dict[str, Any]:
    """The built disk imported through the API and exported as ``vm-boot``."""
    image = upload(stack, "vm-boot", disk_image)
    assert image["size"] == disk_image.stat().st_size
    exported = export(stack, "vm-boot", image)
    digest = hashlib.sha256(disk_image.read_bytes()).hexdigest()
    assert export_sha256(local_uri(exported["uri"])) == digest
    return {"image": image, "export": exported}


def test_vm_boots_from_an_export_and_a_second_boot_sees_its_file(
        stack: Stack, original: dict[str, Any], tmp_path: Path) -> None:
    exported = original["export"]
    uri = local_uri(exported["uri"])
    seen: dict[str, Any] = {}

    def while_waiting(vm: Vm) -> None:
        # The guest booted from the export and waits: its session is there, live.
        assert wait_until(lambda: active_session(stack, exported["id"]) is not None,
                          timeout=20), (stack.request("GET", "/sessions/?active=true"),
                                        vm.report())
        session = active_session(stack, exported["id"])
        assert session is not None
        assert session["fingerprint"] == "qemu", session
        assert session["features"]["structured_replies"] is True, session
        assert session["features"]["base_allocation"] is True, session
        seen["session"] = session["id"]
        seen["before"] = int(session["live"]["stats"]["bytes_read"])
        assert seen["before"] > 0, session

    def while_holding(vm: Vm) -> None:
        # The guest has read its payload since: the live counter grew by at least that.
        target = seen["before"] + build.PAYLOAD_SIZE
        assert wait_until(lambda: bytes_read(stack, exported["id"]) >= target, timeout=20), (
            seen, active_session(stack, exported["id"]), vm.report())
        session = active_session(stack, exported["id"])
        assert session is not None
        assert session["id"] == seen["session"], session

    started = time.monotonic()
    first = boot(uri, "first", tmp_path / "first.log", while_waiting=while_waiting,
                 while_holding=while_holding)
    assert first.lines("VMTEST-SEEN") == [], first.report()
    (first_id,) = first.lines("VMTEST-WROTE first ")
    first_took = time.monotonic() - started

    second = boot(uri, "second", tmp_path / "second.log")
    assert second.lines("VMTEST-SEEN") == [f"first {first_id}"], second.report()
    (second_id,) = second.lines("VMTEST-WROTE second ")
    # and on the host, through the export, the file holds both boots' lines
    assert boots_log(uri, tmp_path) == [f"first {first_id}", f"second {second_id}"]
    assert first_took < 150, first_took

    # each VM's session ended with it, its totals recorded (the VMs were the only clients
    # that wrote: nbdinfo and nbdcopy only read)
    def finished() -> list[dict[str, Any]]:
        status, body = stack.request("GET", f"/sessions/?export={exported['id']}&active=false")
        assert status == 200
        return [s for s in body["results"] if s["bytes_written"]]

    assert wait_until(lambda: len(finished()) == 2, timeout=20), finished()
    for session in finished():
        assert session["fingerprint"] == "qemu", session
        assert session["close_reason"] == "client sent NBD_CMD_DISC", session
        assert session["bytes_read"] > build.PAYLOAD_SIZE, session


def test_copy_on_write_clone_boots_and_the_original_is_unchanged(
        stack: Stack, original: dict[str, Any], tmp_path: Path) -> None:
    source_uri = local_uri(original["export"]["uri"])
    history = boots_log(source_uri, tmp_path)
    digest = export_sha256(source_uri)

    status, image = stack.request("POST", f"/images/{original['image']['id']}/clone",
                                  {"name": "vm-boot-clone"})
    assert status == 201, image
    assert image["size"] == original["image"]["size"]
    clone_uri = local_uri(export(stack, "vm-boot-clone", image)["uri"])

    vm = boot(clone_uri, "clone", tmp_path / "clone.log")
    assert vm.lines("VMTEST-SEEN") == history, vm.report()
    (clone_id,) = vm.lines("VMTEST-WROTE clone ")
    assert boots_log(clone_uri, tmp_path) == [*history, f"clone {clone_id}"]

    # what the clone's VM wrote is not in the original
    assert export_sha256(source_uri) == digest
    assert boots_log(source_uri, tmp_path) == history


def test_a_failing_guest_fails_the_test_with_its_serial_log(disk_image: Path,
                                                             tmp_path: Path) -> None:
    """The checks above report what the guest said: a disk that does not boot, and one whose
    payload is corrupt (from local copies; no appliance needed)."""
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"")
    os.truncate(blank, build.MiB)
    with pytest.raises(AssertionError, match=r"(?s)marker did not appear.*serial log"
                       r".*firmware \(SeaBIOS\) log.*Booting from Hard Disk"):
        boot(str(blank), "blank", tmp_path / "blank.log", timeout=10)

    corrupt = tmp_path / "corrupt.img"
    corrupt.write_bytes(disk_image.read_bytes())
    data = corrupt.read_bytes()
    offset = data.index(build.payload()[:4096], build.DATA_START)
    with open(corrupt, "r+b") as f:
        f.seek(offset + 100)
        f.write(bytes([data[offset + 100] ^ 0xFF]))
    with pytest.raises(AssertionError, match=r"(?s)serial log.*VMTEST-FAIL payload checksum"):
        boot(str(corrupt), "corrupt", tmp_path / "corrupt.log")
