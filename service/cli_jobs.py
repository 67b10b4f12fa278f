"""`zoserve jobs …`: the control plane over REST (never in-process), so it works against any deployment.

URL and key come from `--url`/`--api-key` or ZOSERVE_URL / ZOSERVE_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

FINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    pass


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=60)


def _check(reply: httpx.Response) -> dict:
    if reply.status_code >= 400:
        try:
            error = reply.json()["error"]
            where = f" ({error['param']})" if error.get("param") else ""
            raise ApiError(f"HTTP {reply.status_code}{where}: {error['message']}")
        except (ValueError, KeyError, TypeError):
            raise ApiError(f"HTTP {reply.status_code}: {reply.text[:500]}") from None
    return reply.json()


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def _upload(http: httpx.Client, path: Path) -> str:
    with path.open("rb") as f:
        return _check(http.post("/v1/files", files={"file": (path.name, f, "application/jsonl")}))["id"]


def create(args: argparse.Namespace) -> int:
    body: dict = json.loads(Path(args.spec).read_text()) if args.spec else {}
    body["adapter"] = args.adapter or body.get("adapter")
    hyper = body.setdefault("hyperparameters", {})
    for flag, key in (("lr", "learning_rate"), ("eps", "eps"), ("q", "num_directions"),
                      ("weight_decay", "weight_decay"), ("batch_size", "batch_size"), ("max_steps", "max_steps")):
        if getattr(args, flag) is not None:
            hyper[key] = getattr(args, flag)
    for flag in ("method", "seed", "eval_every", "weight"):
        if getattr(args, flag) is not None:
            body[flag] = getattr(args, flag)
    with _client(args) as http:
        if args.training_file:
            body["training_file"] = _upload(http, Path(args.training_file))
        if args.validation_file:
            body["validation_file"] = _upload(http, Path(args.validation_file))
        _print(_check(http.post("/v1/jobs", json=body)))
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    with _client(args) as http:
        page = _check(http.get("/v1/jobs", params={"offset": args.offset, "limit": args.limit}))
    for job in page["data"]:
        loss = f"{job['last_loss']:.4f}" if job["last_loss"] is not None else "-"
        print(f"{job['id']}  {job['adapter']:<24} {job['status']:<10} step {job['step']}/{job['max_steps']}  loss {loss}")
    if page["has_more"]:
        print(f"… more: --offset {args.offset + args.limit}")
    return 0


def get(args: argparse.Namespace) -> int:
    with _client(args) as http:
        _print(_check(http.get(f"/v1/jobs/{args.job_id}")))
    return 0


def action(args: argparse.Namespace) -> int:
    with _client(args) as http:
        _print(_check(http.post(f"/v1/jobs/{args.job_id}/{args.action}")))
    return 0


def progress_line(job: dict, width: int = 30) -> str:
    done = job["step"] / max(1, job["max_steps"])
    bar = "#" * int(done * width) + "." * (width - int(done * width))
    loss = f"{job['last_loss']:.4f}" if job["last_loss"] is not None else "-"
    rate = f"{job['steps_per_s']:.2f}" if job["steps_per_s"] else "-"
    return f"[{bar}] step {job['step']}/{job['max_steps']}  loss {loss}  {rate} steps/s  {job['status']}"


def watch(args: argparse.Namespace) -> int:
    """A live progress bar (step, loss, steps/s) until the job ends; exit 0 only if it succeeded."""
    with _client(args) as http:
        while True:
            job = _check(http.get(f"/v1/jobs/{args.job_id}"))
            sys.stdout.write("\r" + progress_line(job))
            sys.stdout.flush()
            if job["status"] in FINAL:
                sys.stdout.write("\n")
                if job.get("error"):
                    print(job["error"])
                return 0 if job["status"] == "succeeded" else 1
            time.sleep(args.interval)


def plot(args: argparse.Namespace) -> int:
    """Training loss per step, and eval loss / accuracy, into a PNG (matplotlib Agg, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _client(args) as http:
        metrics = {"steps": [], "evals": [], "has_more": True}
        while metrics["has_more"]:  # page by page: at most 10,000 steps a reply
            after = metrics["steps"][-1]["step"] if metrics["steps"] else 0
            page = _check(http.get(f"/v1/jobs/{args.job_id}/metrics", params={"after_step": after, "limit": 10_000}))
            metrics = {**page, "steps": metrics["steps"] + page["steps"], "evals": metrics["evals"] + page["evals"]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([m["step"] for m in metrics["steps"]], [m["loss"] for m in metrics["steps"]], label="train loss", lw=1)
    if metrics["evals"]:
        ax.plot([e["step"] for e in metrics["evals"]], [e["loss"] for e in metrics["evals"]], "o-", label="eval loss")
        accuracy = [(e["step"], e["accuracy"]) for e in metrics["evals"] if e["accuracy"] is not None]
        if accuracy:
            twin = ax.twinx()
            twin.plot(*zip(*accuracy), "s--", color="tab:green", label="eval accuracy")
            twin.set_ylabel("accuracy")
            twin.set_ylim(0, 1)
            twin.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{args.job_id}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(args.output)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="manage fine-tuning jobs through the REST API")
    jobs.add_argument("--url", default=os.environ.get("ZOSERVE_URL", "http://127.0.0.1:8000"))
    jobs.add_argument("--api-key", default=os.environ.get("ZOSERVE_API_KEY"))
    cmds = jobs.add_subparsers(dest="jobs_command", required=True)

    c = cmds.add_parser("create", help="create a job (uploads --training-file / --validation-file first)")
    c.add_argument("--spec", help="a JSON file with the POST /v1/jobs body; flags below override it")
    c.add_argument("--adapter")
    c.add_argument("--training-file")
    c.add_argument("--validation-file")
    c.add_argument("--method")
    c.add_argument("--lr", type=float)
    c.add_argument("--eps", type=float)
    c.add_argument("-q", type=int, help="probe directions per step")
    c.add_argument("--weight-decay", type=float)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--max-steps", type=int)
    c.add_argument("--eval-every", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--weight", type=float)
    c.set_defaults(func=create)

    ls = cmds.add_parser("list", help="list jobs")
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=list_jobs)

    g = cmds.add_parser("get", help="show one job")
    g.add_argument("job_id")
    g.set_defaults(func=get)

    for name in ("cancel", "pause", "resume"):
        a = cmds.add_parser(name, help=f"{name} a job")
        a.add_argument("job_id")
        a.set_defaults(func=action, action=name)

    w = cmds.add_parser("watch", help="live progress bar until the job ends")
    w.add_argument("job_id")
    w.add_argument("--interval", type=float, default=1.0)
    w.set_defaults(func=watch)

    p = cmds.add_parser("plot", help="draw loss and eval curves to a PNG")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default="loss.png")
    p.set_defaults(func=plot)
