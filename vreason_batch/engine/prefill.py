"""The prefill: requests grouped into units that share a prompt prefix, their prompts cached, rows started.

`prefill_units` groups requests (one vision-tower pass per video, its questions' common prefix
once); `Prefilled.of` fills the cache with every prompt but its last token, one row per request;
`Prefilled.start_rows` starts (request, mode) rows from it as slots free up, each with its own
copy of the request's cache and, if its mode is controlled, its own controller.

Lite prunes after the prefill of all but the last prompt token, so every token it decodes, the
first included, sees the pruned cache in every layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from vreason_batch.engine.api import DecodeSettings, EngineStats, Request
from vreason_batch.engine.controller import ControllerState, PolicyState
from vreason_batch.engine.last_layer import LastLayer
from vreason_batch.engine.models import LoadedModel
from vreason_batch.engine.modes import get_mode
from vreason_batch.engine.prompting import ModelInputs, collate
from vreason_batch.engine.sampling import row_seed
from vreason_batch.engine.state import DecodeState, RowTrace, cache_bytes, cache_rows, on


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
        g = on(gather, layer.keys).view(B, 1, S2, 1).expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
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


def prefill_units(requests: list[Request], video_token_id: int | None) -> list[PrefillUnit]:
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
        cache = cache_rows(cache, unit_of)
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

    def start_rows(self, n: int, head: LastLayer, settings: DecodeSettings, stats: EngineStats | None = None) -> list[DecodeState]:
        """The next `n` (request, mode) pairs as packed rows (one state for unpruned rows, one for Lite's):
        each its own controller if its mode is controlled. Unpruned rows read their request's cache
        where it is (`cache_index`: the copy into a slot is the only one); Lite prunes its own copy."""
        pairs = [self.todo.popleft() for _ in range(min(n, len(self.todo)))]
        dev = self.pad_mask.device
        states = []
        for prune in (False, True):
            group = [(i, m) for i, m in pairs if m.prune_video == prune]
            if not group:
                continue
            idx = [i for i, _ in group]
            t = torch.tensor(idx, device=dev)
            pm, vid = self.pad_mask[t], self.video[t]
            kept = vid.sum(dim=1)
            sub, index = self.cache, (None if idx == list(range(len(self.reqs))) else idx)
            if prune:
                sub, index = cache_rows(self.cache, t), None
                if stats is not None:
                    stats.copied_cache_bytes += cache_bytes(sub)
                pm, vid, kept = prune_video_tokens(sub, pm, vid, settings.prune_ratio)
            controlled = torch.tensor([m.controlled for _, m in group], device=dev)
            ctrl = None
            if bool(controlled.any()):
                where = _controlled_positions(pm, vid, controlled, settings.controller.positions)
                ctrl = ControllerState.new(where, head.p.num_kv_heads, head.p.head_dim)
            rows = [RowTrace(self.reqs[i].key, m.name, len(self.reqs[i].inputs.input_ids),
                             self.reqs[i].inputs.num_video_tokens, int(k), self.t_start)
                    for (i, m), k in zip(group, kept.tolist())]
            seed = torch.tensor([row_seed(settings.sampling.seed, r.key, r.mode) for r in rows], dtype=torch.long, device=dev)
            states.append(DecodeState(rows=rows, cache=sub, pad_mask=pm, next_ids=self.next_ids[t],
                                      next_pos=self.next_pos[..., t, :], policy=PolicyState.new(len(rows), device=dev),
                                      ctrl=ctrl, controlled=controlled, seed=seed, cache_index=index))
        return states


def prefill_rows(lm: LoadedModel, head: LastLayer, units: list[PrefillUnit], settings: DecodeSettings,
                 stats: EngineStats) -> DecodeState:
    """Prefill `units` once and start every (request, mode) row from it."""
    pre = Prefilled.of(lm, head, units, stats)
    states = pre.start_rows(len(pre.todo), head, settings)
    return states[0].packed() if len(states) == 1 else DecodeState.merge(*states)


def prefill(lm: LoadedModel, head: LastLayer, batch: list[ModelInputs], settings: DecodeSettings) -> DecodeState:
    """Cache every prompt token but the last (left-padded batch, one row per input in `settings.mode`)."""
    units = prefill_units([Request(i, x, (settings.mode.name,)) for i, x in enumerate(batch)], None)
    return prefill_rows(lm, head, units, settings, EngineStats())
