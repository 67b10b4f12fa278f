"""The `zoserve` command: `zoserve serve`, `zoserve build-tiny-model`."""

from __future__ import annotations

import argparse
import logging
import sys


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
