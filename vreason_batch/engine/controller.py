"""V-Reason's controller as pure tensor code: entropy, the EMA / alpha policy, per-sample dV and Adam.

Nothing here knows about models or files; every function runs on CPU tensors in tests.

Shapes: B = samples in the batch, H / kv_heads = attention / key-value heads of the last layer,
n = the most controlled positions (video tokens) of any row in the batch, S = cache length.

Sign convention of alpha, here and in the `alpha` output column: +1 LOWERS entropy (exploit),
-1 RAISES it (explore); the loss is `alpha * H`. The paper writes `alpha_k * KL(p || U)`, whose
gradient is that of `-alpha_k * H`: our alpha = -(the paper's alpha_k).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# `paper` is the paper's rule (its Fig. 2a); `switch` is this project's earlier rule, written before
# the paper's was known; `always_min` / `always_max` are ablations.
RULES = ("paper", "switch", "always_min", "always_max")
# How dV changes the controlled value vectors V (the paper: `(V + dV) / ||V + dV|| * ||V||`):
# `vector` keeps each value vector's norm (per KV head and token, over head_dim), `block` keeps the
# norm of a row's whole controlled block [kv_heads, n, head_dim], `none` adds dV (V + dV).
VALUE_NORMS = ("vector", "block", "none")


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

    @staticmethod
    def concat(a: "PolicyState", b: "PolicyState") -> "PolicyState":
        """a's samples then b's."""
        return PolicyState(*(torch.cat([x, y]) for x, y in zip(a._tensors(), b._tensors())))

    def put(self, idx: torch.Tensor, other: "PolicyState") -> "PolicyState":
        """This state with rows `idx` [r] replaced by `other`'s r rows."""
        return PolicyState(*(x.index_copy(0, idx, y) for x, y in zip(self._tensors(), other._tensors())))


