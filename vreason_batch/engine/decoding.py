"""The one decode loop: every mode in modes.py, batched over the KV cache, with per-row traces.

Its shape follows gpt-fast's generate.py: `Prefilled` fills the cache with the prompts (all but
their last token) and starts rows from them; `decode_one_token` advances every live row by one
token; `DecodeState.retire` is the one place rows leave; `decode_requests` drives them with
continuous batching (`decode_batch` is its one-batch case).

Every token, the model runs up to the input of its last layer; the last layer, final norm and
lm_head for that token run in last_layer.py at float32 precision, where dV enters the attention
as `P[pos] @ dV` (README, "V-Reason, as implemented"). An update therefore re-runs only o_proj,
the MLP, the final norm and lm_head of the current token, forward and backward into dV, with the
attention probabilities P of that token reused. No graph outlives an update; earlier layers
never see a gradient.

Lite prunes after the prefill of all but the last prompt token, so every token it decodes, the
first included, sees the pruned cache in every layer.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from vreason_batch.config import Config, ControllerConfig, DecodingConfig, LiteConfig
from vreason_batch.engine.controller import (
    ControllerState, PolicyState, adam_step, entropy_from_logits, policy_step, reset_moments, value_change, value_delta,
)
from vreason_batch.engine.last_layer import Attention, LastLayer
from vreason_batch.engine.models import LoadedModel
from vreason_batch.engine.modes import ModeSpec, get_mode
from vreason_batch.engine.prompting import ModelInputs, collate


@dataclass(frozen=True)
class DecodeSettings:
    """What one decode needs from the config. Built by `build` / `from_config`; defaults live in config.py."""

    mode: ModeSpec
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    controller: ControllerConfig
    prune_ratio: float

    @classmethod
    def build(cls, mode: str, decoding: DecodingConfig, controller: ControllerConfig, lite: LiteConfig) -> "DecodeSettings":
        return cls(mode=get_mode(mode), max_new_tokens=decoding.max_new_tokens,
                   stop_strings=tuple(decoding.stop_strings), controller=controller, prune_ratio=lite.prune_ratio)

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


def _copy_cache(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache of the same kind as `cache` holding the given per-layer (keys, values)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for layer, (k, v) in zip(new.layers, kv):
        layer.keys, layer.values = k, v
    return new


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


def prune_video_tokens(cache, pad_mask, video, ratio: float):
    """V-Reason-Lite: drop the `ratio` of each row's video tokens with the lowest last-layer value
    norm (L2 over head_dim, mean over kv heads), from every layer's cache.

    Rows keep different numbers of tokens, so they are re-packed to the right (left padding) and the
    mask follows. Keys already carry their rotary positions, so moving them is safe.
    pad_mask, video: [B, S]. Returns (pad_mask [B, S'], video [B, S'], kept video tokens per row [B]).
    """
    B, S = pad_mask.shape
    norms = cache.layers[-1].values.float().norm(dim=-1).mean(dim=1)  # [B, S]
    keep = pad_mask.bool().clone()
    for b in range(B):
        vid = torch.nonzero(video[b], as_tuple=True)[0]
        n_drop = int(vid.numel() * ratio)
        if n_drop:
            keep[b, vid[torch.argsort(norms[b, vid], stable=True)[:n_drop]]] = False
    S2 = int(keep.sum(dim=1).max())
    gather = torch.zeros((B, S2), dtype=torch.long, device=pad_mask.device)
    new_pad = torch.zeros((B, S2), dtype=pad_mask.dtype, device=pad_mask.device)
    new_video = torch.zeros((B, S2), dtype=torch.bool, device=pad_mask.device)
    for b in range(B):
        idx = torch.nonzero(keep[b], as_tuple=True)[0]
        gather[b, S2 - idx.numel():] = idx
        new_pad[b, S2 - idx.numel():] = 1
        new_video[b, S2 - idx.numel():] = video[b, idx]
    for layer in cache.layers:
        g = gather.view(B, 1, S2, 1).expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)
    return new_pad, new_video, new_video.sum(dim=1)


def _controlled_positions(pad_mask, video, controlled, positions: str):
    """[B, S+1] bool over the cache after the last prompt token joins it: where each row's dV lives.

    controlled [B] bool: rows whose mode updates dV (the others get no positions). `auto` is
    decided per row: its video tokens if it has any, else every prompt token.
    """
    has_video = video.bool().any(dim=1, keepdim=True)  # [B, 1]
    if positions == "video" and not bool((has_video[:, 0] | ~controlled).all()):
        raise ValueError("controller.positions=video but the inputs have no video tokens; use prompt")
    use_video = has_video if positions == "auto" else torch.full_like(has_video, positions == "video")
    mask = torch.where(use_video, video.bool(), pad_mask.bool())
    # in prompt mode the last prompt token is controlled too
    return torch.cat([mask, ~use_video], dim=1) & controlled[:, None]


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

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0

    @property
    def occupancy_while_queued(self) -> float:
        """Occupancy before the drain: once nothing waits, the last rows run out with slots free."""
        return self.queued_busy_slot_steps / self.queued_slot_steps if self.queued_slot_steps else 0.0

    def add(self, other: "EngineStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class PrefillUnit:
    """Requests prefilled together: their first `prefix` prompt tokens once (one row, so one
    vision-tower pass), then each request's own tokens after them."""

    requests: list[Request]
    prefix: int

    @property
    def rows(self) -> int:
        return sum(len(r.modes) for r in self.requests)

    @property
    def has_video(self) -> bool:
        return self.requests[0].inputs.pixel_values_videos is not None


