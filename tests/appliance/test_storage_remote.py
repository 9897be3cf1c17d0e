"""Storage operations run on the node that holds the file (appliance.storage.remote).

This process plays a central host; the transport is replaced so that each operation runs
in-process as the node it is sent to (its name, its role, its own storage root), with its
arguments and answer passed through JSON as Celery would. The wire itself (the task, its
queue, the timeout) is checked separately with the task's sending mocked."""

from __future__ import annotations

import json
from typing import Any

import pytest
from appliance_testing import Cluster, MiB, add_node
from django.core.exceptions import ValidationError
from django.http import Http404

from appliance.errors import (
    ApplianceError,
    ImageInUse,
    ImageNameTaken,
    NodeOperationFailed,
    NodeUnavailable,
    QuotaExceeded,
    ShrinkNotForced,
)
from appliance.exports.services import export_publish
from appliance.storage import remote
from appliance.storage.models import Image
from appliance.storage.services import (
    image_check_create,
    image_check_grow,
    image_clone,
    image_create,
    image_delete,
    image_grow,
)
from appliance.storage.tasks import storage_run

# ---------------------------------------------------------------- which host does the work


def test_is_local_only_for_this_nodes_images_on_a_host_with_storage(settings) -> None:
    settings.APPLIANCE_NODE_NAME = "here"
    settings.APPLIANCE_ROLE = "all"
    assert remote.is_local("here")
    assert not remote.is_local("there")
    settings.APPLIANCE_ROLE = "node"
    assert remote.is_local("here")
    settings.APPLIANCE_ROLE = "central"
    assert not remote.is_local("here")


@pytest.mark.django_db
def test_single_host_images_never_leave_the_process(monkeypatch, storage_root) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("a single host sent a storage operation away")

    monkeypatch.setattr(remote, "_dispatch", refuse)
    image = image_create(name="disk", size=4 * MiB)
    assert image.node == "node1"
    image_grow(image=image, size=8 * MiB)
    image_clone(source=image, name="copy")
    assert len(list(storage_root.iterdir())) == 2


# ---------------------------------------------------------------- services on another node


@pytest.mark.django_db(transaction=True)
def test_create_grow_clone_delete_run_on_the_images_node(cluster: Cluster) -> None:
    image = image_create(name="disk", size=4 * MiB, node="node-b")
    assert image.node == "node-b"
    assert Image.objects.get(pk=image.pk).node == "node-b"
    assert cluster.files("node-b") == {image.filename}
    assert cluster.files("node-a") == set()
    assert not cluster.roots["node-a"].parent.joinpath("central").exists()
    assert cluster.calls[0][:2] == ("node-b", "create")

    assert image_check_grow(image=image, size=8 * MiB, force=False) == 4 * MiB
    grown = image_grow(image=image, size=8 * MiB)
    assert grown.size == image.size == 8 * MiB
    assert (cluster.roots["node-b"] / image.filename).stat().st_size == 8 * MiB

    copy = image_clone(source=image, name="copy")
    assert copy.node == "node-b"
    assert copy.cloned_from_id == image.pk
    assert cluster.files("node-b") == {image.filename, copy.filename}

    image_delete(image=copy)
    assert not Image.objects.filter(pk=copy.pk).exists()
    assert cluster.files("node-b") == {image.filename}  # unlinked on the node, on commit
    assert [c[1] for c in cluster.calls] == ["create", "check_grow", "grow", "clone", "delete"]


@pytest.mark.django_db(transaction=True)
def test_refusals_on_the_node_reach_the_caller_as_the_same_errors(cluster: Cluster,
                                                                  settings) -> None:
    image = image_create(name="disk", size=4 * MiB, node="node-a")
    with pytest.raises(ShrinkNotForced) as shrink:
        image_grow(image=image, size=2 * MiB)
    assert shrink.value.status == 400
    assert shrink.value.field == "size"
    assert "force=true" in shrink.value.message
    with pytest.raises(ImageNameTaken):
        image_create(name="disk", size=4 * MiB, node="node-b")
    assert cluster.files("node-b") == set()

    export_publish(image=image, name="vol")
    with pytest.raises(ImageInUse, match="'vol'"):
        image_delete(image=image)
    assert cluster.files("node-a") == {image.filename}

    settings.APPLIANCE_PROVISION_QUOTA = 6 * MiB
    with pytest.raises(QuotaExceeded):
        image_grow(image=image, size=8 * MiB)
    with pytest.raises(QuotaExceeded):
        image_check_create(name="more", size=4 * MiB, node="node-b")


@pytest.mark.django_db(transaction=True)
def test_free_space_is_read_on_the_node(cluster: Cluster, settings) -> None:
    image_check_create(name="x", size=MiB, node="node-a")
    assert cluster.calls[-1][:2] == ("node-a", "check_free_space")
    image_check_create(name="x", size=MiB)  # central, no node chosen: placement decides
    assert len(cluster.calls) == 1
    settings.APPLIANCE_STORAGE_RESERVE = 1 << 60
    with pytest.raises(ApplianceError) as refused:
        image_create(name="big", size=MiB, node="node-a")
    assert refused.value.code == "insufficient_space"
    assert not Image.objects.exists()
    assert cluster.files("node-a") == set()


@pytest.mark.django_db(transaction=True)
def test_a_misrouted_operation_is_refused_by_the_node(cluster: Cluster) -> None:
    image = image_create(name="disk", size=4 * MiB, node="node-a")
    reply = cluster.dispatch("node-b", "grow", {"image": image.pk, "size": 8 * MiB}, 1)
    error = remote.error_from_reply(reply["error"], node="node-b")
    assert isinstance(error, NodeOperationFailed)
    assert "node 'node-a'" in str(error)
    assert Image.objects.get(pk=image.pk).size == 4 * MiB


