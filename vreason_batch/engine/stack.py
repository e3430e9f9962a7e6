"""The decoder layers before the last, for one decode token: the model's own modules, run by us.

HF's forward does more per decode step than the arithmetic: it re-derives the positions and the
mask mapping, dispatches each layer's attention through its interface and reshapes the grouped
heads there, runs every linear on [b, 1, D] (two views around each GEMM) and walks the cache
object: 76 PyTorch ops a layer on the tiny Qwen2.5-VL, each a kernel launch on a GPU, where this
module's layer takes 49 (`bench --workload step`). For the models the engine's last layer
supports (Llama / Qwen2 / Qwen2-VL / Qwen2.5-VL decoder layers, full attention, sdpa, one device)
the step runs the same modules itself, on rows of [b, D]:

    x = embed(ids); cos, sin = the model's rotary module at the step's positions
    per layer: h = input_norm(x); q, k, v = projections of h; RoPE on q, k;
               k, v written into the slab cache's next column (hf_standins.slab_buffers);
               a = SDPA(q grouped by kv head, the cache's keys and values, the step's mask)
               x = x + o_proj(a); x = x + mlp(post_norm(x))

The same modules in the same order, and the same SDPA call as HF's sdpa path for a single query
(the query heads grouped by the kv head they read, as its `pack_gqa`), so the same numbers: tested
bit for bit against HF's forward (tests/engine/test_stack.py). Any other model keeps HF's forward
(`unsupported` says why). With runtime.compile a layer runs as one `torch.compile` graph, the
same graph for every layer (`fullgraph=True`: a graph break is an error; dynamic in the batch, the
cache's capacity and its filled length), the cache written in place: with the last layer's two
(last_layer.py), the greedy step is three graphs, whatever the model's depth.
"""

from __future__ import annotations

import torch

from vreason_batch.engine import hf_standins
from vreason_batch.engine.last_layer import rope_factors, rope_one

# text configs whose decoder layer is the pre-norm RoPE attention + gated MLP this module runs
_ARCHS = frozenset({"llama", "qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"})


def unsupported(lm) -> str | None:
    """Why `lm`'s layers before the last cannot run here (None: they can)."""
    tm = lm.text_model()
    cfg = tm.config
    if cfg.model_type not in _ARCHS:
        return f"model type {cfg.model_type!r}"
    if cfg._attn_implementation != "sdpa":
        return f"attention {cfg._attn_implementation!r} (only sdpa)"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(lm.model, "hf_device_map", None) and len(set(lm.model.hf_device_map.values())) > 1:
        return "a model placed over several devices"
    if not all(hasattr(tm, n) for n in ("embed_tokens", "rotary_emb", "layers")):
        return f"{type(tm).__name__} has no embed_tokens / rotary_emb / layers"
    for layer in list(tm.layers)[:-1]:
        attn = getattr(layer, "self_attn", None)
        if attn is None or any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm", "sliding_window")):
            return f"{type(layer).__name__}: not a plain RoPE attention layer"
    return None


class Stack:
    """The layers before the last of a supported model (`unsupported(lm)` is None), as the module docstring says."""

    def __init__(self, lm, compiled: bool = False) -> None:
        tm = lm.text_model()
        cfg = tm.config
        self.embed, self.rotary, self.vl = tm.embed_tokens, tm.rotary_emb, lm.is_vl
        self.layers = list(tm.layers)[:-1]  # module references: the last layer's stand-in never enters
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # runtime.compile: one graph for a layer, reused by every layer (their modules are the graph's
        # inputs, not constants: dynamo inlines nn modules), so the compile cost does not grow with depth
        self._compiled_layer = torch.compile(self._layer, dynamic=True, fullgraph=True) if compiled else None

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache):
        """ids [b, 1]; position_ids [4, b, 1] (Qwen-VL: text + mrope) or [b, 1]; mask [b, 1, 1, S] additive,
        S = the cache's filled columns + 1. Fills every earlier layer's next cache column; returns the
        last layer's input [b, 1, D] and the step's RoPE (last_layer.rope_factors), for the last layer too."""
        # rows of [b, D] throughout: a linear of a 2D input is one GEMM and a transpose view, where one of
        # [b, 1, D] adds two views (the same GEMM, the same numbers); and every layer's input a tensor of its
        # own, not a view, as the later layers' are (torch.compile guards on it: else a second graph)
        x = self.embed(ids[:, 0])
        if self.vl and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]  # the rotary takes the 3 mrope rows (HF's text model does the same)
        rope = rope_factors(*self.rotary(x, position_ids))  # the rotary reads x's dtype and device alone
        layers = cache.layers[: len(self.layers)]
        layer_fn = self._compiled_layer or self._layer
        for layer, cache_layer in zip(self.layers, layers):
            kb, vb, first, n = hf_standins.slab_buffers(cache_layer)  # each layer's own: its buffers may differ
            x = layer_fn(layer, x, rope, mask, kb, vb, first, first + n)
            hf_standins.advance(cache_layer)
        return x[:, None], rope

    def _layer(self, layer, x, rope, mask, kb, vb, first: int, n: int):
        """One decoder layer (x [b, D]), as HF's sdpa path computes it for a single query (module docstring):
        writes column n of the layer's key and value buffers, attends over their columns first..n."""
        b = x.shape[0]
        H, kv, d = self.heads, self.kv_heads, self.head_dim
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        # a slice, not kb[:, :, n]: an int index makes torch.compile specialise on n (a graph per cache length)
        kb[:, :, n:n + 1] = rope_one(attn.k_proj(h).view(b, kv, 1, d), rope)
        vb[:, :, n:n + 1] = attn.v_proj(h).view(b, kv, 1, d)
        q = rope_one(attn.q_proj(h).view(b, kv, H // kv, d), rope)  # heads grouped by the kv head they read
        a = torch.nn.functional.scaled_dot_product_attention(
            q, kb[:, :, first:n + 1], vb[:, :, first:n + 1], attn_mask=mask, scale=attn.scaling)
        x = x + attn.o_proj(a.reshape(b, H * d))
        return x + layer.mlp(layer.post_attention_layernorm(x))
