"""Reports from the Parquet output: one run (`write_report`) or several side by side (`write_comparison`).

Modules: `loading` (reading the result files), `rows` (per-row values as numpy), `summaries`
(summaries, EMA curves; MODE_ORDER, the one place that orders modes), `plots` (PNGs), `render`
(report.md / .html / summary.json of one run), `compare` (several runs paired by sample).
"""

from .compare import compare_runs, write_comparison
from .loading import NoResults, load_results
from .plots import PLOT_FILES, _alpha_runs
from .render import write_report
from .rows import NO_DATASET, _alpha_switches
from .summaries import ALL_DATASETS, MODE_ORDER, ema_curves, summarize

__all__ = [
    "ALL_DATASETS", "MODE_ORDER", "NO_DATASET", "NoResults", "PLOT_FILES", "compare_runs", "ema_curves",
    "load_results", "summarize", "write_comparison", "write_report", "_alpha_runs", "_alpha_switches",
]
