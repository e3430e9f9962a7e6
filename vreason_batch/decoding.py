"""The one decode loop: every mode in modes.py, batched over the KV cache, with per-row traces.

Its shape follows gpt-fast's generate.py: `prefill` fills the cache with the prompt (all but its
last token) and sets up the rows; `decode_one_token` advances every live row by one token;
`DecodeState.retire` is the one place rows leave; `decode_batch` drives them.

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

import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .config import Config, ControllerConfig, DecodingConfig, LiteConfig
from .controller import ControllerState, PolicyState, adam_step, entropy_from_logits, policy_step, value_delta
from .last_layer import Attention, LastLayer
from .models import LoadedModel
from .modes import ModeSpec, get_mode
from .prompting import ModelInputs, collate


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
    latency_s: float  # from the batch's start to this sample's last token (prefill included)

    def columns(self) -> dict[str, Any]:
        """The output columns this result fills."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token_ids"}


@dataclass
class RowTrace:
    """What one row has produced so far; becomes a DecodeResult when the row leaves."""

    index: int  # the row's place in the caller's batch
    num_prompt_tokens: int
    num_video_tokens: int
    num_video_tokens_kept: int
    token_ids: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    entropy_post: list[float] = field(default_factory=list)
    entropy_ema: list[float] = field(default_factory=list)
    alpha: list[int] = field(default_factory=list)
    finish_reason: str = "max_new_tokens"
    latency_s: float = 0.0
    controller_updates: int = 0
    ema_peak_step: int | None = None


@dataclass
class DecodeState:
    """The live rows and everything indexed by them, in the same row order."""

    rows: list[RowTrace]
    cache: Any  # transformers DynamicCache; every layer's keys/values [b, kv_heads, S, head_dim]
    pad_mask: torch.Tensor  # [b, S] 1 where the cache holds a real token (left padding is 0)
    next_ids: torch.Tensor  # [b, 1] the token each row feeds next: the prompt's last, then its choices
    next_pos: torch.Tensor  # its position ids: [4, b, 1] (Qwen-VL text + mrope) or [b, 1]
    policy: PolicyState  # per-row EMA / peak / token count
    ctrl: ControllerState | None  # per-row dV and Adam state (controlled modes)
    t0: float = field(default_factory=time.perf_counter)
    done: list[RowTrace] = field(default_factory=list)

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
        if self.ctrl is not None:
            self.ctrl = self.ctrl.select(idx)


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


def _controlled_positions(pad_mask, video, positions: str):
    """[B, S+1] bool over the cache after the last prompt token joins it: where dV lives."""
    if positions == "auto":
        positions = "video" if bool(video.any()) else "prompt"
    if positions == "video":
        if not bool(video.any()):
            raise ValueError("controller.positions=video but the inputs have no video tokens; use prompt")
        mask, last = video.bool(), False
    else:
        mask, last = pad_mask.bool(), True  # every prompt token, the last one included
    return torch.cat([mask, mask.new_full((mask.shape[0], 1), last)], dim=1)


def prefill(lm: LoadedModel, head: LastLayer, batch: list[ModelInputs], settings: DecodeSettings) -> DecodeState:
    """Cache every prompt token but the last (left-padded batch); set up the rows' policy and controller."""
    t0 = time.perf_counter()
    inputs = collate(lm, batch)
    position_ids = lm.prompt_position_ids(inputs)
    video = lm.video_mask(inputs)[:, :-1]
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    cache = lm.new_cache()
    if ids.shape[1] > 1:
        head_inputs = {**inputs, "input_ids": ids[:, :-1], "attention_mask": attn[:, :-1]}
        hidden, cos, sin = lm.forward_to_last_layer(head_inputs, position_ids[..., :-1], cache)
        head.extend_cache(hidden, cos, sin, cache.layers[-1])
    pad_mask = attn[:, :-1]
    kept = video.sum(dim=1)
    if settings.mode.prune_video:
        pad_mask, video, kept = prune_video_tokens(cache, pad_mask, video, settings.prune_ratio)
    ctrl = None
    if settings.mode.controlled:
        controlled = _controlled_positions(pad_mask, video, settings.controller.positions)
        ctrl = ControllerState.new(controlled, head.p.num_kv_heads, head.p.head_dim)
    rows = [RowTrace(i, len(b.input_ids), b.num_video_tokens, int(k)) for i, (b, k) in enumerate(zip(batch, kept.tolist()))]
    return DecodeState(rows=rows, cache=cache, pad_mask=pad_mask, next_ids=ids[:, -1:], next_pos=position_ids[..., -1:],
                       policy=PolicyState.new(len(batch), device=lm.device), ctrl=ctrl, t0=t0)


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


