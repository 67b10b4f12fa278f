"""Versioned adapter states: records, snapshots, replay, PEFT export, aliases, retention (no vLLM, no HTTP)."""

from adapters_store.blobs import BlobInfo, BlobStore, LocalBlobStore
from adapters_store.codec import decode_record, encode_record
from adapters_store.errors import (
    AdapterExists,
    AdapterNotFound,
    BlobNotFound,
    HeadConflict,
    IntegrityError,
    InvalidArgument,
    StoreError,
    VersionNotFound,
)
from adapters_store.factory import open_store
from adapters_store.metadata import MetadataBackend
from adapters_store.records import (
    AdapterCommit,
    AdapterMeta,
    AdapterState,
    RecordKind,
    SnapshotRef,
    VersionRecord,
    parse_address,
)
from adapters_store.store import AdapterStore, ApplyRecord

__all__ = [
    "AdapterCommit", "AdapterExists", "AdapterMeta", "AdapterNotFound", "AdapterState", "AdapterStore",
    "ApplyRecord", "BlobInfo", "BlobNotFound", "BlobStore", "HeadConflict", "IntegrityError", "InvalidArgument",
    "LocalBlobStore", "MetadataBackend", "RecordKind", "SnapshotRef", "StoreError", "VersionNotFound",
    "VersionRecord", "decode_record", "encode_record", "open_store", "parse_address",
]
