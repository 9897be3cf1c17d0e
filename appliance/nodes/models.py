from __future__ import annotations

from django.db import models

from .validators import validate_labels, validate_node_name


class NodeStatus(models.TextChoices):
    """A node's status (computed from its heartbeat, never stored)."""

    UP = "up", "up"
    DOWN = "down", "down"


class Node(models.Model):
    """A storage host: its engine worker registers it on start and beats every few seconds.

    ``status`` is not stored: a node is "up" while its last heartbeat is younger than
    ``settings.APPLIANCE_NODE_DOWN_AFTER`` seconds, else "down".

    ``image_usage`` is how other hosts know the sizes of this node's image files (a central
    host has none of them): the node measures them at every heartbeat and after every
    storage operation it runs, and writes the map only when it changed.
    """

    name = models.CharField(max_length=253, unique=True, validators=[validate_node_name],
                            help_text="APPLIANCE_NODE_NAME of the host")
    nbd_host = models.CharField(max_length=253,
                                help_text="host clients dial (NBD_PUBLIC_HOST, else NBD_BIND)")
    nbd_port = models.PositiveIntegerField(help_text="port its engine listens on (NBD_PORT)")
    storage_root = models.CharField(max_length=4096, blank=True, default="")
    capacity_bytes = models.BigIntegerField(default=0, help_text="size of the storage root's "
                                            "filesystem in bytes")
    free_bytes = models.BigIntegerField(default=0, help_text="bytes available on the storage "
                                        "root's filesystem")
    labels = models.JSONField(default=list, blank=True, validators=[validate_labels],
                              help_text="placement labels (APPLIANCE_NODE_LABELS)")
    image_usage = models.JSONField(
        default=dict, blank=True, editable=False,
        help_text="virtual and allocated bytes of each image file on this node, "
        '{"<image id>": [st_size, st_blocks * 512]}, measured at each heartbeat')
    version = models.CharField(max_length=64, blank=True, default="")
    started_at = models.DateTimeField(help_text="when its engine worker last registered it")
    last_heartbeat = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        """"up" or "down", from the age of the last heartbeat."""
        from .selectors import node_is_up

        return NodeStatus.UP if node_is_up(self) else NodeStatus.DOWN

    @property
    def address(self) -> str:
        """``host:port`` as clients dial it (IPv6 addresses in brackets)."""
        host = f"[{self.nbd_host}]" if ":" in self.nbd_host else self.nbd_host
        return f"{host}:{self.nbd_port}"