def _units(requests: list[Request], video_token_id: int | None) -> list[PrefillUnit]:
    """Requests that share a prefill: same video_key, with a shared prefix that holds the whole video
    (the vision tower needs all of a prompt's video tokens at once). Others go alone. Input order."""
    groups: dict[Any, list[Request]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.video_key if r.video_key is not None else ("alone", i), []).append(r)
    units = []
    for g in groups.values():
        L = _shared_prefix(g, video_token_id)
        if L:
            units.append(PrefillUnit(g, L))
        else:  # None, or nothing in common: each alone
            units.extend(PrefillUnit([r], _shared_prefix([r], video_token_id)) for r in g)
    return units


def _shared_prefix(unit: list[Request], video_token_id: int | None) -> int | None:
    """Prompt tokens every request of the unit prefills together: the common prefix, but never a
    request's last token. None when they cannot share (the prefix would cut a video in two, or the
    videos differ)."""
    ids = [r.inputs.input_ids for r in unit]
    if len(unit) == 1:
        return len(ids[0]) - 1
    first = unit[0].inputs
    if any(r.inputs.video_grid_thw != first.video_grid_thw for r in unit):
        return None
    n = min(len(x) for x in ids) - 1
    L = 0
    while L < n and all(x[L] == ids[0][L] for x in ids):
        L += 1
    if first.pixel_values_videos is not None and any(video_token_id in x[L:] for x in ids):
        return None
    return L


