"""V-Reason's controller as pure tensor code: entropy, the EMA / alpha policy, per-sample dV and Adam.

Nothing here knows about models or files; every function runs on CPU tensors in tests.

Shapes: B = samples in the batch, H / kv_heads = attention / key-value heads of the last layer,
n = the most controlled positions (video tokens) of any row in the batch, S = cache length.
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

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.ema, self.max_ema, self.max_step, self.peak_step, self.steps

    def select(self, idx: torch.Tensor) -> "PolicyState":
        return PolicyState(*(t[idx] for t in self._tensors()))

    @staticmethod
    def concat(a: "PolicyState", b: "PolicyState") -> "PolicyState":
        """a's samples then b's."""
        return PolicyState(*(torch.cat([x, y]) for x, y in zip(a._tensors(), b._tensors())))


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

    The project's default rule (`switch`, README "V-Reason, as implemented"): m_0 = H_0,
    m_t = beta m_{t-1} + (1-beta) H_t; the peak is passed once m_t < (1 - delta) max_s m_s, never before `min_explore_tokens`; before the
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
    """Per-sample dV with its Adam moments, padded to the row with the most controlled positions.

    dV is never written into the KV cache (a bfloat16 cache would round `base + dV` and quantise
    the control away); it enters the last layer's attention as `P[:, :, :, pos] @ dV` in float32
    (`value_delta`). Shapes: dv, m, v [B, kv_heads, n, head_dim] fp32; pos [B, n] cache position
    of each controlled slot; valid [B, n] (False = padding: its gradient is 0, so its dV stays 0);
    step [B] Adam steps taken (per-sample bias correction); updates [B] controller updates applied.
    """

    dv: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    step: torch.Tensor
    updates: torch.Tensor

    @classmethod
    def new(cls, controlled: torch.Tensor, kv_heads: int, head_dim: int) -> "ControllerState":
        """controlled: [B, S] bool, the cache positions that carry dV in each row."""
        B = controlled.shape[0]
        dev = controlled.device
        counts = controlled.sum(dim=1)  # [B]
        n = int(counts.max()) if B else 0
        # stable sort puts each row's controlled positions first, in cache order
        order = torch.argsort((~controlled).to(torch.int8), dim=1, stable=True)[:, :n]  # [B, n]
        valid = torch.arange(n, device=dev)[None, :] < counts[:, None]  # [B, n]
        pos = torch.where(valid, order, torch.zeros_like(order))
        z = torch.zeros((B, kv_heads, n, head_dim), dtype=torch.float32, device=dev)
        zb = torch.zeros(B, dtype=torch.long, device=dev)
        return cls(dv=z, m=z.clone(), v=z.clone(), pos=pos, valid=valid, step=zb, updates=zb.clone())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.dv, self.m, self.v, self.pos, self.valid, self.step, self.updates

    def select(self, idx: torch.Tensor) -> "ControllerState":
        """Keep rows `idx` [B'] (indices into the current batch), in that order."""
        return ControllerState(*(t[idx] for t in self._tensors()))

    def shift(self, n: int) -> "ControllerState":
        """The same state over a cache with `n` columns added (n > 0) or removed (n < 0) on the left."""
        if n == 0:
            return self
        pos = torch.where(self.valid, self.pos + n, torch.zeros_like(self.pos))
        return ControllerState(self.dv, self.m, self.v, pos, self.valid, self.step, self.updates)

    @staticmethod
    def concat(a: "ControllerState", b: "ControllerState") -> "ControllerState":
        """a's samples then b's, padded to the larger n (padding slots: valid False, dV and moments 0)."""
        n = max(a.pos.shape[1], b.pos.shape[1])

        def pad(s: "ControllerState") -> tuple[torch.Tensor, ...]:
            extra = n - s.pos.shape[1]
            if extra == 0:
                return s._tensors()
            z = s.dv.new_zeros((s.dv.shape[0], s.dv.shape[1], extra, s.dv.shape[3]))
            return (torch.cat([s.dv, z], 2), torch.cat([s.m, z], 2), torch.cat([s.v, z], 2),
                    torch.cat([s.pos, s.pos.new_zeros((s.pos.shape[0], extra))], 1),
                    torch.cat([s.valid, s.valid.new_zeros((s.valid.shape[0], extra))], 1), s.step, s.updates)

        return ControllerState(*(torch.cat([x, y]) for x, y in zip(pad(a), pad(b))))


def value_delta(probs: torch.Tensor, state: ControllerState, dv: torch.Tensor | None = None) -> torch.Tensor:
    """dV's share of the attention output: `P[..., pos] @ dV`, in fp32.

    probs: [B, H, Q, S] fp32 attention probabilities of the last layer (H = kv_heads * groups; head h
    reads kv head h // groups, as HF's repeat_kv). Returns [B, H, Q, head_dim] fp32. Differentiable in `dv`.
    """
    dv = state.dv if dv is None else dv
    B, H, Q, _ = probs.shape
    kv, n, d = dv.shape[1], dv.shape[2], dv.shape[3]
    idx = state.pos[:, None, None, :].expand(B, H, Q, n)
    p = probs.gather(-1, idx) * state.valid[:, None, None, :]  # [B, H, Q, n]
    out = p.reshape(B, kv, (H // kv) * Q, n) @ dv  # [B, kv, groups * Q, head_dim]
    return out.reshape(B, H, Q, d)


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

    grad: [B, kv_heads, n, head_dim]. Per-sample step counts give per-sample bias correction; rows of
    inactive samples are untouched. With lr = 0 dV stays exactly zero.
    """
    state.step = state.step + active.long()
    g = grad.float()
    m = beta1 * state.m + (1 - beta1) * g
    v = beta2 * state.v + (1 - beta2) * g * g
    t = state.step.clamp(min=1).float().view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    new_dv = state.dv - lr * m_hat / (v_hat.sqrt() + eps)
    r = active.view(-1, 1, 1, 1)
    state.m = torch.where(r, m, state.m)
    state.v = torch.where(r, v, state.v)
    state.dv = torch.where(r, new_dv, state.dv)
