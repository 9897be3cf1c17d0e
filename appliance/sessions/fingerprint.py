"""Which client was it? A guess from the negotiation record alone.

What each client sends (nbd-protocol.md §11, checked against the real clients on Debian 12):

- qemu 7.2 (qemu-img, qemu-io, qemu-system): STRUCTURED_REPLY, SET_META_CONTEXT with one
  query (base:allocation), GO asking only for BLOCK_SIZE. qemu 8.2+ sends EXTENDED_HEADERS
  first.
- libnbd (nbdcopy, nbdinfo, nbdsh, python3-libnbd): STRUCTURED_REPLY, then SET_META_CONTEXT
  only if the program added contexts, then GO asking for BLOCK_SIZE, plus NAME and
  DESCRIPTION with full info; nbdinfo uses option mode: INFO and LIST_META_CONTEXT
  (``--list`` adds LIST). **nbdcopy and ``nbdinfo --map`` negotiate exactly like qemu**: the
  record cannot tell them apart, so they are guessed as qemu here; the session service
  refines that when several such connections come from one client at once (nbdcopy's
  multi-conn; qemu opens one).
- the kernel's nbd-client: never structured replies nor meta contexts; GO (no info
  requests, or BLOCK_SIZE only) or EXPORT_NAME straight away (older versions, or after GO
  was refused); ``nbd-client -l`` sends LIST then ABORT. STARTTLS may come first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .models import Fingerprint

__all__ = ["guess_fingerprint", "negotiation_signature"]

INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 1, 2, 3


def _option_names(negotiated: Mapping[str, Any]) -> list[str]:
    return [str(o.get("name", "")) for o in negotiated.get("options") or []]


def negotiation_signature(negotiated: Mapping[str, Any]) -> tuple[Any, ...]:
    """What two connections of one program have in common (not the peer or the time)."""
    options = tuple((o.get("name"), o.get("length")) for o in negotiated.get("options") or [])
    return (
        negotiated.get("client_flags"),
        options,
        tuple(negotiated.get("info_requests") or ()),
        tuple(negotiated.get("meta_contexts") or ()),
    )


def _one_meta_query(negotiated: Mapping[str, Any]) -> bool:
    """Whether every SET_META_CONTEXT carried exactly the one query that was agreed.

    The payload is u32 name length, name, u32 query count, then u32 length + text per
    query, so a single query ``q`` makes the option ``8 + len(name) + 4 + len(q)`` long.
    """
    contexts: Sequence[str] = negotiated.get("meta_contexts") or ()
    if len(contexts) != 1:
        return False
    query = len(contexts[0].encode())
    for option in negotiated.get("options") or []:
        if option.get("name") != "SET_META_CONTEXT":
            continue
        name = len((option.get("export") or "").encode())
        if option.get("length") != 8 + name + 4 + query:
            return False
    return True


def guess_fingerprint(negotiated: Mapping[str, Any]) -> tuple[str, str]:
    """``(fingerprint, reason)`` for a NegotiationRecord dict."""
    names = [n for n in _option_names(negotiated) if n != "STARTTLS"]
    info = set(negotiated.get("info_requests") or ())
    structured = "STRUCTURED_REPLY" in names or "EXTENDED_HEADERS" in names
    meta = "SET_META_CONTEXT" in names or "LIST_META_CONTEXT" in names
    if not names:
        return Fingerprint.UNKNOWN, "no options were sent"
    if "INFO" in names or "LIST_META_CONTEXT" in names:
        return Fingerprint.LIBNBD, "INFO or LIST_META_CONTEXT before GO: nbdinfo's option mode"
    if info & {INFO_NAME, INFO_DESCRIPTION}:
        return Fingerprint.LIBNBD, "GO asked for NAME and DESCRIPTION: libnbd with full info"
    if not structured and not meta:
        if names in (["GO"], ["EXPORT_NAME"], ["GO", "EXPORT_NAME"]) and info <= {
            INFO_BLOCK_SIZE
        }:
            return (
                Fingerprint.NBD_CLIENT,
                "no structured replies or meta contexts, straight to GO or EXPORT_NAME: "
                "the kernel's nbd-client",
            )
        if names in (["LIST"], ["LIST", "ABORT"]):
            return (
                Fingerprint.NBD_CLIENT,
                "LIST then ABORT without structured replies: nbd-client -l",
            )
        return (
            Fingerprint.UNKNOWN,
            "no structured replies, but an option sequence nbd-client never sends",
        )
    if names and names[0] in {"STRUCTURED_REPLY", "EXTENDED_HEADERS"} and names[-1] == "GO":
        middle = set(names[1:-1]) - {"STRUCTURED_REPLY"}
        if info == {INFO_BLOCK_SIZE} and middle == {"SET_META_CONTEXT"}:
            if _one_meta_query(negotiated):
                return (
                    Fingerprint.QEMU,
                    "structured replies, SET_META_CONTEXT with one query, GO asking only "
                    "BLOCK_SIZE: qemu (libnbd's nbdcopy negotiates the same way)",
                )
            return Fingerprint.LIBNBD, "SET_META_CONTEXT with several queries: libnbd"
        if info == {INFO_BLOCK_SIZE} and not middle:
            return (
                Fingerprint.LIBNBD,
                "structured replies and GO asking only BLOCK_SIZE, no meta context: libnbd "
                "(qemu always asks for base:allocation)",
            )
    return Fingerprint.UNKNOWN, "an option sequence none of qemu, libnbd or nbd-client sends"
