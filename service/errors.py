"""The one place where package errors become HTTP statuses, in the OpenAI error shape."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from scheduler import errors as sched

_STATUS: list[tuple[type[Exception], int]] = [
    (sched.InvalidJobSpec, 422),
    (sched.JobNotFound, 404),
    (sched.AdapterNotServed, 404),
    (sched.AdapterBusy, 409),
    (sched.NoCapacity, 503),
]


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _status_for(exc: Exception) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(sched.SchedulerError)
    async def scheduler_error(_: Request, exc: sched.SchedulerError) -> JSONResponse:
        status = _status_for(exc)
        param = getattr(exc, "field", None)
        return JSONResponse(error_body(str(exc), type(exc).__name__, param, status), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(error_body(message, "invalid_request_error", field, 422), status_code=422)
