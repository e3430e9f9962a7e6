"""The last decoder layer for the current token, at float32 precision, with dV in its value path.

Why this exists: V-Reason's controller dV lives in the last layer's values and its effect on the
logits is small by design. In a bfloat16 model, writing `base + dV` into the cache rounds it to
bf16 (dV moves in bf16-sized jumps, or not at all), and every later bf16 tensor (attention output,
residual stream, logits) rounds the effect again. So for the current token every mode computes:

    K, V (cache), q        model dtype, exactly as the model computes them
    P = softmax(q K^T)     fp32                                              [b, H, 1, S]
    attn = P V + P[pos] delta  fp32 (dV is never written into the cache)      [b, H, 1, d]

where delta = V_new[pos] - V[pos] is dV's change of the controlled value vectors, computed in
fp32 from the cache's values at those positions (controller.value_change: the paper's
norm-keeping `V_new = (V + dV) / ||V + dV|| * ||V||`, or `V + dV`). Only those [n] vectors are
upcast, never the cache.
    o_proj, residual, post-norm, gated MLP, residual, final norm, lm_head: fp32 activations

The weights stay in the model's dtype and are never copied whole: `linear32` multiplies fp32
activations by low-precision weights with fp32 accumulation and fp32 output (on CUDA one bf16
GEMM with fp32 output over a hi/lo split of the activations; elsewhere the weight is upcast in
chunks of rows). Memory above greedy is the controller state plus chunk-sized temporaries.

All modes share this path, so `lr = 0` equals greedy token for token in every dtype. Only the
last layer of the CURRENT token runs here: prefill runs it for keys and values alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vreason_batch.engine.models import LastLayerParts

log = logging.getLogger(__name__)

# Rows of a weight upcast at once on the chunked path: 16M elements (64 MB in fp32) at most.
_CHUNK_ELEMENTS = 1 << 24
# whether the fp32-output GEMM exists, decided once per (device, weight dtype) by `_out32_gemm_available`
_out32_gemm: dict[tuple, bool] = {}


def hi_lo_gemm(x: torch.Tensor, w: torch.Tensor, gemm) -> torch.Tensor:
    """x [M, K] fp32 @ w [K, N] (bf16/fp16) via one low-precision GEMM with fp32 output.

    x is split into hi + lo in w's dtype (hi = round(x), lo = round(x - hi)), which keeps about 16
    of fp32's 24 mantissa bits; both halves go through the same GEMM, so the weight is read once.
    gemm(a [2M, K], w) -> fp32 [2M, N].
    """
    hi = x.to(w.dtype)
    lo = (x - hi.float()).to(w.dtype)
    out = gemm(torch.cat([hi, lo]), w)
    return out[: x.shape[0]] + out[x.shape[0]:]


def _cuda_gemm_out32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, w, out_dtype=torch.float32)


def out32_gemm_supported(device_type: str, dtype, probe) -> bool:
    """Whether the fp32-output GEMM serves a weight of `dtype` on `device_type`: CUDA, bf16 or fp16,
    and `probe()` (one such GEMM on tiny tensors) runs. A TypeError or NotImplementedError from the
    probe (a torch whose mm has no `out_dtype`, or no kernel for it) is the one "no"; any other error
    is a real one and raises."""
    if device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        probe()
    except (TypeError, NotImplementedError) as e:
        log.info("fp32-output GEMM not available in torch %s (%s): weights are upcast in chunks", torch.__version__, e)
        return False
    return True


def _out32_gemm_available(w: torch.Tensor) -> bool:
    key = (w.device, w.dtype)
    if key not in _out32_gemm:
        def probe():
            tiny = torch.ones((2, 2), dtype=w.dtype, device=w.device)
            _cuda_gemm_out32(tiny, tiny)

        _out32_gemm[key] = out32_gemm_supported(w.device.type, w.dtype, probe)
    return _out32_gemm[key]


def _mm_out32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The CUDA fast path of `_matmul32`, or None where the fp32-output GEMM does not exist. An error
    inside it raises: it never switches the process to the slow path."""
    if not _out32_gemm_available(w):
        return None
    return hi_lo_gemm(x, w, _cuda_gemm_out32)