def _prefill(lm: LoadedModel, head: LastLayer, units: list[PrefillUnit], stats: EngineStats):
    """Cache every request's prompt but its last token. Each unit's shared prefix (one row per unit,
    so one vision-tower pass per video) first, then each request's own suffix after it.

    Returns (cache, pad_mask [R, S], video [R, S], next_ids [R, 1], next_pos [.., R, 1]) with one row
    per request, in unit order. A suffix shorter than the longest is left-padded where it starts,
    so padding may sit between a prefix and its suffix: it is masked, as left padding is.
    """
    reqs = [r for u in units for r in u.requests]
    lens = [len(r.inputs.input_ids) for r in reqs]
    if min(lens) < 2:
        raise ValueError("a prompt of one token: nothing to prefill")
    # every prompt's positions exactly as for a prefill of the whole prompt (pixels not needed)
    full = collate(lm, [r.inputs for r in reqs], pixels=False)
    T = full["input_ids"].shape[1]
    pos_full = lm.prompt_position_ids(full)  # [.., R, T] left-padded
    own_pos = [pos_full[..., i, T - n:] for i, n in enumerate(lens)]  # [.., n_i]
    prefix = [u.prefix for u in units]

    # 1. the units' prefixes: one row per unit
    heads = [u.requests[0].inputs for u in units]
    pre = collate(lm, [dataclasses.replace(x, input_ids=x.input_ids[:L]) for x, L in zip(heads, prefix)])
    Lmax = pre["input_ids"].shape[1]
    first = [sum(len(u.requests) for u in units[:j]) for j in range(len(units))]  # each unit's first request
    pre_pos = pos_full.new_zeros((*pos_full.shape[:-2], len(units), Lmax))
    for j, (i, L) in enumerate(zip(first, prefix)):
        pre_pos[..., j, Lmax - L:] = own_pos[i][..., :L]
    cache = lm.new_cache()
    hidden, cos, sin = lm.forward_to_last_layer(pre, pre_pos, cache)
    head.extend_cache(hidden, cos, sin, cache.layers[-1])
    stats.vision_encodes += sum(u.has_video for u in units)
    stats.prefill_tokens += sum(prefix)

    # 2. one row per request: its unit's prefix, then its own tokens after it (but the last)
    unit_of = torch.tensor([j for j, u in enumerate(units) for _ in u.requests], device=lm.device)
    if len(reqs) > len(units):
        cache = _copy_cache(cache, [(layer.keys[unit_of], layer.values[unit_of]) for layer in cache.layers])
    pad_mask = pre["attention_mask"][unit_of]
    video = lm.video_mask(pre)[unit_of]
    starts = [u.prefix for u in units for _ in u.requests]
    Ts = max(n - 1 - L for n, L in zip(lens, starts))
    if Ts > 0:
        ids = torch.full((len(reqs), Ts), lm.pad_token_id, dtype=torch.long, device=lm.device)
        attn = torch.zeros((len(reqs), Ts), dtype=pad_mask.dtype, device=lm.device)
        suf_pos = pos_full.new_zeros((*pos_full.shape[:-2], len(reqs), Ts))
        for i, (r, n, L) in enumerate(zip(reqs, lens, starts)):
            k = n - 1 - L
            if k:
                ids[i, Ts - k:] = torch.tensor(r.inputs.input_ids[L:n - 1], dtype=torch.long)
                attn[i, Ts - k:] = 1
                suf_pos[..., i, Ts - k:] = own_pos[i][..., L:n - 1]
        pad_mask = torch.cat([pad_mask, attn], dim=1)
        hidden, cos, sin = lm.forward_to_last_layer({"input_ids": ids, "attention_mask": pad_mask}, suf_pos, cache)
        head.extend_cache(hidden, cos, sin, cache.layers[-1])
        video = torch.cat([video, torch.zeros_like(attn, dtype=torch.bool)], dim=1)
        stats.prefill_tokens += sum(n - 1 - L for n, L in zip(lens, starts))
    next_ids = torch.tensor([[r.inputs.input_ids[-1]] for r in reqs], dtype=torch.long, device=lm.device)
    next_pos = torch.stack([p[..., -1:] for p in own_pos], dim=-2)  # [.., R, 1]
    return cache, pad_mask, video, next_ids, next_pos


@dataclass
class Prefilled:
    """Prompts in the cache, one row per request, and the (request, mode) rows still to start from them.

    The modes' copies of the cache are made only when their rows start (`start_rows`), so rows
    waiting for a slot hold one cache row per request, not one per (request, mode).
    """

    reqs: list[Request]
    cache: Any
    pad_mask: torch.Tensor  # [R, S]
    video: torch.Tensor  # [R, S] bool
    next_ids: torch.Tensor  # [R, 1]
    next_pos: torch.Tensor  # [.., R, 1]
    t_start: float
    todo: deque  # (request index, ModeSpec) not started yet, in order

    @classmethod
    def of(cls, lm: LoadedModel, head: LastLayer, units: list[PrefillUnit], stats: EngineStats) -> "Prefilled":
        t0 = time.perf_counter()
        reqs = [r for u in units for r in u.requests]
        cache, pad_mask, video, next_ids, next_pos = _prefill(lm, head, units, stats)
        todo = deque((i, get_mode(m)) for i, r in enumerate(reqs) for m in r.modes)
        return cls(reqs, cache, pad_mask, video, next_ids, next_pos, t0, todo)

    def start_rows(self, n: int, head: LastLayer, settings: DecodeSettings) -> DecodeState:
        """The next `n` (request, mode) pairs as rows: each its own copy of the request's cache (Lite
        prunes its copy) and, if its mode is controlled, its own controller."""
        pairs = [self.todo.popleft() for _ in range(min(n, len(self.todo)))]
        dev = self.pad_mask.device
        states = []
        for prune in (False, True):
            group = [(i, m) for i, m in pairs if m.prune_video == prune]
            if not group:
                continue
            idx = [i for i, _ in group]
            t = torch.tensor(idx, device=dev)
            if idx == list(range(len(self.reqs))) and not self.todo and len(group) == len(pairs):
                sub = self.cache  # the last rows, one per request: no copy needed
            else:
                sub = _copy_cache(self.cache, [(layer.keys[t], layer.values[t]) for layer in self.cache.layers])
            pm, vid = self.pad_mask[t], self.video[t]
            kept = vid.sum(dim=1)
            if prune:
                pm, vid, kept = prune_video_tokens(sub, pm, vid, settings.prune_ratio)
            controlled = torch.tensor([m.controlled for _, m in group], device=dev)
            ctrl = None
            if bool(controlled.any()):
                where = _controlled_positions(pm, vid, controlled, settings.controller.positions)
                ctrl = ControllerState.new(where, head.p.num_kv_heads, head.p.head_dim)
            rows = [RowTrace(self.reqs[i].key, m.name, len(self.reqs[i].inputs.input_ids),
                             self.reqs[i].inputs.num_video_tokens, int(k), self.t_start)
                    for (i, m), k in zip(group, kept.tolist())]
            states.append(DecodeState(rows=rows, cache=sub, pad_mask=pm, next_ids=self.next_ids[t],
                                      next_pos=self.next_pos[..., t, :], policy=PolicyState.new(len(rows), device=dev),
                                      ctrl=ctrl, controlled=controlled))
        return states[0] if len(states) == 1 else DecodeState.merge(*states)


