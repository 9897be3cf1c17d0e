"""Errors a service raises when a request breaks a rule of the appliance.

Each knows its HTTP answer (``status``), a stable machine-readable ``code`` and, when one
input is to blame, the ``field`` it names. The API renders them all in one place
(``appliance.api.exceptions.exception_handler``); the admin shows the message.
Messages say what is allowed and what came in.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ApplianceError",
    "CertificateAlreadyRevoked",
    "ClientNameTaken",
    "ExportNameTaken",
    "ImageFileMissing",
    "ImageInUse",
    "ImageNameTaken",
    "ImageTooLarge",
    "InsufficientSpace",
    "InvalidEngineSnapshot",
    "NoNodeAvailable",
    "NodeOperationFailed",
    "NodeUnavailable",
    "PskIdentityNameTaken",
    "PskUnsupported",
    "QuotaExceeded",
    "ShrinkNotForced",
    "UploadIncomplete",
    "human_size",
]


class ApplianceError(Exception):
    code: ClassVar[str] = "appliance_error"
    status: ClassVar[int] = 400
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if field is not None:
            self.field = field


class ImageNameTaken(ApplianceError):
    code = "image_name_taken"
    status = 409
    field = "name"


class ImageInUse(ApplianceError):
    code = "image_in_use"
    status = 409


class ImageFileMissing(ApplianceError):
    code = "image_file_missing"
    status = 409


class ShrinkNotForced(ApplianceError):
    code = "shrink_not_forced"
    status = 400
    field = "size"


class ImageTooLarge(ApplianceError):
    code = "image_too_large"
    status = 400
    field = "size"


class QuotaExceeded(ApplianceError):
    code = "quota_exceeded"
    status = 409
    field = "size"


class InsufficientSpace(ApplianceError):
    code = "insufficient_space"
    status = 409


class UploadIncomplete(ApplianceError):
    code = "upload_incomplete"
    status = 400


class ExportNameTaken(ApplianceError):
    code = "export_name_taken"
    status = 409
    field = "name"


class InvalidEngineSnapshot(ApplianceError):
    code = "invalid_engine_snapshot"
    status = 400


class ClientNameTaken(ApplianceError):
    """Another certificate that is not revoked has this name (names select clients)."""

    code = "client_name_taken"
    status = 400
    field = "name"


class CertificateAlreadyRevoked(ApplianceError):
    code = "certificate_already_revoked"
    status = 409


class PskIdentityNameTaken(ApplianceError):
    code = "psk_identity_name_taken"
    status = 400
    field = "name"


class PskUnsupported(ApplianceError):
    """The engine's Python has no TLS-PSK callbacks (they came with Python 3.13)."""

    code = "psk_unsupported"
    status = 400


class ImportIntoRemoteImage(ApplianceError):
    code = "import_into_remote_image"
    status = 409


class ImageMoveRefused(ApplianceError):
    """A move that cannot start, or a copy that did not verify."""

    code = "image_move_refused"
    status = 409


class NodeUnavailable(ApplianceError):
    """The node that holds the image is down or did not answer in time (503). Placement
    on a named node that is unknown or down answers 400 with the same code (``status``)."""

    code = "node_unavailable"
    status = 503

    def __init__(self, message: str, *, field: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message, field=field)
        if status is not None:
            self.status = status


class NodeOperationFailed(ApplianceError):
    """A storage operation failed on its node for a reason that is not a rule of the
    appliance (a disk error, a bug): the node's message is passed on."""

    code = "node_operation_failed"
    status = 502


class NoNodeAvailable(ApplianceError):
    """No node that is up (and has the labels asked for) can take a new image."""

    code = "no_node_available"
    status = 409


def human_size(n: int) -> str:
    """``human_size(10 * 2**30) == "10 GiB"``; exact for whole units, else one decimal."""
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if n % scale == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes"
