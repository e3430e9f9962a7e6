"""report: summaries computed by hand on synthetic runs, plots written, partial / failed / empty runs, S3."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from vreason_batch.evaluation import report

from vreason_batch.io import storage
from vreason_batch.io.schema import SCHEMA_VERSION, empty_row, rows_to_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

# Per mode: where the EMA peaks (fraction of the output), its height, the final EMA value, the
# seconds per output token, and for how many steps the controller explores before the alpha
# settles on +1 (None: no controller).
SHAPES = {
    "greedy": dict(peak_pos=0.3, height=2.0, final=1.2, s_per_token=0.01, explore_steps=None),
    "vreason": dict(peak_pos=0.6, height=1.6, final=0.4, s_per_token=0.02, explore_steps=16),
    "vreason_lite": dict(peak_pos=0.6, height=1.7, final=0.5, s_per_token=0.015, explore_steps=8),
}

# (dataset, sample, mode) -> (output tokens, correct, score). Lengths are chosen so that the
# peak step peak_pos * (n - 1) is a whole number. Datasets without ground truth have correct=None.
OK_ROWS = {
    ("mvbench", "s0"): {"greedy": (101, True, 1.0), "vreason": (61, True, 1.0), "vreason_lite": (51, True, 1.0)},
    ("mvbench", "s1"): {"greedy": (121, False, 0.0), "vreason": (71, True, 1.0), "vreason_lite": (61, True, 1.0)},
    ("mvbench", "s2"): {"greedy": (81, False, 0.0), "vreason": (41, False, 0.0), "vreason_lite": (41, False, 0.0)},
    ("mvbench", "s3"): {"greedy": (101, True, 1.0), "vreason": (51, True, 1.0)},
    ("videomme", "v0"): {"greedy": (101, False, 0.0), "vreason": (51, True, 1.0), "vreason_lite": (41, True, 1.0)},
    ("videomme", "v1"): {"greedy": (81, True, 1.0), "vreason": (41, True, 1.0), "vreason_lite": (41, False, 0.0)},
    ("open", "o0"): {"greedy": (101, None, 0.5), "vreason": (61, None, 0.6), "vreason_lite": (51, None, 0.4)},
    ("open", "o1"): {"greedy": (121, None, 0.7), "vreason": (51, None, 0.8), "vreason_lite": (51, None, 0.6)},
}
# A video no mode can read, and one out-of-memory decode.
FAILED_ROWS = [
    ("mvbench", "s4", "greedy", "video_unreadable"),
    ("mvbench", "s4", "vreason", "video_unreadable"),
    ("mvbench", "s4", "vreason_lite", "video_unreadable"),
    ("mvbench", "s3", "vreason_lite", "decode_error"),
]


def _base_row(dataset: str, sample_id: str, mode: str) -> dict:
    row = empty_row()
    row.update(
        schema_version=SCHEMA_VERSION,
        run_id="run-a",
        config_hash="cfg123",
        model=MODEL,
        sample_id=sample_id,
        mode=mode,
        dataset=dataset,
        video=f"s3://videos/{sample_id}.mp4",
        question="What happens first?",
        problem_type="free_form" if dataset == "open" else "multiple_choice",
        created_at=dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
    )
    return row


def traces(n: int, peak_pos: float, height: float, final: float, explore_steps: int | None):
    """EMA rising linearly from 1.0 to `height` at the peak step, then falling to `final`; raw
    entropy wobbling around it; alpha on every second step, switching sign every two updates
    for `explore_steps` steps, then +1."""
    peak = round(peak_pos * (n - 1))
    t = np.arange(n)
    ema = np.where(
        t <= peak,
        1.0 + (height - 1.0) * t / max(peak, 1),
        height + (final - height) * (t - peak) / max(n - 1 - peak, 1),
    )
    entropy = np.clip(ema + 0.4 * np.sin(0.9 * t), 0.0, None)
    alpha = np.zeros(n, dtype=int)
    if explore_steps is not None:
        for step in range(0, n, 2):
            alpha[step] = -1 if step < explore_steps and (step // 4) % 2 == 0 else 1
    return entropy.tolist(), ema.tolist(), alpha.tolist(), peak


def ok_row(dataset: str, sample_id: str, mode: str, n: int, correct, score, **shape_overrides) -> dict:
    shape = {**SHAPES[mode], **shape_overrides}
    entropy, ema, alpha, peak = traces(
        n, shape["peak_pos"], shape["height"], shape["final"], shape["explore_steps"]
    )
    row = _base_row(dataset, sample_id, mode)
    row.update(
        answer_gt=None if correct is None else "B",
        output_text="<think>...</think><answer>B</answer>",
        answer="B",
        correct=correct,
        score=score,
        finish_reason="stop_string",
        entropy=entropy,
        entropy_post=entropy,
        entropy_ema=ema,
        alpha=alpha,
        num_output_tokens=n,
        num_think_tokens=n - 10,
        controller_updates=sum(1 for a in alpha if a != 0),
        ema_peak_step=peak,
        latency_s=n * shape["s_per_token"],
    )
    return row


def failed_row(dataset: str, sample_id: str, mode: str, error_type: str) -> dict:
    row = _base_row(dataset, sample_id, mode)
    row.update(error_type=error_type, error=f"{error_type}: synthetic failure")
    return row


def run_rows() -> dict[str, list[dict]]:
    """The synthetic run as two shards: mvbench, and the other datasets."""
    shards: dict[str, list[dict]] = {"part-00000.parquet": [], "part-00001.parquet": []}
    for (dataset, sample_id), modes in OK_ROWS.items():
        shard = "part-00000.parquet" if dataset == "mvbench" else "part-00001.parquet"
        for mode, (n, correct, score) in modes.items():
            shards[shard].append(ok_row(dataset, sample_id, mode, n, correct, score))
    for dataset, sample_id, mode, error_type in FAILED_ROWS:
        shards["part-00000.parquet"].append(failed_row(dataset, sample_id, mode, error_type))
    return shards


def write_run(root, shards: dict[str, list[dict]]) -> None:
    """Parquet shards plus the kind of files a run leaves beside them, which must be skipped."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in shards.items():
        pq.write_table(rows_to_table(rows), root / name)
    (root / "_run.json").write_text(json.dumps({"run_id": "run-a"}))
    # A shard being written (not Parquet yet) and a staging folder holding a copy of a shard.
    (root / ".part-00002.parquet.tmp.parquet").write_bytes(b"half a file")
    (root / "_staging").mkdir()
    first_name, first_rows = next(iter(shards.items()))
    pq.write_table(rows_to_table(first_rows), root / "_staging" / first_name)


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "output"
    write_run(root, run_rows())
    return root


