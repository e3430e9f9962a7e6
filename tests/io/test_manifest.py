"""manifest (and its manifest_formats, manifest_rows parts): every format, column mapping, paths,
ids, duplicates, bad rows, annotation, S3."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from videos import counter_video_bytes, frame_index

from vreason_batch.io import storage
from vreason_batch.config import InputConfig, VideoConfig
from vreason_batch.io.manifest import IdConflict, ManifestError, read_samples
from vreason_batch.io.manifest_rows import make_sample_id, normalize_answer, shard_key
from vreason_batch.io.video import load_clip

ROWS = [
    {"id": "q1", "video": "videos/a.mp4", "question": "What colour?", "options": ["A. red", "B. blue"], "answer": "B"},
    {"video": "videos/b.mp4", "question": "How many cars?", "answer": 3, "problem_type": "numerical"},
    {"video": "/abs/c.mp4", "question": "Describe it.", "dataset": "mine"},
]


def write_manifest(path: Path, rows: list[dict], fmt: str) -> Path:
    """Write rows in one of the four formats (CSV cells: options as a JSON list string)."""
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "json-data":
        path.write_text(json.dumps({"data": rows}))
    elif fmt == "parquet":
        # from_pylist takes its columns from the first row: give every row every column.
        columns = sorted({k for r in rows for k in r})
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), path)
    elif fmt == "csv":
        columns = sorted({k for r in rows for k in r})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({c: json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "") for c in columns})
    else:
        raise ValueError(fmt)
    return path


def read(manifest: str | Path, **kwargs):
    return read_samples(InputConfig(manifest=str(manifest), **kwargs))


EXTENSIONS = {"jsonl": "jsonl", "json": "json", "json-data": "json", "parquet": "parquet", "csv": "csv"}


@pytest.mark.parametrize("fmt", list(EXTENSIONS))
def test_every_format_reads_the_same_samples(tmp_path, fmt):
    rows = [dict(r, answer=str(r["answer"])) if "answer" in r else r for r in ROWS]  # one answer type per column
    path = write_manifest(tmp_path / f"bench.{EXTENSIONS[fmt]}", rows, fmt)
    result = read(path)
    assert result.format == EXTENSIONS[fmt] and result.num_rows == 3 and result.num_duplicates == 0
    a, b, c = result.samples
    assert (a.sample_id, a.video, a.question) == ("q1", str(tmp_path / "videos/a.mp4"), "What colour?")
    assert a.options == ["A. red", "B. blue"] and a.answer_gt == "B" and a.problem_type == "multiple_choice"
    assert a.dataset == "bench"  # the manifest's name when there is no dataset column
    assert b.answer_gt == "3" and b.problem_type == "numerical" and b.options == []
    assert b.sample_id == make_sample_id(str(tmp_path / "videos/b.mp4"), "How many cars?", [])
    assert (c.video, c.dataset, c.problem_type, c.answer_gt) == ("/abs/c.mp4", "mine", "free_form", None)
    assert all(s.error_type is None for s in result.samples)


def test_format_from_config_overrides_extension(tmp_path):
    path = write_manifest(tmp_path / "manifest.txt", ROWS, "jsonl")
    with pytest.raises(ManifestError, match="set input.format"):
        read(path)
    assert len(read(path, format="jsonl").samples) == 3


def test_video_r1_json_with_column_mapping(tmp_path):
    """Video-R1's eval files: problem / path / solution with <answer> tags / 'multiple choice'."""
    rows = [
        {
            "problem_id": 0,
            "problem": "What happens first?",
            "data_type": "video",
            "problem_type": "multiple choice",
            "options": ["A. jump", "B. run"],
            "process": "",
            "solution": "<answer>B</answer>",
            "path": "./Evaluation/MVBench/clip0.mp4",
            "data_source": "MVBench",
        },
        {
            "problem_id": 1,
            "problem": "How far is the chair, in metres?",
            "problem_type": "numerical",
            "options": [],
            "solution": "<answer>2.5</answer>",
            "path": "./Evaluation/VSI/clip1.mp4",
            "data_source": "VSI-Bench",
        },
    ]
    path = tmp_path / "eval_mvbench.json"
    path.write_text(json.dumps(rows))
    columns = {
        "video": "path",
        "question": "problem",
        "answer": "solution",
        "id": "problem_id",
        "dataset": "data_source",
    }
    result = read(path, columns=columns, video_root="/data/video-r1")
    mc, num = result.samples
    assert (mc.sample_id, mc.video) == ("0", "/data/video-r1/Evaluation/MVBench/clip0.mp4")
    assert (mc.answer_gt, mc.problem_type, mc.dataset) == ("B", "multiple_choice", "MVBench")
    assert (num.sample_id, num.answer_gt, num.problem_type) == ("1", "2.5", "numerical")


