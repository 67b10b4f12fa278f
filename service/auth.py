"""API keys with two scopes: `admin` (control plane) and `inference` (data plane).

A request carries its key as `Authorization: Bearer <key>` (what the `openai` client sends). No key, or a key
the service does not know, is 401; a known key of the other scope is 403. With no keys configured at all
the service is open (the app logs a warning at start-up). Once any key is configured, both planes require
a key of their own scope, so configuring only inference keys never leaves the control plane open.
"""

from __future__ import annotations

import enum
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.settings import Settings


class Scope(enum.StrEnum):
    ADMIN = "admin"
    INFERENCE = "inference"


class AuthError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def _known(key: str, keys: list[str]) -> bool:
    # Constant-time per comparison, and every configured key is compared: no early exit on a match.
    matches = [hmac.compare_digest(key.encode(), k.encode()) for k in keys]
    return any(matches)


def check_key(settings: Settings, key: str | None, scope: Scope) -> None:
    """Raise AuthError unless `key` grants `scope` (always passes when the service runs open)."""
    if settings.is_open:
        return
    wanted = settings.admin_api_keys if scope is Scope.ADMIN else settings.inference_api_keys
    other = settings.inference_api_keys if scope is Scope.ADMIN else settings.admin_api_keys
    if key is None:
        raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'")
    if _known(key, wanted):
        return
    if _known(key, other):
        raise AuthError(403, f"this API key does not have the {scope.value!r} scope")
    raise AuthError(401, "invalid API key")


async def require_admin(request: Request) -> None:
    check_key(request.app.state.settings, _bearer(request), Scope.ADMIN)


async def require_inference(request: Request) -> None:
    check_key(request.app.state.settings, _bearer(request), Scope.INFERENCE)


def _requires_admin_unless(setting: str):
    """For /healthz, /readyz, /metrics: open when `setting` is true, else the admin key."""

    async def dependency(request: Request) -> None:
        settings: Settings = request.app.state.settings
        if not getattr(settings, setting):
            check_key(settings, _bearer(request), Scope.ADMIN)

    return dependency


# The checks are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
# pool, a thread hop on every request (tests/unit/test_route_dependencies.py).
# Routers take these as router-level dependencies, so no route of a plane can forget its check.
AdminKey = Annotated[None, Depends(require_admin)]
InferenceKey = Annotated[None, Depends(require_inference)]
HealthAccess = Annotated[None, Depends(_requires_admin_unless("open_health"))]
MetricsAccess = Annotated[None, Depends(_requires_admin_unless("open_metrics"))]
