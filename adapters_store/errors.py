"""The store's one root error type. `service` maps these to HTTP status in one place.

Every error names the adapter (and version, field) it is about, so the message can be shown to a caller.
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidArgument(StoreError, ValueError):
    """Bad input (malformed adapter name, negative version, record inconsistent with its parent…) → 4xx."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterNotFound(StoreError, KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {name!r} does not exist")
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class AdapterExists(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {name!r} already exists")
        self.name = name


class VersionNotFound(StoreError, KeyError):
    """The version does not exist, or it cannot be rebuilt because retention dropped what it needed."""

    def __init__(self, name: str, version: int, reason: str = "does not exist") -> None:
        super().__init__(f"adapter {name!r} version {version} {reason}")
        self.name = name
        self.version = version

    def __str__(self) -> str:
        return self.args[0]


class HeadConflict(StoreError):
    """Compare-and-set on the head failed: someone else committed (or rolled back) since `expected`."""

    def __init__(self, name: str, expected: int, actual: int) -> None:
        super().__init__(f"adapter {name!r}: head is {actual}, expected {expected}")
        self.name = name
        self.expected = expected
        self.actual = actual


class IntegrityError(StoreError):
    """Stored bytes do not match their checksum, or metadata references something that is missing."""


class BlobNotFound(IntegrityError):
    def __init__(self, key: str) -> None:
        super().__init__(f"blob {key!r} does not exist")
        self.key = key
