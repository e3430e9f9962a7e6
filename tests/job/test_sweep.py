"""The sweep's plan: grid parsing, one cell per combination, greedy split off only when no grid key
can change a greedy row, and a greedy config hash that ignores the sweep's controller values."""

from __future__ import annotations

import pytest

from vreason_batch.config import ConfigError
from vreason_batch.job.sweep import parse_grid, plan_sweep

BASE = {"input": {"manifest": "m.jsonl"}, "output": {"uri": "s3://b/sweep/"},
        "decoding": {"modes": ["greedy", "vreason"], "max_new_tokens": 8}}


def test_cells_are_the_product_greedy_once():
    base, cells = plan_sweep(BASE, [], ["controller.lr=0,1e-3", "controller.update_every=1,2,4"])
    assert [c.name for c in cells] == ["greedy"] + [f"lr={lr}/update_every={k}" for lr in ("0", "1e-3") for k in (1, 2, 4)]
    greedy, first = cells[0], cells[1]
    assert greedy.config.decoding.modes == ["greedy"] and greedy.config.output.uri == "s3://b/sweep/greedy"
    assert first.config.decoding.modes == ["vreason"] and first.config.output.uri == "s3://b/sweep/lr=0/update_every=1"
    assert first.legacy_name == "lr=0_update_every=1"
    assert (first.config.controller.lr, first.config.controller.update_every) == (0.0, 1)
    assert cells[-1].values == {"controller.lr": "1e-3", "controller.update_every": "4"}
    assert base.output.uri == "s3://b/sweep/"


def test_greedy_prefix_survives_other_controller_settings():
    # the controller is part of config_hash; greedy's cell resets it, so its prefix stays valid
    _, a = plan_sweep(BASE, [], ["controller.lr=0,1e-2"])
    _, b = plan_sweep(BASE, ["controller.rule=always_min", "controller.update_every=4"], ["controller.lr=5e-2"])
    assert a[0].config.config_hash() == b[0].config.config_hash()
    assert a[1].config.config_hash() != b[1].config.config_hash()


@pytest.mark.parametrize("grid", [["decoding.max_new_tokens=8,16"], ["video.num_frames=4,8", "controller.lr=0,1e-3"]])
def test_greedy_runs_in_every_cell_when_a_key_can_change_it(grid):
    _, cells = plan_sweep(BASE, [], grid)
    assert "greedy" not in [c.name for c in cells]
    assert all(c.config.decoding.modes == ["greedy", "vreason"] for c in cells)


def test_labels_use_full_keys_when_last_parts_collide():
    from vreason_batch.job.sweep import _label_keys

    _, cells = plan_sweep(BASE, [], ["controller.lr=0,1", "model.seed=1"])
    assert cells[0].name == "lr=0/seed=1"
    assert _label_keys(["input.columns.dataset", "input.annotate.dataset", "controller.lr"]) == {
        "input.columns.dataset": "input.columns.dataset", "input.annotate.dataset": "input.annotate.dataset",
        "controller.lr": "lr"}


@pytest.mark.parametrize(
    "grid, needle",
    [([], "at least one --grid"), (["controller.lr"], "dotted.key=v1"), (["controller.lr=0,,1"], "empty"),
     (["output.uri=a,b"], "sets output.uri"), (["decoding.modes=greedy"], "sets output.uri and the modes"),
     (["controller.lr=0", "controller.lr=1"], "given twice"), (["controller.lr=0,0"], "repeats"),
     (["controller.update_every=0,2"], r"sweep cell update_every=0: invalid config")],
)
def test_bad_grids_name_the_problem(grid, needle):
    with pytest.raises(ConfigError, match=needle):
        if grid and "update_every=0" in grid[0]:
            plan_sweep(BASE, [], grid)
        else:
            parse_grid(grid)


def test_cell_values_are_escaped_as_hive_partition_values():
    # one path segment per axis: a value's '/' or '=' must not make another directory or key
    _, cells = plan_sweep(BASE, [], ["model.name_or_path=a/b=c,builtin:tiny-qwen2.5-vl"])
    assert [c.name for c in cells] == ["name_or_path=a%2Fb%3Dc", "name_or_path=builtin%3Atiny-qwen2.5-vl"]
    assert [c.legacy_name for c in cells] == ["name_or_path=a_b_c", "name_or_path=builtin_tiny-qwen2.5-vl"]


def test_an_old_sweep_resumes_at_its_flat_prefixes(tmp_path):
    from vreason_batch.job.sweep import keep_legacy_prefixes

    base_cfg = {**BASE, "output": {"uri": str(tmp_path)}}
    (tmp_path / "lr=0_update_every=1" / "_runs").mkdir(parents=True)  # written by an old sweep
    (tmp_path / "lr=0_update_every=1" / "_runs" / "r.json").write_text("{}")
    base, cells = plan_sweep(base_cfg, [], ["controller.lr=0,1e-3", "controller.update_every=1"])
    assert keep_legacy_prefixes(base, cells) == ["lr=0_update_every=1"]
    old, new = cells[1], cells[2]
    assert old.name == "lr=0_update_every=1" and old.config.output.uri == f"{tmp_path}/lr=0_update_every=1"
    assert f"output.uri={tmp_path}/lr=0_update_every=1" in old.overrides and old.overrides[-1] == "decoding.modes=[vreason]"
    assert new.name == "lr=1e-3/update_every=1" and new.config.output.uri == f"{tmp_path}/lr=1e-3/update_every=1"
