"""Per-row decode state: the live rows' traces and batched tensors, and the one place rows leave.

A row is one sample in one mode. Its host-side facts and trace live in one `RowTrace`; everything
the step needs batched (the KV cache, masks, positions, policy, controller) lives in `DecodeState`
with one row per RowTrace, in the same order. `DecodeState.merge`, `retire` and `trim_left` are
the only code that index those tensors by row, and they follow the fields' declared axes.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch

from vreason_batch.engine.api import DecodeResult
from vreason_batch.engine import hf_standins
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


def cache_bytes(cache, rows: int | None = None) -> int:
    """Bytes of `rows` rows (default: all) of every layer's keys and values."""
    total = 0
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        n = k.shape[0] if rows is None else rows
        total += n * (k[0].numel() * k.element_size() + v[0].numel() * v.element_size())
    return total


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
    """The rows being decoded: a RowTrace each (None for a free slot), and everything batched over
    them, in the same row order.

    The driver's state is a fixed set of slots (`with_slots`): every tensor keeps one row per slot
    from the first step to the last, so no step changes a shape but the cache's length. `retire`
    frees the slots of finished rows (their state stays in place, masked: nothing is copied), `fill`
    writes newly started rows into free slots (their own prefill, right-aligned, is the only cache
    copied), and `trim_left` drops leading columns no live row needs (a view: nothing moves). The
    states that prefill.py starts are packed (no free slot); `merge` joins two of them. A new per-row
    tensor is one `_batched` field: these methods follow its axes (the cache, policy and controller
    have their own).
    """

    rows: list[RowTrace | None]
    cache: Any  # transformers DynamicCache; every layer's keys/values [b, kv_heads, S, head_dim]
    pad_mask: torch.Tensor = _batched(seq=1)  # [b, S] 1 where the cache holds a real token (padding is 0)
    next_ids: torch.Tensor = _batched()  # [b, 1] the token each row feeds next: the prompt's last, then its choices
    next_pos: torch.Tensor = _batched(row=-2)  # its position ids: [4, b, 1] (Qwen-VL text + mrope) or [b, 1]
    policy: PolicyState  # per-row EMA / peak / token count
    ctrl: ControllerState | None  # per-row dV and Adam state (None when no row is controlled)
    controlled: torch.Tensor = _batched()  # [b] bool: the row's mode updates dV (greedy rows never do)
    seed: torch.Tensor = _batched()  # [b] int64: the row's sampling key (sampling.row_seed)
    done: list[RowTrace] = field(default_factory=list)
    cache_index: list[int] | None = None  # rows of `cache` that are this state's rows (None: all, in order)

    @property
    def size(self) -> int:
        """Rows, free slots included."""
        return len(self.rows)

    @property
    def live(self) -> int:
        return sum(r is not None for r in self.rows)

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    @classmethod
    def _tensors(cls) -> list[tuple[str, int, int | None]]:
        """(name, row axis, sequence axis) of every `_batched` field."""
        return [(f.name, f.metadata["row"], f.metadata["seq"]) for f in fields(cls) if "row" in f.metadata]

    def own_cache(self):
        """A cache holding exactly this state's rows (a copy only when it shares its prefill's cache)."""
        if self.cache_index is None:
            return self.cache
        return cache_rows(self.cache, torch.tensor(self.cache_index, device=self.pad_mask.device))

    def cache_bytes(self) -> int:
        """Bytes of this state's rows' keys and values, over every layer."""
        return cache_bytes(self.cache, self.size if self.cache_index is None else len(self.cache_index))

    def packed(self) -> "DecodeState":
        """The same rows with a cache of their own (no `cache_index`)."""
        return self if self.cache_index is None else dataclasses.replace(self, cache=self.own_cache(), cache_index=None)

    @staticmethod
    def merge(a: "DecodeState", b: "DecodeState") -> "DecodeState":
        """a's rows then b's, in one packed state. The shorter cache is left-padded (masked), so every
        row's tokens keep their keys, values and positions; `done` rows of both are kept."""
        S = max(a.pad_mask.shape[1], b.pad_mask.shape[1])
        pa, pb = S - a.pad_mask.shape[1], S - b.pad_mask.shape[1]
        ca, cb = a.own_cache(), b.own_cache()
        kv = [(_cat_rows(la.keys, lb.keys, pa, pb, 0, 2), _cat_rows(la.values, lb.values, pa, pb, 0, 2))
              for la, lb in zip(ca.layers, cb.layers)]
        ctrl = None
        if a.ctrl is not None or b.ctrl is not None:
            ctrl = ControllerState.concat(_control(a).shift(pa), _control(b).shift(pb))
        tensors = {name: _cat_rows(getattr(a, name), getattr(b, name), pa, pb, row, seq)
                   for name, row, seq in DecodeState._tensors()}
        return DecodeState(rows=a.rows + b.rows, cache=_copy_cache(ca, kv), **tensors,
                           policy=PolicyState.concat(a.policy, b.policy), ctrl=ctrl, done=a.done + b.done)

    @classmethod
    def with_slots(cls, first: "DecodeState", slots: int, stats=None) -> "DecodeState":
        """`slots` slots holding `first`'s rows in slots 0.. and the rest free: the cache is allocated here,
        once, as long as `first`'s (and grows with decoding as a SlabLayer does)."""
        if first.size > slots:
            raise ValueError(f"{first.size} rows do not fit {slots} slots")
        S = first.pad_mask.shape[1]
        cache = copy.copy(first.cache)
        cache.layers = [copy.copy(layer) for layer in first.cache.layers]
        for layer, src in zip(cache.layers, first.cache.layers):
            hf_standins.allocate(layer, slots, S, src.keys, src.values)
        tensors = {}
        for name, row, _ in cls._tensors():
            t = getattr(first, name)
            shape = list(t.shape)
            shape[row] = slots
            tensors[name] = t.new_zeros(shape)
        blank = cls(rows=[None] * slots, cache=cache, **tensors, policy=PolicyState.new(slots, device=first.pad_mask.device), ctrl=None)
        blank.fill(list(range(first.size)), first, stats)
        return blank

    def fill(self, free: list[int], new: "DecodeState", stats=None) -> None:
        """Start `new`'s (packed) rows in the free slots `free`, in order: their keys and values are
        written into those slots, right-aligned with the live rows' (the columns before them zeroed
        and masked), and every per-row tensor takes their rows. Only when `new`'s cache is longer than
        this one does the whole cache move (every row padded on the left): counted in `stats`."""
        assert len(free) == new.size and all(self.rows[r] is None for r in free)
        S, Sn = self.pad_mask.shape[1], new.pad_mask.shape[1]
        copied = 0
        if Sn > S:
            copied += self._grow_left(Sn - S)
            S = Sn
        g = S - Sn
        dev = self.pad_mask.device
        idx = torch.tensor(free, dtype=torch.long, device=dev)
        src_rows = new.cache_index or list(range(new.size))
        for layer, src in zip(self.cache.layers, new.cache.layers):
            for t, s_t in ((layer.keys, src.keys), (layer.values, src.values)):
                if g:
                    t[:, :, :g].index_fill_(0, on(idx, t), 0)
                for slot, r in zip(free, src_rows):
                    t[slot, :, g:].copy_(s_t[r])
                    copied += s_t[r].numel() * s_t.element_size()
        for name, row, seq in self._tensors():
            t = getattr(new, name)
            setattr(self, name, getattr(self, name).index_copy(row, idx, t if seq is None else _pad_left(t, g, seq)))
        self.policy = self.policy.put(idx, new.policy)
        if self.ctrl is not None or new.ctrl is not None:
            self.ctrl = _control(self).put(idx, _control(new).shift(g))
        for slot, row in zip(free, new.rows):
            self.rows[slot] = row
        self.done.extend(new.done)
        if stats is not None:
            stats.admissions += 1
            stats.admitted_cache_bytes += new.cache_bytes()
            stats.copied_cache_bytes += copied

    def _grow_left(self, g: int) -> int:
        """`g` masked columns before every row's; returns the cache bytes copied."""
        copied = sum(hf_standins.pad_left(layer, g) for layer in self.cache.layers)
        for name, _, seq in self._tensors():
            if seq is not None:
                setattr(self, name, _pad_left(getattr(self, name), g, seq))
        if self.ctrl is not None:
            self.ctrl = self.ctrl.shift(g)
        return copied

    def retire(self, finished: list[int]) -> None:
        """Move rows `finished` (slot indices) to `done` and free their slots. Their state stays where it is,
        masked: no attention column (but the newest, their own, so their row stays finite), no control."""
        if not finished:
            return
        for r in finished:
            row = self.rows[r]
            peak = int(self.policy.peak_step[r])
            row.ema_peak_step = peak if peak >= 0 else None
            row.controller_updates = int(self.ctrl.updates[r]) if self.ctrl is not None else 0
            self.done.append(row)
            self.rows[r] = None
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[finished] = False
        keep = keep.to(self.pad_mask.device, non_blocking=True)
        self.pad_mask = self.pad_mask * keep[:, None]
        self.controlled = self.controlled & keep
        if self.ctrl is not None:
            self.ctrl = dataclasses.replace(self.ctrl, valid=self.ctrl.valid & keep[:, None])
        self.trim_left()

    def trim_left(self) -> None:
        """Drop the leading cache columns that are padding in every live row (a long row just left): views, no copy."""
        live = [i for i, r in enumerate(self.rows) if r is not None]
        if not live:
            return
        mask = self.pad_mask if len(live) == self.size else self.pad_mask[torch.tensor(live, device=self.pad_mask.device)]
        used = torch.nonzero(mask.any(dim=0))
        j = int(used[0]) if used.numel() else 0
        if j == 0:
            return
        for layer in self.cache.layers:
            hf_standins.drop_left(layer, j)
        for name, _, seq in self._tensors():
            if seq is not None:
                t = getattr(self, name)
                setattr(self, name, t.narrow(seq, j, t.shape[seq] - j))
        if self.ctrl is not None:
            self.ctrl = self.ctrl.shift(-j)


def _control(st: DecodeState) -> ControllerState:
    """`st`'s controller; an empty one (n = 0 positions) when none of its rows is controlled."""
    if st.ctrl is not None:
        return st.ctrl
    _, kv, _, d = st.cache.layers[-1].keys.shape  # [b, kv_heads, S, head_dim]
    return ControllerState.new(st.pad_mask.new_zeros((st.size, 1), dtype=torch.bool), kv, d)
