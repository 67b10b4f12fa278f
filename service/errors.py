"""The one place where package errors become HTTP statuses, in the OpenAI error shape.

`{"error": {"message", "type", "param", "code"}}`: `param` names the offending field where one is known,
`code` repeats the status. Errors are mapped by type, never by message text.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import errors as store
from scheduler import errors as sched
from scheduler.zo.methods import InvalidHyperParameter
from service.auth import AuthError

log = logging.getLogger("zoserve")


class ServiceError(Exception):
    """An error the service itself raises (input it checks before any runtime call)."""

    status_code = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidInput(ServiceError):
    status_code = 422


class NotFound(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    status_code = 413


# First match wins, so subclasses come before their bases.
_STATUS: list[tuple[type[Exception], int]] = [
    (sched.InvalidJobSpec, 422),
    (sched.JobNotFound, 404),
    (sched.AdapterNotServed, 404),
    (sched.AdapterBusy, 409),
    (sched.JobStateConflict, 409),
    (sched.NoCapacity, 503),
    (store.InvalidArgument, 422),
    (store.AdapterNotFound, 404),
    (store.VersionNotFound, 404),
    (store.AdapterExists, 409),
    (store.HeadConflict, 409),
    (store.IntegrityError, 500),
    (InvalidHyperParameter, 422),
]
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 422: "invalid_request_error", 503: "service_unavailable"}


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, kind, param, status), status_code=status, headers=headers)


def status_for(exc: Exception) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def _field_of(exc: Exception) -> str | None:
    field = getattr(exc, "field", None)
    if field is None and isinstance(exc, (store.VersionNotFound,)):
        return "version"
    return field


def install_error_handlers(app: FastAPI) -> None:
    async def package_error(_: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return error_response(status, str(exc), _field_of(exc))

    for root in (sched.SchedulerError, store.StoreError, InvalidHyperParameter):
        app.add_exception_handler(root, package_error)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), exc.field)

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return error_response(exc.status_code, exc.message, None, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _loc(first["loc"])
        message = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return error_response(422, message, field)


def _loc(loc) -> str:
    # Drop where the value came from ("body", "query", "path") and pydantic's union-branch tags.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else [str(p) for p in loc]
    return ".".join(parts)
