"""The one typed config: pydantic models (unknown keys are errors), YAML loading, dotted overrides.

Validated at the edge (CLI / job entrypoint) before any cluster work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vreason_batch.engine.modes import MODE_NAMES  # the decoding modes' one registry

Mode = Literal[MODE_NAMES]  # type: ignore[valid-type]
Rule = Literal["paper", "switch", "always_min", "always_max"]  # controller.RULES
ValueNorm = Literal["vector", "block", "none"]  # controller.VALUE_NORMS


class ConfigError(ValueError):
    """A config that cannot be used; the message is meant for the command line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnMap(_Strict):
    """Names of the manifest columns, so benchmark exports load without conversion."""

    video: str = Field("video", description="column holding the video path or URI")
    question: str = Field("question", description="column holding the question text")
    options: str = Field("options", description="column holding a list of answer options (optional)")
    answer: str = Field("answer", description="column holding the ground-truth answer (optional)")
    id: str = Field("id", description="column holding a stable sample id (optional)")
    dataset: str = Field("dataset", description="column holding the dataset name (optional)")
    problem_type: str = Field("problem_type", description="column holding the problem type (optional)")


class AnnotateConfig(_Strict):
    """Annotation mode: every video under a directory / S3 prefix crossed with fixed questions."""

    videos: str = Field(..., description="local directory, glob, or s3:// prefix of videos")
    pattern: str = Field("*.mp4", description="file-name glob applied under `videos`")
    questions: list[str] = Field(..., min_length=1, description="questions asked of every video")
    dataset: str = Field("annotation", description="dataset name written to every row")


class InputConfig(_Strict):
    manifest: str | None = Field(None, description="manifest path or s3:// URI (jsonl, json, parquet, csv)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = Field(
        "auto", description="manifest format; auto = from the file extension"
    )
    video_root: str | None = Field(None, description="base for relative video paths; default: the manifest's folder")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="manifest column names")
    annotate: AnnotateConfig | None = Field(None, description="annotation mode instead of a manifest")
    limit: int | None = Field(None, ge=1, description="only the first N samples (after de-duplication)")
    text_only: bool | None = Field(
        None, description="rows carry no video (text questions for a text LM); null = true when the model cannot"
        " take video (a .gguf file, builtin:smollm2-135m-instruct, a local checkpoint without a vision tower)")

    @model_validator(mode="after")
    def _one_source(self) -> "InputConfig":
        if (self.manifest is None) == (self.annotate is None):
            raise ValueError("set exactly one of input.manifest and input.annotate")
        return self


# Output columns a writer may partition by: few distinct values each, so a directory per value stays small.
PARTITION_COLUMNS = ("dataset", "mode", "model", "problem_type")


class OutputConfig(_Strict):
    uri: str = Field(..., description="local directory or s3://bucket/prefix for the Parquet output")
    partition_by: list[str] = Field(
        default_factory=list,
        description=f"output columns for Hive-style directories (col=value/...), in order; any of "
        f"{', '.join(PARTITION_COLUMNS)}; [] = one flat directory",
    )
    rows_per_file: int = Field(256, ge=1, description="result rows per Parquet file (one file per shard)")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression")
    flush_interval_s: float = Field(
        60.0, gt=0, description="finished rows are written at least this often, even before rows_per_file of them"
    )
    lease_ttl_s: float = Field(
        120.0, ge=5, description="the run's lease on output.uri expires this long after its last renewal "
        "(a killed run blocks the output this long); keep it well above clock skew between drivers",
    )

    @field_validator("partition_by")
    @classmethod
    def _partition_columns(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in PARTITION_COLUMNS]
        if unknown:
            raise ValueError(f"output.partition_by: {unknown} cannot partition the output; allowed: {list(PARTITION_COLUMNS)}"
                             " (low-cardinality output columns)")
        if len(set(v)) != len(v):
            raise ValueError(f"output.partition_by has duplicates: {v}")
        return v


class ModelConfig(_Strict):
    name_or_path: str = Field(
        "builtin:tiny-qwen2.5-vl",
        description="local dir, s3:// prefix, hub id, a .gguf file, or builtin:tiny-qwen2.5-vl (random weights: noise)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel for the language model"
    )
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the checkpoint")
    cache_dir: str = Field(
        "~/.cache/vreason-batch/models", description="where s3:// checkpoints are downloaded, once per node"
    )
    tokenizer: str | None = Field(None, description="tokenizer dir when it is not next to the weights")
    seed: int = Field(0, description="seed of the built-in random model")