def test_relative_paths(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    rows = [{"video": "./v/a.mp4", "question": "q"}, {"video": "../b.mp4", "question": "q"}]
    path = write_manifest(sub / "m.jsonl", rows, "jsonl")
    assert [s.video for s in read(path).samples] == [str(sub / "v/a.mp4"), str(tmp_path / "b.mp4")]
    assert [s.video for s in read(path, video_root="s3://bkt/root").samples] == [
        "s3://bkt/root/v/a.mp4",
        "s3://bkt/b.mp4",
    ]


def test_answer_normalisation():
    assert normalize_answer(3) == "3"
    assert normalize_answer(3.0) == "3"
    assert normalize_answer(2.5) == "2.5"
    assert normalize_answer(" <answer> C </answer> ") == "C"
    assert normalize_answer("<think>hmm</think><answer>12</answer>") == "12"
    assert normalize_answer(float("nan")) is None
    assert normalize_answer("") is None
    assert normalize_answer(None) is None


def test_sample_ids_are_deterministic_and_content_based(tmp_path):
    rows = [{"video": "a.mp4", "question": "q1"}, {"video": "a.mp4", "question": "q2"}]
    path = write_manifest(tmp_path / "m.jsonl", rows, "jsonl")
    first, second = read(path), read(path)
    assert [s.sample_id for s in first.samples] == [s.sample_id for s in second.samples]
    assert len({s.sample_id for s in first.samples}) == 2
    assert all(len(s.sample_id) == 16 for s in first.samples)
    assert make_sample_id("a", "q", ["x"]) != make_sample_id("a", "q", ["y"])
    # No separator tricks: the parts are JSON-encoded, not concatenated.
    assert make_sample_id("a b", "c", []) != make_sample_id("a", "b c", [])


def test_duplicates_are_reported_and_kept_once(tmp_path):
    rows = [
        {"video": "a.mp4", "question": "q", "answer": "first"},
        {"video": "b.mp4", "question": "q"},
        {"video": "a.mp4", "question": "q", "answer": "second"},
        {"id": 7, "video": "c.mp4", "question": "q"},
        {"id": "7", "video": "c.mp4", "question": "q"},  # the same sample again (an int id reads as its string)
    ]
    result = read(write_manifest(tmp_path / "m.jsonl", rows, "jsonl"))
    assert result.num_rows == 5 and result.num_duplicates == 2
    assert len(result.samples) == 3
    assert result.samples[0].answer_gt == "first"  # first wins
    assert "7" in result.duplicate_ids and result.samples[0].sample_id in result.duplicate_ids
    assert "2 duplicates" in result.summary()


@pytest.mark.parametrize("other", [{"question": "another"}, {"video": "b.mp4"}, {"options": ["x", "z"]}],
                         ids=["question", "video", "options"])
def test_rows_that_share_an_id_and_differ_are_refused_naming_both_rows(tmp_path, other):
    # two benchmark files concatenated, their ids restarting at 1
    first = {"id": 1, "video": "a.mp4", "question": "q", "options": ["x", "y"]}
    rows = [first, {"id": 2, "video": "a.mp4", "question": "r"}, {**first, **other}]
    with pytest.raises(IdConflict) as e:
        read(write_manifest(tmp_path / "m.jsonl", rows, "jsonl"))
    msg = str(e.value)
    assert "id '1' is used by row 1 and by row 3" in msg and "own id" in msg and "leave the id column out" in msg


def test_an_id_conflict_is_found_across_id_chunks(tmp_path, monkeypatch):
    import vreason_batch.io.manifest as manifest

    monkeypatch.setattr(manifest, "ID_CHUNK", 4)
    rows = [{"id": f"s{i}", "video": "a.mp4", "question": f"q{i}"} for i in range(10)]
    rows += [{"id": "s7", "video": "a.mp4", "question": "q7"},  # an exact repeat: dropped as before
             {"id": "s3", "video": "a.mp4", "question": "not q3"}]  # row 12 reuses row 4's id
    with pytest.raises(IdConflict, match="id 's3' is used by row 4 and by row 12"):
        read(write_manifest(tmp_path / "m.jsonl", rows, "jsonl"))
    assert read(write_manifest(tmp_path / "ok.jsonl", rows[:11], "jsonl")).num_duplicates == 1


def test_bad_rows_become_error_samples(tmp_path):
    rows = [
        {"video": "ok.mp4", "question": "fine"},
        {"video": "", "question": "no video"},
        {"video": "x.mp4"},
        {"video": "y.mp4", "question": "q", "problem_type": "essay"},
        {"video": "z.mp4", "question": "q", "options": "A or B"},
        {"video": "http://example.com/v.mp4", "question": "q"},
        {"id": "keep-my-id", "question": "q"},
    ]
    path = write_manifest(tmp_path / "m.jsonl", rows, "jsonl")
    result = read(path)
    ok, *bad = result.samples
    assert ok.error_type is None
    assert len(bad) == 6 and result.num_bad_rows == 6
    assert all(s.error_type == "bad_manifest_row" for s in bad)
    messages = [s.error for s in bad]
    assert "manifest row 2" in messages[0] and "no video (column 'video')" in messages[0]
    assert "no question (column 'question')" in messages[1]
    assert "unknown problem_type 'essay'" in messages[2]
    assert "not a JSON list" in messages[3]
    assert "unsupported URI scheme" in messages[4]
    assert bad[5].sample_id == "keep-my-id"
    # Ids of bad rows are distinct and the same on every read, so each is written exactly once.
    assert len({s.sample_id for s in result.samples}) == 7
    assert [s.sample_id for s in read(path).samples] == [s.sample_id for s in result.samples]


def test_malformed_jsonl_lines_are_bad_rows_with_their_line_number(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"id": "a", "video": "a.mp4", "question": "q"}\n'
        "\n"  # blank lines are skipped, but still counted as lines
        '{"id": "b", "video": "b.mp4", "question": \n'
        '["not", "an", "object"]\n'
        '{"id": "c", "video": "c.mp4", "question": "q"}\n'
    )
    path.write_bytes(path.read_bytes() + b'{"id": "d\xff", "video": "d.mp4"}\n')
    result = read(path)
    a, broken, listed, c, binary = result.samples
    assert [a.sample_id, c.sample_id] == ["a", "c"] and a.error_type is None and c.error_type is None
    assert broken.error_type == listed.error_type == binary.error_type == "bad_manifest_row"
    assert broken.error.startswith("manifest line 3: not valid JSON (Expecting value at column 43)")
    assert '"question":' in broken.error  # the line itself, to find it
    assert listed.error.startswith("manifest line 4: a JSON list, not an object")
    assert binary.error.startswith("manifest line 6: not UTF-8 text")
    assert broken.sample_id.startswith("row3-") and listed.sample_id.startswith("row4-")
    assert result.num_rows == 5 and result.num_bad_rows == 3 and "3 bad rows" in result.summary()
    # ids of broken lines are the same on every read of the same manifest: written exactly once
    assert [s.sample_id for s in read(path).samples] == [s.sample_id for s in result.samples]


