"""Reports from the Parquet output: one run (`write_report`) or several side by side (`write_comparison`).

Modules: `summaries` (loading, per-row values, summaries, EMA curves; MODE_ORDER, the one place
that orders modes), `plots` (PNGs), `render` (report.md / .html / summary.json of one run),
`compare` (several runs paired by sample).
"""

from .compare import compare_runs, write_comparison
from .plots import PLOT_FILES, _alpha_runs
from .render import write_report
from .summaries import (
    ALL_DATASETS,
    MODE_ORDER,
    NO_DATASET,
    NoResults,
    _alpha_switches,
    ema_curves,
    load_results,
    summarize,
)

__all__ = [
    "ALL_DATASETS", "MODE_ORDER", "NO_DATASET", "NoResults", "PLOT_FILES", "compare_runs", "ema_curves",
    "load_results", "summarize", "write_comparison", "write_report", "_alpha_runs", "_alpha_switches",
]
