"""The report's numbers: summaries per dataset and mode, and EMA curves, from result rows.

`summarize` turns the rows into a JSON-serialisable dict per dataset and mode, `ema_curves` gives
the mean EMA-entropy curve over normalised decoding time (the paper's figure). Reading the output
is in `loading`, the per-row values in `rows`, plots in `plots`, the pages in `render`, the
comparison of runs in `compare`.

Conventions used throughout:
- Failed rows (`error_type` or `error` set) are counted, then left out of every other metric.
- Normalised decoding time of step t in an output of n tokens is t / (n - 1): 0 is the first
  output token, 1 the last (a one-token output sits at 0).
- The EMA peak of a sample is the controller's `ema_peak_step` (the step of the running EMA
  maximum when the peak was declared passed); samples that never passed it have no peak.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from vreason_batch.engine.modes import MODE_NAMES

from .rows import _failed, _lists, _Rows, _strings

GREEDY = "greedy"
# Known modes first, in this order, in every table and plot; any other mode follows sorted.
MODE_ORDER = MODE_NAMES  # the decoding modes' registry, in registration order
ALL_DATASETS = "all"

# Columns `summarize` reads. The per-token `entropy` / `entropy_post` traces and the texts are
# left out: on a large run they dominate the size and the summary does not need them.
SUMMARY_COLUMNS = (
    "run_id",
    "config_hash",
    "model",
    "sample_id",
    "mode",
    "dataset",
    "correct",
    "score",
    "entropy_ema",
    "alpha",
    "num_output_tokens",
    "num_think_tokens",
    "controller_updates",
    "ema_peak_step",
    "latency_s",
    "error_type",
    "error",
)
EXAMPLE_COLUMNS = (
    "sample_id",
    "mode",
    "dataset",
    "entropy",
    "entropy_ema",
    "alpha",
    "ema_peak_step",
    "error_type",
    "error",
)
NUM_EXAMPLES = 3


# ---------------------------------------------------------------------------------------------
# Summary


def _num(x: float) -> float | None:
    """A JSON-safe float: NaN / inf (an empty group) become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return _num(finite.mean()) if finite.size else None


def _dist(values: np.ndarray) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": None, "p50": None, "p90": None}
    return {
        "mean": _num(finite.mean()),
        "p50": _num(np.percentile(finite, 50)),
        "p90": _num(np.percentile(finite, 90)),
    }


def _ordered_modes(modes) -> list[str]:
    present = set(modes)
    return [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))


def _group_metrics(rows: _Rows, idx: np.ndarray) -> dict[str, Any]:
    """Metrics of one (dataset, mode) group; `idx` are its row indices."""
    failed = idx[rows.failed[idx]]
    ok = idx[~rows.failed[idx]]
    scored = ok[np.isfinite(rows.correct[ok])]
    timed = ok[np.isfinite(rows.n_out[ok]) & np.isfinite(rows.latency_s[ok])]
    total_latency = rows.latency_s[timed].sum()
    passed = ok[np.isfinite(rows.peak_pos[ok])]
    return {
        "n_rows": int(idx.size),
        "n_ok": int(ok.size),
        "n_failed": int(failed.size),
        "failed_by_error_type": dict(sorted(Counter(rows.error_type[i] for i in failed).items())),
        "n_scored": int(scored.size),
        # None (not 0) when no row has ground truth: "unknown", not "all wrong".
        "accuracy": _mean(rows.correct[scored]),
        "score_mean": _mean(rows.score[ok]),
        "output_tokens": _dist(rows.n_out[ok]),
        "think_tokens_mean": _mean(rows.n_think[ok]),
        "latency_s": _dist(rows.latency_s[ok]),
        # Per-sample latencies overlap in a batch, so this is tokens per second of sample
        # latency, a per-request rate, not the cluster's throughput.
        "throughput_tok_per_s": _num(rows.n_out[timed].sum() / total_latency) if total_latency > 0 else None,
        "controller_updates_mean": _mean(rows.updates[ok]),
        "final_ema_entropy_mean": _mean(rows.final_ema[ok]),
        "ema_peak": {
            "n_passed": int(passed.size),
            "passed_frac": _num(passed.size / ok.size) if ok.size else None,
            "position_mean": _mean(rows.peak_pos[passed]),
            "height_mean": _mean(rows.peak_height[passed]),
        },
        "alpha_switches_mean": _mean(rows.alpha_switches[ok]),
    }