def _rows_for_modes(lm: LoadedModel, head: LastLayer, units: list[PrefillUnit], settings: DecodeSettings,
                    stats: EngineStats) -> DecodeState:
    """Prefill `units` once and start every (request, mode) row from it."""
    pre = Prefilled.of(lm, head, units, stats)
    return pre.start_rows(len(pre.todo), head, settings)


def prefill(lm: LoadedModel, head: LastLayer, batch: list[ModelInputs], settings: DecodeSettings) -> DecodeState:
    """Cache every prompt token but the last (left-padded batch, one row per input in `settings.mode`)."""
    units = _units([Request(i, x, (settings.mode.name,)) for i, x in enumerate(batch)], None)
    return _rows_for_modes(lm, head, units, settings, EngineStats())


@dataclass
class Step:
    """One token for every live row (all [b])."""

    token: torch.Tensor
    entropy: torch.Tensor  # H_t of the logits before any update
    entropy_post: torch.Tensor  # entropy of the logits the token was chosen from
    alpha: torch.Tensor  # alpha_t where an update was made, else 0
    logits: torch.Tensor  # [b, V] fp32, the logits the token was chosen from


def forward_last_token(lm: LoadedModel, head: LastLayer, st: DecodeState) -> Attention:
    """Feed each row's next token through the model and the last layer's attention (cache extended)."""
    st.pad_mask = torch.cat([st.pad_mask, st.pad_mask.new_ones((st.pad_mask.shape[0], 1))], dim=1)
    hidden, cos, sin = lm.forward_to_last_layer({"input_ids": st.next_ids, "attention_mask": st.pad_mask}, st.next_pos, st.cache)
    layer = st.cache.layers[-1]
    return head.attend(hidden, head.extend_cache(hidden, cos, sin, layer), layer, st.pad_mask)


def entropy_and_grad(head: LastLayer, att: Attention, ctrl: ControllerState, weights_of, value_norm: str):
    """One grad-enabled pass at the current dV, its change of the values as `value_norm` says.

    weights_of: H [b] -> w [b]; the loss is sum_b w_b * H_b. Returns (logits [b, V], H [b], w [b],
    dLoss/d dV [b, kv, n, d]). Samples are independent: each dV gets only its own sample's gradient.
    """
    dv = ctrl.dv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = head.logits(att, value_delta(att.probs, ctrl, value_change(att.values, ctrl, dv, value_norm)))
        h = entropy_from_logits(logits)
        w = weights_of(h.detach())
        (grad,) = torch.autograd.grad((w * h).sum(), dv)
    return logits.detach(), h.detach(), w, grad


def decode_one_token(lm: LoadedModel, head: LastLayer, st: DecodeState, settings: DecodeSettings) -> Step:
    """Advance every live row by one token: update dV where due (every k of the row's tokens), choose greedily."""
    att = forward_last_token(lm, head, st)
    cc = settings.controller
    # [b]: controlled rows update every k of their own tokens (each row keeps its own phase of k)
    due = st.controlled & (st.policy.steps % cc.update_every == 0)
    if bool(due.any()):
        h, alpha, pre, post = _update(head, att, st, due, cc)
        logits = torch.where(due[:, None], post, pre)
        h_post = torch.where(due, entropy_from_logits(post), h)
        alpha = torch.where(due, alpha, torch.zeros_like(alpha))
    else:
        logits = head.logits(att, None if st.ctrl is None else value_delta(att.probs, st.ctrl))
        h = h_post = entropy_from_logits(logits)
        _policy_step(st.policy, h, cc)
        alpha = torch.zeros_like(h)
    token = logits.argmax(dim=-1)
    st.next_ids, st.next_pos = token[:, None], st.next_pos + 1
    return Step(token=token, entropy=h, entropy_post=h_post, alpha=alpha, logits=logits)


