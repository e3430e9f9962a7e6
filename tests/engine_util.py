"""Shared, cached engine objects for tests: one tiny model per test process."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def tiny_lm():
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.loading import load_model

    return load_model(ModelConfig())


def random_frames(seed: int, t: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (t, h, w, 3), dtype=np.uint8)


def video_inputs(seed: int = 0, t: int = 4, h: int = 112, w: int = 112, question: str = "What colour is the car?"):
    """A small video prompt; different (t, h, w) give different numbers of video tokens."""
    from vreason_batch.engine.prompting import build_video_inputs

    lm = tiny_lm()
    return build_video_inputs(
        lm.tokenizer, lm.vision, random_frames(seed, t, h, w), 2.0, question, ["red", "blue", "green"],
        "multiple_choice", min_pixels=28 * 28 * 4, max_pixels=112 * 112,
    )


def decode_settings(mode: str, max_new_tokens: int, stop_strings=(), prune_ratio: float = 0.5, **controller):
    """DecodeSettings the way the pipeline builds them, from config sections (defaults from config.py)."""
    from vreason_batch.config import ControllerConfig, DecodingConfig, LiteConfig
    from vreason_batch.engine.api import DecodeSettings

    return DecodeSettings.build(
        mode, DecodingConfig(max_new_tokens=max_new_tokens, stop_strings=list(stop_strings)),
        ControllerConfig(**controller), LiteConfig(prune_ratio=prune_ratio),
    )