def _vs_greedy(rows: _Rows, idx: np.ndarray, greedy_idx: np.ndarray) -> dict[str, Any] | None:
    """Tokens and accuracy of a group vs greedy on the samples both decoded successfully.

    Pairing by sample keeps the comparison fair when one mode failed or has not reached some
    samples yet (a partial run). The reduction is of total (= mean) tokens over the pairs.
    """
    greedy = {
        (rows.dataset[i], rows.sample_id[i]): i
        for i in greedy_idx
        if not rows.failed[i] and np.isfinite(rows.n_out[i])
    }
    pairs = []
    for i in idx:
        g = greedy.get((rows.dataset[i], rows.sample_id[i]))
        if g is not None and not rows.failed[i] and np.isfinite(rows.n_out[i]):
            pairs.append((g, i))
    if not pairs:
        return None
    g, m = (np.array(side) for side in zip(*pairs))
    g_tokens, m_tokens = rows.n_out[g].sum(), rows.n_out[m].sum()
    both = np.isfinite(rows.correct[g]) & np.isfinite(rows.correct[m])
    return {
        "n_paired": len(pairs),
        "greedy_tokens_mean": _num(g_tokens / len(pairs)),
        "tokens_mean": _num(m_tokens / len(pairs)),
        "token_reduction_pct": _num(100.0 * (1.0 - m_tokens / g_tokens)) if g_tokens > 0 else None,
        "n_paired_scored": int(both.sum()),
        "accuracy_delta_pts": (
            _num(100.0 * (rows.correct[m][both].mean() - rows.correct[g][both].mean())) if both.any() else None
        ),
    }


def _per_mode(rows: _Rows, idx: np.ndarray) -> dict[str, dict[str, Any]]:
    by_mode: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        by_mode[rows.mode[i]].append(i)
    greedy_idx = np.array(by_mode.get(GREEDY, []), dtype=int)
    out = {}
    for mode in _ordered_modes(by_mode):
        mode_idx = np.array(by_mode[mode], dtype=int)
        metrics = _group_metrics(rows, mode_idx)
        metrics["vs_greedy"] = None if mode == GREEDY else _vs_greedy(rows, mode_idx, greedy_idx)
        out[mode] = metrics
    return out


def summarize(table: pa.Table) -> dict[str, Any]:
    """A JSON-serialisable summary of result rows: totals, then metrics per mode overall and per
    dataset and mode. See the module docstring for how failures, time and peaks are counted."""
    rows = _Rows.from_table(table)
    all_idx = np.arange(table.num_rows)
    keys = list(zip(rows.dataset, rows.sample_id, rows.mode))
    failed_types = Counter(t for t in rows.error_type if t is not None)
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(rows.dataset):
        by_dataset[d].append(i)
    ok = ~rows.failed
    return {
        "run_ids": sorted(set(_strings(table, "run_id"))),
        "models": sorted(set(_strings(table, "model"))),
        "config_hashes": sorted(set(_strings(table, "config_hash"))),
        "totals": {
            "n_rows": table.num_rows,
            "n_ok": int(ok.sum()),
            "n_failed": int(rows.failed.sum()),
            "failed_by_error_type": dict(sorted(failed_types.items())),
            "n_samples": len({(d, s) for d, s, _ in keys}),
            # More than one row per (dataset, sample, mode): two runs under one prefix, or a
            # writer that duplicated a shard. Counted so the report can warn; not resolved.
            "n_duplicate_rows": len(keys) - len(set(keys)),
            "datasets": sorted(by_dataset),
            "modes": _ordered_modes(rows.mode),
            "output_tokens_total": int(np.nansum(rows.n_out[ok])),
            "latency_s_total": _num(np.nansum(rows.latency_s[ok])),
        },
        "overall": _per_mode(rows, all_idx),
        "datasets": {d: _per_mode(rows, np.array(by_dataset[d], dtype=int)) for d in sorted(by_dataset)},
    }


# ---------------------------------------------------------------------------------------------
# EMA-entropy curves


def ema_curves(table: pa.Table, bins: int = 50) -> dict[str, Any]:
    """Mean EMA-entropy curve per mode over normalised decoding time (successful rows only).

    Each sample's EMA trace is resampled to `bins` points on [0, 1] by linear interpolation over
    t / (n - 1), so short and long outputs weigh the same; the curves are the means over samples.
    Returns {"t": [bins], "modes": {mode: {"n_samples", "mean": [bins], "peak_t", "peak_value"}}};
    a mode without any non-empty trace is left out.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    grid = np.linspace(0.0, 1.0, bins)
    traces = _lists(table, "entropy_ema", np.float64)
    sums: dict[str, np.ndarray] = {}
    counts: Counter = Counter()
    for mode, trace, failed in zip(_strings(table, "mode"), traces, _failed(table)):
        if failed or not len(trace):
            continue
        x = np.linspace(0.0, 1.0, len(trace)) if len(trace) > 1 else np.zeros(1)
        sums[mode] = sums.get(mode, np.zeros(bins)) + np.interp(grid, x, trace)
        counts[mode] += 1
    modes = {}
    for mode in _ordered_modes(sums):
        mean = sums[mode] / counts[mode]
        peak = int(np.argmax(mean))
        modes[mode] = {
            "n_samples": counts[mode],
            "mean": [float(v) for v in mean],
            "peak_t": float(grid[peak]),
            "peak_value": float(mean[peak]),
        }
    return {"t": [float(v) for v in grid], "modes": modes}