def policy_step(
    state: PolicyState,
    entropy: torch.Tensor,
    rule: str = "paper",
    beta: float = 0.9,
    delta: float = 0.1,
    min_explore_tokens: int = 16,
    peak_from_step: int = 0,
) -> torch.Tensor:
    """Advance the EMA with H_t [B] and return alpha_t [B] (+1 lower entropy, -1 raise it).

    Every rule shares the EMA: m_0 = H_0, m_t = beta m_{t-1} + (1-beta) H_t, and its running max
    M_t = max_{s<=t} m_s (over steps >= `peak_from_step`).
    - `paper` (the paper's Fig. 2a, `alpha_k = -1 if m_k < M_k else +1` in its sign): explore
      (alpha = -1) while the EMA sits at its running max, exploit (alpha = +1) whenever it is
      below it; before `peak_from_step` there is no max yet, and it explores.
    - `switch` (this project's earlier rule): before the peak alpha = -1 if H_t < m_t else +1 (pull
      H back toward its trend), after it alpha = +1.
    - `always_min` (+1) / `always_max` (-1).
    The peak is declared passed once m_t < (1 - delta) M_t, never before `min_explore_tokens`; its
    step (`peak_step`, the `ema_peak_step` column) is recorded the same way under every rule, and
    only `switch` reads it.
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
    if rule == "paper":
        # max_ema is a copy of one of the EMA's values, so "at the max" is exact equality
        return torch.where(eligible & (state.ema < state.max_ema), ones, -ones)
    explore = torch.where(h < state.ema, -ones, ones)
    return torch.where(state.peak_passed, ones, explore)


@dataclass
class ControllerState:
    """Per-sample dV with its Adam moments, padded to the row with the most controlled positions.

    dV is never written into the KV cache (a bfloat16 cache would round `base + dV` and quantise
    the control away); its effect enters the last layer's attention as `P[:, :, :, pos] @ delta`
    in float32 (`value_delta`), where `delta = V_new - V` is the change it makes to the controlled
    value vectors (`value_change`: norm-keeping by default, `delta = dV` when additive). Shapes:
    dv, m, v, delta [B, kv_heads, n, head_dim] fp32; pos [B, n] cache position of each controlled
    slot; valid [B, n] (False = padding: its gradient is 0, so its dV and delta stay 0); step [B]
    Adam steps taken (per-sample bias correction); updates [B] controller updates applied;
    last_alpha [B] the alpha of the row's last update (0 before the first).
    """

    dv: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    step: torch.Tensor
    updates: torch.Tensor
    delta: torch.Tensor
    last_alpha: torch.Tensor

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
        return cls(dv=z, m=z.clone(), v=z.clone(), pos=pos, valid=valid, step=zb, updates=zb.clone(),
                   delta=z.clone(), last_alpha=zb.clone())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.dv, self.m, self.v, self.pos, self.valid, self.step, self.updates, self.delta, self.last_alpha

    def select(self, idx: torch.Tensor) -> "ControllerState":
        """Keep rows `idx` [B'] (indices into the current batch), in that order."""
        return ControllerState(*(t[idx] for t in self._tensors()))

    def shift(self, n: int) -> "ControllerState":
        """The same state over a cache with `n` columns added (n > 0) or removed (n < 0) on the left."""
        if n == 0:
            return self
        pos = torch.where(self.valid, self.pos + n, torch.zeros_like(self.pos))
        return dataclasses.replace(self, pos=pos)

    def widen(self, n: int) -> "ControllerState":
        """The same state padded to `n` controlled slots (padding slots: valid False, dV, delta and moments 0)."""
        extra = n - self.pos.shape[1]
        if extra <= 0:
            return self
        z = self.dv.new_zeros((self.dv.shape[0], self.dv.shape[1], extra, self.dv.shape[3]))
        zp = self.pos.new_zeros((self.pos.shape[0], extra))
        return dataclasses.replace(
            self, dv=torch.cat([self.dv, z], 2), m=torch.cat([self.m, z], 2), v=torch.cat([self.v, z], 2),
            pos=torch.cat([self.pos, zp], 1), valid=torch.cat([self.valid, zp.bool()], 1), delta=torch.cat([self.delta, z], 2))

    @staticmethod
    def concat(a: "ControllerState", b: "ControllerState") -> "ControllerState":
        """a's samples then b's, padded to the larger n."""
        n = max(a.pos.shape[1], b.pos.shape[1])
        return ControllerState(*(torch.cat([x, y]) for x, y in zip(a.widen(n)._tensors(), b.widen(n)._tensors())))

    def put(self, idx: torch.Tensor, other: "ControllerState") -> "ControllerState":
        """This state with rows `idx` [r] replaced by `other`'s r rows (both padded to the larger n)."""
        n = max(self.pos.shape[1], other.pos.shape[1])
        return ControllerState(*(x.index_copy(0, idx, y) for x, y in zip(self.widen(n)._tensors(), other.widen(n)._tensors())))


def controlled_values(values: torch.Tensor, state: ControllerState) -> torch.Tensor:
    """The cache's value vectors at the controlled slots, in fp32 (an exact upcast).

    values: [B, kv_heads, S, head_dim] the last layer's cache (model dtype). Returns
    [B, kv_heads, n, head_dim] fp32; padding slots hold zeros.
    """
    B, kv, _, d = values.shape
    idx = state.pos[:, None, :, None].expand(B, kv, state.pos.shape[1], d)
    return values.gather(2, idx).float() * state.valid[:, None, :, None]


def value_change(values: torch.Tensor, state: ControllerState, dv: torch.Tensor | None = None,
                 norm: str = "vector") -> torch.Tensor:
    """delta = V_new - V at the controlled slots, fp32 [B, kv_heads, n, head_dim]; differentiable in dv.

    The paper's norm-keeping update `V_new = (V + dV) / ||V + dV|| * ||V||`, the norm over each
    value vector (`vector`, over head_dim) or over a row's whole controlled block (`block`, over
    kv_heads, n and head_dim); `none` is additive (delta = dV). values: the cache's
    [B, kv_heads, S, head_dim]; dv defaults to state.dv.

    Where dV is zero (per vector, or per block), delta is exactly zero, not zero up to rounding: lr
    = 0 must be greedy token for token, and a near-tie would flip on a rounding error. The guard
    changes only the forward value; the gradient is that of the formula, so dV = 0 still moves.
    """
    if norm not in VALUE_NORMS:
        raise ValueError(f"unknown value norm {norm!r}; known: {VALUE_NORMS}")
    dv = state.dv if dv is None else dv
    if norm == "none":
        return dv
    dims = (-1,) if norm == "vector" else (1, 2, 3)
    base = controlled_values(values, state)  # [B, kv, n, d]
    new = base + dv
    n_base = torch.linalg.vector_norm(base, dim=dims, keepdim=True)
    n_new = torch.linalg.vector_norm(new, dim=dims, keepdim=True)
    # a zero vector (padding) has no direction: keep it (scale 1), with no 0/0 in forward or backward
    nonzero = n_new > 0
    scale = torch.where(nonzero, n_base / torch.where(nonzero, n_new, torch.ones_like(n_new)), torch.ones_like(n_new))
    delta = new * scale - base
    untouched = (dv == 0).all(dim=dims, keepdim=True)
    return delta - torch.where(untouched, delta, torch.zeros_like(delta)).detach()


def value_delta(probs: torch.Tensor, state: ControllerState, delta: torch.Tensor | None = None) -> torch.Tensor:
    """dV's share of the attention output: `P[..., pos] @ delta`, in fp32.

    probs: [B, H, Q, S] fp32 attention probabilities of the last layer (H = kv_heads * groups; head h
    reads kv head h // groups, as HF's repeat_kv). delta [B, kv_heads, n, head_dim] defaults to
    state.delta, the change in force. Returns [B, H, Q, head_dim] fp32. Differentiable in `delta`.
    """
    delta = state.delta if delta is None else delta
    B, H, Q, _ = probs.shape
    kv, n, d = delta.shape[1], delta.shape[2], delta.shape[3]
    idx = state.pos[:, None, None, :].expand(B, H, Q, n)
    p = probs.gather(-1, idx) * state.valid[:, None, None, :]  # [B, H, Q, n]
    # one bmm over (row, kv head): [B * kv, groups * Q, n] @ [B * kv, n, head_dim] (the 4D matmul's own
    # kernel, without its broadcasting views)
    out = torch.bmm(p.reshape(B * kv, (H // kv) * Q, n), delta.reshape(B * kv, n, d))
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


def reset_moments(state: ControllerState, rows: torch.Tensor) -> None:
    """Restart Adam for `rows` [B] bool: moments and step count to zero, dV kept.

    For `controller.reset_moments_on_switch`: alpha multiplies the loss, so after a sign switch
    Adam's first moment still points the old way for several steps; a fresh Adam's first step
    after the switch is lr * sign(gradient), the new way.
    """
    r = rows.view(-1, 1, 1, 1)
    state.m = torch.where(r, torch.zeros_like(state.m), state.m)
    state.v = torch.where(r, torch.zeros_like(state.v), state.v)
    state.step = torch.where(rows, torch.zeros_like(state.step), state.step)