def assert_png(path) -> None:
    data = path.read_bytes() if hasattr(path, "read_bytes") else storage.read_bytes(path)
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_results_reads_shards_and_skips_run_records_and_temp_files(run_dir):
    table = report.load_results(str(run_dir))
    assert table.num_rows == 27  # 9 samples x 3 modes; none from _staging/ or the temp file
    assert sorted(set(table.column("dataset").to_pylist())) == ["mvbench", "open", "videomme"]
    cols = report.load_results(str(run_dir), columns=["sample_id", "mode"])
    assert cols.column_names == ["sample_id", "mode"] and cols.num_rows == 27


@pytest.mark.parametrize("setup", ["empty", "only_records", "missing"])
def test_no_result_files_is_a_clear_error(tmp_path, setup):
    root = tmp_path / "output"
    if setup != "missing":
        root.mkdir()
    if setup == "only_records":
        (root / "_run.json").write_text("{}")
        (root / ".part-0.parquet").write_bytes(b"partial")
    with pytest.raises(report.NoResults, match="no Parquet result files under .*output"):
        report.load_results(str(root))
    with pytest.raises(report.NoResults):
        report.write_report(str(root), str(tmp_path / "report"))


# ---------------------------------------------------------------------------------------------
# Summary numbers, computed by hand from OK_ROWS / FAILED_ROWS


