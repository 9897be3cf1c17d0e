"""Withdrawing an export while its engine records a session of it.

``export_delete`` detaches the export's sessions (``ClientSession.export`` SET NULL) and
then deletes the export; the engine worker records sessions from another process
(``session_record_from_engine``). Both lock the export's row before they touch sessions, so
whichever comes second waits for the first, and neither fails. Before that lock, a session
the engine committed between the detaching UPDATE and the DELETE still referenced the
export, and PostgreSQL refused the deletion at commit (the foreign key is checked when the
transaction ends).

The interleavings are forced, not hoped for: a hook on one connection stops its
transaction at the chosen statement, the other side runs in a thread, and the test goes on
only once that thread has finished or PostgreSQL reports it waiting for a lock
(``pg_blocking_pids``). No sleeps decide the outcome.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from appliance_testing import client_records, engine_snapshot
from django.db import connection, connections

from appliance.exports.models import Export
from appliance.exports.services import export_delete
from appliance.sessions.models import ClientSession
from appliance.sessions.services import session_record_from_engine

T0 = 1_790_000_000.0
PATIENCE_S = 20.0


def snapshot(connection_id: int) -> dict[str, Any]:
    """A qemu session of "vm1"; each from a client of its own (sessions of one client
    opened together are compared with each other, which would lock them too)."""
    negotiated = copy.deepcopy(client_records()["qemu-img map"][0])  # asks for "vm1"
    return engine_snapshot(negotiated, connection_id=connection_id, opened_at=T0,
                           peer=f"192.0.2.{connection_id}:40000")


def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks and a deferred foreign-key check: PostgreSQL "
                    "(SQLite serializes writers: see the test after these)")


class Side(threading.Thread):
    """One side of the race on a database connection of its own."""

    def __init__(self, work: Callable[[], Any],
                 hook: Callable[..., Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.work, self.hook = work, hook
        self.pid: int | None = None
        self.connected = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            connection.ensure_connection()
            self.pid = connection.connection.info.backend_pid
            self.connected.set()
            if self.hook is None:
                self.work()
            else:
                with connection.execute_wrapper(self.hook):
                    self.work()
        except BaseException as exc:
            self.error = exc
        finally:
            self.connected.set()
            connections.close_all()


def blocked(pid: int) -> bool:
    """Whether the backend ``pid`` waits for a lock another backend holds."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", [pid])
        return bool(cursor.fetchone()[0])


def wait_done_or_blocked(side: Side, *, probe: Callable[[int], bool] = blocked) -> str:
    assert side.connected.wait(PATIENCE_S)
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        if not side.is_alive():
            return "done"
        if side.pid is not None and probe(side.pid):
            return "blocked"
        side.join(0.01)
    raise AssertionError("the other side neither finished nor waited for a lock")


@pytest.fixture
def export(make_export: Callable[..., Any]) -> Export:
    export = make_export("vm1")
    session_record_from_engine(snapshot=snapshot(1))  # an older session, to be detached
    return export


@pytest.mark.django_db(transaction=True)
def test_a_session_recorded_while_the_export_is_deleted(export: Export) -> None:
    """The deletion has detached the sessions and is about to delete the export when the
    engine records a new session: the engine waits, then records it without an export."""
    postgresql_only()
    engine = Side(lambda: session_record_from_engine(snapshot=snapshot(2)))
    seen: list[str] = []

    def before_the_delete(execute: Any, sql: str, params: Any, many: bool,
                          context: Any) -> Any:
        if sql.startswith('DELETE FROM "exports_export"') and not seen:
            engine.start()
            seen.append(wait_done_or_blocked(engine))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(before_the_delete):
        export_delete(export=export)  # raised IntegrityError before the lock

    engine.join(PATIENCE_S)
    assert seen == ["blocked"]  # the engine waited for the deletion
    assert engine.error is None
    assert not Export.objects.exists()
    rows = ClientSession.objects.order_by("connection_id")
    assert [(s.connection_id, s.export_id, s.export_name) for s in rows] == [
        (1, None, "vm1"), (2, None, "vm1")]


@pytest.mark.django_db(transaction=True)
def test_an_export_deleted_while_a_session_is_being_recorded(export: Export) -> None:
    """The engine has written a new session of the export but not committed when the
    export is deleted: the deletion waits, then detaches that session too."""
    postgresql_only()
    written = threading.Event()
    release = threading.Event()
    deleter: list[Side] = []

    def after_the_insert(execute: Any, sql: str, params: Any, many: bool,
                         context: Any) -> Any:
        result = execute(sql, params, many, context)
        if sql.startswith('INSERT INTO "clientsessions_clientsession"'):
            written.set()
            assert release.wait(PATIENCE_S)
        return result

    engine = Side(lambda: session_record_from_engine(snapshot=snapshot(2)),
                  hook=after_the_insert)
    engine.start()
    assert written.wait(PATIENCE_S)
    deleter.append(Side(lambda: export_delete(export=Export.objects.get(name="vm1"))))
    deleter[0].start()
    state = wait_done_or_blocked(deleter[0])
    release.set()
    engine.join(PATIENCE_S)
    deleter[0].join(PATIENCE_S)

    assert state == "blocked"  # the deletion waited for the engine's transaction
    assert engine.error is None  # the engine's commit failed its foreign key before
    assert deleter[0].error is None
    assert not Export.objects.exists()
    rows = ClientSession.objects.order_by("connection_id")
    assert [(s.connection_id, s.export_id) for s in rows] == [(1, None), (2, None)]


@pytest.mark.django_db(transaction=True)
def test_the_engine_finds_the_export_inside_the_transaction_that_writes(
        export: Export) -> None:
    """On any backend: the export a session names is read by the transaction that writes
    the session (on SQLite, whose transactions take the write lock at BEGIN, that alone
    keeps a deletion out; it used to be read before the transaction began)."""
    reads: list[bool] = []

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("SELECT") and 'FROM "exports_export"' in sql:
            reads.append(connection.in_atomic_block)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(watch):
        session = session_record_from_engine(snapshot=snapshot(2))
    assert reads == [True]
    assert session.export == export
    export_delete(export=export)
    assert ClientSession.objects.filter(export__isnull=True).count() == 2
    # The engine's next snapshot of a session of the withdrawn export keeps its name only.
    again = session_record_from_engine(snapshot=snapshot(2))
    assert (again.export, again.export_name) == (None, "vm1")


@pytest.mark.django_db
def test_deleting_an_export_twice_is_harmless(export: Export) -> None:
    stale = Export.objects.get(pk=export.pk)
    export_delete(export=export)
    export_delete(export=stale)
    assert not Export.objects.exists()
