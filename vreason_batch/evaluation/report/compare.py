"""Several runs side by side: `vreason-batch report OUT_A OUT_B ... --out DIR`, and a sweep's report.

An *arm* is one (run, mode): a run's output prefix holds one or more modes. Per dataset (and
"all"), every arm gets its own accuracy (with a Wilson 95% interval) and token counts, and the
same figures on the samples that every arm of that dataset decoded successfully and scored:
pairing by (dataset, sample_id) keeps the comparison fair when runs cover different samples
(a partial run, a failed row, another limit). Deltas are against the reference arm: the first
run's greedy mode when it has one, else the first arm.

Writes comparison.json, comparison.md, comparison.html and three PNGs: the mean EMA-entropy
curves of every arm overlaid, accuracy against mean output tokens (one point per arm, with its
interval), and output tokens per arm.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from vreason_batch.io import storage

from . import paper
from .loading import _open_dataset
from .plots import _matplotlib, _placeholder, _png
from .rows import _Rows
from .summaries import ALL_DATASETS, GREEDY, SUMMARY_COLUMNS, _mean, _num, _ordered_modes, ema_curves

COMPARE_PLOTS = ("compare_ema_curves.png", "compare_accuracy_vs_tokens.png", "compare_tokens.png")
WILSON_Z = 1.96  # 95%


def wilson_interval(k: int, n: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n; None when n = 0."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def run_labels(uris: list[str]) -> list[str]:
    """Short distinct labels for output URIs: the last path segment, more segments where two agree."""
    parts = [u.rstrip("/").split("/") for u in uris]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{u}" for i, u in enumerate(uris)]


# ---------------------------------------------------------------------------------------------
# Numbers


def _arm_metrics(rows: _Rows, idx: np.ndarray) -> dict[str, Any]:
    ok = idx[~rows.failed[idx]]
    scored = ok[np.isfinite(rows.correct[ok])]
    k = int(np.nansum(rows.correct[scored]))
    ci = wilson_interval(k, int(scored.size))
    timed = ok[np.isfinite(rows.n_out[ok]) & np.isfinite(rows.latency_s[ok])]
    latency = rows.latency_s[timed].sum()
    passed = ok[np.isfinite(rows.peak_pos[ok])]
    return {
        "n_rows": int(idx.size),
        "n_failed": int(idx.size - ok.size),
        "n_scored": int(scored.size),
        "n_correct": k,
        "accuracy": _num(k / scored.size) if scored.size else None,
        "accuracy_ci95": list(ci) if ci else None,
        "output_tokens_mean": _mean(rows.n_out[ok]),
        "score_mean": _mean(rows.score[ok]),
        # seconds of sample latency per output token: per-request cost, comparable between arms
        # that ran on the same hardware (batches overlap samples, so it is not cluster throughput)
        "ms_per_token": _num(1000.0 * latency / rows.n_out[timed].sum()) if rows.n_out[timed].sum() > 0 else None,
        "final_ema_entropy_mean": _mean(rows.final_ema[ok]),
        "ema_peak_passed": int(passed.size),
        "ema_peak_position_mean": _mean(rows.peak_pos[passed]),
        "ema_peak_height_mean": _mean(rows.peak_height[passed]),
    }


def _paired(rows_by_arm: dict[str, tuple[_Rows, np.ndarray]], ref: str) -> dict[str, dict[str, Any]]:
    """Accuracy and tokens of every arm on the samples all arms decoded and scored, and the
    differences to the reference arm on those samples."""
    ok_sets = []
    values: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
    for arm, (rows, idx) in rows_by_arm.items():
        good = {}
        for i in idx:
            if not rows.failed[i] and np.isfinite(rows.correct[i]) and np.isfinite(rows.n_out[i]):
                good[(rows.dataset[i], rows.sample_id[i])] = (float(rows.correct[i]), float(rows.n_out[i]))
        values[arm] = good
        ok_sets.append(set(good))
    common = sorted(set.intersection(*ok_sets)) if ok_sets else []
    out: dict[str, dict[str, Any]] = {}
    if not common:
        return {arm: {"n_paired": 0} for arm in rows_by_arm}
    ref_acc = np.array([values[ref][key][0] for key in common])
    ref_tok = np.array([values[ref][key][1] for key in common])
    for arm in rows_by_arm:
        acc = np.array([values[arm][key][0] for key in common])
        tok = np.array([values[arm][key][1] for key in common])
        out[arm] = {
            "n_paired": len(common),
            "accuracy": _num(acc.mean()),
            "output_tokens_mean": _num(tok.mean()),
            "accuracy_delta_pts": _num(100.0 * (acc.mean() - ref_acc.mean())),
            "tokens_delta_pct": _num(100.0 * (tok.sum() / ref_tok.sum() - 1.0)) if ref_tok.sum() > 0 else None,
            # samples whose score differs from the reference arm's: how many answers moved at all
            "n_changed_score": int(np.count_nonzero(acc != ref_acc)),
        }
    return out


def compare_runs(runs: list[tuple[str, pa.Table]]) -> dict[str, Any]:
    """The comparison of runs given as (label, table with SUMMARY_COLUMNS); JSON-serialisable."""
    arms: list[tuple[str, str, str]] = []  # (arm name, run label, mode)
    parsed = {}
    for label, table in runs:
        rows = _Rows.from_table(table)
        parsed[label] = rows
        for mode in _ordered_modes(rows.mode):
            arms.append((f"{label} / {mode}", label, mode))
    if not arms:
        raise ValueError("no rows in any of the runs")
    ref = next((a for a, label, m in arms if label == runs[0][0] and m == GREEDY), arms[0][0])
    datasets = sorted({d for rows in parsed.values() for d in rows.dataset})

    def select(label: str, mode: str, dataset: str | None) -> np.ndarray:
        rows = parsed[label]
        return np.array([i for i in range(len(rows.mode)) if rows.mode[i] == mode
                         and (dataset is None or rows.dataset[i] == dataset)], dtype=int)

    groups: dict[str, Any] = {}
    for dataset in [ALL_DATASETS, *datasets]:
        ds = None if dataset == ALL_DATASETS else dataset
        by_arm = {a: (parsed[label], select(label, mode, ds)) for a, label, mode in arms}
        by_arm = {a: v for a, v in by_arm.items() if v[1].size}
        if not by_arm:
            continue
        paired = _paired(by_arm, ref if ref in by_arm else next(iter(by_arm)))
        groups[dataset] = {a: {**_arm_metrics(*by_arm[a]), "paired": paired[a]} for a in by_arm}
    return {
        "runs": [{"label": label, "run_ids": sorted(set(t.column("run_id").to_pylist())),
                  "models": sorted(set(t.column("model").to_pylist())),
                  "config_hashes": sorted(set(t.column("config_hash").to_pylist()))} for label, t in runs],
        "arms": [{"arm": a, "run": label, "mode": m} for a, label, m in arms],
        "reference_arm": ref,
        "datasets": groups,
    }


# ---------------------------------------------------------------------------------------------
# Plots


def _arm_colors(arms: list[dict]) -> dict[str, str]:
    return {a["arm"]: f"C{k % 10}" for k, a in enumerate(arms)}


# Arms often coincide (lr = 0 is greedy; small lr changes little): a line style and a marker per
# arm keep every one of them visible where they overlap.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(arms: list[str], arm: str, styles: tuple[str, ...]) -> str:
    return styles[arms.index(arm) % len(styles)]


def _plot_curves(curves: dict[str, dict], colors: dict[str, str]) -> bytes:
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(9, 5.4), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.set_title("Mean EMA of token entropy over decoding time, every run and mode")
    drawn = 0
    names = list(curves)
    for arm, c in curves.items():
        ax.plot(c["t"], c["mean"], color=colors[arm], linewidth=1.8, linestyle=_style(names, arm, LINE_STYLES),
                label=f"{arm} (n={c['n_samples']})")
        ax.plot([c["peak_t"]], [c["peak_value"]], marker="o", markersize=6, color=colors[arm], markeredgecolor="black")
        drawn += 1
    if not drawn:
        _placeholder(ax, "no entropy traces in successful rows")
        return _png(fig)
    ax.set_xlabel("normalised decoding time (0 = first output token, 1 = last); dots: peaks")
    ax.set_ylabel("EMA entropy (nats)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2 if drawn > 4 else 1, fontsize=8, frameon=False)
    return _png(fig)


def _plot_tradeoff(overall: dict[str, dict], colors: dict[str, str]) -> bytes:
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(8.5, 5.6), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.set_title("Accuracy against mean output tokens (all datasets; bars: Wilson 95%)")
    points = [(a, m) for a, m in overall.items() if m["accuracy"] is not None and m["output_tokens_mean"] is not None]
    if not points:
        _placeholder(ax, "no scored rows")
        return _png(fig)
    xs = [m["output_tokens_mean"] for _, m in points]
    span = max(max(xs) - min(xs), 1.0)
    names = [a for a, _ in points]
    seen: dict[tuple[float, float], int] = {}
    for arm, m in points:
        lo, hi = m["accuracy_ci95"]
        x, y = m["output_tokens_mean"], m["accuracy"]
        # coinciding points are dodged sideways (2% of the x range each) so none hides another
        key = (round(x, 6), round(y, 6))
        dodge, seen[key] = seen.get(key, 0), seen.get(key, 0) + 1
        ax.errorbar([x + 0.02 * span * dodge], [y], yerr=[[y - lo], [hi - y]], fmt=_style(names, arm, MARKERS),
                    color=colors[arm], markersize=7, capsize=3, markeredgecolor="black", markeredgewidth=0.6,
                    label=f"{arm}: {100 * y:.1f}% at {x:.1f} tokens (n={m['n_scored']})")
    ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.15 * span)
    dodged = any(n > 1 for n in seen.values())
    ax.set_xlabel("mean output tokens per sample" + (" (coinciding points drawn side by side)" if dodged else ""))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2 if len(points) > 4 else 1, fontsize=8, frameon=False)
    return _png(fig)


def _plot_tokens(tokens: dict[str, np.ndarray], colors: dict[str, str]) -> bytes:
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(max(7.5, 1.1 * len(tokens) + 2), 5.2), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    ax.set_title("Output tokens per sample, per run and mode")
    ax.set_xlabel("box: quartiles; line: median; triangle: mean")
    present = {a: v for a, v in tokens.items() if v.size}
    if not present:
        _placeholder(ax, "no successful rows")
        return _png(fig)
    bp = ax.boxplot(list(present.values()), patch_artist=True, showmeans=True, widths=0.6,
                    medianprops={"color": "black", "linewidth": 1.5},
                    meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black"})
    for patch, arm in zip(bp["boxes"], present):
        patch.set_facecolor(colors[arm])
        patch.set_alpha(0.55)
    ax.set_xticks(range(1, len(present) + 1), list(present), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("output tokens")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Pages


def _f(x, spec: str = ".1f") -> str:
    return "–" if x is None else f"{x:{spec}}"


def _acc(m: dict) -> str:
    if m["accuracy"] is None:
        return "–"
    lo, hi = m["accuracy_ci95"]
    return f"{100 * m['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({m['n_correct']}/{m['n_scored']})"


def comparison_tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per table; comparison.md and comparison.html render the same ones."""
    main, paired, dynamics = [], [], []
    for dataset, arms in result["datasets"].items():
        for arm, m in arms.items():
            p = m["paired"]
            main.append([dataset, arm, str(m["n_rows"]), str(m["n_failed"]), _acc(m), _f(m["output_tokens_mean"]),
                         _f(m["ms_per_token"])])
            paired.append([dataset, arm, str(p["n_paired"]),
                           "–" if not p["n_paired"] else f"{100 * p['accuracy']:.1f}%",
                           _f(p.get("accuracy_delta_pts"), "+.1f"), _f(p.get("output_tokens_mean")),
                           _f(p.get("tokens_delta_pct"), "+.1f"), str(p.get("n_changed_score", "–"))])
            dynamics.append([dataset, arm, _f(m["final_ema_entropy_mean"], ".3f"),
                             f"{m['ema_peak_passed']}/{m['n_rows'] - m['n_failed']}",
                             _f(m["ema_peak_position_mean"], ".2f"), _f(m["ema_peak_height_mean"], ".3f")])
    modes = {a["arm"]: a["mode"] for a in result["arms"]}
    beside = paper.beside_paper({
        dataset: {arm: {"mode": modes[arm], "accuracy": m["accuracy"], "tokens": m["output_tokens_mean"],
                        "score": m.get("score_mean")} for arm, m in arms.items()}
        for dataset, arms in result["datasets"].items()
    })
    return [
        ("Accuracy and cost per run and mode",
         ["dataset", "run / mode", "rows", "failed", "accuracy [Wilson 95%] (correct/scored)", "mean out tokens",
          "ms / token"], main),
        (f"Paired by sample (the samples every arm scored; deltas vs {result['reference_arm']})",
         ["dataset", "run / mode", "paired n", "accuracy", "acc. delta pts", "mean out tokens", "tokens delta %",
          "scores changed"], paired),
        ("Entropy dynamics",
         ["dataset", "run / mode", "final EMA entropy", "peak passed", "peak position", "peak height"], dynamics),
    ] + ([(f"Beside the paper: {paper.SOURCE}", paper.HEADER, beside)] if beside else [])


