"""One decode step: every live row's next token, the controller's dV update where due, and its record.

Every token, the model runs up to the input of its last layer (stack.py, or HF's forward for the
models it does not run); the last layer, final norm and lm_head for that token run in
last_layer.py at float32 precision, where dV enters the attention as `P[pos] @ dV` (README,
"V-Reason, as implemented"). An update therefore re-runs only o_proj,
the MLP, the final norm and lm_head of the current token, forward and backward into dV, with the
attention probabilities P of that token reused. No graph outlives an update; earlier layers
never see a gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vreason_batch.config import ControllerConfig
from vreason_batch.engine import hf_standins
from vreason_batch.engine.api import DecodeSettings
from vreason_batch.engine.controller import (
    ControllerState, PolicyState, adam_step, entropy_from_logits, policy_step, reset_moments, value_change, value_delta,
)
from vreason_batch.engine.last_layer import Attention, LastLayer, rope_factors
from vreason_batch.engine.models import LoadedModel
from vreason_batch.engine.modes import get_mode
from vreason_batch.engine.sampling import choose_tokens
from vreason_batch.engine.state import DecodeState, TokenRecord


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
    mask = lm.step_mask(st.pad_mask)
    if head.stack is not None and all(hf_standins.is_slab(layer) for layer in st.cache.layers[:-1]):
        hidden, rope = head.stack.forward(st.next_ids, st.next_pos, mask, st.cache)  # stack.py
    else:
        hidden, cos, sin = lm.forward_to_last_layer({"input_ids": st.next_ids, "attention_mask": mask}, st.next_pos, st.cache)
        rope = rope_factors(cos, sin)
    layer = st.cache.layers[-1]
    return head.attend(hidden, head.extend_cache_one(hidden, rope, layer), layer, mask)


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
    """Advance every live row by one token: update dV where due (every k of the row's tokens), then choose
    it from the logits after the update (argmax, or the row's own seeded draw: sampling.py)."""
    att = forward_last_token(lm, head, st)
    cc = settings.controller
    # [b]: controlled rows update every k of their own tokens (each row keeps its own phase of k)
    due = st.controlled & (st.policy.steps % cc.update_every == 0)
    if any(due_on_host(st, cc.update_every)):  # the same rows as `due`, known without a device sync
        h, alpha, pre, post = _update(head, att, st, due, cc)
        logits = torch.where(due[:, None], post, pre)
        h_post = torch.where(due, entropy_from_logits(post), h)
        alpha = torch.where(due, alpha, torch.zeros_like(alpha))
    else:
        logits = head.logits(att, None if st.ctrl is None else value_delta(att.probs, st.ctrl))
        h = h_post = entropy_from_logits(logits)
        _policy_step(st.policy, h, cc)
        alpha = torch.zeros_like(h)
    token = choose_tokens(logits, settings.sampling, st.seed, st.policy.steps)  # argmax unless decoding.temperature > 0
    st.next_ids, st.next_pos = token[:, None], st.next_pos + 1
    return Step(token=token, entropy=h, entropy_post=h_post, alpha=alpha, logits=logits)


def due_on_host(st: DecodeState, update_every: int) -> list[bool]:
    """The rows whose dV updates this step, from host counters (== `due` in decode_one_token); counts the step."""
    due = [row is not None and get_mode(row.mode).controlled and row.tokens_seen % update_every == 0 for row in st.rows]
    for row in st.rows:
        if row is not None:
            row.tokens_seen += 1
    return due


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


def record_step(st: DecodeState, step: Step, eos: set[int], stops: StopStrings, max_new_tokens: int) -> list[int]:
    """Append the step to each live row's trace (one host transfer); return the slots of the rows that just finished."""
    # float32, exact for all five: the traces are float32 (or narrower), token ids < 2^24 (vocabularies
    # are ~10^5); .float() of a float32 tensor is no op, so this is one cast (the tokens) and the stack
    vals = torch.stack([step.token.float(), step.entropy.float(), step.entropy_post.float(),
                        st.policy.ema.float(), step.alpha.float()], dim=1).tolist()
    now = time.perf_counter()
    finished = []
    for r, (row, (tok, h, h_post, ema, alpha)) in enumerate(zip(st.rows, vals)):
        if row is None:  # a free slot
            continue
        tok = int(tok)
        row.steps.append(TokenRecord(entropy=h, entropy_post=h_post, entropy_ema=ema, alpha=int(alpha)))
        if tok in eos:
            row.finish_reason = "eos"
        else:
            row.token_ids.append(tok)
            if stops.hit(row.token_ids):
                row.finish_reason = "stop_string"
        if row.finish_reason != "max_new_tokens" or len(row.steps) >= max_new_tokens:
            row.latency_s = now - row.t_start
            finished.append(r)
    return finished
