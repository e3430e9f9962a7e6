"""Reports from the Parquet output of a run (`write_report`).

Modules: `summaries` (loading, per-row values, summaries, EMA curves; MODE_ORDER, the one place
that orders modes), `plots` (PNGs), `render` (report.md / .html / summary.json of one run).
"""

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
    "ALL_DATASETS", "MODE_ORDER", "NO_DATASET", "NoResults", "PLOT_FILES", "ema_curves",
    "load_results", "summarize", "write_report", "_alpha_runs", "_alpha_switches",
]
