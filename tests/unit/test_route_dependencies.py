"""Every dependency of every route runs on the event loop.

FastAPI runs a plain `def` dependency in its thread pool: for each request it hands the call to a worker
thread and waits for it to come back. On the data plane that is a thread hop on every completion, in the
path of the user's first token, for checks (the API key, the app's state) that never block.
"""

from __future__ import annotations

import inspect

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.app import create_app
from service.settings import Settings


def _calls(dependant: Dependant):
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def test_no_route_runs_a_dependency_in_the_thread_pool(tmp_path):
    app = create_app(Settings(data_dir=str(tmp_path)))  # routes only: the lifespan (the engine) never starts
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    paths = {route.path for route in routes}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/jobs", "/metrics", "/readyz"} <= paths
    sync = sorted(
        {f"{route.path}: {call.__qualname__}" for route in routes for call in _calls(route.dependant)
         if call is not None and not inspect.iscoroutinefunction(call)}
    )
    assert sync == []
