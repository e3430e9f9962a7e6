"""Planning, on the driver before any cluster work: read the manifest, look at what the output
already holds, and list the (sample, mode) pairs left to do."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from .config import Config, ConfigError
from .results import RUNS_DIR, list_result_files
from .schema import Sample


class OutputConflict(ConfigError):
    """The output location holds results of a different config."""


@dataclass
class RunPlan:
    run_id: str
    config_hash: str
    pending: list[tuple[Sample, list[str]]]  # sample -> modes still to do
    num_samples: int
    num_pairs_total: int
    num_pairs_done: int
    manifest_summary: str
    duplicates_in_output: int = 0

    @property
    def num_pairs_pending(self) -> int:
        return sum(len(m) for _, m in self.pending)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def read_done_keys(uri: str) -> tuple[dict[tuple[str, str], str], int]:
    """{(sample_id, mode): config_hash} already written, and how many keys appear more than once."""
    import pyarrow.parquet as pq

    from . import storage

    done: dict[tuple[str, str], str] = {}
    dupes = 0
    for f in list_result_files(uri):
        fs, path = storage.pyarrow_fs(f)
        t = storage.retry(lambda: pq.read_table(path, filesystem=fs, columns=["sample_id", "mode", "config_hash"]), what=f)
        for sid, mode, h in zip(*(t.column(c).to_pylist() for c in ("sample_id", "mode", "config_hash"))):
            if (sid, mode) in done:
                dupes += 1
            done[(sid, mode)] = h
    return done, dupes


def clear_output(uri: str) -> int:
    """--overwrite: delete this job's result objects and run records (nothing else under uri)."""
    from . import storage

    removed = 0
    for f in list_result_files(uri):
        storage.delete_prefix(f)
        removed += 1
    runs = storage.join(uri, RUNS_DIR)
    if storage.exists(runs):
        removed += storage.delete_prefix(runs)
    return removed


def plan_run(cfg: Config, overwrite: bool = False, dry_run: bool = False) -> RunPlan:
    """Read the manifest, look at what is already written, and list what is left to do.

    With `overwrite`, the job's results are deleted first; with `dry_run` too, nothing is deleted
    and the plan shows what an overwriting run would do.
    """
    from .manifest import read_samples

    manifest = read_samples(cfg.input)
    chash = cfg.config_hash()
    if overwrite and not dry_run:
        clear_output(cfg.output.uri)
    done, dupes = ({}, 0) if overwrite else read_done_keys(cfg.output.uri)
    others = {h for h in done.values() if h != chash}
    if others:
        raise OutputConflict(
            f"{cfg.output.uri} already holds results of another config (hash {sorted(others)[0]}; this one is "
            f"{chash}). Use --overwrite to replace them, or another output.uri."
        )
    pending = []
    n_done = 0
    for s in manifest.samples:
        todo = [m for m in cfg.decoding.modes if (s.sample_id, m) not in done]
        n_done += len(cfg.decoding.modes) - len(todo)
        if todo:
            pending.append((s, todo))
    return RunPlan(
        run_id=new_run_id(),
        config_hash=chash,
        pending=pending,
        num_samples=len(manifest.samples),
        num_pairs_total=len(manifest.samples) * len(cfg.decoding.modes),
        num_pairs_done=n_done,
        manifest_summary=manifest.summary(),
        duplicates_in_output=dupes,
    )
