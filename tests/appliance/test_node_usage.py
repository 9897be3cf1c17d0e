"""Sizes of images on other nodes, and the free space of the cluster.

A host reads the sizes of its own image files with ``stat``; the files of other nodes are
not there, so each node measures its own at every heartbeat (and after every storage
operation it runs) into ``Node.image_usage``, and the other hosts read that. The free space
where images can go is this host's storage root plus every other node that is up.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from appliance_testing import Cluster, GiB, MiB, allocated, place_on
from django.db import connection
from django.test.utils import CaptureQueriesContext

from appliance.nodes.models import Node
from appliance.nodes.services import node_heartbeat, node_register, node_usage_refresh
from appliance.storage.models import Image
from appliance.storage.selectors import (
    ImageUsage,
    image_list,
    image_usage,
    image_usages,
    storage_usage,
)
from appliance.storage.services import image_create, image_delete, image_grow, image_path

pytestmark = pytest.mark.django_db


def write(image: Image, offset: int, data: bytes) -> None:
    fd = os.open(image_path(image), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def measured(name: str = "node1") -> dict[str, Any]:
    return Node.objects.get(name=name).image_usage


def node_updates(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries
            if q["sql"].startswith('UPDATE "nodes_node"')]


# ------------------------------------------------------------------ what a node measures


def test_a_node_measures_its_own_image_files(make_image) -> None:
    disk, other, gone = make_image("disk"), make_image("other"), make_image("gone")
    write(disk, 8 * MiB, b"x" * MiB)
    place_on(other, "node2")  # recorded on another node: not measured here
    image_path(gone).unlink()  # a missing file has no sizes
    node_register()
    assert measured() == {str(disk.pk): [64 * MiB, allocated(image_path(disk))]}
    assert measured()[str(disk.pk)][1] >= MiB


def test_the_heartbeat_follows_the_files(make_image) -> None:
    node_register()
    disk = make_image("disk")
    node_heartbeat()
    assert measured() == {str(disk.pk): [64 * MiB, 0]}
    write(disk, 0, b"y" * (2 * MiB))
    os.truncate(image_path(disk), 128 * MiB)
    node_heartbeat()
    assert measured() == {str(disk.pk): [128 * MiB, allocated(image_path(disk))]}
    Image.objects.filter(pk=disk.pk).delete()
    node_heartbeat()
    assert measured() == {}


def test_the_sizes_are_written_only_when_they_change(make_image) -> None:
    disk = make_image("disk")
    node_register()
    with CaptureQueriesContext(connection) as idle:
        node_heartbeat()
    [update] = node_updates(idle)
    assert '"last_heartbeat"' in update
    assert '"image_usage"' not in update  # nothing changed: the map is not rewritten

    write(disk, 0, b"z" * MiB)
    with CaptureQueriesContext(connection) as busy:
        node_heartbeat()
    [update] = node_updates(busy)
    assert '"image_usage"' in update
    assert measured()[str(disk.pk)][1] >= MiB


def test_a_refresh_writes_only_changed_sizes_and_never_on_a_central_host(
        settings, make_image) -> None:
    disk = make_image("disk")
    node_register()
    beat = Node.objects.get(name="node1").last_heartbeat
    assert not node_usage_refresh()  # unchanged
    write(disk, 0, b"w" * MiB)
    assert node_usage_refresh()
    assert measured()[str(disk.pk)][1] >= MiB
    assert Node.objects.get(name="node1").last_heartbeat == beat  # a refresh is no beat
    settings.APPLIANCE_ROLE = "central"
    write(disk, 4 * MiB, b"w" * MiB)
    assert not node_usage_refresh()


# ------------------------------------------------------------------ what other hosts read


def test_images_of_other_nodes_show_what_their_node_measured(make_image, make_node) -> None:
    here, there, unmeasured = make_image("here"), make_image("there"), make_image("new")
    lost = place_on(make_image("lost"), "nowhere")
    write(here, 0, b"h" * MiB)
    place_on(there, "node2")
    place_on(unmeasured, "node2")
    node = make_node("node2")
    Node.objects.filter(pk=node.pk).update(image_usage={str(there.pk): [5 * GiB, 3 * MiB]})

    assert image_usage(here) == ImageUsage(64 * MiB, allocated(image_path(here)))  # stat
    assert image_usage(there) == ImageUsage(5 * GiB, 3 * MiB)  # not this host's file
    assert image_usage(unmeasured) == ImageUsage(None, None)  # not measured yet
    assert image_usage(lost) == ImageUsage(None, None)  # no such node


def test_a_down_node_keeps_its_last_measurement(make_image, make_node) -> None:
    image = place_on(make_image("disk"), "node2")
    node = make_node("node2", age=3600)
    Node.objects.filter(pk=node.pk).update(image_usage={str(image.pk): [64 * MiB, MiB]})
    assert image_usage(image) == ImageUsage(64 * MiB, MiB)


def test_a_central_host_reads_every_size_from_the_nodes(settings, make_image,
                                                        make_node) -> None:
    image = make_image("disk")
    make_node("node1")
    Node.objects.filter(name="node1").update(image_usage={str(image.pk): [7 * MiB, 0]})
    settings.APPLIANCE_ROLE = "central"  # node1's file is not this host's any more
    assert image_usage(image) == ImageUsage(7 * MiB, 0)


def test_bad_measurements_are_unknown_sizes(make_image, make_node) -> None:
    images = [place_on(make_image(f"d{i}"), "node2") for i in range(4)]
    make_node("node2")
    Node.objects.filter(name="node2").update(image_usage={
        str(images[0].pk): [1, 2, 3], str(images[1].pk): ["1", 2],
        str(images[2].pk): [-1, 0], str(images[3].pk): None})
    assert set(image_usages(images).values()) == {ImageUsage(None, None)}


def test_a_page_of_images_reads_their_sizes_in_one_query(make_image, make_node) -> None:
    images = [make_image(f"disk{i}") for i in range(12)]
    for node in ("node2", "node3"):
        make_node(node)
    for i, image in enumerate(images[2:]):
        place_on(image, "node2" if i % 2 else "node3")
    for node in ("node2", "node3"):
        Node.objects.filter(name=node).update(image_usage={
            str(i.pk): [i.size, i.pk * 4096] for i in images if i.node == node})

    with CaptureQueriesContext(connection) as queries:
        listed = list(image_list().order_by("name"))
        sizes = {image.name: image.usage for image in listed}
    # the images, their exports (prefetched), the two nodes' measurements: whatever the page
    assert len(queries.captured_queries) == 3
    for image in images:
        expected = (64 * MiB, 0) if image.node == "node1" else (image.size, image.pk * 4096)
        assert sizes[image.name] == ImageUsage(*expected)
    one = image_list().get(pk=images[5].pk)
    assert "usage" in one.__dict__  # .get() on the list fills it in too


# ------------------------------------------------------------------ free space


def test_a_single_host_counts_its_own_disk(settings) -> None:
    st = os.statvfs(settings.STORAGE_ROOT.parent)
    usage = storage_usage()
    assert usage.nodes == 1
    assert abs(usage.free - st.f_bavail * st.f_frsize) < 64 * MiB


def test_the_free_space_of_the_cluster_is_that_of_the_nodes_up(settings, make_node) -> None:
    make_node("node1", free=1)  # this host: its disk is read now, not its last beat
    make_node("node2", free=10 * GiB)
    make_node("node3", free=20 * GiB)
    make_node("node4", free=40 * GiB, age=3600)  # down: nothing can go there
    settings.STORAGE_ROOT.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(settings.STORAGE_ROOT)
    usage = storage_usage()
    assert usage.nodes == 3
    assert abs(usage.free - (st.f_bavail * st.f_frsize + 30 * GiB)) < 64 * MiB

    settings.APPLIANCE_ROLE = "central"  # no disk of its own: the nodes' beats only
    usage = storage_usage()
    assert (usage.free, usage.nodes) == (30 * GiB + 1, 3)
    Node.objects.all().delete()
    assert (storage_usage().free, storage_usage().nodes) == (0, 0)


# ------------------------------------------------------------------ after an operation


@pytest.mark.django_db(transaction=True)
def test_sizes_follow_operations_on_another_node_at_once(cluster: Cluster) -> None:
    image = image_create(name="disk", size=4 * MiB, node="node-b")
    assert image_usage(image) == ImageUsage(4 * MiB, 0)  # before any heartbeat
    image_grow(image=image, size=8 * MiB)
    assert image_usage(Image.objects.get(pk=image.pk)) == ImageUsage(8 * MiB, 0)
    assert measured("node-a") == {}
    image_delete(image=image)
    assert measured("node-b") == {}
