"""Input sample records and THE one explicit Arrow schema of the output Parquet.

The output schema is versioned: bump SCHEMA_VERSION on any change and document it in the README.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 3

PROBLEM_TYPES = ("multiple_choice", "numerical", "regression", "free_form")

# `media_type` column: how the row's media reached the model. Version 2 added the column.
MEDIA_TYPES = ("video", "image_as_video", "text")

# `video_backend` column: the reader that decoded the row's media. Version 3 added the column.
VIDEO_BACKENDS = ("decord", "pyav", "pillow")

# Error types written to the `error_type` column. Stable strings: analysts filter on them.
ERROR_TYPES = (
    "bad_manifest_row",  # a manifest row that cannot run: no question / video, or a line that is not JSON
    "video_not_found",  # missing file or key
    "video_empty",  # zero-byte file
    "video_unreadable",  # not a video, truncated, no decodable frames
    "video_too_large",  # absurd resolution
    "decode_error",  # the model failed on this sample
    "out_of_memory",  # the sample does not fit the device even alone, on one slot
    "internal_error",  # anything else; a bug to report
)


@dataclass
class Sample:
    """One question about one video, as read from a manifest (or the annotation crossing)."""

    sample_id: str
    video: str
    question: str
    dataset: str = ""
    options: list[str] = field(default_factory=list)
    answer_gt: str | None = None
    problem_type: str = "free_form"
    # A manifest row that cannot be run is carried through as an error row, never dropped.
    error_type: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("video", pa.string()),
        pa.field("media_type", pa.string()),
        pa.field("video_backend", pa.string()),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("problem_type", pa.string()),
        pa.field("answer_gt", pa.string()),
        pa.field("output_text", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("score", pa.float32()),
        pa.field("finish_reason", pa.string()),
        pa.field("entropy", pa.list_(pa.float32())),
        pa.field("entropy_post", pa.list_(pa.float32())),
        pa.field("entropy_ema", pa.list_(pa.float32())),
        pa.field("alpha", pa.list_(pa.int8())),
        pa.field("num_prompt_tokens", pa.int32()),
        pa.field("num_video_tokens", pa.int32()),
        pa.field("num_video_tokens_kept", pa.int32()),
        pa.field("num_output_tokens", pa.int32()),
        pa.field("num_think_tokens", pa.int32()),
        pa.field("controller_updates", pa.int32()),
        pa.field("ema_peak_step", pa.int32()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("num_frames", pa.int32()),
        pa.field("video_fps", pa.float32()),
        pa.field("sampled_fps", pa.float32()),
        pa.field("video_duration_s", pa.float32()),
        pa.field("frame_height", pa.int32()),
        pa.field("frame_width", pa.int32()),
        pa.field("latency_s", pa.float64()),
        pa.field("error_type", pa.string()),
        pa.field("error", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"vreason_batch.schema_version": str(SCHEMA_VERSION)},
)

OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)


def empty_row() -> dict[str, Any]:
    """A row with every output column present (None), so no stage forgets one."""
    return {name: None for name in OUTPUT_COLUMNS}


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with exactly the output columns) -> a table in THE schema; extra keys are an error."""
    for r in rows:
        extra = set(r) - set(OUTPUT_COLUMNS)
        if extra:
            raise ValueError(f"row has columns not in the output schema: {sorted(extra)}")
    cols = {name: [r.get(name) for r in rows] for name in OUTPUT_COLUMNS}
    return pa.Table.from_pydict(cols, schema=OUTPUT_SCHEMA)
