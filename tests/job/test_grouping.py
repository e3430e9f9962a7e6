"""Work done once per video, without Ray: the plan groups a video's samples and keeps them in one
input block, the video stage decodes each distinct video once and carries its frames once, and the
model stage turns a video's row back into one request per sample (all its modes) and one output
row per (sample, mode), isolating a sample the engine fails on."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import torch
import pytest

from videos import write_counter_video
from vreason_batch.job import stages
from vreason_batch.config import VideoConfig, config_from_dict
from vreason_batch.io.schema import VIDEO_BACKENDS
from vreason_batch.job.plan import RunPlan, group_by_video, input_blocks, plan_run, plan_schema

VIDEO = {"num_frames": 4, "min_pixels": 3136, "max_pixels": 12544}


def plan_table(videos: list[str | None], modes=("greedy",), errors: dict[int, str] | None = None) -> pa.Table:
    """Pending samples s0.. on the given videos ("" / None: a text question), in plan_schema."""
    errors = errors or {}
    cols = {n: [None] * len(videos) for n in plan_schema().names}
    cols.update(sample_id=[f"s{i}" for i in range(len(videos))], video=list(videos),
                question=[f"q{i}?" for i in range(len(videos))], options=[[] for _ in videos],
                modes=[list(modes) for _ in videos], error_type=[errors.get(i) and "bad_manifest_row" for i in range(len(videos))],
                error=[errors.get(i) for i in range(len(videos))])
    return pa.table(cols, schema=plan_schema())


def ids_and_videos(tables) -> list[tuple[str, str]]:
    return [(r["sample_id"], r["video"]) for t in tables for r in t.select(["sample_id", "video"]).to_pylist()]


# ---------------------------------------------------------------------------------------------
# The plan


def test_plan_groups_a_videos_samples_in_first_appearance_order(tmp_path):
    manifest = tmp_path / "m.jsonl"
    order = ["a", "b", "a", "c", "b", "a"]  # questions on a video scattered through the manifest
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "video": f"/v/{v}.mp4", "question": f"q{i}"}) + "\n"
                                for i, v in enumerate(order)))
    cfg = config_from_dict({"input": {"manifest": str(manifest)}, "output": {"uri": str(tmp_path / "out")}})

    plan = plan_run(cfg)

    got = [(s.sample_id, s.video) for s, _ in plan.pending]
    assert got == [("s0", "/v/a.mp4"), ("s2", "/v/a.mp4"), ("s5", "/v/a.mp4"), ("s1", "/v/b.mp4"),
                   ("s4", "/v/b.mp4"), ("s3", "/v/c.mp4")]
    assert (plan.num_samples_pending, plan.num_videos_pending) == (6, 3)


def test_group_by_video_cuts_tables_where_a_video_starts():
    videos = ["a", "b", "a", "", "c", "b", "", "a", None, "c", "c"]
    t = plan_table(videos)

    tables, n_videos = group_by_video([t.slice(0, 4), t.slice(4)], chunk_rows=3)

    # a, b, c in order of first appearance, manifest order within; text questions ("" / null) together
    assert ids_and_videos(tables) == [("s0", "a"), ("s2", "a"), ("s7", "a"), ("s1", "b"), ("s5", "b"),
                                      ("s3", ""), ("s6", ""), ("s4", "c"), ("s9", "c"), ("s10", "c"), ("s8", None)]
    assert n_videos == 3 + 3  # three videos, and each of the three text questions shares nothing
    assert [x.num_rows for x in tables] == [3, 3, 4, 1]  # each at least chunk_rows, cut where a video starts
    seen = Counter(v for x in tables for v in set(x.column("video").to_pylist()) if v)
    assert set(seen.values()) == {1}, "a video spans two tables"
    assert sum(x.num_rows for x in tables) == len(videos)


def test_group_by_video_keeps_a_grouped_plan_as_it_is():
    t = plan_table(["a", "a", "b", "c", "c"])
    tables, n_videos = group_by_video([t], chunk_rows=2)
    assert ids_and_videos(tables) == ids_and_videos([t]) and n_videos == 3
    assert [x.num_rows for x in tables] == [2, 3]  # at least chunk_rows, cut where a video starts


@pytest.mark.parametrize("k, expected", [
    (1, [["a"] * 3, ["b"] * 2, ["c"], [""], [""], ["d"] * 4]),
    (4, [["a"] * 3, ["b", "b", "c", ""], [""], ["d"] * 4]),
    (6, [["a"] * 3 + ["b"] * 2 + ["c"], ["", ""] + ["d"] * 4]),
])
def test_input_blocks_never_split_a_video(k, expected):
    t = plan_table(["a"] * 3 + ["b"] * 2 + ["c", "", ""] + ["d"] * 4)
    plan = RunPlan(run_id="r", config_hash="h", pending_tables=[t], num_samples=12, num_pairs_total=12,
                   num_pairs_done=0, manifest_summary="")
    blocks = input_blocks(plan, k)
    assert [b.column("video").to_pylist() for b in blocks] == expected
    # a block exceeds k only to hold one video's samples whole
    assert all(b.num_rows <= k or len(set(b.column("video").to_pylist())) == 1 for b in blocks)


def test_model_batch_rows_hold_about_batch_size_samples(tmp_path):
    def cfg(bs, **inp):
        return config_from_dict({"input": {"manifest": "m.jsonl", **inp}, "output": {"uri": str(tmp_path)},
                                 "runtime": {"batch_size": bs}})

    assert stages.model_batch_rows(cfg(16), num_samples=90, num_videos=30) == 5  # 3 questions a video
    assert stages.model_batch_rows(cfg(16), num_samples=30, num_videos=30) == 16  # one question a video
    assert stages.model_batch_rows(cfg(4), num_samples=1000, num_videos=2) == 1  # rows of 4 samples each
    assert stages.model_batch_rows(cfg(16, text_only=True), num_samples=90, num_videos=30) == 16


# ---------------------------------------------------------------------------------------------
# The video stage


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("grouping")
    return [str(write_counter_video(d / f"v{i}.mp4", num_frames=10 + i)) for i in range(2)]


def run_video_stage(block: pa.Table, needs_video=True, max_samples_per_row=8) -> list[dict]:
    tables = list(stages.video_stage(block, VideoConfig(**VIDEO).model_dump(), needs_video, max_samples_per_row))
    for t in tables:
        assert t.schema.equals(stages.stage_schema())
    return [r for t in tables for r in t.to_pylist()]


def test_video_stage_decodes_each_video_once_and_carries_its_frames_once(two_videos, tmp_path, monkeypatch):
    import vreason_batch.io.video as video

    decoded = []
    real = video.load_clip
    monkeypatch.setattr(video, "load_clip", lambda uri, cfg: decoded.append(uri) or real(uri, cfg))
    a, b = two_videos
    missing = str(tmp_path / "missing.mp4")
    # a's questions not adjacent within the block; s5 is a bad manifest row on b; s6 asks a missing video
    block = plan_table([a, b, a, a, missing, b, missing], modes=("greedy", "vreason"), errors={5: "manifest row 6: bad"})

    rows = run_video_stage(block)

    assert sorted(decoded) == sorted([a, b, missing])  # one decode per distinct video
    assert sum(r["video_decodes"] for r in rows) == 3
    by_video = {r["video"]: r for r in rows}
    assert len(rows) == 3 and set(by_video) == {a, b, missing}
    assert [s["sample_id"] for s in by_video[a]["samples"]] == ["s0", "s2", "s3"]
    assert [s["sample_id"] for s in by_video[b]["samples"]] == ["s1", "s5"]
    assert all(s["modes"] == ["greedy", "vreason"] for r in rows for s in r["samples"])
    for v in (a, b):
        r = by_video[v]
        assert r["error_type"] is None and r["frames_shape"][0] == 4 and len(r["frames"]) == \
            r["frames_shape"][0] * r["frames_shape"][1] * r["frames_shape"][2] * 3
    assert by_video[b]["samples"][1]["error_type"] == "bad_manifest_row"
    gone = by_video[missing]
    assert gone["error_type"] == "video_not_found" and missing in gone["error"] and gone["frames"] == b""
    assert rows[-1]["video"] == missing  # rows without frames travel together, last


def test_video_stage_splits_a_video_with_many_questions_and_skips_unusable_videos(two_videos, monkeypatch):
    import vreason_batch.io.video as video

    decoded = []
    real = video.load_clip
    monkeypatch.setattr(video, "load_clip", lambda uri, cfg: decoded.append(uri) or real(uri, cfg))
    a, b = two_videos
    # five questions on a; b's only sample is a bad manifest row: b is not decoded at all
    rows = run_video_stage(plan_table([a] * 5 + [b], errors={5: "bad"}), max_samples_per_row=2)

    assert decoded == [a]
    a_rows = [r for r in rows if r["video"] == a]
    assert [len(r["samples"]) for r in a_rows] == [2, 2, 1] and [r["video_decodes"] for r in a_rows] == [1, 0, 0]
    assert len({r["frames"] for r in a_rows}) == 1
    (b_row,) = [r for r in rows if r["video"] == b]
    assert b_row["video_decodes"] == 0 and b_row["frames"] == b"" and b_row["error_type"] is None


def test_video_stage_without_video_gives_a_row_per_sample(two_videos, monkeypatch):
    import vreason_batch.io.video as video

    monkeypatch.setattr(video, "load_clip", lambda uri, cfg: pytest.fail("a text model decodes no video"))
    a, _ = two_videos
    rows = run_video_stage(plan_table([a, a, ""]), needs_video=False)
    assert [[s["sample_id"] for s in r["samples"]] for r in rows] == [["s0"], ["s1"], ["s2"]]
    assert all(r["media_type"] == "text" and r["video_decodes"] == 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# The model stage (in-process: the tiny model, ray.util.metrics replaced)


class _Metric:
    def __init__(self, *args, **kwargs):
        pass

    def inc(self, *args, **kwargs):
        pass

    def observe(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def model_stage():
    import ray.util.metrics

    mp = pytest.MonkeyPatch()
    mp.setattr(ray.util.metrics, "Counter", _Metric)
    mp.setattr(ray.util.metrics, "Histogram", _Metric)
    cfg = config_from_dict({"input": {"manifest": "m.jsonl"}, "output": {"uri": "/tmp/unused"},
                            "model": {"name_or_path": "builtin:tiny-qwen2.5-vl"}, "video": VIDEO,
                            "decoding": {"modes": ["greedy", "vreason", "vreason_lite"], "max_new_tokens": 3},
                            "runtime": {"decode_slots": 4}})
    yield stages.ModelStage(cfg.model_dump_json(), "run", "hash")
    mp.undo()


def test_model_stage_one_request_per_sample_and_one_row_per_sample_and_mode(model_stage, two_videos, tmp_path,
                                                                            monkeypatch):
    import vreason_batch.engine.driver as driver
    import vreason_batch.engine.prompting as prompting

    modes = ("greedy", "vreason", "vreason_lite")
    a, b = two_videos
    missing = str(tmp_path / "missing.mp4")
    stage_rows = run_video_stage(plan_table([a, b, a, missing, a], modes=modes, errors={4: "bad row"}))
    calls, patch_builds = [], []
    real_decode, real_patches = driver.decode_requests, prompting.video_patches
    monkeypatch.setattr(driver, "decode_requests",
                        lambda lm, reqs, settings, slots, compiled=False, **fed:
                        calls.append((reqs, slots)) or real_decode(lm, reqs, settings, slots, compiled, **fed))
    monkeypatch.setattr(prompting, "video_patches", lambda *a, **k: patch_builds.append(1) or real_patches(*a, **k))
    before = dict(model_stage.stats)

    out = model_stage(pa.Table.from_pylist(stage_rows, schema=stages.stage_schema())).to_pylist()

    assert len(calls) == 1 and calls[0][1] == 4  # the whole batch in one engine call, runtime.decode_slots slots
    reqs = calls[0][0]
    assert [r.modes for r in reqs] == [modes] * 3  # s0, s2 (a), s1 (b): the error rows are not decoded
    # keyed by sample id, not by place in the batch: a sampled row's draws follow (seed, sample id, mode)
    assert [r.key for r in reqs] == ["s0", "s2", "s1"]
    assert {r.video_key for r in reqs} == {a, b} and reqs[0].inputs.pixel_values_videos is reqs[1].inputs.pixel_values_videos
    assert len(patch_builds) == 2  # once per video, shared by its questions
    assert Counter((r["sample_id"], r["mode"]) for r in out) == {(f"s{i}", m): 1 for i in range(5) for m in modes}
    by_key = {(r["sample_id"], r["mode"]): r for r in out}
    for i in (0, 1, 2):
        for m in modes:
            r = by_key[(f"s{i}", m)]
            assert r["error_type"] is None and r["num_output_tokens"] and r["num_frames"] == 4
            assert r["video_backend"] in VIDEO_BACKENDS  # which reader decoded the video, on every row of it
    assert {by_key[("s3", m)]["error_type"] for m in modes} == {"video_not_found"}
    assert {by_key[("s3", m)]["video_backend"] for m in modes} == {None}
    assert {by_key[("s4", m)]["error"] for m in modes} == {"bad row"}
    st = model_stage.stats
    assert st["video_decodes"] - before["video_decodes"] == 3  # a, b and the missing one were each decoded once
    assert st["prefill_tokens"] > before["prefill_tokens"] and st["vision_encodes"] > before["vision_encodes"]


def test_two_calls_at_once_share_one_engine_run_and_answer_as_one_at_a_time(model_stage, two_videos, monkeypatch):
    """runtime.calls_per_actor (stages/feeding.py): a second call's rows fill the slots the first call's
    last rows free, in the same engine run; each call's rows equal those it gets alone (float32)."""
    import threading
    import time

    import vreason_batch.engine.driver as driver

    a, b = two_videos
    batches = []
    for tag, videos in (("A", [a, b, a]), ("B", [b])):  # 6 rows on 4 slots leave 2 free for B's 2
        rows = run_video_stage(plan_table(videos, modes=("greedy", "vreason")))
        for row in rows:
            for smp in row["samples"]:
                smp["sample_id"] = tag + smp["sample_id"]  # ids are unique in a run
        batches.append(pa.Table.from_pylist(rows, schema=stages.stage_schema()))
    steps0 = model_stage.stats["decode_steps"]
    alone = [model_stage(t).to_pylist() for t in batches]
    steps_alone = model_stage.stats["decode_steps"] - steps0

    runs, asked, real = [], [], driver.decode_requests

    def engine(lm, reqs, settings, slots, compiled=False, more=None, finished=None):
        runs.append(len(reqs))

        def more_once_b_waits():  # the first time slots free up, the second call is queued: hold until it is
            deadline = time.monotonic() + 60
            while not asked and not model_stage.engine.waiting_calls() and time.monotonic() < deadline:
                time.sleep(0.01)
            asked.append(1)
            return more()

        return real(lm, reqs, settings, slots, compiled, more=more_once_b_waits, finished=finished)

    monkeypatch.setattr(driver, "decode_requests", engine)
    out = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, model_stage(batches[i]).to_pylist())) for i in (0, 1)]
    threads[0].start()
    while not runs:
        time.sleep(0.01)
    threads[1].start()
    for t in threads:
        t.join(120)
    assert model_stage.engine.wait_idle(60)  # the run adds its steps once it ends, after its calls returned
    steps_fed = model_stage.stats["decode_steps"] - steps0 - steps_alone

    assert runs == [3]  # one run: call A's 3 requests, then call B's 1 fed in as A's rows finished
    key = lambda r: (r["sample_id"], r["mode"])
    for i in (0, 1):
        assert len(out[i]) == len(alone[i]) and all(r["error_type"] is None for r in out[i])
        got, ref = {key(r): r for r in out[i]}, {key(r): r for r in alone[i]}
        assert got.keys() == ref.keys()
        for k in ref:
            for col in ("output_text", "finish_reason", "num_output_tokens", "alpha", "controller_updates"):
                assert got[k][col] == ref[k][col], (k, col)
            for col in ("entropy", "entropy_post"):  # prefills batched otherwise: float32 sums in another order
                assert got[k][col] == pytest.approx(ref[k][col], abs=1e-3), (k, col)
    assert steps_fed < steps_alone  # no drain between the calls: fewer steps for the same rows


