"""The stages of the job, run in Ray workers, one a module: plain functions and one actor class, testable without Ray.

block of samples (the plan keeps each video's samples in one block) -> `video.video_stage` (CPU
tasks: each distinct video decoded once, its frames sampled and resized; one stage row per video,
carrying its frames once and the list of its samples with their pending modes) ->
`model.ModelStage` (GPU actors: one request per sample with all its modes; the calls in flight on
an actor feed its one engine run, `feeding.SharedEngine`; one output row per (sample, mode) in
OUTPUT_SCHEMA, a result or an error row). `healing` says what a failed decode does.
"""

from .model import ModelStage, model_batch_rows, model_needs_video
from .video import stage_schema, video_stage

__all__ = ["ModelStage", "model_batch_rows", "model_needs_video", "stage_schema", "video_stage"]
