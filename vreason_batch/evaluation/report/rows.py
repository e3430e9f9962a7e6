"""Result rows as numpy: column readers, and `_Rows`, the per-row values the summaries and comparisons use.

How failures, normalised time and EMA peaks are counted: see the docstring of `summaries`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NO_DATASET = "(none)"


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