def engine_failing(monkeypatch, fails):
    """Make the engine raise `fails(reqs, slots)` (an exception, or None to decode); returns the calls."""
    import vreason_batch.engine.driver as driver

    calls, real = [], driver.decode_requests

    def engine(lm, reqs, settings, slots, compiled=False, **fed):
        calls.append((len(reqs), slots))
        e = fails(reqs, slots)
        if e is not None:
            raise e
        return real(lm, reqs, settings, slots, compiled, **fed)

    monkeypatch.setattr(driver, "decode_requests", engine)
    return calls


def decoded_by_key(model_stage, two_videos):
    a, b = two_videos
    stage_rows = run_video_stage(plan_table([a, b, a], modes=("greedy", "vreason")))
    out = model_stage(pa.Table.from_pylist(stage_rows, schema=stages.stage_schema())).to_pylist()
    by_key = {(r["sample_id"], r["mode"]): r for r in out}
    assert len(out) == len(by_key) == 6
    return by_key


def assert_answered(by_key, ids):
    for m in ("greedy", "vreason"):
        for ok in ids:
            assert by_key[(ok, m)]["error_type"] is None and by_key[(ok, m)]["output_text"] is not None


def test_model_stage_isolates_a_sample_the_engine_fails_on(model_stage, two_videos, monkeypatch):
    b = two_videos[1]
    calls = engine_failing(monkeypatch, lambda reqs, slots: ValueError("bad sample (injected)")
                           if any(r.video_key == b for r in reqs) else None)
    by_key = decoded_by_key(model_stage, two_videos)
    assert calls == [(3, 4), (1, 1), (1, 1), (1, 1)]  # the whole call failed, then each request alone, one slot
    for m in ("greedy", "vreason"):
        assert by_key[("s1", m)]["error_type"] == "decode_error" and "bad sample" in by_key[("s1", m)]["error"]
    assert_answered(by_key, ("s0", "s2"))


