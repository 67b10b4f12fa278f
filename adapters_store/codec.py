"""Compact binary encoding of a `VersionRecord` (typically 70–150 bytes; see bench/store_bench.py).

Layout, little-endian, CRC32 of everything before it at the end:
  u8 codec=1 | u8 kind | varint version, parent, step, batch_id, rollback_to+1 (0 = none) | f64 created_at
  | str optimizer | f64 lr, weight_decay, eps | u8 n, n×u64 seeds | u8 n, n×f64 coeffs | u8 n, n×(str, f64)
where str = u8 length + ASCII. Floats are f64 so coefficients round-trip bit-exactly (replay depends on it).
"""

from __future__ import annotations

import struct
import zlib

from adapters_store.errors import IntegrityError
from adapters_store.records import RecordKind, VersionRecord

CODEC_VERSION = 1
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _short_str(text: str, out: bytearray) -> None:
    raw = text.encode("ascii")
    out.append(len(raw))
    out += raw


def encode_record(record: VersionRecord) -> bytes:
    out = bytearray((CODEC_VERSION, int(record.kind)))
    for value in (record.version, record.parent, record.step, record.batch_id):
        _varint(value, out)
    _varint(0 if record.rollback_to is None else record.rollback_to + 1, out)
    out += _F64.pack(record.created_at)
    _short_str(record.optimizer, out)
    out += struct.pack("<ddd", record.lr, record.weight_decay, record.eps)
    out.append(len(record.seeds))
    out += struct.pack(f"<{len(record.seeds)}Q", *record.seeds)
    out.append(len(record.coeffs))
    out += struct.pack(f"<{len(record.coeffs)}d", *record.coeffs)
    out.append(len(record.hparams))
    for key, value in record.hparams:
        _short_str(key, out)
        out += _F64.pack(value)
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, num_bytes: int) -> bytes:
        end = self.pos + num_bytes
        if end > len(self.data):
            raise IntegrityError("version record is truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 70:
                raise IntegrityError("version record has a malformed varint")

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def short_str(self) -> str:
        return self.take(self.u8()).decode("ascii")


def decode_record(data: bytes) -> VersionRecord:
    if len(data) < 2 + _CRC.size:
        raise IntegrityError("version record is truncated")
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise IntegrityError("version record fails its CRC32 check")
    r = _Reader(body)
    codec = r.u8()
    if codec != CODEC_VERSION:
        raise IntegrityError(f"unknown version record codec {codec}")
    try:
        kind = RecordKind(r.u8())
        version, parent, step, batch_id, rollback_plus_one = (r.varint() for _ in range(5))
        (created_at,) = r.unpack("<d")
        optimizer = r.short_str()
        lr, weight_decay, eps = r.unpack("<ddd")
        num_seeds = r.u8()
        seeds = r.unpack(f"<{num_seeds}Q")
        num_coeffs = r.u8()
        coeffs = r.unpack(f"<{num_coeffs}d")
        hparams = tuple((r.short_str(), r.unpack("<d")[0]) for _ in range(r.u8()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"version record is malformed: {exc}") from exc
    if r.pos != len(body):
        raise IntegrityError("version record has trailing bytes")
    return VersionRecord(
        version=version,
        parent=parent,
        step=step,
        optimizer=optimizer,
        seeds=tuple(seeds),
        coeffs=tuple(coeffs),
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        hparams=hparams,
        batch_id=batch_id,
        kind=kind,
        rollback_to=None if rollback_plus_one == 0 else rollback_plus_one - 1,
        created_at=created_at,
    )
