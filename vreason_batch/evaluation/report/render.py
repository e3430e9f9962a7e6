"""The report's pages (report.md, report.html, summary.json) and `write_report`, the entry point."""

from __future__ import annotations

import html
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vreason_batch.io import storage

from . import paper
from .loading import _open_dataset
from .plots import _pick_examples, _plot_ema_curves, _plot_examples, _plot_tokens_hist
from .summaries import ALL_DATASETS, EXAMPLE_COLUMNS, SUMMARY_COLUMNS, ema_curves, summarize

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
    beside = _beside_paper(summary)
    if beside:
        tables.append((f"Beside the paper: {paper.SOURCE}", paper.HEADER, beside))
    return tables


def _beside_paper(summary: dict[str, Any]) -> list[list[str]]:
    """The paper's Fig. 1 rows beside this run's modes, for the datasets that are paper benchmarks."""
    return paper.beside_paper({
        dataset: {mode: {"mode": mode, "accuracy": m["accuracy"], "tokens": m["output_tokens"]["mean"],
                         "score": m["score_mean"]} for mode, m in modes.items()}
        for dataset, modes in summary["datasets"].items()
    })


def _notes(summary: dict[str, Any]) -> str:
    return NOTES + (" " + paper.NOTE if _beside_paper(summary) else "")


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
    out += ["", _notes(summary), "", "## Figures", ""]
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
tr.paper td { color: #555; font-style: italic; }
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
            cls = " class='paper'" if row[1].startswith("paper: ") else cls
            out.append(f"<tr{cls}>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>")
        out.append("</table>")
    out += [f"<p class='note'>{e(_notes(summary))}</p>", "<h2>Figures</h2>"]
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
    summary["beside_paper"] = {"source": paper.SOURCE, "header": paper.HEADER, "rows": _beside_paper(summary)}

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
