"""The figure: user TTFT, ZO step rate and the co-scheduler's budget across the three phases."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coserve_parts.load import UserSample
from coserve_parts.windows import USER_PHASES, Windows


def plot(path: Path, origin: float, phases: dict[str, Windows], samples: list[UserSample], steps_by_job, runtime_rows, window_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_user, ax_zo, ax_budget) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    colors = {"users": "#dbe9f6", "zo": "#fde8d0", "together": "#e3f1dc", "together_b": "#eadcf1"}
    for name, windows in phases.items():
        for t0, t1 in windows:
            for ax in (ax_user, ax_zo, ax_budget):
                ax.axvspan(t0 - origin, t1 - origin, color=colors[name], zorder=0)
            ax_user.text((t0 + t1) / 2 - origin, 1.0, name, transform=ax_user.get_xaxis_transform(), ha="center", va="bottom")

    ok = [s for s in samples if s.ttft_s is not None and s.phase in USER_PHASES]
    xs = np.array([s.scheduled_s - origin for s in ok])
    ys = np.array([s.ttft_s * 1000.0 for s in ok])
    ax_user.scatter(xs, ys, s=3, color="0.6", alpha=0.5, label="TTFT (each request)")
    grid = np.arange(0.0, max(windows.end for windows in phases.values()) - origin, 1.0)
    p50, p99 = [], []
    user_windows = [(t0 - origin, t1 - origin) for name in USER_PHASES if name in phases for t0, t1 in phases[name]]
    for t in grid:
        # Within the user window that holds t only: a window's first seconds do not average in the phase before.
        start = next((t0 for t0, t1 in user_windows if t0 <= t < t1), None)
        inside = ys[(xs > max(t - window_s, start)) & (xs <= t)] if start is not None else ys[:0]
        p50.append(np.percentile(inside, 50) if len(inside) >= 10 else np.nan)
        p99.append(np.percentile(inside, 99) if len(inside) >= 10 else np.nan)
    ax_user.plot(grid, p50, color="tab:blue", label=f"rolling p50 ({window_s:.0f} s)")
    ax_user.plot(grid, p99, color="tab:red", label=f"rolling p99 ({window_s:.0f} s)")
    ax_user.set_yscale("log")
    ax_user.set_ylabel("user TTFT (ms)")
    ax_user.legend(loc="upper left", fontsize=8)

    bin_s = 2.0
    edges = np.arange(0.0, grid[-1] + bin_s if len(grid) else bin_s, bin_s)
    total = np.zeros(max(0, len(edges) - 1))
    for (adapter, (weight, steps)), style in zip(steps_by_job.items(), ("--", ":")):
        counts, _ = np.histogram([m["time"] - origin for m in steps], bins=edges)
        total += counts
        ax_zo.step(edges[:-1], counts / bin_s, where="post", ls=style, label=f"{adapter} (weight {weight:g})")
    ax_zo.step(edges[:-1], total / bin_s, where="post", color="k", label="both jobs")
    ax_zo.set_ylabel(f"ZO steps/s ({bin_s:.0f} s bins)")
    ax_zo.legend(loc="upper left", fontsize=8)

    ts = [r["t"] - origin for r in runtime_rows]
    ax_budget.plot(ts, [r["budget_tokens"] for r in runtime_rows], color="tab:purple", label="ZO token budget")
    ax_budget.plot(ts, [r["probe_tokens_in_flight"] or 0 for r in runtime_rows], color="tab:orange", lw=0.8, label="probe tokens in flight")
    ax_budget.set_ylabel("tokens")
    ax_budget.set_xlabel("seconds since the users phase began")
    ax_budget.legend(loc="upper left", fontsize=8)
    fig.suptitle("zoserve co-serving: user TTFT and ZO step rate across the three phases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