def test_summary_numbers(run_dir):
    s = report.summarize(report.load_results(str(run_dir)))
    json.dumps(s, allow_nan=False)  # JSON-serialisable, no NaN

    assert s["run_ids"] == ["run-a"] and s["models"] == [MODEL]
    t = s["totals"]
    assert (t["n_rows"], t["n_ok"], t["n_failed"], t["n_samples"]) == (27, 23, 4, 9)
    assert t["failed_by_error_type"] == {"decode_error": 1, "video_unreadable": 3}
    assert t["modes"] == ["greedy", "vreason", "vreason_lite"]
    assert t["datasets"] == ["mvbench", "open", "videomme"] and t["n_duplicate_rows"] == 0

    mv = s["datasets"]["mvbench"]
    g, v, lite = mv["greedy"], mv["vreason"], mv["vreason_lite"]
    assert (g["n_rows"], g["n_failed"], g["failed_by_error_type"]) == (5, 1, {"video_unreadable": 1})
    assert lite["n_failed"] == 2 and lite["failed_by_error_type"] == {"decode_error": 1, "video_unreadable": 1}
    assert g["accuracy"] == pytest.approx(0.5)  # T F F T
    assert v["accuracy"] == pytest.approx(0.75)  # T T F T
    assert lite["accuracy"] == pytest.approx(2 / 3)  # T T F (s3 failed)
    # greedy tokens 101 121 81 101: mean = median = 101; p90 = 101 + 0.7 * (121 - 101)
    assert g["output_tokens"] == pytest.approx({"mean": 101.0, "p50": 101.0, "p90": 115.0})
    assert g["latency_s"]["p50"] == pytest.approx(1.01)
    assert g["think_tokens_mean"] == pytest.approx(91.0)
    assert g["throughput_tok_per_s"] == pytest.approx(100.0)
    assert v["throughput_tok_per_s"] == pytest.approx(50.0)
    assert g["vs_greedy"] is None

    # vreason vs greedy on s0..s3: 61+71+41+51 = 224 vs 404 tokens.
    assert v["vs_greedy"]["n_paired"] == 4
    assert v["vs_greedy"]["token_reduction_pct"] == pytest.approx(100 * (1 - 224 / 404))
    assert v["vs_greedy"]["accuracy_delta_pts"] == pytest.approx(25.0)
    # Lite failed on s3: paired on s0..s2 only, 51+61+41 = 153 vs 101+121+81 = 303.
    assert lite["vs_greedy"]["n_paired"] == 3
    assert lite["vs_greedy"]["token_reduction_pct"] == pytest.approx(100 * (1 - 153 / 303))
    assert lite["vs_greedy"]["accuracy_delta_pts"] == pytest.approx(100 * (2 / 3 - 1 / 3))

    # Entropy dynamics: the shapes in SHAPES.
    assert g["ema_peak"]["position_mean"] == pytest.approx(0.3)
    assert v["ema_peak"]["position_mean"] == pytest.approx(0.6)
    assert g["ema_peak"]["height_mean"] == pytest.approx(2.0)
    assert v["ema_peak"]["height_mean"] == pytest.approx(1.6, rel=1e-6)
    assert v["ema_peak"]["passed_frac"] == pytest.approx(1.0) and v["ema_peak"]["n_passed"] == 4
    assert g["final_ema_entropy_mean"] == pytest.approx(1.2, rel=1e-6)
    assert v["final_ema_entropy_mean"] == pytest.approx(0.4, rel=1e-6)
    # alpha -1 -1 +1 +1 -1 -1 +1 +1 then +1: 3 switches; lite explores 8 steps: -1 -1 +1 ...: 1.
    assert (g["alpha_switches_mean"], v["alpha_switches_mean"], lite["alpha_switches_mean"]) == (0, 3, 1)
    # One update every second step: ceil(n / 2) for n = 61 71 41 51.
    assert v["controller_updates_mean"] == pytest.approx((31 + 36 + 21 + 26) / 4)
    assert g["controller_updates_mean"] == 0

    # No ground truth: accuracy unknown (None, not 0), scores still averaged.
    op = s["datasets"]["open"]
    assert op["greedy"]["accuracy"] is None and op["greedy"]["n_scored"] == 0
    assert op["greedy"]["score_mean"] == pytest.approx(0.6)
    assert op["vreason"]["vs_greedy"]["accuracy_delta_pts"] is None
    assert op["vreason"]["vs_greedy"]["token_reduction_pct"] == pytest.approx(100 * (1 - 112 / 222))

    # Overall: accuracy over the 6 scored greedy samples (T F F T F T), tokens over all 8 pairs.
    ov = s["overall"]
    assert ov["greedy"]["n_rows"] == 9 and ov["greedy"]["n_scored"] == 6
    assert ov["greedy"]["accuracy"] == pytest.approx(3 / 6)
    assert ov["vreason"]["accuracy"] == pytest.approx(5 / 6)
    assert ov["vreason"]["vs_greedy"]["n_paired"] == 8
    assert ov["vreason"]["vs_greedy"]["token_reduction_pct"] == pytest.approx(100 * (1 - 428 / 808))