def _update(head: LastLayer, att: Attention, st: DecodeState, active, cc: ControllerConfig):
    """`steps_per_update` Adam steps on alpha_t * H_t for the `active` rows [b].

    Returns (H_t before the update [b], alpha_t [b], pre-update logits [b, V], post-update logits [b, V]).
    The first step's forward gives H_t and so alpha_t: one grad-enabled pass serves both. After the
    steps, dV's change of the values (`ctrl.delta`) is recomputed: every logit until the next update carries it.
    """
    ctrl = st.ctrl
    alpha = h_pre = pre = None

    def weights(h):
        nonlocal alpha
        if alpha is None:
            alpha = _policy_step(st.policy, h, cc)  # once per token, from the pre-update H_t
        return alpha * active

    for _ in range(cc.steps_per_update):
        logits, h, _, grad = entropy_and_grad(head, att, ctrl, weights, cc.value_norm)
        if pre is None:
            pre, h_pre = logits, h
            if cc.reset_moments_on_switch:  # a fresh Adam for rows whose alpha just changed sign
                reset_moments(ctrl, active & (ctrl.last_alpha != 0) & (alpha.long() != ctrl.last_alpha))
        adam_step(ctrl, grad, active, cc.lr, cc.adam_beta1, cc.adam_beta2, cc.adam_eps)
    ctrl.updates = ctrl.updates + active.long()
    ctrl.last_alpha = torch.where(active, alpha.long(), ctrl.last_alpha)
    ctrl.delta = value_change(att.values, ctrl, norm=cc.value_norm)
    return h_pre, alpha, pre, head.logits(att, value_delta(att.probs, ctrl))


def _policy_step(policy: PolicyState, h, cc: ControllerConfig):
    return policy_step(policy, h, cc.rule, cc.ema_beta, cc.delta, cc.min_explore_tokens, cc.peak_from_step)


class StopStrings:
    """Stop-string detection that decodes text only when the new token could complete a stop string."""

    def __init__(self, tokenizer, stops) -> None:
        self.tok = tokenizer
        self.stops = tuple(s for s in stops if s)
        # a token is at least one character, so a just-completed stop string lies in the last `window` tokens
        self.window = max((len(s) for s in self.stops), default=0)
        self.finals = {s[-1] for s in self.stops}
        self._may_complete: dict[int, bool] = {}

    def _can_complete(self, token: int) -> bool:
        hit = self._may_complete.get(token)
        if hit is None:
            text = self.tok.decode([token], skip_special_tokens=False)
            # U+FFFD: part of a multi-byte character, which only the sequence decode can tell
            hit = "\ufffd" in text or any(c in text or c.isspace() for c in self.finals)
            self._may_complete[token] = hit
        return hit

    def hit(self, ids: list[int]) -> bool:
        if not self.stops or not self._can_complete(ids[-1]):
            return False
        tail = self.tok.decode(ids[-self.window:], skip_special_tokens=False)
        return any(s in tail for s in self.stops)


def _record(st: DecodeState, step: Step, eos: set[int], stops: StopStrings, max_new_tokens: int) -> list[int]:
    """Append the step to each row's trace (one host transfer); return the rows that just finished."""
    vals = torch.stack([step.token.double(), step.entropy.double(), step.entropy_post.double(),
                        st.policy.ema.double(), step.alpha.double()], dim=1).tolist()
    now = time.perf_counter()
    finished = []
    for r, (row, (tok, h, h_post, ema, alpha)) in enumerate(zip(st.rows, vals)):
        tok = int(tok)
        row.entropy.append(h)
        row.entropy_post.append(h_post)
        row.entropy_ema.append(ema)
        row.alpha.append(int(alpha))
        if tok in eos:
            row.finish_reason = "eos"
        else:
            row.token_ids.append(tok)
            if stops.hit(row.token_ids):
                row.finish_reason = "stop_string"
        if row.finish_reason != "max_new_tokens" or len(row.entropy) >= max_new_tokens:
            row.latency_s = now - row.t_start
            finished.append(r)
    return finished