NOTES = (
    "An arm is one (run, mode). Failed rows are counted and left out of every other metric. ms / token is"
    " summed sample latency over summed output tokens: compare it between arms run on the same machine."
    " Peak position: the controller's EMA peak step / (output tokens - 1), over the samples that passed the"
    " peak; peak height: the EMA there."
)
FIGURES = (
    ("compare_accuracy_vs_tokens.png", "Accuracy against mean output tokens, one point per run and mode"),
    ("compare_ema_curves.png", "Mean EMA entropy over normalised decoding time, every run and mode"),
    ("compare_tokens.png", "Output tokens per sample, per run and mode"),
)


def _notes(result: dict[str, Any]) -> str:
    has_paper = any(paper.benchmark_of(d) for d in result["datasets"])
    return NOTES + (" " + paper.NOTE if has_paper else "")


def _runs_lines(result: dict[str, Any], uris: dict[str, str]) -> list[str]:
    return [f"{r['label']}: {uris.get(r['label'], '')} (models {', '.join(r['models'])}; runs {', '.join(r['run_ids'])})"
            for r in result["runs"]]


def _markdown(result: dict[str, Any], uris: dict[str, str]) -> str:
    out = ["# V-Reason batch: runs compared", ""] + [f"- {line}" for line in _runs_lines(result, uris)]
    for title, header, rows in comparison_tables(result):
        out += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    out += ["", _notes(result), "", "## Figures", ""] + [f"![{cap}]({name})\n" for name, cap in FIGURES]
    return "\n".join(out)


