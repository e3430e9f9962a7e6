"""The report's PNG plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend switch)."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from .rows import NO_DATASET, _failed, _floats, _lists, _strings
from .summaries import NUM_EXAMPLES, _ordered_modes

MODE_COLORS = {"greedy": "#4d4d4d", "vreason": "#1f77b4", "vreason_lite": "#2ca02c"}
EXPLORE_COLOR = "#d62728"  # alpha = -1: the update pushes entropy up
EXPLOIT_COLOR = "#17becf"  # alpha = +1: the update pushes entropy down

PLOT_FILES = ("ema_entropy_curves.png", "entropy_examples.png", "output_tokens_hist.png")



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
    """One row of panels per example sample, one column per mode: its entropy trace, EMA, peak and alpha strip."""
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
            _plot_example_trace(ax, mode, color, entropy[i], ema[i], alpha[i], peak[i])
    _fit_row_ylims(axes)
    handles = _example_legend_handles()
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    return _png(fig)


def _plot_example_trace(ax, mode: str, color: str, entropy: np.ndarray, ema: np.ndarray, alpha: np.ndarray,
                        peak: float) -> None:
    """One sample's panel in one mode: entropy, its EMA, the alpha strip and the EMA peak."""
    if len(entropy):
        ax.plot(entropy, color=color, alpha=0.45, linewidth=0.9)
    if len(ema):
        ax.plot(ema, color=color, linewidth=2.2)
    # The strip sits below the curves (see the y range set after plotting).
    for start, stop, sign in _alpha_runs(alpha):
        ax.axvspan(
            start - 0.5, stop - 0.5, ymin=0.0, ymax=0.07, linewidth=0,
            color=EXPLORE_COLOR if sign < 0 else EXPLOIT_COLOR, alpha=0.8,
        )
    if np.isfinite(peak):
        ax.axvline(peak, color="black", linestyle="--", linewidth=1.2)
    n = max(len(entropy), len(ema))
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(f"{mode}: {n} tokens", fontsize=10)
    ax.grid(alpha=0.25)


def _fit_row_ylims(axes) -> None:
    """One y range per row, fitted to the traces (entropy may vary in a narrow band far from 0),
    with room at the bottom for the alpha strip (drawn in axes coordinates, below 7%)."""
    for row_axes in axes:
        lo = min(ax.get_ylim()[0] for ax in row_axes)
        hi = max(ax.get_ylim()[1] for ax in row_axes)
        span = max(hi - lo, 1e-3)
        for ax in row_axes:
            ax.set_ylim(lo - 0.12 * span, hi)


def _example_legend_handles() -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    return [
        Line2D([], [], color="#777777", alpha=0.6, linewidth=0.9, label="entropy H_t"),
        Line2D([], [], color="#777777", linewidth=2.2, label="EMA of H_t"),
        Line2D([], [], color="black", linestyle="--", label="EMA peak (controller)"),
        Patch(color=EXPLORE_COLOR, label="alpha = -1 (raise entropy)"),
        Patch(color=EXPLOIT_COLOR, label="alpha = +1 (lower entropy)"),
    ]
