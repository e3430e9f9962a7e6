"""Parameter sweeps: one config, a grid of dotted-key values, one normal run per grid cell.

    vreason-batch sweep CONFIG --grid controller.lr=0,1e-3,1e-2 --grid controller.update_every=1,2,4

Every cell is the config with its grid values applied as `--set` overrides and its own output
prefix under `output.uri`, one directory per grid axis (`<output.uri>/lr=1e-3/update_every=2`), so a
Hive reader over the sweep's prefix sees one column per axis; run by the pipeline's `run_job` like any
job: resumable (a re-run skips what each prefix holds), exactly once, with its run record. The
sweep writes `<output.uri>/_sweep.json` (what ran where) and, with `--report DIR`, one comparison
report over all cells (`vreason_batch.evaluation.report.compare`).

The greedy baseline runs once, not once per cell, when the config's modes include greedy and no
grid key can change a greedy row (keys under `controller.` and `lite.` only). It is written under
`<output.uri>/greedy` by a config whose controller and lite sections are reset to their defaults:
greedy reads neither, and this keeps its config hash, and so its prefix, valid whatever the
sweep's controller settings are (the hash guards a prefix against mixed configs).

Sweeps written before cells were nested used one flat name (`lr=1e-3_update_every=2`); a cell whose
flat prefix already holds output keeps it (`keep_legacy_prefixes`), and `cells_from_record` reads
whatever names `_sweep.json` lists, so `report` finds and labels old and new cells alike.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from vreason_batch.config import Config, ConfigError, config_from_dict
from vreason_batch.io.partitions import escape_value

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
    legacy_name: str = ""  # the flat name sweeps before nested cells gave it (`lr=1e-3_update_every=2`)


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
    # the flat names' alphabet (sweeps before nested cells); new names escape values as Hive does
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value)


def cell_name(labels: dict[str, str], values: dict[str, str]) -> str:
    """`lr=1e-3/update_every=2`: one Hive-style `key=value` directory per grid axis, in grid order."""
    return "/".join(f"{labels[k]}={escape_value(v)}" for k, v in values.items())


def legacy_cell_name(labels: dict[str, str], values: dict[str, str]) -> str:
    """`lr=1e-3_update_every=2`: the one flat directory a cell got before names were nested."""
    return "_".join(f"{labels[k]}={_safe(v)}" for k, v in values.items())


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
        name = cell_name(labels, values)
        sets = [*overrides, *(f"{k}={v}" for k, v in values.items()), f"output.uri={root}/{name}",
                f"decoding.modes=[{', '.join(cell_modes)}]"]
        try:
            cfg = config_from_dict(data, sets)
        except ConfigError as e:
            raise ConfigError(f"sweep cell {name}: {e}") from None
        cells.append(Cell(name, sets, cfg, values, legacy_name=legacy_cell_name(labels, values)))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError(f"two sweep cells got the same prefix: {names}")
    return base, cells


def keep_legacy_prefixes(base: Config, cells: list[Cell]) -> list[str]:
    """Resume an old sweep where it is: a cell whose flat prefix (`lr=0_update_every=2`) holds output
    and whose nested one does not keeps the flat prefix. Returns the names of the cells kept so."""
    from vreason_batch.io import storage

    root, kept = base.output.uri.rstrip("/"), []
    for c in cells:
        if not c.legacy_name or c.legacy_name == c.name:
            continue
        if storage.exists(f"{root}/{c.legacy_name}") and not storage.exists(f"{root}/{c.name}"):
            c.name = c.legacy_name
            c.overrides = [*c.overrides[:-2], f"output.uri={root}/{c.name}", c.overrides[-1]]
            c.config.output.uri = f"{root}/{c.name}"
            kept.append(c.name)
    return kept


def cells_from_record(uri: str) -> list[tuple[str, str]] | None:
    """(cell name, output URI under `uri`) of every cell `uri/_sweep.json` lists whose prefix holds
    output (`--only` may have left some unrun), nested or flat names alike; None when `uri` is not a
    sweep's prefix. URIs are joined to `uri`, so a sweep copied elsewhere reads too."""
    from vreason_batch.io import storage

    try:
        record = json.loads(storage.read_bytes(storage.join(uri, SWEEP_RECORD)))
    except storage.NotFound:
        return None
    root = uri.rstrip("/")
    cells = [(c["name"], f"{root}/{c['name']}") for c in record.get("cells", [])]
    return [(name, cell_uri) for name, cell_uri in cells if storage.exists(cell_uri)]


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