def test_ema_curves_peak_where_the_samples_peak(run_dir):
    curves = report.ema_curves(report.load_results(str(run_dir)), bins=51)
    assert len(curves["t"]) == 51 and curves["t"][0] == 0 and curves["t"][-1] == 1
    assert list(curves["modes"]) == ["greedy", "vreason", "vreason_lite"]
    g, v = curves["modes"]["greedy"], curves["modes"]["vreason"]
    assert g["n_samples"] == 8 and len(g["mean"]) == 51
    assert g["peak_t"] == pytest.approx(0.3) and g["peak_value"] == pytest.approx(2.0, rel=1e-6)
    assert v["peak_t"] == pytest.approx(0.6) and v["peak_value"] == pytest.approx(1.6, rel=1e-6)
    assert g["mean"][0] == pytest.approx(1.0) and g["mean"][-1] == pytest.approx(1.2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Written reports


def check_report_files(out) -> dict:
    for name in ("summary.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    for name in report.PLOT_FILES:
        assert_png(out / name)
    return json.loads((out / "summary.json").read_text())


def test_write_report(run_dir, tmp_path):
    out = tmp_path / "report"
    summary = report.write_report(str(run_dir), str(out))
    assert check_report_files(out) == summary
    assert summary["source"] == str(run_dir)
    assert summary["ema_curves"]["modes"]["vreason"]["peak_t"] == pytest.approx(0.6, abs=0.02)

    md = (out / "report.md").read_text()
    assert "| mvbench | vreason |" in md and "-44.6% (n=4)" in md  # tokens vs greedy
    assert "| mvbench | vreason_lite | decode_error | 1 |" in md  # the failures table
    html_text = (out / "report.html").read_text()
    for name in report.PLOT_FILES:
        assert f"src='{name}'" in html_text and f"]({name})" in md
    assert "<td>videomme</td>" in html_text


def test_partial_run_reports_the_shards_written_so_far(run_dir, tmp_path):
    (run_dir / "part-00001.parquet").unlink()
    out = tmp_path / "report"
    summary = report.write_report(str(run_dir), str(out))
    check_report_files(out)
    assert summary["totals"]["datasets"] == ["mvbench"] and summary["totals"]["n_rows"] == 15
    # A single file is a valid source too.
    assert report.load_results(str(run_dir / "part-00000.parquet")).num_rows == 15


def test_all_failed_run_still_reports(tmp_path):
    rows = [failed_row("mvbench", f"s{i}", mode, "video_not_found") for i in range(3) for mode in SHAPES]
    write_run(tmp_path / "output", {"part-00000.parquet": rows})
    out = tmp_path / "report"
    summary = report.write_report(str(tmp_path / "output"), str(out))
    check_report_files(out)
    assert summary["totals"]["n_failed"] == 9 and summary["totals"]["n_ok"] == 0
    v = summary["overall"]["vreason"]
    assert v["accuracy"] is None and v["output_tokens"]["mean"] is None and v["vs_greedy"] is None
    assert v["failed_by_error_type"] == {"video_not_found": 3}
    assert summary["ema_curves"]["modes"] == {}


def test_one_mode_empty_traces_and_no_ground_truth(tmp_path):
    rows = []
    for i, n in enumerate([3, 5, 8]):
        row = ok_row("open", f"o{i}", "greedy", n, None, None)
        # Rows written without traces (e.g. tracing switched off): nothing to plot, nothing to crash.
        row.update(entropy=[], entropy_post=[], entropy_ema=[], alpha=[], ema_peak_step=None)
        rows.append(row)
    write_run(tmp_path / "output", {"part-00000.parquet": rows})
    out = tmp_path / "report"
    summary = report.write_report(str(tmp_path / "output"), str(out))
    check_report_files(out)
    g = summary["overall"]["greedy"]
    assert list(summary["overall"]) == ["greedy"]
    assert g["accuracy"] is None and g["score_mean"] is None and g["output_tokens"]["p50"] == 5
    assert g["ema_peak"] == {"n_passed": 0, "passed_frac": 0.0, "position_mean": None, "height_mean": None}
    assert g["final_ema_entropy_mean"] is None and g["alpha_switches_mean"] == 0


def test_alpha_switches_ignore_steps_without_update():
    assert report._alpha_switches(np.array([0, -1, 0, -1, 0, 1, 0, 0, 1, -1], dtype=np.int8)) == 2
    assert report._alpha_switches(np.zeros(0, dtype=np.int8)) == 0
    assert report._alpha_runs(np.array([-1, 0, -1, 0, 1, 0, 1], dtype=np.int8)) == [(0, 4, -1), (4, 7, 1)]


# ---------------------------------------------------------------------------------------------
# S3 (moto server)


def test_s3_round_trip(s3_bucket):
    prefix = f"s3://{s3_bucket}/runs/a/output"
    fs, path = storage.pyarrow_fs(prefix)
    for name, rows in run_rows().items():
        pq.write_table(rows_to_table(rows), f"{path}/{name}", filesystem=fs)
    storage.write_bytes(f"{prefix}/_run.json", b"{}")
    storage.write_bytes(f"{prefix}/_tmp/part-00009.parquet", b"not parquet")

    out = f"s3://{s3_bucket}/runs/a/report"
    summary = report.write_report(prefix, out)
    assert summary["totals"]["n_rows"] == 27
    assert summary["datasets"]["mvbench"]["vreason"]["vs_greedy"]["token_reduction_pct"] == pytest.approx(
        100 * (1 - 224 / 404)
    )
    assert json.loads(storage.read_bytes(f"{out}/summary.json")) == summary
    for name in report.PLOT_FILES:
        assert_png(f"{out}/{name}")
    assert not math.isnan(summary["overall"]["greedy"]["latency_s"]["mean"])


# ---------------------------------------------------------------------------------------------
# Runs compared (report OUT_A OUT_B ...)


def test_wilson_interval():
    from vreason_batch.evaluation.report.compare import wilson_interval

    lo, hi = wilson_interval(7, 48)
    assert (round(lo, 4), round(hi, 4)) == (0.0725, 0.2717)  # k=7, n=48, z=1.96 (by hand: 0.17208 -+ 0.09960)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) is None


def second_run(tmp_path):
    """Run B: only greedy and vreason on mvbench; s0 failed, s1's vreason answer now wrong and
    longer, a sample (s9) that run A does not have."""
    rows = []
    for sample_id, (n_g, c_g), (n_v, c_v) in [
        ("s1", (121, False), (91, False)), ("s2", (81, False), (41, False)), ("s3", (101, True), (51, True)),
        ("s9", (11, True), (11, True)),
    ]:
        rows.append(ok_row("mvbench", sample_id, "greedy", n_g, c_g, float(c_g)))
        rows.append(ok_row("mvbench", sample_id, "vreason", n_v, c_v, float(c_v)))
    rows.append(failed_row("mvbench", "s0", "vreason", "decode_error"))
    for r in rows:
        r["run_id"] = "run-b"
    root = tmp_path / "output_b"
    root.mkdir()
    pq.write_table(rows_to_table(rows), root / "part-0.parquet")
    return root


def test_compare_pairs_by_sample_and_keeps_mode_order(run_dir, tmp_path):
    from vreason_batch.evaluation.report.compare import compare_runs

    run_b = second_run(tmp_path)
    cols = list(report.summaries.SUMMARY_COLUMNS)
    result = compare_runs([("A", report.load_results(str(run_dir), cols)), ("B", report.load_results(str(run_b), cols))])
    assert [a["arm"] for a in result["arms"]] == [
        "A / greedy", "A / vreason", "A / vreason_lite", "B / greedy", "B / vreason"]
    assert result["reference_arm"] == "A / greedy"
    mv = result["datasets"]["mvbench"]
    # own figures: run B's vreason has 4 ok rows, 2 of them right
    assert (mv["B / vreason"]["n_scored"], mv["B / vreason"]["n_correct"], mv["B / vreason"]["n_failed"]) == (4, 2, 1)
    # paired: the samples every mvbench arm scored: s1 and s2 (s0 failed in B, s3's lite failed in A, s9 not in A)
    assert {m["paired"]["n_paired"] for m in mv.values()} == {2}
    assert mv["A / vreason"]["paired"]["accuracy"] == 0.5 and mv["B / vreason"]["paired"]["accuracy"] == 0.0
    assert mv["B / vreason"]["paired"]["accuracy_delta_pts"] == 0.0  # A's greedy got s1 and s2 wrong too
    assert mv["A / vreason"]["paired"]["n_changed_score"] == 1
    # tokens on s1 + s2: greedy 121 + 81, B's vreason 91 + 41
    assert mv["B / vreason"]["paired"]["tokens_delta_pct"] == pytest.approx(100 * (132 / 202 - 1))
    # a dataset only run A has: its arms only
    assert set(result["datasets"]["videomme"]) == {"A / greedy", "A / vreason", "A / vreason_lite"}
    assert mv["A / vreason"]["ms_per_token"] == pytest.approx(20.0)


def test_report_cli_one_output_and_several(run_dir, tmp_path):
    from vreason_batch.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "single" / "summary.json").is_file() and not (tmp_path / "single" / "comparison.json").exists()

    run_b = second_run(tmp_path)
    out = tmp_path / "compared"
    assert main(["report", str(run_dir), str(run_b), "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["output", "output_b"]
    for name in ("compare_ema_curves.png", "compare_accuracy_vs_tokens.png", "compare_tokens.png"):
        assert_png(out / name)
    md = (out / "comparison.md").read_text()
    assert "| all | output / greedy |" in md and "Wilson" in md
    assert main(["report", str(run_dir), str(run_b), "--out", str(out), "--label", "only-one"]) == 2
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_paper_benchmarks_are_found_by_name():
    from vreason_batch.evaluation.report.paper import benchmark_of

    assert benchmark_of("VSI-Bench") == benchmark_of("eval_vsibench.json") == "vsibench"
    assert benchmark_of("Video-MME") == "videomme" and benchmark_of("VideoMMMU") == "videommmu"
    assert benchmark_of("MVBench") == benchmark_of("mvbench") == "mvbench"
    assert benchmark_of("open") is None and benchmark_of("all") is None


def test_report_shows_the_papers_figures_beside_the_run(run_dir, tmp_path):
    out = tmp_path / "report"
    summary = report.write_report(str(run_dir), str(out))
    md = (out / "report.md").read_text()
    section = md.split("## Beside the paper", 1)[1].split("\n## ", 1)[0]
    assert "Fig. 1" in section.splitlines()[0]
    # mvbench: greedy 2 of 4 right, vreason 3 of 4; beside the paper's Qwen2.5-VL-7B and V-Reason-7B
    assert "| MVBench (mvbench) | greedy | 50.0 | 101.0 | 0.500 | 60.7 / 124 | -10.7 |" in section
    assert "| MVBench (mvbench) | vreason | 75.0 | 56.0 | 0.750 | 60.9 / 126 | +14.1 |" in section
    assert "| MVBench (mvbench) | paper: Video-R1-7B (RL) | 64.1 | 410 |" in section
    assert "| Video-MME (videomme) | paper: V-Reason-7B (pruned, Lite) | 53.5 | 149 |" in section
    assert "open" not in section  # not a paper benchmark
    assert "copied from its Fig. 1" in md  # the note says where the figures come from
    assert "tr class='paper'" in (out / "report.html").read_text()
    assert any(r[1] == "paper: V-Reason-7B" for r in summary["beside_paper"]["rows"])

    run_b = second_run(tmp_path)
    compared = tmp_path / "compared"
    report.write_comparison([("A", str(run_dir)), ("B", str(run_b))], str(compared))
    cmp_md = (compared / "comparison.md").read_text()
    section = cmp_md.split("## Beside the paper", 1)[1].split("\n## ", 1)[0]
    assert "| MVBench (mvbench) | A / vreason | 75.0 |" in section and "| 60.9 / 126 | +14.1 |" in section
    assert "| MVBench (mvbench) | B / greedy |" in section


def test_no_paper_table_without_a_paper_benchmark(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    rows = [ok_row("open", "o0", mode, 11, None, 0.5) for mode in ("greedy", "vreason")]
    pq.write_table(rows_to_table(rows), root / "part-0.parquet")
    report.write_report(str(root), str(tmp_path / "report"))
    assert "Beside the paper" not in (tmp_path / "report" / "report.md").read_text()


def test_report_over_a_sweep_prefix_finds_old_flat_and_new_nested_cells(tmp_path):
    """Cells named before nesting (`lr=0_update_every=2`) and after (`lr=1e-1/update_every=2`) are
    found through `_sweep.json` and labelled by their names; a listed cell never run is left out."""
    from vreason_batch.cli import main

    root = tmp_path / "sweep"
    names = ["lr=0_update_every=2", "lr=1e-1/update_every=2"]
    for name in names:
        write_run(root / name, run_rows())
    (root / "_sweep.json").write_text(json.dumps({"cells": [{"name": n} for n in [*names, "lr=1/update_every=2"]]}))
    out = tmp_path / "report"
    assert main(["report", str(root), "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in result["runs"]] == names
    assert {"lr=0_update_every=2 / vreason", "lr=1e-1/update_every=2 / vreason"} <= set(result["datasets"]["all"])
