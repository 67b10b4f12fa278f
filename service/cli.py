"""The `zoserve` command: `serve`, `build-tiny-model`, and `jobs …` (a REST client, see cli_jobs)."""

from __future__ import annotations

import argparse
import logging
import sys

import httpx

from service import cli_jobs


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model": args.model}.items() if v is not None}
    settings = Settings(**overrides)
    app = create_app(settings)
    print(f"zoserve: listening on http://{settings.host}:{settings.port} (OpenAI API under /v1)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def _build_tiny_model(args: argparse.Namespace) -> int:
    from scheduler.models.tiny import ensure_model

    print(ensure_model(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service (embedded default: tiny local model, no Redis)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="local model directory (default: a tiny model built locally)")
    serve.set_defaults(func=_serve)
    tiny = sub.add_parser("build-tiny-model", help="build a tiny local model and print its directory")
    tiny.add_argument("name", nargs="?", default="tiny-opt")
    tiny.set_defaults(func=_build_tiny_model)
    cli_jobs.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except cli_jobs.ApiError as exc:
        print(f"zoserve: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"zoserve: cannot reach the service: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
