"""Accuracy / token / entropy summaries and plots from the Parquet output of a run.

`load_results` reads every result file under a local directory or s3:// prefix (also while a run
is still writing shards), `summarize` turns the rows into a JSON-serialisable dict per dataset and
mode, `ema_curves` gives the mean EMA-entropy curve over normalised decoding time (the paper's
figure), and `write_report` writes summary.json, report.md, report.html and PNG plots.

Conventions used throughout:
- Failed rows (`error_type` or `error` set) are counted, then left out of every other metric.
- Normalised decoding time of step t in an output of n tokens is t / (n - 1): 0 is the first
  output token, 1 the last (a one-token output sits at 0).
- The EMA peak of a sample is the controller's `ema_peak_step` (the step of the running EMA
  maximum when the peak was declared passed); samples that never passed it have no peak.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vreason_batch import storage
from vreason_batch.results import is_result_path
from vreason_batch.schema import OUTPUT_SCHEMA

GREEDY = "greedy"
# Known modes first, in this order, in every table and plot; any other mode follows sorted.
MODE_ORDER = ("greedy", "vreason", "vreason_lite")
NO_DATASET = "(none)"
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

MODE_COLORS = {"greedy": "#4d4d4d", "vreason": "#1f77b4", "vreason_lite": "#2ca02c"}
EXPLORE_COLOR = "#d62728"  # alpha = -1: the update pushes entropy up
EXPLOIT_COLOR = "#17becf"  # alpha = +1: the update pushes entropy down

PLOT_FILES = ("ema_entropy_curves.png", "entropy_examples.png", "output_tokens_hist.png")


class NoResults(FileNotFoundError):
    """No Parquet result file under the given location."""


# ---------------------------------------------------------------------------------------------
# Loading


def _result_files(uri: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, sorted Parquet paths) under `uri`, skipping `_*` and `.*` files and dirs.

    Run records (`_run.json`, completion markers) and temporary files of shards being written
    live under such names; a temp file is a half-written Parquet file and must never be read.
    """
    import pyarrow.fs as pafs

    fs, base = storage.pyarrow_fs(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return fs, [base] if base.endswith(".parquet") else []
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    paths = []
    for entry in fs.get_file_info(selector):
        if entry.type == pafs.FileType.File and is_result_path(entry.path[len(base) :].lstrip("/")):
            paths.append(entry.path)
    return fs, sorted(paths)


def _open_dataset(uri: str):
    import pyarrow.dataset as pads

    fs, paths = _result_files(uri)
    if not paths:
        raise NoResults(
            f"no Parquet result files under {uri} (is the output URI right? has the run written a shard"
            " yet? files and folders whose names start with '_' or '.' are skipped)"
        )
    # The explicit schema makes every shard read alike: a column missing from one file is null.
    return pads.dataset(paths, schema=OUTPUT_SCHEMA, format="parquet", filesystem=fs)


def load_results(uri: str, columns: list[str] | tuple[str, ...] | None = None) -> pa.Table:
    """Every result row under a local directory or s3:// prefix (or one .parquet file) as one table.

    Works on a run that is still writing: the shards written so far are read. Raises `NoResults`
    when there is no result file at all. `columns` limits the columns read (default: all).
    """
    return _open_dataset(uri).to_table(columns=list(columns) if columns is not None else None)


# ---------------------------------------------------------------------------------------------
# Per-row values as numpy


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or bool column as float64, NaN where null."""
    return table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)


def _lists(table: pa.Table, name: str, dtype) -> list[np.ndarray]:
    """A list column as one numpy array per row (empty where null), without a Python float per value."""
    col = table.column(name)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if len(arr) == 0:
        return []
    offsets = arr.offsets.to_numpy()
    # `values` is the whole child array even for a sliced list array; offsets index into it.
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    empty = np.zeros(0, dtype=dtype)
    return [values[offsets[i] : offsets[i + 1]] if valid[i] else empty for i in range(len(arr))]


def _strings(table: pa.Table, name: str) -> list[str | None]:
    return table.column(name).to_pylist()


def _failed(table: pa.Table) -> np.ndarray:
    """Rows that failed: either error column set (the writer sets both; one is enough here)."""
    either = pc.or_(pc.is_valid(table.column("error_type")), pc.is_valid(table.column("error")))
    return either.to_numpy(zero_copy_only=False).astype(bool)


def _alpha_switches(alpha: np.ndarray) -> int:
    """Sign changes between consecutive updates (alpha == 0 marks steps without an update)."""
    signs = alpha[alpha != 0]
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def _norm_time(step: float, n: int) -> float:
    return step / (n - 1) if n > 1 else 0.0


@dataclass
class _Rows:
    """The columns the summary needs, one entry per row, plus per-row derived values."""

    dataset: list[str]
    mode: list[str]
    sample_id: list[str]
    error_type: list[str | None]  # None on rows that did not fail
    failed: np.ndarray  # bool
    correct: np.ndarray  # 1.0 / 0.0 / NaN
    score: np.ndarray
    n_out: np.ndarray
    n_think: np.ndarray
    latency_s: np.ndarray
    updates: np.ndarray
    final_ema: np.ndarray  # last EMA value, NaN for an empty trace
    peak_pos: np.ndarray  # 0..1, NaN where the peak was never passed
    peak_height: np.ndarray
    alpha_switches: np.ndarray  # NaN where there is no alpha trace

    @classmethod
    def from_table(cls, table: pa.Table) -> _Rows:
        n = table.num_rows
        failed = _failed(table)
        n_out = _floats(table, "num_output_tokens")
        peak_step = _floats(table, "ema_peak_step")
        ema = _lists(table, "entropy_ema", np.float64)
        alpha = _lists(table, "alpha", np.int8)
        has_alpha = table.column("alpha").is_valid().to_numpy(zero_copy_only=False)
        final_ema = np.full(n, np.nan)
        peak_pos = np.full(n, np.nan)
        peak_height = np.full(n, np.nan)
        switches = np.full(n, np.nan)
        for i in range(n):
            if len(ema[i]):
                final_ema[i] = ema[i][-1]
            if not math.isnan(peak_step[i]):
                step = int(peak_step[i])
                # Normalise by the trace length; a row without a trace falls back to its token count.
                length = len(ema[i]) or (0 if math.isnan(n_out[i]) else int(n_out[i]))
                if 0 <= step < length:
                    peak_pos[i] = _norm_time(step, length)
                if 0 <= step < len(ema[i]):
                    peak_height[i] = ema[i][step]
            if has_alpha[i]:
                switches[i] = _alpha_switches(alpha[i])
        return cls(
            dataset=[d or NO_DATASET for d in _strings(table, "dataset")],
            mode=_strings(table, "mode"),
            sample_id=_strings(table, "sample_id"),
            error_type=[(t or "(unknown)") if f else None for t, f in zip(_strings(table, "error_type"), failed)],
            failed=failed,
            correct=_floats(table, "correct"),
            score=_floats(table, "score"),
            n_out=n_out,
            n_think=_floats(table, "num_think_tokens"),
            latency_s=_floats(table, "latency_s"),
            updates=_floats(table, "controller_updates"),
            final_ema=final_ema,
            peak_pos=peak_pos,
            peak_height=peak_height,
            alpha_switches=switches,
        )


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


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend switch)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("report plots need matplotlib: pip install 'vreason-batch[report]'") from e
    return Figure, FigureCanvasAgg


def _mode_color(mode: str, k: int) -> str:
    return MODE_COLORS.get(mode, f"C{(k + 3) % 10}")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_ema_curves(curves: dict[str, Any]) -> bytes:
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.set_title("Mean EMA of token entropy over decoding time")
    if not curves["modes"]:
        _placeholder(ax, "no entropy traces in successful rows")
        return _png(fig)
    t = curves["t"]
    for k, (mode, c) in enumerate(curves["modes"].items()):
        color = _mode_color(mode, k)
        label = f"{mode} (n={c['n_samples']}): peak {c['peak_value']:.2f} nats at t={c['peak_t']:.2f}"
        ax.plot(t, c["mean"], color=color, linewidth=2, label=label)
        ax.plot([c["peak_t"]], [c["peak_value"]], marker="o", markersize=8, color=color, markeredgecolor="black")
    ax.set_xlabel("normalised decoding time (0 = first output token, 1 = last)")
    ax.set_ylabel("EMA entropy (nats)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    # Below the axes, one mode a line: inside, the legend would hide parts of real curves.
    fig.legend(loc="outside lower center", ncols=1, fontsize=9, frameon=False)
    return _png(fig)


def _plot_tokens_hist(table: pa.Table) -> bytes:
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.set_title("Output tokens per sample")
    modes = _strings(table, "mode")
    n_out = _floats(table, "num_output_tokens")
    ok = ~_failed(table)
    per_mode = {}
    for mode in _ordered_modes(modes):
        v = n_out[[i for i, m in enumerate(modes) if m == mode and ok[i]]]
        v = v[np.isfinite(v)]
        if v.size:
            per_mode[mode] = v
    if not per_mode:
        _placeholder(ax, "no successful rows")
        return _png(fig)
    from matplotlib.ticker import MaxNLocator

    # Shared bins, the modes' bars side by side in each: overlaid fills blend into muddy colours.
    edges = np.histogram_bin_edges(np.concatenate(list(per_mode.values())), bins="auto")
    if len(edges) > 31:
        edges = np.linspace(edges[0], edges[-1], 31)
    colors = [_mode_color(mode, k) for k, mode in enumerate(per_mode)]
    labels = [f"{mode} (n={v.size}, median {np.median(v):g})" for mode, v in per_mode.items()]
    ax.hist(list(per_mode.values()), bins=edges, color=colors, label=labels, alpha=0.85)
    for color, v in zip(colors, per_mode.values()):
        ax.axvline(float(np.median(v)), color=color, linestyle="--", linewidth=1.4)
    ax.set_xlabel("output tokens (dashed: median)")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    fig.legend(loc="outside lower center", ncols=len(labels), fontsize=9, frameon=False)
    return _png(fig)


def _pick_examples(table: pa.Table, k: int = NUM_EXAMPLES) -> list[tuple[str, str]]:
    """Up to k (dataset, sample_id) keys to plot, present (successful, with a trace) in the most
    modes and preferably with a passed EMA peak; spread evenly over the sorted candidates so
    that different datasets show up, and deterministic."""
    modes_of: dict[tuple[str, str], set] = defaultdict(set)
    has_peak: set = set()
    ema_len = table.column("entropy_ema").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    peak = _floats(table, "ema_peak_step")
    datasets = [d or NO_DATASET for d in _strings(table, "dataset")]
    failed = _failed(table)
    for i, (d, s, m) in enumerate(zip(datasets, _strings(table, "sample_id"), _strings(table, "mode"))):
        if not failed[i] and np.nan_to_num(ema_len[i]) > 0:
            modes_of[(d, s)].add(m)
            if np.isfinite(peak[i]):
                has_peak.add((d, s))
    if not modes_of:
        return []
    most = max(len(v) for v in modes_of.values())
    best = sorted(key for key, v in modes_of.items() if len(v) == most)
    with_peak = [key for key in best if key in has_peak]
    if len(with_peak) < k:
        return (with_peak + [key for key in best if key not in has_peak])[:k]
    return [with_peak[int(j)] for j in np.linspace(0, len(with_peak) - 1, k).round()]


def _alpha_runs(alpha: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, sign) runs of the alpha in force: an update's alpha holds until the next one."""
    runs: list[tuple[int, int, int]] = []
    current, start = 0, 0
    for t, a in enumerate(alpha):
        if a != 0 and a != current:
            if current != 0:
                runs.append((start, t, current))
            current, start = int(a), t
    if current != 0:
        runs.append((start, len(alpha), current))
    return runs


def _plot_examples(examples: pa.Table, keys: list[tuple[str, str]]) -> bytes:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    Figure, Canvas = _matplotlib()
    modes = _ordered_modes(examples.column("mode").to_pylist()) if keys else []
    n_rows, n_cols = max(len(keys), 1), max(len(modes), 1)
    fig = Figure(figsize=(4.6 * n_cols + 0.6, 2.7 * n_rows + 1.2), layout="constrained")
    Canvas(fig)
    if not keys:
        ax = fig.add_subplot()
        ax.set_title("Entropy traces of example samples")
        _placeholder(ax, "no entropy traces in successful rows")
        return _png(fig)
    fig.suptitle("Token entropy of example samples (bottom strip: alpha of the controller updates)")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey="row")
    row_of = {}
    for i, (d, s, m) in enumerate(
        zip(
            [d or NO_DATASET for d in _strings(examples, "dataset")],
            _strings(examples, "sample_id"),
            _strings(examples, "mode"),
        )
    ):
        row_of[(d, s, m)] = i
    entropy = _lists(examples, "entropy", np.float64)
    ema = _lists(examples, "entropy_ema", np.float64)
    alpha = _lists(examples, "alpha", np.int8)
    peak = _floats(examples, "ema_peak_step")
    for r, (dataset, sample_id) in enumerate(keys):
        short_dataset = dataset if len(dataset) <= 20 else dataset[:19] + "…"
        short_id = sample_id if len(sample_id) <= 16 else sample_id[:15] + "…"
        for c, mode in enumerate(modes):
            ax = axes[r][c]
            color = _mode_color(mode, c)
            i = row_of.get((dataset, sample_id, mode))
            ax.set_title(mode, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{short_dataset}\n{short_id}\nentropy (nats)", fontsize=9)
            if r == n_rows - 1:
                ax.set_xlabel("output token")
            if i is None or not (len(entropy[i]) or len(ema[i])):
                ax.text(0.5, 0.5, "no trace", ha="center", va="center", transform=ax.transAxes, color="#666666")
                continue
            if len(entropy[i]):
                ax.plot(entropy[i], color=color, alpha=0.45, linewidth=0.9)
            if len(ema[i]):
                ax.plot(ema[i], color=color, linewidth=2.2)
            # The strip sits below the curves (see the y range set after plotting).
            for start, stop, sign in _alpha_runs(alpha[i]):
                ax.axvspan(
                    start - 0.5, stop - 0.5, ymin=0.0, ymax=0.07, linewidth=0,
                    color=EXPLORE_COLOR if sign < 0 else EXPLOIT_COLOR, alpha=0.8,
                )
            if np.isfinite(peak[i]):
                ax.axvline(peak[i], color="black", linestyle="--", linewidth=1.2)
            n = max(len(entropy[i]), len(ema[i]))
            ax.set_xlim(-0.5, n - 0.5)
            ax.set_title(f"{mode}: {n} tokens", fontsize=10)
            ax.grid(alpha=0.25)
    # One y range per row, fitted to the traces (entropy may vary in a narrow band far from 0),
    # with room at the bottom for the alpha strip (drawn in axes coordinates, below 7%).
    for row_axes in axes:
        lo = min(ax.get_ylim()[0] for ax in row_axes)
        hi = max(ax.get_ylim()[1] for ax in row_axes)
        span = max(hi - lo, 1e-3)
        for ax in row_axes:
            ax.set_ylim(lo - 0.12 * span, hi)
    handles = [
        Line2D([], [], color="#777777", alpha=0.6, linewidth=0.9, label="entropy H_t"),
        Line2D([], [], color="#777777", linewidth=2.2, label="EMA of H_t"),
        Line2D([], [], color="black", linestyle="--", label="EMA peak (controller)"),
        Patch(color=EXPLORE_COLOR, label="alpha = -1 (raise entropy)"),
        Patch(color=EXPLOIT_COLOR, label="alpha = +1 (lower entropy)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Markdown / HTML


def _fmt(x, spec: str = ".1f") -> str:
    return "–" if x is None else f"{x:{spec}}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _vs_greedy_cell(v: dict | None) -> str:
    if v is None or v["token_reduction_pct"] is None:
        return "–"
    return f"{-v['token_reduction_pct']:+.1f}% (n={v['n_paired']})"


def _acc_delta_cell(v: dict | None) -> str:
    if v is None or v["accuracy_delta_pts"] is None:
        return "–"
    return f"{v['accuracy_delta_pts']:+.1f} pts (n={v['n_paired_scored']})"


def _tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table; report.md and report.html render the same tables."""
    groups = [(ALL_DATASETS, summary["overall"])] + list(summary["datasets"].items())
    cost_rows, entropy_rows, failure_rows = [], [], []
    for dataset, modes in groups:
        for mode, m in modes.items():
            tok, lat, peak = m["output_tokens"], m["latency_s"], m["ema_peak"]
            cost_rows.append(
                [
                    dataset, mode, str(m["n_rows"]), str(m["n_failed"]),
                    _pct(m["accuracy"]) + (f" (n={m['n_scored']})" if m["n_scored"] else ""),
                    _acc_delta_cell(m["vs_greedy"]), _fmt(m["score_mean"], ".3f"),
                    _fmt(tok["mean"]), _fmt(tok["p50"]), _fmt(tok["p90"]), _vs_greedy_cell(m["vs_greedy"]),
                    _fmt(m["think_tokens_mean"]),
                    _fmt(lat["mean"], ".2f"), _fmt(lat["p50"], ".2f"), _fmt(lat["p90"], ".2f"),
                    _fmt(m["throughput_tok_per_s"]),
                ]
            )
            entropy_rows.append(
                [
                    dataset, mode, _fmt(m["controller_updates_mean"]), _fmt(m["alpha_switches_mean"]),
                    _fmt(m["final_ema_entropy_mean"], ".3f"),
                    f"{peak['n_passed']}/{m['n_ok']}", _fmt(peak["position_mean"], ".2f"),
                    _fmt(peak["height_mean"], ".3f"),
                ]
            )
            if dataset != ALL_DATASETS:
                failure_rows += [[dataset, mode, t, str(n)] for t, n in m["failed_by_error_type"].items()]
    tables = [
        (
            "Accuracy and cost",
            ["dataset", "mode", "rows", "failed", "accuracy", "acc. vs greedy", "score", "out tokens",
             "p50", "p90", "tokens vs greedy", "think tokens", "latency s", "p50", "p90", "tok/s"],
            cost_rows,
        ),
        (
            "Entropy dynamics",
            ["dataset", "mode", "updates", "alpha switches", "final EMA entropy", "peak passed",
             "peak position", "peak height"],
            entropy_rows,
        ),
    ]
    if failure_rows:
        tables.append(("Failures", ["dataset", "mode", "error_type", "rows"], failure_rows))
    return tables


def _overview_lines(summary: dict[str, Any], source: str) -> list[str]:
    t = summary["totals"]
    lines = [
        f"Source: {source}",
        f"Runs: {', '.join(summary['run_ids']) or '–'}",
        f"Models: {', '.join(summary['models']) or '–'}",
        f"Rows: {t['n_rows']} ({t['n_ok']} ok, {t['n_failed']} failed) over {t['n_samples']} samples,"
        f" {len(t['datasets'])} datasets, modes {', '.join(t['modes'])}",
    ]
    if len(summary["models"]) > 1 or len(summary["config_hashes"]) > 1:
        lines.append("Warning: rows from more than one model or config are summarised together.")
    if t["n_duplicate_rows"]:
        lines.append(f"Warning: {t['n_duplicate_rows']} rows repeat a (dataset, sample, mode) already seen.")
    return lines


NOTES = (
    "Failed rows are counted and left out of every other metric. Accuracy is over rows with ground"
    " truth (n shown). 'vs greedy' columns pair each sample with its greedy row (both successful):"
    " tokens as the change in total output tokens, accuracy in points. Latency is per sample from"
    " the start of its batch; tok/s = output tokens / summed latency. Peak position is the"
    " controller's EMA peak step / (output tokens - 1), over samples that passed the peak."
)

FIGURES = (
    ("ema_entropy_curves.png", "Mean EMA entropy over normalised decoding time, per mode"),
    ("entropy_examples.png", "Entropy traces of example samples, with the controller's alpha"),
    ("output_tokens_hist.png", "Output tokens per sample, per mode"),
)


def _markdown(summary: dict[str, Any], source: str) -> str:
    out = ["# V-Reason batch report", ""]
    out += [f"- {line}" for line in _overview_lines(summary, source)]
    for title, header, rows in _tables(summary):
        out += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    out += ["", NOTES, "", "## Figures", ""]
    for name, caption in FIGURES:
        out += [f"![{caption}]({name})", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:nth-child(-n+2) { text-align: left; }
tr.all td { background: #f8f8ff; font-weight: 600; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; border: 1px solid #ddd; }
p.note { color: #555; max-width: 60em; }
"""


def _html(summary: dict[str, Any], source: str) -> str:
    e = html.escape
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>V-Reason batch report</title>"]
    out += [f"<style>{CSS}</style></head><body>", "<h1>V-Reason batch report</h1>", "<ul>"]
    out += [f"<li>{e(line)}</li>" for line in _overview_lines(summary, source)]
    out.append("</ul>")
    for title, header, rows in _tables(summary):
        out += [f"<h2>{e(title)}</h2>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        for row in rows:
            cls = " class='all'" if row[0] == ALL_DATASETS and title != "Failures" else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
        out.append("</table>")
    out += [f"<p class='note'>{e(NOTES)}</p>", "<h2>Figures</h2>"]
    for name, caption in FIGURES:
        out.append(
            f"<figure><img src='{e(name)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>"
        )
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(uri: str, out_dir: str) -> dict[str, Any]:
    """Summarise the results under `uri` and write summary.json, report.md, report.html and the
    PNG plots into `out_dir` (a local directory or an s3:// prefix). Returns what summary.json
    holds: `summarize`'s dict plus `source` (the URI read) and `ema_curves`."""
    dataset = _open_dataset(uri)
    table = dataset.to_table(columns=list(SUMMARY_COLUMNS))
    summary = {"source": uri, **summarize(table)}
    curves = ema_curves(table)
    summary["ema_curves"] = curves

    # The raw entropy traces are read for the plotted samples only: they are the bulk of a run.
    keys = _pick_examples(table)
    example_ids = pa.array(sorted({sample_id for _, sample_id in keys}), pa.string())
    examples = dataset.to_table(columns=list(EXAMPLE_COLUMNS), filter=pc.field("sample_id").isin(example_ids))

    # Plots first, the pages that show them next, summary.json last: its presence means the
    # report is complete (each file is written atomically).
    files = {
        "ema_entropy_curves.png": _plot_ema_curves(curves),
        "entropy_examples.png": _plot_examples(examples, keys),
        "output_tokens_hist.png": _plot_tokens_hist(table),
        "report.md": _markdown(summary, uri).encode(),
        "report.html": _html(summary, uri).encode(),
        "summary.json": json.dumps(summary, indent=2, allow_nan=False).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, name), data)
    return summary