class DecodingConfig(_Strict):
    modes: list[Mode] = Field(["greedy", "vreason"], min_length=1, description="one output row per sample per mode")
    max_new_tokens: int = Field(1024, ge=1, description="hard cap on generated tokens")
    stop_strings: list[str] = Field(["</answer>"], description="stop once the output ends with one of these")
    prompt: Literal["reasoning", "plain", "video_r1"] = Field(
        "reasoning", description="prompt template: reasoning (<think>/<answer>), plain, or video_r1 (Video-R1's eval prompt)"
    )
    system_prompt: str = Field("You are a helpful assistant.", description="system message")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (argmax); > 0 samples from softmax(logits / T)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sampling: keep the most likely tokens whose mass reaches top_p")
    top_k: int = Field(0, ge=0, description="sampling: keep the k most likely tokens (0 = off)")
    min_p: float = Field(0.0, ge=0.0, lt=1.0, description="sampling: drop tokens under min_p x the most likely one's probability")
    seed: int = Field(0, ge=0, description="sampling: the run's seed; each (sample, mode) row draws from its own stream")

    SAMPLING_KEYS: ClassVar[tuple[str, ...]] = ("temperature", "top_p", "top_k", "min_p", "seed")

    @field_validator("modes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"decoding.modes has duplicates: {v}")
        return v


class ControllerConfig(_Strict):
    lr: float = Field(1e-3, ge=0.0, description="Adam learning rate on dV (0 = the base model)")
    update_every: int = Field(2, ge=1, description="k: update dV every k generated tokens")
    steps_per_update: int = Field(1, ge=1, description="Adam steps per update")
    rule: Rule = Field(
        "paper",
        description="alpha policy (alpha +1 = lower entropy, the paper's alpha_k = -1; -1 = raise it): paper (default,"
        " the paper's rule: raise entropy while its EMA is at its running max, lower it whenever the EMA is below)"
        " | switch (this project's earlier rule, written before the paper's was known) | always_min | always_max",
    )
    value_norm: ValueNorm = Field(
        "vector",
        description="how dV changes the controlled values: vector (the paper's norm-keeping (V + dV) / ||V + dV|| *"
        " ||V||, norm per value vector over head_dim) | block (the same, one norm over a row's whole controlled"
        " block) | none (V + dV, this project's earlier additive update)",
    )
    reset_moments_on_switch: bool = Field(
        False,
        description="restart Adam (moments and step count) on an update whose alpha differs from the row's last one,"
        " so the first step after a switch goes the new way; false = the paper as written (one Adam throughout)",
    )
    ema_beta: float = Field(0.9, ge=0.0, lt=1.0, description="EMA factor of the entropy trend (every rule)")
    delta: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="EMA peak is passed at (1-delta) * running max (switch rule, and the ema_peak_step column)",
    )
    min_explore_tokens: int = Field(
        16, ge=0, description="no peak before this many tokens (switch rule, and the ema_peak_step column)"
    )
    peak_from_step: int = Field(
        0, ge=0, description="the EMA running max ignores earlier steps (chat models open with one high-entropy token);"
        " the paper rule explores until then",
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2")
    adam_eps: float = Field(1e-8, gt=0.0, description="Adam epsilon")
    positions: Literal["auto", "video", "prompt"] = Field(
        "auto", description="where dV lives: video tokens, or all prompt tokens; auto = video if any, else prompt"
    )


class LiteConfig(_Strict):
    prune_ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of video tokens dropped after prefill")


class VideoConfig(_Strict):
    num_frames: int = Field(16, ge=1, le=512, description="frames sampled uniformly (when target_fps is unset)")
    target_fps: float | None = Field(None, gt=0, description="sample at this rate instead, up to max_frames")
    max_frames: int = Field(32, ge=1, le=512, description="cap on frames with target_fps")
    min_pixels: int = Field(128 * 28 * 28, ge=28 * 28, description="min pixels per frame after resize")
    max_pixels: int = Field(768 * 28 * 28, ge=28 * 28, description="max pixels per frame after resize")
    max_source_pixels: int = Field(
        7680 * 4320, ge=1, description="reject sources larger than this (width * height): absurd resolutions"
    )
    backend: Literal["auto", "decord", "pyav"] = Field(
        "auto", description="video decoder: `decord`, `pyav` (frame-accurate on every container), or `auto`: "
        "PyAV for MPEG-TS / PS, AV1 and codecs decord was not found right on, frames under 80 pixels a side; "
        "decord for H.264 / HEVC / VP9 / MPEG-4 / MJPEG / ProRes / FFV1 elsewhere, "
        "PyAV again when decord fails on a file (the file is probed, not its name); images and animated "
        "GIF / WebP are read with Pillow whatever this says",
    )

    @model_validator(mode="after")
    def _pixels(self) -> "VideoConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError("video.min_pixels must be <= video.max_pixels")
        return self


class RuntimeConfig(_Strict):
    batch_size: int = Field(
        16, ge=1, description="samples per model-actor call (one Ray Data batch, whole videos: about this many); "
        "the actor decodes their (sample, mode) rows through `decode_slots` slots, so a few times "
        "decode_slots / modes keeps the slots full",
    )
    decode_slots: int = Field(8, ge=1, description="(sample, mode) rows decoding together in a model actor; a slot "
                              "is refilled with the next row as soon as its row finishes")
    num_actors: int | list[int] = Field(
        1, description="model actors (one model each); [min, max]: an autoscaling pool that starts with min and "
        "grows to max while the cluster has room (a KubeRay GPU group that scales up gets more actors)",
    )
    num_gpus_per_actor: float = Field(
        0.0, ge=0.0, description="GPUs per model actor (0 on CPU); a whole N > 1 shards the model over the actor's "
        "N GPUs (accelerate's device map; the last layer, final norm and lm_head on one GPU)",
    )
    max_memory: dict[str, str] = Field({}, description="memory each device of a model actor may hold (accelerate's "
                                       "max_memory, {'0': '70GiB', 'cpu': '200GiB'}); what finds no room is offloaded")
    offload_folder: str | None = Field(None, description="where a model actor keeps layers offloaded to disk")
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs reserved per model actor")
    video_workers: int = Field(1, ge=1, description="concurrent CPU tasks decoding video")
    max_task_retries: int = Field(2, ge=0, description="Ray retries of a video task / model batch whose worker "
                                  "died (crash, node loss)")
    progress_interval_s: float = Field(10.0, gt=0, description="seconds between progress lines")
    max_pipeline_restarts: int = Field(3, ge=0, description="times a run rebuilds its pipeline for the rows still "
                                       "missing once Ray's own retries are spent on lost workers or nodes")
    calls_per_actor: int = Field(2, ge=1, description="calls (batches) a model actor holds at once on its decode_slots: "
                                 "the next call's rows fill the slots its last rows free (1: each call drains them)")
    compile: bool = Field(False, description="the decode step through torch.compile (three graphs), once per model "
                          "actor (about a minute on CPU); models engine/stack.py does not run keep HF's eager layers")
    max_samples_per_block: int = Field(
        32, ge=1, description="most samples per Ray Data input block (one video task); small runs use fewer so "
        "every model actor gets several blocks",
    )

    @field_validator("num_actors")
    @classmethod
    def _actor_pool(cls, v: int | list[int]) -> int | list[int]:
        lo, hi = (v, v) if isinstance(v, int) else (v[0], v[-1]) if len(v) == 2 else (0, 0)
        if lo < 1 or hi < lo:
            raise ValueError(f"{v}: a number of actors (at least 1), or [min, max] with 1 <= min <= max")
        return v

    @property
    def actor_pool(self) -> tuple[int, int]:
        """(min, max) model actors: equal for a fixed pool."""
        return (self.num_actors,) * 2 if isinstance(self.num_actors, int) else tuple(self.num_actors)

    @field_validator("num_gpus_per_actor")
    @classmethod
    def _whole_when_sharded(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"{v:g}: a model sharded over several GPUs takes a whole number of them (or at most 1)")
        return v


class Config(_Strict):
    """A whole job. Keys: input, output, model, decoding, controller, lite, video, runtime."""

    name: str = Field("vreason", description="job name, written to the run record")
    input: InputConfig
    output: OutputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    lite: LiteConfig = Field(default_factory=LiteConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def config_hash(self) -> str:
        """Hash of what changes a row's result: not the input list (it grows nightly), the output or sizing."""
        d = self.model_dump(mode="json")
        for k in ("input", "output", "runtime", "name"):
            d.pop(k, None)
        if self.decoding.temperature == 0:  # greedy: the sampling knobs change nothing (nor the hashes of earlier runs)
            for k in DecodingConfig.SAMPLING_KEYS:
                d["decoding"].pop(k)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


VL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")  # the checkpoints engine/loading.py loads with their vision tower


def model_takes_video(name_or_path: str) -> bool | None:
    """Whether the model can read video: True / False when the name tells (a .gguf is a text LM, the built-ins are
    known, a local checkpoint says it in config.json), else None (a hub id or s3:// prefix is not looked up)."""
    name = name_or_path.strip()
    if name.endswith(".gguf") or name == "builtin:smollm2-135m-instruct":
        return False
    if name == "builtin:tiny-qwen2.5-vl":
        return True
    config_json = Path(os.path.expanduser(name)) / "config.json"
    if "://" not in name and config_json.is_file():
        try:
            hf = json.loads(config_json.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return hf.get("model_type") in VL_MODEL_TYPES or "vision_config" in hf
    return None


def resolve_text_only(cfg: Config) -> Config:
    """input.text_only left null: true when the model cannot take video, else false."""
    if cfg.input.text_only is None:
        cfg.input.text_only = model_takes_video(cfg.model.name_or_path) is False
    return cfg


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(data: Any, where: str = "") -> Any:
    """Replace `${NAME}` in every string of a raw config with the environment variable NAME (a shipped
    config's one site-specific value, a data root); an unset variable is a ConfigError naming it."""
    if isinstance(data, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):
        def sub(m: re.Match) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                raise ConfigError(f"{where}: the config uses ${{{m.group(1)}}}; set that environment variable")
            return value

        return _ENV_REF.sub(sub, data)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides to a raw config dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = child
        try:  # values are YAML scalars / lists: `1e-3`, `true`, `[greedy, vreason]`, `null`
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def _format_validation(err: ValidationError) -> str:
    lines = (f"  {'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
    return "invalid config:\n" + "\n".join(lines)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Validate a raw config after `--set` overrides and `${ENV}` references are applied."""
    data = expand_env(apply_overrides(json.loads(json.dumps(data)), overrides or []))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e)) from None
    return resolve_text_only(cfg)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    return config_from_dict(data, overrides)
