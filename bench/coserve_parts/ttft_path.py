"""A user request's whole path to its first token: the load generator's sample joined to the service's stages.

The service splits each request's time to first token into stages, from the moment its HTTP middleware sees
the request to the moment the first token is back in the service (service/metrics.py TTFT_STAGES). The load
generator sees only the total, from the request's scheduled arrival to the first SSE chunk with text. Joined
on the completion's `id` (the SSE chunks carry it; the service passes it with the stages), the two give the
parts neither sees alone:

  send_lag   scheduled arrival -> the load generator sent the request (its own lateness)
  http_in    sent -> the app sees the request (the load generator's own send, the connection, uvicorn's parse)
  request_in .. to_service   the service's stages
  http_out   first token back in the service -> the load generator has parsed the SSE chunk with text

The parts add up to the client's TTFT exactly, up to the clocks: wall time in both processes (`time.time()`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from coserve_parts.windows import Windows

PARTS_BEFORE = ("send_lag", "http_in")
PARTS_AFTER = ("http_out",)


def join_paths(samples: Iterable, records: Iterable, windows: Windows) -> list[dict[str, float]]:
    """One row (part -> ms) per sample scheduled inside the windows that got a first token and whose
    completion id the service recorded stages for; rows keep the service's stage order."""
    by_id = {record.request_id: record for record in records if record.request_id is not None}
    rows = []
    for sample in samples:
        if sample.scheduled_s not in windows or sample.first_text_s is None:
            continue
        record = by_id.get(sample.completion_id)
        if record is None:
            continue
        server_total_s = sum(record.stages_s.values())
        entered_s = record.wall_s - server_total_s  # the handler's start, on the wall clock
        row = {"send_lag": sample.sent_s - sample.scheduled_s, "http_in": entered_s - sample.sent_s}
        row.update(record.stages_s)
        row["http_out"] = sample.first_text_s - record.wall_s
        rows.append({part: 1000.0 * seconds for part, seconds in row.items()})
    return rows


def summarise_paths(rows: Sequence[dict[str, float]], num_samples: int) -> dict:
    """Per part: the mean over all requests, over the middle tenth (by TTFT) and over the slowest 1 %."""
    if not rows:
        return {}
    parts = list(rows[0])
    table = np.array([[row[part] for part in parts] for row in rows])
    order = np.argsort(table.sum(axis=1))
    n = len(rows)
    middle = order[int(0.45 * n):max(int(0.55 * n), int(0.45 * n) + 1)]
    slowest = order[-max(1, n // 100):]

    def means(index) -> dict[str, float]:
        return dict(zip(parts, table[index].mean(axis=0).round(3).tolist()))

    return {
        "num_joined": n,
        "num_samples": num_samples,  # the phase's samples with a first token; the rest had no stages recorded
        "mean_ms": means(slice(None)),
        "middle_tenth_mean_ms": means(middle),
        "slowest_1pct_mean_ms": means(slowest),
        "ttft_p99_ms": float(np.percentile(table.sum(axis=1), 99)),
    }