def entropy_and_grad(head: LastLayer, att: Attention, ctrl: ControllerState, weights_of):
    """One grad-enabled pass at the current dV.

    weights_of: H [b] -> w [b]; the loss is sum_b w_b * H_b. Returns (logits [b, V], H [b], w [b],
    dLoss/d dV [b, kv, n, d]). Samples are independent: each dV gets only its own sample's gradient.
    """
    dv = ctrl.dv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = head.logits(att, value_delta(att.probs, ctrl, dv))
        h = entropy_from_logits(logits)
        w = weights_of(h.detach())
        (grad,) = torch.autograd.grad((w * h).sum(), dv)
    return logits.detach(), h.detach(), w, grad


def decode_one_token(lm: LoadedModel, head: LastLayer, st: DecodeState, settings: DecodeSettings) -> Step:
    """Advance every live row by one token: update dV where due (every k of the row's tokens), choose greedily."""
    att = forward_last_token(lm, head, st)
    cc = settings.controller
    due = torch.zeros_like(st.policy.steps, dtype=torch.bool)
    if st.ctrl is not None:
        due = st.policy.steps % cc.update_every == 0  # [b]: each row keeps its own phase of k
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
    The first step's forward gives H_t and so alpha_t: one grad-enabled pass serves both.
    """
    ctrl = st.ctrl
    alpha = h_pre = pre = None

    def weights(h):
        nonlocal alpha
        if alpha is None:
            alpha = _policy_step(st.policy, h, cc)  # once per token, from the pre-update H_t
        return alpha * active

    for _ in range(cc.steps_per_update):
        logits, h, _, grad = entropy_and_grad(head, att, ctrl, weights)
        if pre is None:
            pre, h_pre = logits, h
        adam_step(ctrl, grad, active, cc.lr, cc.adam_beta1, cc.adam_beta2, cc.adam_eps)
    ctrl.updates = ctrl.updates + active.long()
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
    now = time.perf_counter() - st.t0
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
            row.latency_s = now
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


def decode_batch(lm: LoadedModel, batch: list[ModelInputs], settings: DecodeSettings) -> list[DecodeResult]:
    """Decode `batch` together; each sample keeps its own controller state. One result per input, in order."""
    head = LastLayer(lm.last_layer_parts())
    eos, stops = set(lm.eos_token_ids), StopStrings(lm.tokenizer, settings.stop_strings)
    with torch.no_grad():
        st = prefill(lm, head, batch, settings)
        while st.rows:
            step = decode_one_token(lm, head, st, settings)
            st.retire(_record(st, step, eos, stops, settings.max_new_tokens))
    return [_result(lm.tokenizer, row) for row in sorted(st.done, key=lambda r: r.index)]


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

    vision_encodes: int = 0  # vision-tower passes (one per distinct video)
    prefill_tokens: int = 0  # prompt tokens run through a prefill forward (padding excluded)
    decode_steps: int = 0  # decode_one_token calls
    busy_slot_steps: int = 0  # sum over steps of the live rows
    slot_steps: int = 0  # sum over steps of the slots (decode_slots)
    output_tokens: int = 0

    @property
    def occupancy(self) -> float:
        return self.busy_slot_steps / self.slot_steps if self.slot_steps else 0.0


def decode_requests(lm: LoadedModel, requests: list[Request], settings: DecodeSettings,
                    slots: int) -> tuple[dict[tuple[Any, str], DecodeResult], EngineStats]:
    """Decode every (request, mode) with at most `slots` rows live at once; `settings.mode` is
    replaced by each request's modes. Returns ({(key, mode): result}, stats)."""
    from dataclasses import replace

    stats = EngineStats()
    out: dict[tuple[Any, str], DecodeResult] = {}
    by_mode: dict[str, list[Request]] = {}
    for r in requests:
        for m in r.modes:
            by_mode.setdefault(m, []).append(r)
    for m, reqs in by_mode.items():
        for i in range(0, len(reqs), slots):
            chunk = reqs[i:i + slots]
            for r, res in zip(chunk, decode_batch(lm, [r.inputs for r in chunk], replace(settings, mode=get_mode(m)))):
                out[(r.key, m)] = res
                stats.prefill_tokens += len(r.inputs.input_ids) - 1
                stats.vision_encodes += r.inputs.pixel_values_videos is not None
                stats.output_tokens += res.num_output_tokens
    return out, stats
