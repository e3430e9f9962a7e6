"""What callers hand the engine and get back: Request, DecodeSettings, DecodeResult, EngineStats.

Kept apart from the loop (state.py, prefill.py, step.py, driver.py) so that every piece of it can
name these types without importing the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vreason_batch.config import Config, ControllerConfig, DecodingConfig, LiteConfig
from vreason_batch.engine.modes import ModeSpec, get_mode
from vreason_batch.engine.prompting import ModelInputs
from vreason_batch.engine.sampling import Sampling


@dataclass(frozen=True)
class DecodeSettings:
    """What one decode needs from the config. Built by `build` / `from_config`; defaults live in config.py."""

    mode: ModeSpec
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    controller: ControllerConfig
    prune_ratio: float
    sampling: Sampling = Sampling()  # greedy unless decoding.temperature > 0

    @classmethod
    def build(cls, mode: str, decoding: DecodingConfig, controller: ControllerConfig, lite: LiteConfig) -> "DecodeSettings":
        sampling = Sampling(**{k: getattr(decoding, k) for k in DecodingConfig.SAMPLING_KEYS})
        return cls(mode=get_mode(mode), max_new_tokens=decoding.max_new_tokens, stop_strings=tuple(decoding.stop_strings),
                   controller=controller, prune_ratio=lite.prune_ratio, sampling=sampling)

    @classmethod
    def from_config(cls, cfg: Config, mode: str) -> "DecodeSettings":
        return cls.build(mode, cfg.decoding, cfg.controller, cfg.lite)


@dataclass
class DecodeResult:
    """One decoded sample. Every field except `token_ids` is the output column of the same name."""

    token_ids: list[int]
    output_text: str
    finish_reason: str  # eos | stop_string | max_new_tokens
    entropy: list[float]  # H_t before the update, one per output token
    entropy_post: list[float]  # entropy of the logits the token was chosen from (after the update)
    entropy_ema: list[float]
    alpha: list[int]  # 0 where no update was made
    controller_updates: int
    ema_peak_step: int | None
    num_prompt_tokens: int
    num_video_tokens: int
    num_video_tokens_kept: int
    num_output_tokens: int
    num_think_tokens: int
    latency_s: float  # from the start of the sample's prefill to its last token

    def columns(self) -> dict[str, Any]:
        """The output columns this result fills."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token_ids"}


@dataclass(frozen=True)
class Request:
    """One sample to decode in one or more modes, from one shared prefill.

    Requests with the same `video_key` carry the same frames (the same `pixel_values_videos`): the
    engine runs the vision tower once for them and prefills their common prompt prefix (system +
    video) once, each question's suffix after it.
    """

    key: Any  # the caller's id for the sample; results are keyed by (key, mode)
    inputs: ModelInputs
    modes: tuple[str, ...]
    video_key: str | None = None


@dataclass
class EngineStats:
    """What one `decode_requests` call did."""

    vision_encodes: int = 0  # vision-tower passes (one per distinct video in a prefill)
    prefill_tokens: int = 0  # prompt tokens run through a prefill forward (padding excluded)
    decode_steps: int = 0  # decode_one_token calls
    busy_slot_steps: int = 0  # sum over steps of the live rows
    slot_steps: int = 0  # sum over steps of the slots
    queued_busy_slot_steps: int = 0  # the same two, over the steps taken while rows still waited for a slot
    queued_slot_steps: int = 0
    output_tokens: int = 0
    admissions: int = 0  # packed states written into free slots (DecodeState.fill)
    admitted_cache_bytes: int = 0  # the admitted rows' own keys and values (their prefill), summed
    copied_cache_bytes: int = 0  # cache bytes copied to admit them (goal: admitted_cache_bytes)

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0

    @property
    def occupancy_while_queued(self) -> float:
        """Occupancy before the drain: once nothing waits, the last rows run out with slots free."""
        return self.queued_busy_slot_steps / self.queued_slot_steps if self.queued_slot_steps else 0.0

    def count_step(self, live: int, slots: int, queued: bool) -> None:
        """One decode step of `live` busy rows on `slots` slots; `queued`: rows waited for a slot."""
        self.decode_steps += 1
        self.busy_slot_steps += live
        self.slot_steps += slots
        if queued:
            self.queued_busy_slot_steps += live
            self.queued_slot_steps += slots

    def add(self, other: "EngineStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