def _count_think_tokens(tokenizer, text: str, n_out: int) -> int:
    """Output tokens up to and including `</think>`; all of them if thinking never closed."""
    end = text.find("</think>")
    if end >= 0:
        return len(tokenizer(text[: end + len("</think>")], add_special_tokens=False)["input_ids"])
    return n_out if "<think>" in text else 0


def _result(tokenizer, row: RowTrace) -> DecodeResult:
    text = tokenizer.decode(row.token_ids, skip_special_tokens=True)
    n_out = len(row.entropy)
    return DecodeResult(
        token_ids=row.token_ids, output_text=text, finish_reason=row.finish_reason, entropy=row.entropy,
        entropy_post=row.entropy_post, entropy_ema=row.entropy_ema, alpha=row.alpha,
        controller_updates=row.controller_updates, ema_peak_step=row.ema_peak_step,
        num_prompt_tokens=row.num_prompt_tokens, num_video_tokens=row.num_video_tokens,
        num_video_tokens_kept=row.num_video_tokens_kept, num_output_tokens=n_out,
        num_think_tokens=_count_think_tokens(tokenizer, text, n_out), latency_s=row.latency_s,
    )


def _admit(lm: LoadedModel, head: LastLayer, pending: deque, free: int, stats: EngineStats) -> Prefilled:
    """Prefill the next units from `pending` (at least one; more while they add up to fewer than
    `free` rows and are of the same kind, text or video, as the first)."""
    units = [pending.popleft()]
    rows = units[0].rows
    while pending and rows < free and pending[0].has_video == units[0].has_video:
        units.append(pending.popleft())
        rows += units[-1].rows
    return Prefilled.of(lm, head, units, stats)


def decode_requests(lm: LoadedModel, requests: list[Request], settings: DecodeSettings,
                    slots: int) -> tuple[dict[tuple[Any, str], DecodeResult], EngineStats]:
    """Decode every (request, mode) with continuous batching over `slots` rows.

    When a row finishes, its slot is refilled at once: the next requests are prefilled (one prefill
    per request shared by its modes, one prefix per video shared by its questions) and join the
    running batch, each row with its own step counter, policy and controller. Rows that do not fit
    yet wait, prefilled (one cache row per request; the modes' copies are made as rows start), for
    the next free slot: at most one prefill's requests wait at a time. `settings.mode` is not used: each
    request names its modes. Returns ({(key, mode): result}, stats).
    """
    if slots < 1:
        raise ValueError("slots must be >= 1")
    head = LastLayer(lm.last_layer_parts())
    eos, stops = set(lm.eos_token_ids), StopStrings(lm.tokenizer, settings.stop_strings)
    stats = EngineStats()
    pending = deque(_units(requests, lm.vision.video_token_id if lm.vision else None))
    live: DecodeState | None = None
    ready: Prefilled | None = None  # prefilled requests whose rows wait for a slot
    done: list[RowTrace] = []
    with torch.no_grad():
        while True:
            free = slots - (live.size if live is not None else 0)
            while free > 0 and (ready is not None or pending):
                if ready is None:
                    ready = _admit(lm, head, pending, free, stats)
                admit = ready.start_rows(free, head, settings)
                if not ready.todo:
                    ready = None
                live = admit if live is None else DecodeState.merge(live, admit)
                free -= admit.size
            if live is None:
                break
            stats.decode_steps += 1
            stats.busy_slot_steps += live.size
            stats.slot_steps += slots
            if ready is not None or pending:
                stats.queued_busy_slot_steps += live.size
                stats.queued_slot_steps += slots
            step = decode_one_token(lm, head, live, settings)
            live.retire(_record(live, step, eos, stops, settings.max_new_tokens))
            if not live.rows:
                done.extend(live.done)
                live = None
    results = {(row.key, row.mode): _result(lm.tokenizer, row) for row in done}
    stats.output_tokens = sum(r.num_output_tokens for r in results.values())
    return results, stats


def decode_batch(lm: LoadedModel, batch: list[ModelInputs], settings: DecodeSettings) -> list[DecodeResult]:
    """Decode `batch` together in `settings.mode`; each sample keeps its own controller state. One
    result per input, in order."""
    mode = settings.mode.name
    out, _ = decode_requests(lm, [Request(i, x, (mode,)) for i, x in enumerate(batch)], settings, slots=len(batch))
    return [out[(i, mode)] for i in range(len(batch))]
