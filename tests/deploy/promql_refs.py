"""Pull metric and label names out of PromQL expressions, enough to check them against the catalogue."""

from __future__ import annotations

import re

from service.metrics import METRIC_NAMES

_METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])(zoserve_[a-z0-9_]+)(?![A-Za-z0-9_:])")
_SELECTOR_RE = re.compile(r"\{([^}]*)\}")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus adds at scrape time, plus the histogram bucket bound.
TARGET_LABELS = frozenset({"instance", "job", "le"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def metric_refs(expr: str) -> list[str]:
    """Every series name referenced (recording-rule names with colons are not matched)."""
    return _METRIC_RE.findall(expr)


def family_of(series_name: str) -> str | None:
    """The catalogue family a series name belongs to, or None when it is not in the catalogue."""
    if series_name in METRIC_NAMES:
        return series_name
    for suffix in HISTOGRAM_SUFFIXES:
        base = series_name.removesuffix(suffix)
        if base != series_name and METRIC_NAMES.get(base, ("",))[0] == "histogram":
            return base
    return None


def label_refs(expr: str) -> set[str]:
    labels: set[str] = set()
    for selector in _SELECTOR_RE.findall(expr):
        labels.update(_MATCHER_RE.findall(selector))
    for grouping in _GROUPING_RE.findall(expr):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    return labels