def _matmul32(x: torch.Tensor, w: torch.Tensor, transpose: bool) -> torch.Tensor:
    """fp32 x [M, K] times w^T (transpose, w [N, K]) or w (w [K, N]); w may be low precision."""
    wt = w.t() if transpose else w  # [K, N] view
    fast = _mm_out32(x, wt)
    if fast is not None:
        return fast
    # chunks along w's first dimension, whose rows are contiguous
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    if transpose:  # output columns = w's rows
        return torch.cat([x @ w[i:i + rows].float().t() for i in range(0, w.shape[0], rows)], dim=-1)
    out = None  # contraction over w's rows: sum partial products
    for i in range(0, w.shape[0], rows):
        part = x[:, i:i + rows] @ w[i:i + rows].float()
        out = part if out is None else out + part
    return out


class _Linear32(torch.autograd.Function):
    """y = x W^T + b for fp32 x and a low-precision W, fp32 out; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)  # a reference to the module's weight, not a copy
        y = _matmul32(x.reshape(-1, x.shape[-1]), weight, transpose=True)
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = _matmul32(grad.reshape(-1, grad.shape[-1]).float(), weight, transpose=False)
        return gx.reshape(*grad.shape[:-1], weight.shape[1]), None, None


def linear32(x: torch.Tensor, module) -> torch.Tensor:
    """An nn.Linear applied to fp32 activations with fp32 output, whatever the weight's dtype."""
    w, b = module.weight, module.bias
    if w.dtype == torch.float32:
        return torch.nn.functional.linear(x, w, b)
    return _Linear32.apply(x, w.detach(), None if b is None else b.detach())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, T, d]; cos/sin [b, T, d] (Qwen2.5-VL's mrope sections are already merged into them)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def rope_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One decode token's RoPE, once a step for every layer: (cos, signed sin, half), cos / sin [b, 1, d]
    -> [b, 1, 1, d]. `rope_one(x, factors)` == `_rope(x, cos, sin)` exactly: rotate_half(x) * sin ==
    roll(x, half) * (sin with its first half negated), as the sign of a product moves from a factor to
    the other without rounding, and the roll is rotate_half without its neg."""
    half = cos.shape[-1] // 2
    return cos[:, :, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, :, None], half


def rope_one(x: torch.Tensor, factors) -> torch.Tensor:
    """x [b, heads, 1, d] rotated by `rope_factors`' (cos, signed sin, half)."""
    c, s, half = factors
    return x * c + torch.roll(x, half, dims=-1) * s


@dataclass
class Attention:
    """The last layer's attention for the current token: what the logits need, independent of dV."""

    hidden_in: torch.Tensor  # [b, 1, D] the layer's input (residual stream), model dtype
    probs: torch.Tensor  # [b, H, 1, S] fp32
    base: torch.Tensor  # [b, H, 1, d] fp32: P @ V over the cache as stored (no dV)
    values: torch.Tensor  # [b, kv, S, d] the cache's values (model dtype; a reference, not a copy)


class LastLayer:
    """The last decoder layer + final norm + lm_head, as described in the module docstring."""

    def __init__(self, parts: LastLayerParts, compiled: bool = False, stack=None) -> None:
        self.p = parts
        self.stack = stack  # stack.Stack: the layers before this one, where the step runs them itself (else HF's forward)
        # runtime.compile: the two tensor functions of a step through torch.compile, one graph each
        # (fullgraph: a graph break is an error), dynamic in the batch and the cache length
        self._scores_fn, self._head_fn = self._scores, self._head
        if compiled:
            self._scores_fn = torch.compile(self._scores, dynamic=True, fullgraph=True)
            self._head_fn = torch.compile(self._head, dynamic=True, fullgraph=True)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.p.head_dim).transpose(1, 2)  # [b, heads, T, d]

    def extend_cache(self, hidden: torch.Tensor, cos, sin, cache_layer) -> torch.Tensor:
        """Append the keys/values of all T input positions to the cache; return the last position's query.

        hidden: [b, T, D] the layer's input. Returns q [b, H, 1, d] (model dtype, rotated).
        """
        p = self.p
        h = p.input_norm(hidden)
        k = _rope(self._split(p.k_proj(h), p.num_kv_heads), cos, sin)
        v = self._split(p.v_proj(h), p.num_kv_heads)
        cache_layer.update(k, v)
        return _rope(self._split(p.q_proj(h[:, -1:]), p.num_heads), cos[:, -1:], sin[:, -1:])

    def extend_cache_one(self, hidden: torch.Tensor, rope, cache_layer) -> torch.Tensor:
        """`extend_cache` for the decode step's one token (hidden [b, 1, D]; rope: `rope_factors` of its
        cos / sin), the same numbers in fewer ops: rows of [b, D] (a linear of a 2D input adds no views)."""
        p = self.p
        b = hidden.shape[0]
        h = p.input_norm(hidden[:, 0])
        k = p.k_proj(h).view(b, p.num_kv_heads, 1, p.head_dim)
        cache_layer.update(rope_one(k, rope), p.v_proj(h).view(b, p.num_kv_heads, 1, p.head_dim))
        return rope_one(p.q_proj(h).view(b, p.num_heads, 1, p.head_dim), rope)

    def attend(self, hidden: torch.Tensor, q: torch.Tensor, cache_layer, mask: torch.Tensor) -> Attention:
        """q [b, H, 1, d] against the whole cache; mask: the step's (models.step_mask), additive [b, 1, 1, S]
        or the padding mask [b, S] (1 = a real token)."""
        probs, base = self._scores_fn(q, cache_layer.keys, cache_layer.values, mask)
        return Attention(hidden_in=hidden[:, -1:], probs=probs, base=base, values=cache_layer.values)

    def _scores(self, q, keys, values, mask):
        """(P [b, H, 1, S], P @ V [b, H, 1, d]) in fp32; keys, values [b, kv, S, d] as stored."""
        b, H, _, d = q.shape
        kv = keys.shape[1]
        qg = q.float().reshape(b, kv, H // kv, d)  # heads grouped by the kv head they read
        scores = (qg @ keys.float().transpose(-1, -2)) * self.p.scaling  # [b, kv, groups, S]
        if mask.dim() == 4:  # additive, 0 or -inf (sdpa) / the dtype's min (eager): the same zero probabilities
            scores = scores + mask
        else:
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        base = probs @ values.float()  # [b, kv, groups, d]
        return probs.reshape(b, H, 1, -1), base.reshape(b, H, 1, d)

    def logits(self, att: Attention, delta: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [b, V] from the attention output (+ dV's share `delta` [b, H, 1, d], controller.value_delta)."""
        return self._head_fn(att.hidden_in, att.base if delta is None else att.base + delta)

    def _head(self, hidden_in, out):
        """o_proj, MLP, final norm and lm_head of the attention output `out` [b, H, 1, d]: fp32 logits [b, V]."""
        p = self.p
        b = out.shape[0]
        # rows of [b, H*d] (one query: the heads in HF's transpose-reshape order) and [b, D]: a linear of
        # a 2D input is one GEMM and a transpose view, where [b, 1, D] adds two views (the same GEMM)
        out = out.reshape(b, p.num_heads * p.head_dim)
        x = hidden_in.reshape(b, -1).float() + linear32(out, p.o_proj)  # residual stream, fp32
        h = p.post_norm(x)  # HF RMSNorm keeps an fp32 input in fp32
        x = x + linear32(p.act_fn(linear32(h, p.gate_proj)) * linear32(h, p.up_proj), p.down_proj)
        return linear32(p.final_norm(x), p.lm_head)
