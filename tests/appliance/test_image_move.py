"""Moving an image between nodes (appliance/storage/move.py), with a real engine serving
the source node's exports and the hidden move export, and the target's copy made by
nbdcore.client over NBD; the two nodes are played in this process (appliance_testing's
Cluster)."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest
from appliance_testing import Cluster, MiB, add_node
from conftest import file_extents

from appliance.engine.applier import SpecApplier
from appliance.engine.spec import desired_spec
from appliance.errors import (
    ImageMoveRefused,
    ImportIntoRemoteImage,
    NodeUnavailable,
    UploadIncomplete,
)
from appliance.exports.models import Export
from appliance.exports.services import export_publish
from appliance.storage import move
from appliance.storage.models import Image
from appliance.storage.services import image_create, image_create_from_upload, image_import
from nbdcore.exports import ExportRegistry
from nbdcore.protocol.exports import Client
from nbdcore.server import NbdServer

SIZE = 64 * MiB
ISLANDS = {0: b"boot" * 1024, 20 * MiB: os.urandom(3 * MiB), SIZE - 4096: b"end!" * 1024}


@pytest.fixture
def source_engine(cluster: Cluster):
    """node-a's engine: an nbdcore server fed by node-a's desired spec."""
    registry = ExportRegistry()
    server = NbdServer(registry, host="127.0.0.1", port=0)
    server.start()
    applier = SpecApplier(server, registry)
    add_node("node-a", host="127.0.0.1", port=server.port)

    def refresh() -> None:
        with cluster.as_node("node-a"):
            applier.apply(desired_spec("node-a"))

    yield server, registry, refresh
    server.shutdown(timeout_s=5)
    applier.close_all()


@pytest.fixture
def image(cluster: Cluster) -> Image:
    image = image_create(name="disk", size=SIZE, node="node-a")
    path = cluster.roots["node-a"] / image.filename
    with open(path, "r+b") as f:
        for offset, data in ISLANDS.items():
            f.seek(offset)
            f.write(data)
    return image


@pytest.fixture
def no_background(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """storage.move is run by the test, not sent to a broker."""
    queued: list[int] = []
    monkeypatch.setattr(move.storage_move, "delay", queued.append)
    return queued


@pytest.mark.django_db(transaction=True)
def test_move_copies_only_data_verifies_and_switches_the_export(
        cluster: Cluster, source_engine, image: Image, no_background: list[int]) -> None:
    _, registry, refresh = source_engine
    export_publish(image=image, name="vol")
    refresh()
    source_file = cluster.roots["node-a"] / image.filename
    original = source_file.read_bytes()
    source_map = file_extents(source_file)

    started = move.image_move_start(image=image, node="node-b")
    assert started.moving_to == "node-b"
    assert no_background == [image.pk]
    refresh()  # the source engine now serves the export read-only, plus the hidden copy
    hidden = move.move_export_name(started)
    assert registry.get("vol").read_only
    assert registry.get(hidden).hidden
    assert hidden not in [name for name, _ in registry.list_exports(Client("127.0.0.1:1"))]

    moved = move.image_move_run(image.pk)

    assert moved.node == "node-b"
    assert moved.moving_to == ""
    assert moved.move_error == ""
    assert Export.objects.get(name="vol").node == "node-b"
    target_file = cluster.roots["node-b"] / moved.filename
    assert target_file.read_bytes() == original
    assert file_extents(target_file) == source_map  # holes were not sent, nor filled
    assert cluster.files("node-a") == set()  # the old file went last
    copy_call = next(c for c in cluster.calls if c[1] == "move_in")
    assert copy_call[0] == "node-b"
    refresh()  # node-a withdraws both exports
    assert "vol" not in registry.names()
    assert hidden not in registry.names()


@pytest.mark.django_db(transaction=True)
def test_a_failed_copy_leaves_the_image_where_it_was(
        cluster: Cluster, image: Image, no_background: list[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(move, "CONNECT_PATIENCE_S", 0.3)
    add_node("node-a", host="127.0.0.1", port=1)  # no engine answers there
    move.image_move_start(image=image, node="node-b")
    with pytest.raises(ImageMoveRefused, match=r"cannot reach the engine at 127\.0\.0\.1:1 "):
        move.image_move_run(image.pk)
    after = Image.objects.get(pk=image.pk)
    assert after.node == "node-a"
    assert after.moving_to == ""
    assert "copy to node-b failed" in after.move_error
    assert cluster.files("node-b") == set()  # the partial copy was removed
    assert cluster.files("node-a") == {image.filename}


@pytest.mark.django_db(transaction=True)
def test_moves_that_cannot_start_say_why(cluster: Cluster, image: Image,
                                         no_background: list[int]) -> None:
    with pytest.raises(ImageMoveRefused, match="already on node"):
        move.image_move_start(image=image, node="node-a")
    add_node("node-b", age_s=600)
    with pytest.raises(NodeUnavailable):
        move.image_move_start(image=image, node="node-b")
    add_node("node-b")
    move.image_move_start(image=image, node="node-b")
    with pytest.raises(ImageMoveRefused, match="already moving"):
        move.image_move_start(image=image, node="node-b")
    assert no_background == [image.pk]


@pytest.mark.django_db(transaction=True)
def test_move_through_the_api_answers_202_and_shows_the_move(
        cluster: Cluster, image: Image, no_background: list[int], api: Any) -> None:
    response = api.post(f"/api/v1/images/{image.pk}/move", {"node": "node-b"}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["moving_to"] == "node-b"
    again = api.post(f"/api/v1/images/{image.pk}/move", {"node": "node-b"}, format="json")
    assert again.status_code == 409
    assert again.json()["code"] == "image_move_refused"


@pytest.fixture
def engine_follows(source_engine, monkeypatch: pytest.MonkeyPatch):
    """node-a's engine applies its spec whenever the appliance asks it to converge."""
    _, registry, refresh = source_engine
    monkeypatch.setattr("appliance.engine.tasks.request_sync",
                        lambda node: refresh() if node == "node-a" else None)
    return registry


