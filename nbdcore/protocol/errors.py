"""Errors split by who broke the rules, each knowing its answer on the wire."""

from __future__ import annotations

from typing import ClassVar

from .constants import NbdErrno


class ProtocolError(Exception):
    """The byte stream cannot go on as it is."""


class LocalProtocolError(ProtocolError):
    """We tried to send something illegal: a bug in the engine."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the framing; the only answer is a clean close."""


class CommandError(Exception):
    """One request failed; the connection carries on after the error reply."""

    errno: ClassVar[NbdErrno] = NbdErrno.EINVAL

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset  # where in the request the failure was found, if known


class InvalidRequest(CommandError):
    errno = NbdErrno.EINVAL


class ReadOnlyExport(CommandError):
    errno = NbdErrno.EPERM


class OutOfSpace(CommandError):
    errno = NbdErrno.ENOSPC


class TooLarge(CommandError):
    errno = NbdErrno.EOVERFLOW


class NotFast(CommandError):
    errno = NbdErrno.ENOTSUP


class BackendFailure(CommandError):
    """A backend error mapped to an NBD errno (see ``nbd_errno``)."""

    def __init__(self, message: str, errno: NbdErrno, *, offset: int | None = None) -> None:
        super().__init__(message, offset=offset)
        self.errno = errno  # type: ignore[misc]  # per-instance errno from the OSError
