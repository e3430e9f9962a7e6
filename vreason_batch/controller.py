"""V-Reason's controller as pure tensor code: entropy, the EMA / alpha policy, per-sample dV and Adam.

Nothing here knows about models or files; every function runs on CPU tensors in tests.

Shapes: B = samples in the batch, N = total controlled positions over the batch (dV is stored flat,
one row per (sample, position) so samples with different numbers of video tokens need no padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("switch", "always_min", "always_max")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the full vocabulary, in fp32. logits [B, V] -> [B]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@dataclass
class PolicyState:
    """Per-sample EMA of entropy and the exploration phase. All tensors [B]."""

    ema: torch.Tensor  # m_t
    max_ema: torch.Tensor  # max_{s<=t} m_s
    max_step: torch.Tensor  # argmax step of m so far (long)
    peak_step: torch.Tensor  # step of the EMA peak once passed, -1 before (long)
    steps: torch.Tensor  # tokens seen (long)

    @classmethod
    def new(cls, batch: int, device=None) -> "PolicyState":
        z = torch.zeros(batch, dtype=torch.float32, device=device)
        zl = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(ema=z.clone(), max_ema=z.clone(), max_step=zl.clone(), peak_step=zl - 1, steps=zl.clone())

    @property
    def peak_passed(self) -> torch.Tensor:
        return self.peak_step >= 0

    def select(self, idx: torch.Tensor) -> "PolicyState":
        return PolicyState(*(t[idx] for t in (self.ema, self.max_ema, self.max_step, self.peak_step, self.steps)))


def policy_step(
    state: PolicyState,
    entropy: torch.Tensor,
    rule: str = "switch",
    beta: float = 0.9,
    delta: float = 0.1,
    min_explore_tokens: int = 16,
    peak_from_step: int = 0,
) -> torch.Tensor:
    """Advance the EMA with H_t [B] and return alpha_t [B] (+1 lower entropy, -1 raise it).

    The project's default rule (`switch`, see VREASON.md): m_0 = H_0, m_t = beta m_{t-1} + (1-beta) H_t;
    the peak is passed once m_t < (1 - delta) max_s m_s, never before `min_explore_tokens`; before the
    peak alpha = -1 if H_t < m_t else +1 (pull H back toward its trend), after it alpha = +1.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {RULES}")
    h = entropy.float()
    first = state.steps == 0
    state.ema = torch.where(first, h, beta * state.ema + (1 - beta) * h)
    eligible = state.steps >= peak_from_step
    new_max = eligible & ((state.steps == peak_from_step) | (state.ema > state.max_ema))
    state.max_ema = torch.where(new_max, state.ema, state.max_ema)
    state.max_step = torch.where(new_max, state.steps, state.max_step)
    passing = (
        (~state.peak_passed)
        & eligible
        & (state.steps >= min_explore_tokens)
        & (state.ema < (1 - delta) * state.max_ema)
    )
    state.peak_step = torch.where(passing, state.max_step, state.peak_step)
    state.steps = state.steps + 1
    ones = torch.ones_like(h)
    if rule == "always_min":
        return ones
    if rule == "always_max":
        return -ones
    explore = torch.where(h < state.ema, -ones, ones)
    return torch.where(state.peak_passed, ones, explore)


@dataclass
class ControllerState:
    """Per-sample dV with its Adam moments. dV lives only at the controlled positions.

    dv, m, v: [N, kv_heads, head_dim] fp32; owner: [N] sample index of each row; pos: [N] cache
    position of each row; base: [N, kv_heads, head_dim] the value cache at those positions before any
    update (so the cache can be rewritten exactly as base + dV); step: [B] Adam step count.
    """

    dv: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    owner: torch.Tensor
    pos: torch.Tensor
    base: torch.Tensor
    step: torch.Tensor
    updates: torch.Tensor  # [B] controller updates applied (for the output row)

    @classmethod
    def new(cls, values: torch.Tensor, owner: torch.Tensor, pos: torch.Tensor, batch: int) -> "ControllerState":
        """values: the last layer's value cache [B, kv_heads, S, head_dim]; owner/pos: [N] long."""
        base = values.permute(0, 2, 1, 3)[owner, pos].detach().clone()  # [N, kv_heads, head_dim]
        z = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        zb = torch.zeros(batch, dtype=torch.long, device=base.device)
        return cls(dv=z, m=z.clone(), v=z.clone(), owner=owner, pos=pos, base=base, step=zb, updates=zb.clone())

    def select(self, idx: torch.Tensor, batch_before: int) -> "ControllerState":
        """Keep samples `idx` (sorted [B'] indices into the current batch) and renumber owners."""
        remap = torch.full((batch_before,), -1, dtype=torch.long, device=self.owner.device)
        remap[idx] = torch.arange(idx.numel(), device=self.owner.device)
        keep = remap[self.owner] >= 0
        return ControllerState(
            dv=self.dv[keep], m=self.m[keep], v=self.v[keep], owner=remap[self.owner[keep]],
            pos=self.pos[keep], base=self.base[keep], step=self.step[idx], updates=self.updates[idx],
        )

    def effective_values(self, values: torch.Tensor, dv: torch.Tensor | None = None) -> torch.Tensor:
        """values [B, kv_heads, S, head_dim] with base + dV written at the controlled positions.

        Differentiable in `dv`; the cache tensor itself is not modified. Positions are unique, so the
        index_put is deterministic.
        """
        dv = self.dv if dv is None else dv
        out = values.detach().permute(0, 2, 1, 3).clone()  # [B, S, kv_heads, head_dim]
        out = out.index_put((self.owner, self.pos), (self.base + dv).to(values.dtype))
        return out.permute(0, 2, 1, 3)

    def write_cache(self, values: torch.Tensor) -> None:
        """Write base + dV into the value cache in place ([B, kv_heads, S, head_dim])."""
        values.permute(0, 2, 1, 3)[self.owner, self.pos] = (self.base + self.dv).to(values.dtype)


def adam_step(
    state: ControllerState,
    grad: torch.Tensor,
    active: torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """One elementwise Adam step on dV for the samples where `active` [B] is True.

    Per-sample step counts give per-sample bias correction; rows of inactive samples are untouched.
    With lr = 0 dV stays exactly zero.
    """
    rows = active[state.owner]  # [N]
    state.step = state.step + active.long()
    g = grad.float()
    m = beta1 * state.m + (1 - beta1) * g
    v = beta2 * state.v + (1 - beta2) * g * g
    t = state.step[state.owner].clamp(min=1).float().view(-1, 1, 1)  # [N, 1, 1]
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    new_dv = state.dv - lr * m_hat / (v_hat.sqrt() + eps)
    r = rows.view(-1, 1, 1)
    state.m = torch.where(r, m, state.m)
    state.v = torch.where(r, v, state.v)
    state.dv = torch.where(r, new_dv, state.dv)