def test_out_of_memory_backs_off_to_fewer_slots(model_stage, two_videos, monkeypatch):
    calls = engine_failing(monkeypatch, lambda reqs, slots: torch.OutOfMemoryError("CUDA out of memory (injected)")
                           if slots > 2 else None)
    by_key = decoded_by_key(model_stage, two_videos)
    assert calls == [(3, 4), (3, 2)]  # the same requests on half the slots: every row answered
    assert_answered(by_key, ("s0", "s1", "s2"))


def test_a_sample_too_large_alone_is_an_out_of_memory_row(model_stage, two_videos, monkeypatch):
    b = two_videos[1]
    calls = engine_failing(monkeypatch, lambda reqs, slots: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
                           if any(r.video_key == b for r in reqs) else None)
    by_key = decoded_by_key(model_stage, two_videos)
    assert calls == [(3, 4), (3, 2), (3, 1), (1, 1), (1, 1), (1, 1)]  # fewer slots, down to one; then alone
    for m in ("greedy", "vreason"):
        r = by_key[("s1", m)]
        assert r["error_type"] == "out_of_memory" and "alone, on one slot" in r["error"]
    assert_answered(by_key, ("s0", "s2"))


def test_a_device_error_leaves_the_actor_and_records_nothing(model_stage, two_videos, monkeypatch):
    import vreason_batch.job.stages.model as model_module

    class Exited(Exception):
        pass

    def exit_for_restart(e):
        raise Exited(str(e))

    monkeypatch.setattr(model_module, "exit_for_restart", exit_for_restart)
    calls = engine_failing(monkeypatch, lambda reqs, slots: RuntimeError("CUDA error: an illegal memory access"))
    with pytest.raises(Exited, match="illegal memory access"):
        decoded_by_key(model_stage, two_videos)
    assert calls == [(3, 4)]  # no retry in a poisoned process, no error rows


