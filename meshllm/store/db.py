"""The node's local database: what must survive a restart of the node agent, in ``<state-dir>/meshllm.db``.

The replicated document says what the mesh wants; this file says what *this* node did about it, so
a node agent that restarts (crashed, killed, upgraded) picks up where it was instead of starting
over. Tables:

    identity    node_id → public key, created_at       the node this state folder belongs to
    applied     (kind, name) → body JSON, applied_at   the manifests last applied through this node
    processes   key → pid, port, model, argv, hash,    the engine processes this node runs, so that a
                log path, started_at                   restarted node adopts them (no second copy)
    events      id → at, model, reason, message, level a bounded log of what happened to models here

The Ed25519 private key stays in its own 0600 file (``store.identity``): a key belongs in a file the
operator can back up, inspect and protect on its own, and the node id is derived from it, so a state
folder that predates this database keeps its id; the identity row only records it.

SQLite in WAL mode through SQLAlchemy's async engine and aiosqlite: readers never wait for the writer
and the event loop never blocks on disk. Created on first use.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Field, SQLModel, col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from meshllm.state.schema import ModelName, NodeId

__all__ = ["DB_FILE", "AppliedManifest", "Event", "IdentityRecord", "NodeStore", "ProcessRecord"]

DB_FILE = "meshllm.db"
EVENT_CAP = 1000
_REASON = re.compile(r"[A-Z][A-Za-z0-9]*")
LEVELS = ("info", "warning", "error")


class IdentityRecord(SQLModel, table=True):
    __tablename__ = "identity"

    node_id: str = Field(primary_key=True)
    public_key: str  # hex of the raw Ed25519 public key
    created_at: float


class AppliedManifest(SQLModel, table=True):
    __tablename__ = "applied"

    kind: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    applied_at: float = Field(default_factory=time.time)


class ProcessRecord(SQLModel, table=True):
    """An engine process this node started; ``key`` is what it serves (the model name)."""

    __tablename__ = "processes"

    key: str = Field(primary_key=True)
    pid: int
    port: int
    model: str
    argv: list[str] = Field(sa_column=Column(JSON, nullable=False))
    argv_hash: str
    log_path: str
    started_at: float


class Event(SQLModel, table=True):
    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    at: float = Field(index=True)
    model: str = Field(index=True)
    reason: str  # CamelCase: Started, Ready, Exited, Restarting, Stopped, Adopted, Failed, ...
    message: str
    level: str = "info"


_TABLES = [SQLModel.metadata.tables[str(model.__tablename__)]
           for model in (IdentityRecord, AppliedManifest, ProcessRecord, Event)]


def _pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the agent; WAL keeps it consistent
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class NodeStore:
    """Async access to ``<state-dir>/meshllm.db``. ``await NodeStore.open(dir)``, then ``await store.aclose()``."""

    def __init__(self, engine: AsyncEngine, *, path: Path, event_cap: int = EVENT_CAP,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self.path = path
        self.event_cap = event_cap
        self.clock = clock

    @classmethod
    async def open(cls, state_dir: Path, *, event_cap: int = EVENT_CAP) -> NodeStore:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / DB_FILE
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        event.listen(engine.sync_engine, "connect", _pragmas)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(lambda sync: SQLModel.metadata.create_all(sync, tables=_TABLES))
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, path=path, event_cap=event_cap)

    async def aclose(self) -> None:
        await self._engine.dispose()

    def _session(self) -> AsyncSession:
        return AsyncSession(self._engine, expire_on_commit=False)

    # -- identity ---------------------------------------------------------------------------
    async def record_identity(self, node_id: NodeId, public_key: bytes) -> IdentityRecord:
        """The identity row for this key, created on first use (``created_at`` is kept afterwards)."""
        async with self._session() as session:
            row = await session.get(IdentityRecord, node_id)
            if row is None:
                row = IdentityRecord(node_id=node_id, public_key=public_key.hex(), created_at=self.clock())
                session.add(row)
                await session.commit()
            return row

    async def identity(self) -> IdentityRecord | None:
        """The first identity this state folder recorded."""
        async with self._session() as session:
            return (await session.exec(select(IdentityRecord).order_by(col(IdentityRecord.created_at)))).first()

    # -- applied manifests ------------------------------------------------------------------
    async def save_applied(self, manifests: Iterable[AppliedManifest]) -> None:
        """Insert or replace these manifests, keyed by (kind, name)."""
        async with self._session() as session:
            for manifest in manifests:
                await session.merge(manifest)  # merge copies: the caller's object stays unattached
            await session.commit()

    async def forget_applied(self, kind: str, name: str) -> bool:
        async with self._session() as session:
            row = await session.get(AppliedManifest, (kind, name))
            if row is None:
                return False
            await session.delete(row)
            await session.commit()
            return True

    async def applied(self) -> list[AppliedManifest]:
        async with self._session() as session:
            query = select(AppliedManifest).order_by(col(AppliedManifest.kind), col(AppliedManifest.name))
            return list(await session.exec(query))

    # -- engine processes -------------------------------------------------------------------
    async def record_process(self, record: ProcessRecord) -> None:
        """Remember (or replace) the process running for ``record.key``."""
        async with self._session() as session:
            await session.merge(record)
            await session.commit()

    async def forget_process(self, key: str) -> None:
        async with self._session() as session:
            await session.exec(delete(ProcessRecord).where(col(ProcessRecord.key) == key))
            await session.commit()

    async def processes(self) -> list[ProcessRecord]:
        async with self._session() as session:
            return list(await session.exec(select(ProcessRecord).order_by(col(ProcessRecord.key))))

    # -- events -----------------------------------------------------------------------------
    async def record_event(self, model: ModelName, reason: str, message: str, *, level: str = "info") -> Event:
        """Append an event; only the newest ``event_cap`` are kept."""
        if not _REASON.fullmatch(reason):
            raise ValueError(f"event reason must be CamelCase, not {reason!r}")
        if level not in LEVELS:
            raise ValueError(f"event level must be one of {', '.join(LEVELS)}, not {level!r}")
        row = Event(at=self.clock(), model=model, reason=reason, message=message, level=level)
        async with self._session() as session:
            session.add(row)
            await session.flush()
            assert row.id is not None
            await session.exec(delete(Event).where(col(Event.id) <= row.id - self.event_cap))
            await session.commit()
        return row

    async def events(self, model: ModelName | None = None, *, limit: int = 50) -> list[Event]:
        """The newest events first, for one model or all."""
        query = select(Event).order_by(col(Event.id).desc()).limit(limit)
        if model is not None:
            query = query.where(Event.model == model)
        async with self._session() as session:
            return list(await session.exec(query))