def test_manifest_is_streamed_in_chunks(tmp_path, monkeypatch):
    """Lines that straddle read chunks come out whole: the reader never holds the whole file."""
    rows = [{"id": f"s{i}", "video": f"v{i}.mp4", "question": "q" * (1 + i % 13)} for i in range(1, 200)]
    path = write_manifest(tmp_path / "m.jsonl", rows, "jsonl")
    chunks = []
    real = storage.iter_chunks

    def small_chunks(uri, chunk_bytes=storage.READ_CHUNK_BYTES):
        for c in real(uri, 97):
            chunks.append(len(c))
            yield c

    monkeypatch.setattr(storage, "iter_chunks", small_chunks)
    samples = read(path).samples
    assert len(chunks) > 50 and max(chunks) == 97
    assert [s.sample_id for s in samples] == [r["id"] for r in rows]
    assert all(s.error_type is None for s in samples)


def test_csv_row_with_extra_cells_is_a_bad_row_not_a_crash(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("video,question\na.mp4,fine\n,no video,extra cell\n")
    ok, bad = read(path).samples
    assert ok.error_type is None and bad.error_type == "bad_manifest_row" and bad.sample_id.startswith("row2-")


def test_csv_options_and_types(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "id,video,question,options,answer\n"
        '0012,a.mp4,"Which, exactly?","[""A. x"", ""B. y""]",B\n'
        "13,b.mp4,How many?,,4\n"
    )
    a, b = read(path).samples
    assert a.sample_id == "0012"  # ids stay strings: no numeric inference
    assert a.question == "Which, exactly?" and a.options == ["A. x", "B. y"] and a.problem_type == "multiple_choice"
    assert b.options == [] and b.answer_gt == "4" and b.problem_type == "free_form"


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, "manifest not found"),
        ("broken.jsonl", '{"video": \n[1]\n', "has no rows: line 1 is not valid JSON"),
        ("broken.json", "[{", "not valid JSON"),
        ("scalar.json", "42", "expected a JSON list"),
        ("strings.json", '["a.mp4"]', "item 1 is a str, not an object"),
        ("empty.jsonl", "", "has no rows"),
        ("empty.json", "[]", "has no rows"),
        ("header-only.csv", "video,question\n", "has no rows"),
        ("bad.parquet", "not parquet at all", "not a readable Parquet file"),
        ("nocol.jsonl", '{"path": "a.mp4", "question": "q"}\n', "no video column 'video'.*columns found: path"),
        ("noq.csv", "video,prompt\na.mp4,hi\n", "no question column 'question'"),
    ],
)
def test_unreadable_manifest_raises(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError, match=match):
        read(path)


