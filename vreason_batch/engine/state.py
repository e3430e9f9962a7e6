"""Per-row decode state: the live rows' traces and batched tensors, and the one place rows leave.

A row is one sample in one mode. Its host-side facts and trace live in one `RowTrace`; everything
the step needs batched (the KV cache, masks, positions, policy, controller) lives in `DecodeState`
with one row per RowTrace, in the same order. `DecodeState.merge`, `retire` and `trim_left` are
the only code that index those tensors by row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from vreason_batch.engine.api import DecodeResult
from vreason_batch.engine.controller import ControllerState, PolicyState


@dataclass
class RowTrace:
    """What one row (a sample in one mode) has produced so far; becomes a DecodeResult when it leaves."""

    key: Any  # the caller's id for the sample
    mode: str
    num_prompt_tokens: int
    num_video_tokens: int
    num_video_tokens_kept: int
    t_start: float  # when the row's prefill began (perf_counter)
    token_ids: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    entropy_post: list[float] = field(default_factory=list)
    entropy_ema: list[float] = field(default_factory=list)
    alpha: list[int] = field(default_factory=list)
    finish_reason: str = "max_new_tokens"
    latency_s: float = 0.0
    controller_updates: int = 0
    ema_peak_step: int | None = None

    def result(self, tokenizer) -> DecodeResult:
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        n_out = len(self.entropy)
        return DecodeResult(
            token_ids=self.token_ids, output_text=text, finish_reason=self.finish_reason, entropy=self.entropy,
            entropy_post=self.entropy_post, entropy_ema=self.entropy_ema, alpha=self.alpha,
            controller_updates=self.controller_updates, ema_peak_step=self.ema_peak_step,
            num_prompt_tokens=self.num_prompt_tokens, num_video_tokens=self.num_video_tokens,
            num_video_tokens_kept=self.num_video_tokens_kept, num_output_tokens=n_out,
            num_think_tokens=_count_think_tokens(tokenizer, text, n_out), latency_s=self.latency_s,
        )


def _count_think_tokens(tokenizer, text: str, n_out: int) -> int:
    """Output tokens up to and including `</think>`; all of them if thinking never closed."""
    end = text.find("</think>")
    if end >= 0:
        return len(tokenizer(text[: end + len("</think>")], add_special_tokens=False)["input_ids"])
    return n_out if "<think>" in text else 0


def _copy_cache(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache of the same kind as `cache` holding the given per-layer (keys, values)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer, (k, v) in zip(new.layers, kv):
        layer.keys, layer.values = k, v
    return new


def cache_rows(cache, idx: torch.Tensor):
    """A new cache of the same kind holding rows `idx` [r] of `cache` (which is left as it is)."""
    return _copy_cache(cache, [(layer.keys[idx], layer.values[idx]) for layer in cache.layers])


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x with `n` zeros prepended along `dim`."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class DecodeState:
    """The live rows and everything indexed by them, in the same row order.

    Rows come and go while decoding (continuous batching): `merge` joins two states (the shorter cache is left-padded, and controller positions move with it),
    `retire` is the one place rows leave, `trim_left` drops the padding no live row needs.
    """

    rows: list[RowTrace]
    cache: Any  # transformers DynamicCache; every layer's keys/values [b, kv_heads, S, head_dim]
    pad_mask: torch.Tensor  # [b, S] 1 where the cache holds a real token (padding is 0)
    next_ids: torch.Tensor  # [b, 1] the token each row feeds next: the prompt's last, then its choices
    next_pos: torch.Tensor  # its position ids: [4, b, 1] (Qwen-VL text + mrope) or [b, 1]
    policy: PolicyState  # per-row EMA / peak / token count
    ctrl: ControllerState | None  # per-row dV and Adam state (None when no row is controlled)
    controlled: torch.Tensor  # [b] bool: the row's mode updates dV (greedy rows never do)
    done: list[RowTrace] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.rows)

    @staticmethod
    def merge(a: "DecodeState", b: "DecodeState") -> "DecodeState":
        """a's rows then b's, in one state. The shorter cache is left-padded (masked), so every
        row's tokens keep their keys, values and positions; `done` rows of both are kept."""
        S = max(a.pad_mask.shape[1], b.pad_mask.shape[1])
        pa, pb = S - a.pad_mask.shape[1], S - b.pad_mask.shape[1]
        kv = [(torch.cat([_pad_left(la.keys, pa, 2), _pad_left(lb.keys, pb, 2)]),
               torch.cat([_pad_left(la.values, pa, 2), _pad_left(lb.values, pb, 2)]))
              for la, lb in zip(a.cache.layers, b.cache.layers)]
        ctrl = None
        if a.ctrl is not None or b.ctrl is not None:
            ca, cb = (s.ctrl if s.ctrl is not None else _no_control(s) for s in (a, b))
            ctrl = ControllerState.concat(ca.shift(pa), cb.shift(pb))
        return DecodeState(
            rows=a.rows + b.rows, cache=_copy_cache(a.cache, kv),
            pad_mask=torch.cat([_pad_left(a.pad_mask, pa, 1), _pad_left(b.pad_mask, pb, 1)]),
            next_ids=torch.cat([a.next_ids, b.next_ids]), next_pos=torch.cat([a.next_pos, b.next_pos], dim=-2),
            policy=PolicyState.concat(a.policy, b.policy), ctrl=ctrl,
            controlled=torch.cat([a.controlled, b.controlled]), done=a.done + b.done,
        )

    def retire(self, finished: list[int]) -> None:
        """Move rows `finished` (indices into the live rows) to `done` and drop their state everywhere."""
        if not finished:
            return
        gone = set(finished)
        for r in finished:
            row = self.rows[r]
            peak = int(self.policy.peak_step[r])
            row.ema_peak_step = peak if peak >= 0 else None
            row.controller_updates = int(self.ctrl.updates[r]) if self.ctrl is not None else 0
            self.done.append(row)
        keep = [r for r in range(len(self.rows)) if r not in gone]
        self.rows = [self.rows[r] for r in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.pad_mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self.pad_mask, self.next_ids = self.pad_mask[idx], self.next_ids[idx]
        self.next_pos = self.next_pos[..., idx, :]
        self.policy = self.policy.select(idx)
        self.controlled = self.controlled[idx]
        if self.ctrl is not None:
            self.ctrl = self.ctrl.select(idx)
        self.trim_left()

    def trim_left(self) -> None:
        """Drop the leading cache columns that are padding in every live row (a long row just left)."""
        if not self.rows:
            return
        used = torch.nonzero(self.pad_mask.any(dim=0))
        j = int(used[0]) if used.numel() else 0
        if j == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, j:], layer.values[:, :, j:]
        self.pad_mask = self.pad_mask[:, j:]
        if self.ctrl is not None:
            self.ctrl = self.ctrl.shift(-j)


def _no_control(st: DecodeState) -> ControllerState:
    """An empty controller for a state whose rows are all uncontrolled (n = 0 positions)."""
    _, kv, _, d = st.cache.layers[-1].keys.shape  # [b, kv_heads, S, head_dim]
    return ControllerState.new(st.pad_mask.new_zeros((st.size, 1), dtype=torch.bool), kv, d)