@pytest.mark.django_db(transaction=True)
def test_delete_file_removes_only_names_the_appliance_gives(cluster: Cluster) -> None:
    image = image_create(name="disk", size=4 * MiB, node="node-a")
    with pytest.raises(NodeOperationFailed, match="not a name"):
        remote.run_on_node("node-a", "delete_file", node="node-a", filename="../etc/passwd")
    assert remote.run_on_node("node-a", "delete_file", node="node-a",
                              filename=image.filename) is True
    assert cluster.files("node-a") == set()
    assert remote.run_on_node("node-a", "delete_file", node="node-a",
                              filename=image.filename) is False


# ---------------------------------------------------------------- errors across the wire


@pytest.mark.parametrize("error", [
    ShrinkNotForced("too small"),
    ImageInUse("in use"),
    NodeUnavailable("gone", field="node", status=400),
])
def test_appliance_errors_keep_class_code_status_field_and_message(error) -> None:
    reply = json.loads(json.dumps(remote.error_to_reply(error)))
    back = remote.error_from_reply(reply, node="n")
    assert type(back) is type(error)
    assert (back.code, back.status, back.field, back.message) == (
        error.code, error.status, error.field, error.message)


def test_an_error_this_version_does_not_know_keeps_its_code_and_status() -> None:
    back = remote.error_from_reply({"type": "appliance", "code": "brand_new", "status": 418,
                                    "field": None, "detail": "newer node"}, node="n")
    assert isinstance(back, ApplianceError)
    assert (back.code, back.status, back.message) == ("brand_new", 418, "newer node")


def test_validation_not_found_and_other_errors_cross_too() -> None:
    def round_trip(exc: Exception) -> Exception:
        return remote.error_from_reply(json.loads(json.dumps(remote.error_to_reply(exc))),
                                       node="n")

    back = round_trip(ValidationError({"size": ["too big"]}))
    assert isinstance(back, ValidationError)
    assert back.message_dict == {"size": ["too big"]}
    assert isinstance(round_trip(Image.DoesNotExist("gone")), Http404)
    other = round_trip(OSError(5, "Input/output error"))
    assert isinstance(other, NodeOperationFailed)
    assert other.status == 502
    assert "Input/output error" in other.message


def test_the_task_answers_json_and_never_raises(monkeypatch) -> None:
    monkeypatch.setitem(remote.OPERATIONS, "echo", lambda **kw: {"got": kw})
    assert storage_run.apply(args=["echo", {"a": 1}]).get() == {"result": {"got": {"a": 1}}}
    unknown = storage_run.apply(args=["no-such-op", {}]).get()
    assert unknown["error"]["type"] == "internal"
    assert "no-such-op" in unknown["error"]["detail"]

    def boom(**kw: Any) -> None:
        raise ShrinkNotForced("no")

    monkeypatch.setitem(remote.OPERATIONS, "boom", boom)
    assert storage_run.apply(args=["boom", {}]).get()["error"]["code"] == "shrink_not_forced"


# ---------------------------------------------------------------- the wire: queue, timeout


class _Result:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.forgotten = False

    def get(self, **kwargs: Any) -> Any:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def forget(self) -> None:
        self.forgotten = True


@pytest.mark.django_db
def test_run_on_node_sends_to_the_nodes_queue_with_an_expiry(monkeypatch, settings) -> None:
    settings.APPLIANCE_REMOTE_TIMEOUT = 7
    sent: list[dict[str, Any]] = []
    result = _Result({"result": {"id": 3}})

    def apply_async(**kwargs: Any) -> _Result:
        sent.append(kwargs)
        return result

    monkeypatch.setattr(storage_run, "apply_async", apply_async)
    assert remote.run_on_node("node-b", "grow", image=3, size=MiB) == {"id": 3}
    assert sent == [{"args": ["grow", {"image": 3, "size": MiB}], "queue": "engine.node-b",
                     "expires": 7.0}]
    assert result.forgotten


@pytest.mark.django_db
def test_a_node_that_does_not_answer_is_unavailable(monkeypatch, settings) -> None:
    from celery.exceptions import TimeoutError as ResultTimeout

    settings.APPLIANCE_REMOTE_TIMEOUT = 1
    monkeypatch.setattr(storage_run, "apply_async", lambda **kw: _Result(ResultTimeout()))
    with pytest.raises(NodeUnavailable, match="did not answer within 1 s") as late:
        remote.run_on_node("node-b", "delete", image=1)
    assert late.value.status == 503


@pytest.mark.django_db
def test_a_node_known_down_is_refused_without_sending(monkeypatch, settings) -> None:
    settings.APPLIANCE_NODE_DOWN_AFTER = 15
    add_node("node-b", age_s=60)

    def apply_async(**kwargs: Any) -> None:
        raise AssertionError("sent to a node known to be down")

    monkeypatch.setattr(storage_run, "apply_async", apply_async)
    with pytest.raises(NodeUnavailable, match="node 'node-b' is down") as down:
        remote.run_on_node("node-b", "delete", image=1)
    assert down.value.status == 503


@pytest.mark.django_db
def test_an_unreachable_broker_means_the_node_is_unavailable(monkeypatch) -> None:
    from kombu.exceptions import OperationalError

    def apply_async(**kwargs: Any) -> None:
        raise OperationalError("Connection refused")

    monkeypatch.setattr(storage_run, "apply_async", apply_async)
    with pytest.raises(NodeUnavailable, match="broker is unreachable"):
        remote.run_on_node("node-b", "delete", image=1)
