"""Embedded metadata backend: one SQLite file in WAL mode, the single-machine default.

sqlite3 is blocking, so every call runs on one dedicated thread (which also owns the connection). Each
mutation is one `BEGIN IMMEDIATE … COMMIT` transaction: a process killed mid-commit leaves the WAL without
that transaction, so the adapter is at N or N+1. synchronous=NORMAL is crash-safe for process death; a
power cut may lose the last few commits but never mixes them (set `durable=True` for FULL).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from adapters_store.codec import decode_record, encode_record
from adapters_store.errors import AdapterExists, AdapterNotFound, HeadConflict, VersionNotFound
from adapters_store.records import AdapterMeta, SnapshotRef, VersionRecord

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY, base_model TEXT NOT NULL, rank INTEGER NOT NULL, alpha REAL NOT NULL,
    target_modules TEXT NOT NULL, created_at REAL NOT NULL, head INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    adapter TEXT NOT NULL, version INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (adapter, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    adapter TEXT NOT NULL, version INTEGER NOT NULL, blob_key TEXT NOT NULL, sha256 TEXT NOT NULL,
    num_bytes INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (adapter, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pins (
    adapter TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (adapter, version)) WITHOUT ROWID;
"""


class SqliteMetadata:
    def __init__(self, path: Path, *, durable: bool = False) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoserve-sqlite")
        self._conn = self._executor.submit(self._connect, path, durable).result()
        self._closed = False

    @staticmethod
    def _connect(path: Path, durable: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per operation.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        conn.executescript(_SCHEMA)
        return conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # never leave the shared connection inside a transaction
                self._conn.execute("ROLLBACK")
            raise

    def _head(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT head FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise AdapterNotFound(name)
        return row[0]

    @staticmethod
    def _insert_snapshot(conn: sqlite3.Connection, name: str, ref: SnapshotRef) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
            (name, ref.version, ref.blob_key, ref.sha256, ref.num_bytes, ref.created_at),
        )

    async def create_adapter(self, meta: AdapterMeta, initial: SnapshotRef) -> None:
        def run() -> None:
            with self._txn() as conn:
                try:
                    conn.execute(
                        "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, 0)",
                        (meta.name, meta.base_model, meta.rank, meta.alpha,
                         json.dumps(list(meta.target_modules)), meta.created_at),
                    )
                except sqlite3.IntegrityError:
                    raise AdapterExists(meta.name) from None
                self._insert_snapshot(conn, meta.name, initial)

        await self._run(run)

    async def get_adapter(self, name: str) -> AdapterMeta:
        def run() -> AdapterMeta:
            row = self._conn.execute(
                "SELECT base_model, rank, alpha, target_modules, created_at, head FROM adapters WHERE name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise AdapterNotFound(name)
            base_model, rank, alpha, modules, created_at, head = row
            return AdapterMeta(name, base_model, rank, alpha, tuple(json.loads(modules)), created_at, head)

        return await self._run(run)

    async def list_adapters(self) -> list[str]:
        return await self._run(lambda: [r[0] for r in self._conn.execute("SELECT name FROM adapters ORDER BY name")])

    async def delete_adapter(self, name: str) -> None:
        def run() -> None:
            with self._txn() as conn:
                self._head(conn, name)
                for table, column in (("adapters", "name"), ("records", "adapter"),
                                      ("snapshots", "adapter"), ("pins", "adapter")):
                    conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

        await self._run(run)

    async def commit(self, name: str, record: VersionRecord, snapshot: SnapshotRef | None) -> None:
        data = encode_record(record)

        def run() -> None:
            with self._txn() as conn:
                head = self._head(conn, name)
                if head != record.parent:
                    raise HeadConflict(name, record.parent, head)
                conn.execute("INSERT INTO records VALUES (?, ?, ?)", (name, record.version, data))
                if snapshot is not None:
                    self._insert_snapshot(conn, name, snapshot)
                conn.execute("UPDATE adapters SET head = ? WHERE name = ?", (record.version, name))

        await self._run(run)

    async def get_records(self, name: str, first: int, last: int) -> list[VersionRecord]:
        def run() -> list[bytes]:
            rows = self._conn.execute(
                "SELECT data FROM records WHERE adapter = ? AND version BETWEEN ? AND ? ORDER BY version",
                (name, first, last),
            )
            return [r[0] for r in rows]

        return [decode_record(data) for data in await self._run(run)]

    async def add_snapshot(self, name: str, snapshot: SnapshotRef) -> None:
        def run() -> None:
            with self._txn() as conn:
                if snapshot.version > self._head(conn, name):
                    raise VersionNotFound(name, snapshot.version)
                self._insert_snapshot(conn, name, snapshot)

        await self._run(run)

    async def list_snapshots(self, name: str) -> list[SnapshotRef]:
        def run() -> list[SnapshotRef]:
            # One read transaction, so the existence check and the rows agree.
            self._conn.execute("BEGIN")
            try:
                self._head(self._conn, name)
                rows = self._conn.execute(
                    "SELECT version, blob_key, sha256, num_bytes, created_at FROM snapshots "
                    "WHERE adapter = ? ORDER BY version",
                    (name,),
                ).fetchall()
            finally:
                self._conn.execute("COMMIT")
            return [SnapshotRef(*row) for row in rows]

        return await self._run(run)

    async def remove_snapshots(self, name: str, versions: list[int]) -> None:
        def run() -> None:
            with self._txn() as conn:
                conn.executemany("DELETE FROM snapshots WHERE adapter = ? AND version = ?",
                                 [(name, v) for v in versions])

        await self._run(run)

    async def pin(self, name: str, version: int) -> None:
        def run() -> None:
            with self._txn() as conn:
                if version > self._head(conn, name):
                    raise VersionNotFound(name, version)
                conn.execute("INSERT OR IGNORE INTO pins VALUES (?, ?)", (name, version))

        await self._run(run)

    async def unpin(self, name: str, version: int) -> None:
        def run() -> None:
            with self._txn() as conn:
                self._head(conn, name)
                conn.execute("DELETE FROM pins WHERE adapter = ? AND version = ?", (name, version))

        await self._run(run)

    async def list_pins(self, name: str) -> list[int]:
        def run() -> list[int]:
            self._head(self._conn, name)
            rows = self._conn.execute("SELECT version FROM pins WHERE adapter = ? ORDER BY version", (name,))
            return [r[0] for r in rows]

        return await self._run(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)
