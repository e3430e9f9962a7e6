"""Parameter sweeps: one config, a grid of dotted-key values, one normal run per grid cell.

    vreason-batch sweep CONFIG --grid controller.lr=0,1e-3,1e-2 --grid controller.update_every=1,2,4

Every cell is the config with its grid values applied as `--set` overrides and its own output
prefix under `output.uri` (`<output.uri>/<cell name>`), run by the pipeline's `run_job` like any
job: resumable (a re-run skips what each prefix holds), exactly once, with its run record. The
sweep writes `<output.uri>/_sweep.json` (what ran where) and, with `--report DIR`, one comparison
report over all cells (`vreason_batch.evaluation.report.compare`).

The greedy baseline runs once, not once per cell, when the config's modes include greedy and no
grid key can change a greedy row (keys under `controller.` and `lite.` only). It is written under
`<output.uri>/greedy` by a config whose controller and lite sections are reset to their defaults:
greedy reads neither, and this keeps its config hash, and so its prefix, valid whatever the
sweep's controller settings are (the hash guards a prefix against mixed configs).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from vreason_batch.config import Config, ConfigError, config_from_dict

SWEEP_RECORD = "_sweep.json"
GREEDY = "greedy"
GREEDY_PREFIX = "greedy"
# Sections whose keys never change a greedy row: the controller and Lite act only in the other modes.
GREEDY_INDEPENDENT = ("controller.", "lite.")
# Keys a grid may not vary: where rows go is the sweep's to decide, and the modes are per cell.
FORBIDDEN_PREFIXES = ("output.", "decoding.modes")


@dataclass
class Cell:
    """One run of a sweep."""

    name: str  # the output prefix under the sweep's output.uri, and the label in the report
    overrides: list[str]  # dotted key=value, applied after the command line's --set
    config: Config
    values: dict[str, Any] = field(default_factory=dict)  # grid key -> value (empty for the baseline)
    plan: Any = None  # pipeline.RunPlan, set by run_sweep before any cell runs


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--grid key=v1,v2,...` options -> [(key, [raw values])], in the order given.

    Values are kept raw and YAML-parsed later, like `--set` values; an axis is a flat list of
    scalars (a value cannot hold a comma).
    """
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} is not of the form dotted.key=v1,v2,...")
        key, raw = (part.strip() for part in item.split("=", 1))
        values = [v.strip() for v in raw.split(",")]
        if not key or not all(values):
            raise ConfigError(f"--grid {item!r}: empty key or value")
        if any(key == p or key.startswith(p) for p in FORBIDDEN_PREFIXES):
            raise ConfigError(f"--grid {key}: the sweep sets output.uri and the modes itself; grid other keys")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--grid {key} is given twice")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r} repeats a value")
        axes.append((key, values))
    if not axes:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return axes


def _label_keys(keys: list[str]) -> dict[str, str]:
    """Short names for cell labels: the last dotted part, unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe(value: str) -> str:
    # prefixes are path segments on disk and S3 keys: keep them to a portable alphabet
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value)


def plan_sweep(data: dict, overrides: list[str], grid: list[str]) -> tuple[Config, list[Cell]]:
    """The base config and every cell (the greedy baseline first, when it is split off).

    `data` is the raw config (YAML mapping), `overrides` the command line's `--set`. Every cell's
    config is validated here, before any run starts: a bad value is a ConfigError naming it.
    """
    base = config_from_dict(data, overrides)
    axes = parse_grid(grid)
    keys = [k for k, _ in axes]
    labels = _label_keys(keys)
    root = base.output.uri.rstrip("/")
    modes = list(base.decoding.modes)
    split_greedy = GREEDY in modes and len(modes) > 1 and all(k.startswith(GREEDY_INDEPENDENT) for k in keys)
    cell_modes = [m for m in modes if m != GREEDY] if split_greedy else modes

    cells: list[Cell] = []
    if split_greedy:
        sets = [*overrides, f"output.uri={root}/{GREEDY_PREFIX}", "decoding.modes=[greedy]"]
        cfg = config_from_dict(data, sets)
        cfg.controller = type(cfg.controller)()
        cfg.lite = type(cfg.lite)()
        cells.append(Cell(GREEDY_PREFIX, sets, cfg))
    for combo in itertools.product(*(values for _, values in axes)):
        values = dict(zip(keys, combo))
        name = "_".join(f"{labels[k]}={_safe(v)}" for k, v in values.items())
        sets = [*overrides, *(f"{k}={v}" for k, v in values.items()), f"output.uri={root}/{name}",
                f"decoding.modes=[{', '.join(cell_modes)}]"]
        try:
            cfg = config_from_dict(data, sets)
        except ConfigError as e:
            raise ConfigError(f"sweep cell {name}: {e}") from None
        cells.append(Cell(name, sets, cfg, values))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError(f"two sweep cells got the same prefix: {names}")
    return base, cells


def sweep_record(base: Config, cells: list[Cell], grid: list[str], status: dict[str, Any]) -> dict[str, Any]:
    return {
        "written_at": datetime.now(timezone.utc).isoformat(),
        "output_uri": base.output.uri,
        "grid": grid,
        "cells": [
            {"name": c.name, "output_uri": c.config.output.uri, "values": c.values, "overrides": c.overrides,
             "modes": list(c.config.decoding.modes), "config_hash": c.config.config_hash(), **status.get(c.name, {})}
            for c in cells
        ],
    }


def write_sweep_record(base: Config, cells: list[Cell], grid: list[str], status: dict[str, Any]) -> str:
    from vreason_batch.io import storage

    dest = storage.join(base.output.uri, SWEEP_RECORD)
    body = json.dumps(sweep_record(base, cells, grid, status), indent=2, default=str).encode()
    storage.retry(lambda: storage.write_bytes(dest, body), what=dest)
    return dest


def run_sweep(base: Config, cells: list[Cell], grid: list[str], overwrite: bool = False,
              only: list[str] | None = None) -> dict[str, Any]:
    """Run the cells one after another through the pipeline (each resumable on its own).

    `only` limits this call to the named cells (a sweep split over several sessions); the record
    lists every cell. Returns {cell name: counts of this call}.
    """
    from vreason_batch.job.pipeline import plan_run, run_job

    status: dict[str, Any] = {}
    todo = [c for c in cells if only is None or c.name in only]
    for c in todo:  # plan every cell first: a manifest or output problem fails before any run
        c.plan = plan_run(c.config, overwrite=overwrite)
    write_sweep_record(base, cells, grid, status)
    for k, c in enumerate(todo, 1):
        print(f"[vreason-batch] sweep cell {k}/{len(todo)}: {c.name} -> {c.config.output.uri}", flush=True)
        res = run_job(c.config, plan=c.plan)
        status[c.name] = {"last_run_id": res.run_id, "rows_written": res.rows_written, "rows_failed": res.rows_failed,
                          "skipped_done": res.skipped_done, "wall_s": round(res.wall_s, 2)}
        write_sweep_record(base, cells, grid, status)
    return status


def comparison_runs(cells: list[Cell]) -> list[tuple[str, str]]:
    """(label, output URI) of every cell, for the comparison report."""
    return [(c.name, c.config.output.uri) for c in cells]
