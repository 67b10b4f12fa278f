"""Metadata in Redis (`redis.asyncio`), for several replicas sharing one store.

Every mutation that must be atomic is one Lua script (Redis runs a script without interleaving), so the
compare-and-set on the head, the record and its snapshot reference land together or not at all. Records
are stored as the binary codec; the client runs with decode_responses=False.
"""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from adapters_store.codec import decode_record, encode_record
from adapters_store.errors import AdapterExists, AdapterNotFound, HeadConflict, VersionNotFound
from adapters_store.keys import RedisKeys
from adapters_store.metadata import snapshot_from_json, snapshot_to_json
from adapters_store.records import AdapterMeta, SnapshotRef, VersionRecord

# Script return codes: {0} ok, {1} no such adapter (or, for _CREATE, it already exists),
# {2, head} head mismatch (commit) or version above head (snapshot, pin).
_OK, _NO_ADAPTER, _BAD_HEAD = 0, 1, 2
_ALREADY_EXISTS = 1
_MAX_FIELDS_PER_CALL = 10_000

# KEYS: index, meta, snapshots. ARGV: name, base_model, rank, alpha, modules, created_at, snapshot json.
_CREATE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {1} end
redis.call('HSET', KEYS[2], 'base_model', ARGV[2], 'rank', ARGV[3], 'alpha', ARGV[4],
           'target_modules', ARGV[5], 'created_at', ARGV[6], 'head', '0')
redis.call('HSET', KEYS[3], '0', ARGV[7])
redis.call('SADD', KEYS[1], ARGV[1])
return {0}
"""

# KEYS: meta, records, snapshots. ARGV: expected head, version, record bytes, snapshot json or ''.
_COMMIT = """
local head = redis.call('HGET', KEYS[1], 'head')
if not head then return {1} end
if head ~= ARGV[1] then return {2, head} end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[4]) end
redis.call('HSET', KEYS[1], 'head', ARGV[2])
return {0}
"""

# KEYS: meta, target (hash or set). ARGV: version, value ('' → SADD version into a set).
_ADD_AT_OR_BELOW_HEAD = """
local head = redis.call('HGET', KEYS[1], 'head')
if not head then return {1} end
if tonumber(ARGV[1]) > tonumber(head) then return {2, head} end
if ARGV[2] == '' then redis.call('SADD', KEYS[2], ARGV[1]) else redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return {0}
"""


class RedisMetadata:
    def __init__(self, client: aioredis.Redis, keys: RedisKeys | None = None) -> None:
        self._redis = client
        self.keys = keys or RedisKeys()
        self._create = client.register_script(_CREATE)
        self._commit = client.register_script(_COMMIT)
        self._add = client.register_script(_ADD_AT_OR_BELOW_HEAD)

    @classmethod
    def from_url(cls, url: str, keys: RedisKeys | None = None) -> RedisMetadata:
        return cls(aioredis.Redis.from_url(url, decode_responses=False), keys)

    async def _require(self, name: str) -> None:
        if not await self._redis.exists(self.keys.meta(name)):
            raise AdapterNotFound(name)

    async def create_adapter(self, meta: AdapterMeta, initial: SnapshotRef) -> None:
        k = self.keys
        args = [meta.name, meta.base_model, meta.rank, repr(float(meta.alpha)),
                json.dumps(list(meta.target_modules)), repr(float(meta.created_at)), snapshot_to_json(initial)]
        code, *_ = await self._create(keys=[k.adapters(), k.meta(meta.name), k.snapshots(meta.name)], args=args)
        if code == _ALREADY_EXISTS:
            raise AdapterExists(meta.name)

    async def get_adapter(self, name: str) -> AdapterMeta:
        raw = await self._redis.hgetall(self.keys.meta(name))
        if not raw:
            raise AdapterNotFound(name)
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return AdapterMeta(name, f["base_model"], int(f["rank"]), float(f["alpha"]),
                           tuple(json.loads(f["target_modules"])), float(f["created_at"]), int(f["head"]))

    async def list_adapters(self) -> list[str]:
        return sorted(n.decode() for n in await self._redis.smembers(self.keys.adapters()))

    async def delete_adapter(self, name: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self.keys.adapters(), name)
            pipe.delete(*self.keys.all_for(name))
            _, num_deleted = await pipe.execute()
        if num_deleted == 0:
            raise AdapterNotFound(name)

    async def commit(self, name: str, record: VersionRecord, snapshot: SnapshotRef | None) -> None:
        k = self.keys
        args = [str(record.parent), str(record.version), encode_record(record),
                "" if snapshot is None else snapshot_to_json(snapshot)]
        result = await self._commit(keys=[k.meta(name), k.records(name), k.snapshots(name)], args=args)
        if result[0] == _NO_ADAPTER:
            raise AdapterNotFound(name)
        if result[0] == _BAD_HEAD:
            raise HeadConflict(name, record.parent, int(result[1]))

    async def get_records(self, name: str, first: int, last: int) -> list[VersionRecord]:
        if last < first:
            return []
        records = []
        for start in range(first, last + 1, _MAX_FIELDS_PER_CALL):  # bounded replies for long histories
            versions = list(range(start, min(last, start + _MAX_FIELDS_PER_CALL - 1) + 1))
            raws = await self._redis.hmget(self.keys.records(name), versions)
            records += [decode_record(raw) for raw in raws if raw is not None]
        return records

    async def _add_at_or_below_head(self, name: str, key: str, version: int, value: str) -> None:
        result = await self._add(keys=[self.keys.meta(name), key], args=[version, value])
        if result[0] == _NO_ADAPTER:
            raise AdapterNotFound(name)
        if result[0] == _BAD_HEAD:
            raise VersionNotFound(name, version)

    async def add_snapshot(self, name: str, snapshot: SnapshotRef) -> None:
        await self._add_at_or_below_head(name, self.keys.snapshots(name), snapshot.version,
                                         snapshot_to_json(snapshot))

    async def list_snapshots(self, name: str) -> list[SnapshotRef]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self.keys.meta(name))
            pipe.hgetall(self.keys.snapshots(name))
            exists, raw = await pipe.execute()
        if not exists:
            raise AdapterNotFound(name)
        return sorted((snapshot_from_json(int(v), j) for v, j in raw.items()), key=lambda s: s.version)

    async def remove_snapshots(self, name: str, versions: list[int]) -> None:
        if versions:
            await self._redis.hdel(self.keys.snapshots(name), *versions)

    async def pin(self, name: str, version: int) -> None:
        await self._add_at_or_below_head(name, self.keys.pins(name), version, "")

    async def unpin(self, name: str, version: int) -> None:
        await self._require(name)
        await self._redis.srem(self.keys.pins(name), version)

    async def list_pins(self, name: str) -> list[int]:
        await self._require(name)
        return sorted(int(v) for v in await self._redis.smembers(self.keys.pins(name)))

    async def close(self) -> None:
        await self._redis.aclose()
