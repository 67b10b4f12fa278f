"""The record codec: exact round trip, size budget, corruption detected."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters_store import IntegrityError, RecordKind, VersionRecord, decode_record, encode_record

finite = st.floats(allow_nan=False, allow_infinity=False)
u64 = st.integers(0, 2**64 - 1)
short = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@given(
    parent=st.integers(0, 2**40), step=u64, batch_id=u64, seeds=st.lists(u64, max_size=16),
    coeffs=st.lists(finite, max_size=16), lr=finite, hparams=st.lists(st.tuples(short, finite), max_size=4),
    optimizer=short, created_at=finite,
)
def test_round_trip_is_exact(parent, step, batch_id, seeds, coeffs, lr, hparams, optimizer, created_at) -> None:
    record = VersionRecord(
        version=parent + 1, parent=parent, step=step, optimizer=optimizer, seeds=tuple(seeds),
        coeffs=tuple(coeffs), lr=lr, hparams=tuple(hparams), batch_id=batch_id, created_at=created_at,
    )
    assert decode_record(encode_record(record)) == record


def test_rollback_round_trip() -> None:
    record = VersionRecord(version=9, parent=8, step=3, optimizer="rollback", kind=RecordKind.ROLLBACK, rollback_to=0)
    assert decode_record(encode_record(record)) == record


def test_size_budget() -> None:
    """A MeZO step with q=8 directions and two extra hyper-parameters still fits 256 bytes."""
    record = VersionRecord(
        version=10**9, parent=10**9 - 1, step=10**9, optimizer="zo-adam", seeds=tuple(range(2**61, 2**61 + 8)),
        coeffs=(0.1,) * 8, lr=1e-4, weight_decay=0.01, eps=1e-3, hparams=(("beta1", 0.9), ("beta2", 0.999)),
        batch_id=2**40,
    )
    assert len(encode_record(record)) <= 256
    q1 = dataclasses.replace(record, seeds=(1,), coeffs=(0.5,), hparams=())
    assert len(encode_record(q1)) <= 96


def test_corruption_is_detected() -> None:
    data = bytearray(encode_record(VersionRecord(version=1, parent=0, step=1, seeds=(5,), coeffs=(0.25,))))
    for pos in (0, 5, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(IntegrityError):
            decode_record(bytes(bad))
    with pytest.raises(IntegrityError):
        decode_record(bytes(data[:-3]))
