"""The CLI's edge: validate / run --dry-run print the plan; bad configs and manifests exit 2 with a
message naming the problem, before any Ray work. No Ray is started here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vreason_batch import cli
from vreason_batch.cli import EXIT_USAGE, main
from vreason_batch.config import config_from_dict
from vreason_batch.job.results import write_shard
from vreason_batch.io.schema import SCHEMA_VERSION, empty_row, rows_to_table


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the test; Ray is not running before or after."""
    import ray

    assert not ray.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI started Ray work where it should not have")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("vreason_batch.job.pipeline.init_ray", refuse)
    yield
    assert not ray.is_initialized()


@pytest.fixture
def job(tmp_path) -> dict:
    """A valid job: a 3-row JSONL manifest (videos need not exist to plan) and an output dir."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(
        json.dumps({"id": f"c{i}", "video": f"videos/v{i}.mp4", "question": f"What happens in clip {i}?"}) + "\n" for i in range(3)
    ))
    return {
        "input": {"manifest": str(manifest)},
        "output": {"uri": str(tmp_path / "out"), "rows_per_file": 4},
        "decoding": {"modes": ["greedy", "vreason"], "max_new_tokens": 6},
        "video": {"num_frames": 4, "min_pixels": 3136, "max_pixels": 12544},
    }


def write_config(tmp_path: Path, data: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def printed_plan(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_plan_is_printed(command, job, tmp_path, capsys):
    path = write_config(tmp_path, job)
    assert main([command[0], path, *command[1:]]) == 0
    plan = printed_plan(capsys)
    assert (plan["samples"], plan["pairs_total"], plan["pairs_done"], plan["pairs_pending"]) == (3, 6, 0, 6)
    assert plan["config_hash"] == config_from_dict(job).config_hash()
    assert "3 samples from 3 rows" in plan["manifest"]
    assert not (tmp_path / "out").exists(), "planning wrote to the output"


def test_set_overrides_reach_the_plan(job, tmp_path, capsys):
    path = write_config(tmp_path, job)
    assert main(["validate", path, "--set", "decoding.modes=[greedy]", "--set", "input.limit=2"]) == 0
    plan = printed_plan(capsys)
    assert (plan["samples"], plan["pairs_total"]) == (2, 2)
    assert plan["config_hash"] == config_from_dict(job, ["decoding.modes=[greedy]"]).config_hash()
    assert plan["config_hash"] != config_from_dict(job).config_hash()


def test_dry_run_overwrite_deletes_nothing(job, tmp_path, capsys):
    cfg = config_from_dict(job)
    row = empty_row()
    row.update(schema_version=SCHEMA_VERSION, run_id="r0", config_hash=cfg.config_hash(), model="m",
               sample_id="c0", mode="greedy")
    part = write_shard(cfg.output.uri, rows_to_table([row]), "zstd")
    assert main(["run", write_config(tmp_path, job), "--dry-run", "--overwrite"]) == 0
    plan = printed_plan(capsys)
    # the preview shows what an overwriting run would do (start afresh) ...
    assert (plan["pairs_done"], plan["pairs_pending"]) == (0, 6)
    # ... and deletes nothing
    assert Path(part).exists()


def test_dry_run_retry_errors_counts_the_error_rows_it_would_redo(job, tmp_path, capsys):
    cfg = config_from_dict(job)
    rows = []
    for sid, mode, err in (("c0", "greedy", None), ("c0", "vreason", "out_of_memory"), ("c1", "greedy", "video_unreadable")):
        row = empty_row()
        row.update(schema_version=SCHEMA_VERSION, run_id="r0", config_hash=cfg.config_hash(), model="m",
                   sample_id=sid, mode=mode, error_type=err, error=err)
        rows.append(row)
    write_shard(cfg.output.uri, rows_to_table(rows), "zstd")
    path = write_config(tmp_path, job)
    assert main(["run", path, "--dry-run"]) == 0
    assert (printed_plan(capsys)["pairs_pending"]) == 3  # error rows count as done
    assert main(["run", path, "--dry-run", "--retry-errors"]) == 0  # the transient types: out_of_memory
    plan = printed_plan(capsys)
    assert (plan["pairs_pending"], plan["pairs_retried"]) == (4, 1)
    assert main(["run", path, "--dry-run", "--retry-errors", "video_unreadable,out_of_memory"]) == 0
    assert printed_plan(capsys)["pairs_retried"] == 2
    assert main(["run", path, "--retry-errors", "video_missing"]) == EXIT_USAGE
    assert "unknown error type" in capsys.readouterr().err
    assert main(["run", path, "--retry-errors", "--overwrite"]) == EXIT_USAGE


@pytest.mark.parametrize(
    "edit, overrides, names",
    [
        (lambda d: d["decoding"].update(bogus=1), [], "decoding.bogus"),  # unknown key
        (lambda d: d.update(extra_section={}), [], "extra_section"),
        (lambda d: None, ["controller.lr=-1"], "controller.lr"),  # bad value
        (lambda d: None, ["decoding.modes=[beam]"], "decoding.modes"),
        (lambda d: None, ["video.min_pixels=100000", "video.max_pixels=3136"], "video.min_pixels"),
        (lambda d: d.pop("output"), [], "output"),  # missing section
        (lambda d: None, ["runtime.batch_size=0"], "runtime.batch_size"),
    ],
    ids=["unknown-key", "unknown-section", "negative-lr", "unknown-mode", "min-over-max", "no-output", "zero-batch"],
)
def test_invalid_config_exits_2_naming_the_key(edit, overrides, names, job, tmp_path, capsys):
    edit(job)
    path = write_config(tmp_path, job)
    args = ["run", path, *(a for o in overrides for a in ("--set", o))]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid config" in err and names in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "{tmp}/no-such.yaml"], "config file not found: {tmp}/no-such.yaml"),
        (["run", "{cfg}", "--set", "controller.lr"], "not of the form dotted.key=value"),
        (["run", "{cfg}", "--set", "decoding.modes.first=greedy"], "'modes' is not a section"),
    ],
    ids=["missing-config", "override-without-value", "override-into-a-value"],
)
def test_unusable_config_file_or_override_exits_2(args, message, job, tmp_path, capsys):
    cfg = write_config(tmp_path, job)
    args = [a.format(tmp=tmp_path, cfg=cfg) for a in args]
    assert main(args) == EXIT_USAGE
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_config_that_is_not_yaml_exits_2(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("input: [unclosed\n")
    assert main(["validate", str(path)]) == EXIT_USAGE
    assert f"config {path} is not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "manifest not found: {m}"),
        ('{"video": "b.mp4", "question": \n', "has no rows: line 1 is not valid JSON"),
        ("", "has no rows"),
        ('{"clip": "a.mp4", "question": "q"}\n', "has no video column 'video' (set input.columns.video; for text questions to a text model set input.text_only: true)"),
        (b"\xff\xfe\x00garbage", "is not UTF-8 text"),
        ('{"id": 1, "video": "a.mp4", "question": "q"}\n{"id": 1, "video": "b.mp4", "question": "q"}\n',
         "id '1' is used by row 1 and by row 2"),
    ],
    ids=["missing", "broken-json", "empty", "no-video-column", "binary", "one-id-two-samples"],
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_unreadable_manifest_exits_2_before_ray(command, content, message, job, tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    if content is None:
        manifest.unlink()
    elif isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        manifest.write_text(content)
    assert main([command, write_config(tmp_path, job)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("vreason-batch: manifest error:") and message.format(m=manifest) in err, err
    assert not (tmp_path / "out").exists()  # nothing written, not even the output's lease


def test_job_entrypoint_is_the_run_command(job, tmp_path, capsys, monkeypatch):
    """jobs/vreason_job.py (what `ray job submit` runs) is `vreason-batch run` with the same arguments."""
    import runpy
    import sys

    path = write_config(tmp_path, job)
    monkeypatch.setattr(sys, "argv", ["vreason_job.py", path, "--dry-run", "--set", "decoding.modes=[vreason]"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(cli.__file__).parents[1] / "jobs" / "vreason_job.py"), run_name="__main__")
    assert done.value.code == 0
    assert printed_plan(capsys)["pairs_total"] == 3


@pytest.mark.parametrize("model, exit_code", [("/models/qwen2.5-coder.Q4_K_M.gguf", 0), ("builtin:smollm2-135m-instruct", 0),
                                              ("builtin:tiny-qwen2.5-vl", EXIT_USAGE)])
def test_text_questions_for_a_text_model_need_no_setting(tmp_path, capsys, model, exit_code):
    manifest = tmp_path / "questions.jsonl"
    manifest.write_text('{"id": "q1", "question": "What is 2 + 3?", "answer": "5", "problem_type": "numerical"}\n')
    data = {"input": {"manifest": str(manifest)}, "output": {"uri": str(tmp_path / "out")}, "model": {"name_or_path": model}}
    assert main(["validate", write_config(tmp_path, data)]) == exit_code
    if exit_code == 0:
        assert printed_plan(capsys)["pairs_pending"] == 2
    else:  # a video model: the error says what to set
        assert "input.text_only: true" in capsys.readouterr().err