def _html(result: dict[str, Any], uris: dict[str, str]) -> str:
    from .render import CSS

    e = html.escape
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>V-Reason batch: runs compared</title>",
           f"<style>{CSS}</style></head><body>", "<h1>V-Reason batch: runs compared</h1>", "<ul>"]
    out += [f"<li>{e(line)}</li>" for line in _runs_lines(result, uris)] + ["</ul>"]
    for title, header, rows in comparison_tables(result):
        out += [f"<h2>{e(title)}</h2>", "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        for row in rows:
            cls = " class='all'" if row[0] == ALL_DATASETS else ""
            cls = " class='paper'" if len(row) > 1 and row[1].startswith("paper: ") else cls
            out.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        out.append("</table>")
    out += [f"<p class='note'>{e(_notes(result))}</p>", "<h2>Figures</h2>"]
    out += [f"<figure><img src='{e(n)}' alt='{e(c)}'><figcaption>{e(c)}</figcaption></figure>" for n, c in FIGURES]
    return "\n".join(out + ["</body></html>"])


def write_comparison(runs: list[tuple[str, str]], out_dir: str) -> dict[str, Any]:
    """Compare the runs given as (label, output URI); write the pages, PNGs and comparison.json
    (last: its presence means the comparison is complete) into `out_dir`. Returns its content."""
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must be distinct: {labels}")
    tables = [(label, _open_dataset(uri).to_table(columns=list(SUMMARY_COLUMNS))) for label, uri in runs]
    result = compare_runs(tables)
    colors = _arm_colors(result["arms"])
    curves, tokens = {}, {}
    for label, table in tables:
        for mode, c in ema_curves(table)["modes"].items():
            curves[f"{label} / {mode}"] = {**c, "t": np.linspace(0.0, 1.0, len(c["mean"]))}
        rows = _Rows.from_table(table)
        for mode in _ordered_modes(rows.mode):
            keep = [i for i, m in enumerate(rows.mode) if m == mode and not rows.failed[i] and np.isfinite(rows.n_out[i])]
            tokens[f"{label} / {mode}"] = rows.n_out[keep]
    uris = dict(runs)
    result["sources"] = uris
    result["ema_curves"] = {a: {k: (list(map(float, v)) if k in ("t", "mean") else v) for k, v in c.items()}
                            for a, c in curves.items()}
    overall = result["datasets"].get(ALL_DATASETS, {})
    files = {
        "compare_ema_curves.png": _plot_curves(curves, colors),
        "compare_accuracy_vs_tokens.png": _plot_tradeoff(overall, colors),
        "compare_tokens.png": _plot_tokens(tokens, colors),
        "comparison.md": _markdown(result, uris).encode(),
        "comparison.html": _html(result, uris).encode(),
        "comparison.json": json.dumps(result, indent=2, allow_nan=False).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, name), data)
    return result