@pytest.mark.django_db(transaction=True)
def test_an_upload_for_another_node_is_written_there_over_nbd(
        cluster: Cluster, engine_follows: ExportRegistry) -> None:
    registry = engine_follows
    payload = bytearray(8 * MiB)
    payload[MiB:MiB + 4096] = b"x" * 4096
    payload[5 * MiB:6 * MiB] = os.urandom(MiB)
    image = image_create_from_upload(name="uploaded", stream=io.BytesIO(bytes(payload)),
                                     length=len(payload), node="node-a")
    assert image.node == "node-a"
    assert image.import_token == ""
    path = cluster.roots["node-a"] / image.filename
    assert path.read_bytes() == payload
    # zero blocks were never sent: they are holes on the node
    assert [(o, n) for o, n, data in file_extents(path) if data] == [(MiB, 4096),
                                                                    (5 * MiB, MiB)]
    assert not [n for n in registry.names() if n.startswith(".import-")]
    assert not cluster.roots["node-a"].parent.joinpath("central").exists()


@pytest.mark.django_db(transaction=True)
def test_a_failed_upload_to_another_node_leaves_nothing(
        cluster: Cluster, engine_follows: ExportRegistry) -> None:
    short = io.BytesIO(b"\x01" * MiB)  # announces 4 MiB, sends 1
    with pytest.raises(UploadIncomplete):
        image_create_from_upload(name="cut", stream=short, length=4 * MiB, node="node-a")
    assert not Image.objects.filter(name="cut").exists()
    assert cluster.files("node-a") == set()


@pytest.mark.django_db(transaction=True)
def test_replacing_a_remote_images_contents_is_refused_with_the_way_out(
        cluster: Cluster, image: Image) -> None:
    with pytest.raises(ImportIntoRemoteImage, match="node=node-a"):
        image_import(image=image, stream=io.BytesIO(bytes(MiB)), length=MiB)
    assert (cluster.roots["node-a"] / image.filename).stat().st_size == SIZE