def test_non_utf8_manifest_raises(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("video,question\na.mp4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read(path)


def test_limit_applies_after_dedup(tmp_path):
    rows = [{"video": "a.mp4", "question": "q"}] * 3 + [{"video": f"{i}.mp4", "question": "q"} for i in range(5)]
    result = read(write_manifest(tmp_path / "m.jsonl", rows, "jsonl"), limit=3)
    assert [Path(s.video).name for s in result.samples] == ["a.mp4", "0.mp4", "1.mp4"]
    assert result.num_duplicates == 2 and result.num_over_limit == 3


def test_annotation_mode_local(tmp_path):
    for rel in ["b.mp4", "a.mp4", "sub/c.mp4", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    questions = ["Describe the scene.", "What happens at the end?"]
    cfg = InputConfig(annotate={"videos": str(tmp_path), "questions": questions, "dataset": "my-clips"})
    result = read_samples(cfg)
    assert result.format == "annotate" and result.num_rows == 6
    assert [(Path(s.video).relative_to(tmp_path).as_posix(), s.question) for s in result.samples] == [
        ("a.mp4", questions[0]),
        ("a.mp4", questions[1]),
        ("b.mp4", questions[0]),
        ("b.mp4", questions[1]),
        ("sub/c.mp4", questions[0]),
        ("sub/c.mp4", questions[1]),
    ]
    assert {s.dataset for s in result.samples} == {"my-clips"}
    assert {s.problem_type for s in result.samples} == {"free_form"}
    assert result.samples[0].sample_id == make_sample_id(str(tmp_path / "a.mp4"), questions[0], [])
    assert [s.sample_id for s in read_samples(cfg).samples] == [s.sample_id for s in result.samples]

    globbed = read_samples(InputConfig(annotate={"videos": str(tmp_path / "sub" / "*.mp4"), "questions": ["q"]}))
    assert [s.video for s in globbed.samples] == [str(tmp_path / "sub/c.mp4")]

    with pytest.raises(ManifestError, match="no files matching"):
        read_samples(InputConfig(annotate={"videos": str(tmp_path), "pattern": "*.mkv", "questions": ["q"]}))
    with pytest.raises(ManifestError, match="cannot list"):
        read_samples(InputConfig(annotate={"videos": str(tmp_path / "nope"), "questions": ["q"]}))


def test_annotation_mode_s3(s3_bucket):
    for key in ["clips/x.mp4", "clips/deep/y.mp4", "clips/readme.md", "other/z.mp4"]:
        storage.write_bytes(f"s3://{s3_bucket}/{key}", b"x")
    result = read_samples(InputConfig(annotate={"videos": f"s3://{s3_bucket}/clips", "questions": ["q"]}))
    assert [s.video for s in result.samples] == [f"s3://{s3_bucket}/clips/deep/y.mp4", f"s3://{s3_bucket}/clips/x.mp4"]
    with pytest.raises(ManifestError, match="no files matching"):
        read_samples(InputConfig(annotate={"videos": f"s3://{s3_bucket}/empty", "questions": ["q"]}))


def test_s3_manifest_with_relative_s3_videos_end_to_end(s3_bucket):
    """Manifest and videos on S3: relative paths resolve under the manifest's prefix and load."""
    for n in (6, 9):
        storage.write_bytes(f"s3://{s3_bucket}/bench/videos/v{n}.mp4", counter_video_bytes(num_frames=n))
    rows = [
        {"video": "videos/v6.mp4", "question": "q", "answer": 1},
        {"video": "videos/v9.mp4", "question": "q", "answer": 2},
        {"video": "videos/missing.mp4", "question": "q"},
    ]
    storage.write_bytes(f"s3://{s3_bucket}/bench/manifest.jsonl", "\n".join(map(json.dumps, rows)).encode())
    result = read_samples(InputConfig(manifest=f"s3://{s3_bucket}/bench/manifest.jsonl"))
    assert [s.video for s in result.samples] == [
        f"s3://{s3_bucket}/bench/videos/v6.mp4",
        f"s3://{s3_bucket}/bench/videos/v9.mp4",
        f"s3://{s3_bucket}/bench/videos/missing.mp4",
    ]
    assert result.samples[0].dataset == "manifest"
    clip = load_clip(result.samples[1].video, VideoConfig(num_frames=3))
    assert [frame_index(f) for f in clip.frames] == [0, 4, 8]
    with pytest.raises(ManifestError, match="manifest not found"):
        read_samples(InputConfig(manifest=f"s3://{s3_bucket}/bench/nope.jsonl"))


def test_shard_key_is_stable_and_spread():
    # The same in every process and Python version (unlike hash()).
    assert shard_key("q1", 1000) == int.from_bytes(hashlib.sha256(b"q1").digest()[:8], "big") % 1000
    assert shard_key("q1", 8) == shard_key("q1", 8)
    counts = Counter(shard_key(f"sample-{i}", 8) for i in range(4000))
    assert set(counts) == set(range(8)) and min(counts.values()) > 400
    with pytest.raises(ValueError):
        shard_key("q1", 0)


def test_shard_key_same_in_another_process():
    code = "from vreason_batch.io.manifest_rows import shard_key; print(shard_key('abc', 97))"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == shard_key("abc", 97)


def test_text_only_rows_need_no_video(tmp_path):
    from vreason_batch.config import InputConfig
    from vreason_batch.io.manifest import read_samples

    m = tmp_path / "m.jsonl"
    m.write_text('{"question": "What is 2 + 3?", "answer": "5", "problem_type": "numerical"}\n')
    ok = read_samples(InputConfig(manifest=str(m), text_only=True)).samples
    assert ok[0].error_type is None and ok[0].video == ""
    # without text_only, a manifest with no video column at all is unusable: fail fast
    with pytest.raises(ManifestError, match="no video column") as e:
        read_samples(InputConfig(manifest=str(m)))
    assert "input.text_only: true" in str(e.value)


def test_id_set_matches_a_python_set_across_chunks_and_runs():
    import random

    from vreason_batch.io.manifest import IdSet

    rng = random.Random(0)
    ids = IdSet()
    reference: dict[str, bytes] = {}  # id -> the content it was first seen with
    found = 0
    for _ in range(60):  # 60 chunks: several merged runs
        chunk = [f"id{rng.randrange(5000)}" for _ in range(rng.randrange(1, 200))]
        # mostly the id's own content; now and then other content under a known id
        contents = [f"{i}/{rng.random() < 0.02}".encode() for i in chunk]
        expected, conflicts = [], []
        for k, (i, c) in enumerate(zip(chunk, contents)):
            expected.append(i not in reference)
            if i in reference and reference[i] != c:
                conflicts.append(k)
            reference.setdefault(i, c)
        assert ids.add_new(chunk, contents) == expected
        assert ids.conflicts == conflicts
        found += len(conflicts)
    assert found > 20  # the conflict path was exercised, in many chunks
    assert 1 < len(ids.runs) < 12 and sum(len(hi) for hi, _, _ in ids.runs) == len(reference)


def test_duplicates_across_id_chunks(tmp_path, monkeypatch):
    import vreason_batch.io.manifest as manifest

    monkeypatch.setattr(manifest, "ID_CHUNK", 3)
    # the same 7 samples again and again (another answer does not make another sample)
    rows = [{"id": f"s{i % 7}", "video": "a.mp4", "question": f"q{i % 7}", "answer": f"a{i}"} for i in range(20)]
    result = read(write_manifest(tmp_path / "m.jsonl", rows, "jsonl"))
    assert [s.sample_id for s in result.samples] == [f"s{i}" for i in range(7)]
    assert [s.answer_gt for s in result.samples] == [f"a{i}" for i in range(7)]  # first wins
    assert result.num_duplicates == 13