def test_a_row_the_engine_returns_no_result_for_fails_the_batch_and_records_nothing(model_stage, two_videos,
                                                                                   monkeypatch):
    # a bug (the engine or its feeding lost a row), not bad data: never an error row that `--retry-errors`
    # would have to find, never a silent gap
    import vreason_batch.engine.driver as driver

    real = driver.decode_requests

    lost = ("s1", "vreason")

    def engine(lm, reqs, settings, slots, compiled=False, finished=None, **fed):
        def deliver(rows):  # a fed run hands its rows over as they finish
            finished({k: r for k, r in rows.items() if k != lost})

        got, stats = real(lm, reqs, settings, slots, compiled, finished=finished and deliver, **fed)
        got.pop(lost, None)
        return got, stats

    monkeypatch.setattr(driver, "decode_requests", engine)
    with pytest.raises(RuntimeError, match="no result for sample 's1', mode 'vreason'"):
        decoded_by_key(model_stage, two_videos)


# ---------------------------------------------------------------------------------------------
# The run record


def test_run_record_counts_the_work_summed_over_actors(tmp_path):
    from vreason_batch.job.plan import RunPlan
    from vreason_batch.job.results import RunResult, write_run_record

    cfg = config_from_dict({"input": {"manifest": "m.jsonl"}, "output": {"uri": str(tmp_path)}})
    plan = RunPlan(run_id="r1", config_hash="h", pending_tables=[], num_samples=9, num_pairs_total=27,
                   num_pairs_done=0, manifest_summary="", num_pairs_pending=27)
    # an actor that died after two batches, and its restart under a new pid that did the rest
    actors = {"n:1": {"video_decodes": 2, "vision_encodes": 2, "prefill_tokens": 500, "samples": 18},
              "n:2": {"video_decodes": 1, "vision_encodes": 1, "prefill_tokens": 250, "samples": 9}}
    path = write_run_record(cfg, plan, "finished", RunResult(run_id="r1", output_uri=str(tmp_path)),
                            {"actor_metrics": actors})
    counts = json.loads(open(path).read())["counts"]
    assert (counts["video_decodes"], counts["vision_encodes"], counts["prefill_tokens"]) == (3, 3, 750)
    nothing = RunPlan(run_id="r2", config_hash="h", pending_tables=[], num_samples=9, num_pairs_total=27,
                      num_pairs_done=27, manifest_summary="")
    path = write_run_record(cfg, nothing, "finished", RunResult(run_id="r2", output_uri=str(tmp_path)))
    assert json.loads(open(path).read())["counts"]["video_decodes"] == 0
    path = write_run_record(cfg, plan, "running")
    assert "video_decodes" not in json.loads(open(path).read())["counts"]
