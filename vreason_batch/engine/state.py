"""Per-row decode state: the live rows' traces and batched tensors, and the one place rows leave.

A row is one sample in one mode. Its host-side facts and trace live in one `RowTrace`; everything
the step needs batched (the KV cache, masks, positions, policy, controller) lives in `DecodeState`
with one row per RowTrace, in the same order. `DecodeState.merge`, `retire` and `trim_left` are
the only code that index those tensors by row, and they follow the fields' declared axes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch

from vreason_batch.engine.api import DecodeResult
from vreason_batch.engine.controller import ControllerState, PolicyState


class TokenRecord(NamedTuple):
    """What one decode step left in one row's trace: a value for each per-token output column."""

    entropy: float  # H_t before the update
    entropy_post: float  # entropy of the logits the token was chosen from
    entropy_ema: float
    alpha: int  # 0 where no update was made


@dataclass
class RowTrace:
    """What one row (a sample in one mode) has produced so far; becomes a DecodeResult when it leaves."""

    key: Any  # the caller's id for the sample
    mode: str
    num_prompt_tokens: int
    num_video_tokens: int
    num_video_tokens_kept: int
    t_start: float  # when the row's prefill began (perf_counter)
    token_ids: list[int] = field(default_factory=list)  # the output tokens: a final EOS is not one
    steps: list[TokenRecord] = field(default_factory=list)  # one per decode step, a final EOS included
    tokens_seen: int = 0  # decode steps this row has taken: a host copy of its policy's `steps`, read without a sync
    finish_reason: str = "max_new_tokens"
    latency_s: float = 0.0
    controller_updates: int = 0
    ema_peak_step: int | None = None

    def result(self, tokenizer) -> DecodeResult:
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        n_out = len(self.steps)
        trace = {name: [getattr(s, name) for s in self.steps] for name in TokenRecord._fields}
        return DecodeResult(
            token_ids=self.token_ids, output_text=text, finish_reason=self.finish_reason, **trace,
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


def on(idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`idx` on `t`'s device (a sharded model's cache layers live on their layers' devices); no copy when it is there."""
    return idx if idx.device == t.device else idx.to(t.device, non_blocking=True)


def _copy_cache(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache of the same kind as `cache` holding the given per-layer (keys, values)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer, (k, v) in zip(new.layers, kv):
        layer.keys, layer.values = k, v
    return new


def cache_rows(cache, idx: torch.Tensor):
    """A new cache of the same kind holding rows `idx` [r] of `cache` (which is left as it is)."""
    return _copy_cache(cache, [(layer.keys[on(idx, layer.keys)], layer.values[on(idx, layer.keys)]) for layer in cache.layers])


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x with `n` zeros prepended along `dim`."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _cat_rows(a: torch.Tensor, b: torch.Tensor, pa: int, pb: int, row: int, seq: int | None) -> torch.Tensor:
    """a's rows then b's along axis `row`; with a sequence axis `seq`, left-padded by pa / pb first."""
    if seq is not None:
        a, b = _pad_left(a, pa, seq), _pad_left(b, pb, seq)
    return torch.cat([a, b], dim=row)


def _batched(row: int = 0, seq: int | None = None):
    """A DecodeState tensor with one entry per live row along axis `row`; `seq` is its cache-sequence
    axis, if it has one (left-padded by `merge`, cut by `trim_left` together with the cache)."""
    return field(metadata={"row": row, "seq": seq})


@dataclass
class DecodeState:
    """The live rows: one RowTrace each, and everything batched over them, in the same row order.

    Rows come and go while decoding (continuous batching): `merge` joins two states (the shorter
    cache is left-padded, and controller positions move with it), `retire` is the one place rows
    leave, `trim_left` drops the padding no live row needs. A new per-row tensor is one `_batched`
    field: those three follow its axes (the cache, policy and controller have their own select,
    concat and shift).
    """

    rows: list[RowTrace]
    cache: Any  # transformers DynamicCache; every layer's keys/values [b, kv_heads, S, head_dim]
    pad_mask: torch.Tensor = _batched(seq=1)  # [b, S] 1 where the cache holds a real token (padding is 0)
    next_ids: torch.Tensor = _batched()  # [b, 1] the token each row feeds next: the prompt's last, then its choices
    next_pos: torch.Tensor = _batched(row=-2)  # its position ids: [4, b, 1] (Qwen-VL text + mrope) or [b, 1]
    policy: PolicyState  # per-row EMA / peak / token count
    ctrl: ControllerState | None  # per-row dV and Adam state (None when no row is controlled)
    controlled: torch.Tensor = _batched()  # [b] bool: the row's mode updates dV (greedy rows never do)
    seed: torch.Tensor = _batched()  # [b] int64: the row's sampling key (sampling.row_seed)
    done: list[RowTrace] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.rows)

    @classmethod
    def _tensors(cls) -> list[tuple[str, int, int | None]]:
        """(name, row axis, sequence axis) of every `_batched` field."""
        return [(f.name, f.metadata["row"], f.metadata["seq"]) for f in fields(cls) if "row" in f.metadata]

    @staticmethod
    def merge(a: "DecodeState", b: "DecodeState") -> "DecodeState":
        """a's rows then b's, in one state. The shorter cache is left-padded (masked), so every
        row's tokens keep their keys, values and positions; `done` rows of both are kept."""
        S = max(a.pad_mask.shape[1], b.pad_mask.shape[1])
        pa, pb = S - a.pad_mask.shape[1], S - b.pad_mask.shape[1]
        kv = [(_cat_rows(la.keys, lb.keys, pa, pb, 0, 2), _cat_rows(la.values, lb.values, pa, pb, 0, 2))
              for la, lb in zip(a.cache.layers, b.cache.layers)]
        ctrl = None
        if a.ctrl is not None or b.ctrl is not None:
            ca, cb = (s.ctrl if s.ctrl is not None else _no_control(s) for s in (a, b))
            ctrl = ControllerState.concat(ca.shift(pa), cb.shift(pb))
        tensors = {name: _cat_rows(getattr(a, name), getattr(b, name), pa, pb, row, seq)
                   for name, row, seq in DecodeState._tensors()}
        return DecodeState(rows=a.rows + b.rows, cache=_copy_cache(a.cache, kv), **tensors,
                           policy=PolicyState.concat(a.policy, b.policy), ctrl=ctrl, done=a.done + b.done)

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
        self._select([r for r in range(len(self.rows)) if r not in gone])
        self.trim_left()

    def _select(self, keep: list[int]) -> None:
        """Keep rows `keep` (indices into the live rows), in that order, in every per-row field."""
        self.rows = [self.rows[r] for r in keep]
        idx = torch.tensor(keep, dtype=torch.long, device=self.pad_mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[on(idx, layer.keys)], layer.values[on(idx, layer.keys)]
        for name, row, _ in self._tensors():
            setattr(self, name, getattr(self, name).index_select(row, idx))
        self.policy = self.policy.select(idx)
        if self.ctrl is not None:
            self.ctrl = self.ctrl.select(idx)

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
        for name, _, seq in self._tensors():
            if seq is not None:
                t = getattr(self, name)
                setattr(self, name, t.narrow(seq, j, t.shape[seq] - j))
        if self.ctrl is not None:
            self.ctrl = self.ctrl.shift(-j)


def _no_control(st: DecodeState) -> ControllerState:
    """An empty controller for a state whose rows are all uncontrolled (n = 0 positions)."""
    _, kv, _, d = st.cache.layers[-1].keys.shape  # [b, kv_heads, S, head_dim]
    return ControllerState.new(st.pad_mask.new_zeros((st.size, 1), dtype=torch.bool), kv, d)
