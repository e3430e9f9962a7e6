"""Pure controller code: entropy, the alpha policy on hand-made sequences, Adam, dV's change of the values."""

import math

import pytest
import torch

from vreason_batch.engine.controller import (
    ControllerState, PolicyState, adam_step, entropy_from_logits, policy_step, reset_moments, value_change, value_delta,
)


def test_entropy_uniform_and_peaked():
    v = 1000
    h = entropy_from_logits(torch.stack([torch.zeros(v), torch.tensor([50.0] + [0.0] * (v - 1))]))
    assert h[0].item() == pytest.approx(math.log(v), rel=1e-6)
    assert h[1].item() < 1e-6
    assert h.dtype == torch.float32


def test_entropy_is_fp32_for_bf16_logits():
    logits = torch.randn(2, 5000).to(torch.bfloat16)
    h = entropy_from_logits(logits)
    ref = entropy_from_logits(logits.float())
    assert h.dtype == torch.float32 and torch.allclose(h, ref)


def run_policy(seq, rule="paper", beta=0.9, delta=0.1, min_explore=16, peak_from=0):
    st = PolicyState.new(1)
    alphas, emas = [], []
    for x in seq:
        a = policy_step(st, torch.tensor([float(x)]), rule, beta, delta, min_explore, peak_from)
        alphas.append(int(a[0]))
        emas.append(float(st.ema[0]))
    return alphas, emas, int(st.peak_step[0])


def test_ema_recursion():
    _, emas, _ = run_policy([2.0, 4.0, 0.0], min_explore=100)
    assert emas[0] == pytest.approx(2.0)  # m_0 = H_0
    assert emas[1] == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert emas[2] == pytest.approx(0.9 * emas[1])


def test_switch_rule_explores_until_peak_then_exploits():
    # entropy climbs (thinking), oscillates, then falls sharply (converging)
    rise = [1.0 + 0.1 * i for i in range(20)]
    wiggle = [3.0, 2.0, 3.2, 2.1] * 3
    fall = [0.2] * 30
    alphas, emas, peak = run_policy(rise + wiggle + fall, rule="switch")
    n_pre = len(rise) + len(wiggle)
    # before the peak: alpha = -1 when H < EMA, +1 otherwise (switching)
    for t in range(n_pre):
        x = (rise + wiggle)[t]
        assert alphas[t] == (-1 if x < emas[t] else 1), t
    assert {-1, 1} <= set(alphas[:n_pre])
    # the peak is the argmax of the EMA and is detected during the fall
    assert peak == max(range(n_pre + 1), key=lambda i: emas[i])
    detected = next(t for t in range(len(emas)) if emas[t] < 0.9 * max(emas[: t + 1]) and t >= 16)
    assert all(a == 1 for a in alphas[detected:])
    assert detected >= n_pre


def test_no_peak_before_min_explore_tokens():
    seq = [5.0, 0.1, 0.1, 0.1, 0.1, 0.1]
    _, _, peak_default = run_policy(seq, min_explore=16)
    assert peak_default == -1
    _, _, peak_early = run_policy(seq, min_explore=2)
    assert peak_early == 0


def test_paper_rule_on_a_hand_made_sequence():
    # beta 0.5: m = 1, 2, 2.5 (rising: at the running max, explore), 1.25, 0.625 (below it:
    # exploit), 4.3125 (a new max: explore again), 2.15625 (below: exploit)
    alphas, emas, _ = run_policy([1.0, 3.0, 3.0, 0.0, 0.0, 8.0, 0.0], beta=0.5, min_explore=100)
    assert emas == [1.0, 2.0, 2.5, 1.25, 0.625, 4.3125, 2.15625]
    assert alphas == [-1, -1, -1, 1, 1, -1, 1]
    # the paper's sign is the opposite: alpha_k = -1 if m_k < max m else +1
    paper = [-1 if m < max(emas[: t + 1]) else 1 for t, m in enumerate(emas)]
    assert alphas == [-a for a in paper]


def test_paper_rule_explores_on_a_plateau_at_the_max_and_exploits_after_the_peak():
    # an EMA equal to its running max is "at" it (not below): explore
    assert run_policy([2.0, 2.0, 2.0])[0] == [-1, -1, -1]
    # after the global peak the EMA stays below it: exploit only, whatever H_t does around the EMA
    rise, wiggle = [1.0 + 0.2 * i for i in range(10)], [1.0, 2.5, 0.5, 2.5, 1.0, 2.0] * 3
    alphas, emas, _ = run_policy(rise + wiggle)
    top = max(range(len(emas)), key=lambda t: emas[t])
    assert all(a == 1 for a in alphas[top + 1:])
    assert all(a == -1 for a in alphas[: len(rise)])


def test_paper_rule_explores_before_peak_from_step():
    # a high opening token: with the running max from step 0 it is the peak and the rule exploits
    # from step 1; with peak_from_step 3 the max starts at step 3 and the steps before it explore
    seq = [4.0, 1.0, 1.1, 1.2, 1.3, 0.2, 0.2]
    assert run_policy(seq)[0] == [-1, 1, 1, 1, 1, 1, 1]
    assert run_policy(seq, peak_from=3)[0] == [-1, -1, -1, -1, 1, 1, 1]


def test_fixed_rules():
    seq = [3.0, 1.0, 4.0, 0.5]
    assert run_policy(seq, rule="always_min")[0] == [1, 1, 1, 1]
    assert run_policy(seq, rule="always_max")[0] == [-1, -1, -1, -1]
    with pytest.raises(ValueError):
        run_policy(seq, rule="bogus")


def test_policy_is_per_sample():
    st = PolicyState.new(2)
    a = [policy_step(st, torch.tensor([1.0, 5.0 - i])) for i in range(3)]
    single = PolicyState.new(1)
    b = [policy_step(single, torch.tensor([5.0 - i])) for i in range(3)]
    assert [int(x[1]) for x in a] == [int(x[0]) for x in b]
    assert st.ema[1].item() == pytest.approx(single.ema[0].item())


def _state(rows, S=6, kv=2, d=4):
    """Controlled positions per row (lists of cache positions) -> a ControllerState."""
    mask = torch.zeros(len(rows), S, dtype=torch.bool)
    for b, pos in enumerate(rows):
        mask[b, pos] = True
    return ControllerState.new(mask, kv, d)


def test_controller_state_pads_rows_to_the_longest():
    st = _state([[1, 3], [0, 2, 5]])
    assert st.dv.shape == (2, 2, 3, 4) and st.dv.dtype == torch.float32
    assert st.valid.tolist() == [[True, True, False], [True, True, True]]
    assert st.pos[0, :2].tolist() == [1, 3] and st.pos[1].tolist() == [0, 2, 5]


def test_adam_matches_torch_adam_and_lr0_is_identity():
    torch.manual_seed(0)
    st = _state([[1, 3]])
    ref = torch.zeros_like(st.dv, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(5):
        g = torch.randn_like(st.dv)
        adam_step(st, g, torch.tensor([True]), lr=0.01)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(st.dv, ref.detach(), atol=1e-7)
    st0 = _state([[2]])
    adam_step(st0, torch.randn_like(st0.dv), torch.tensor([True]), lr=0.0)
    assert torch.equal(st0.dv, torch.zeros_like(st0.dv))


def test_adam_leaves_inactive_samples_alone():
    st = _state([[1], [2, 4]])
    adam_step(st, torch.ones_like(st.dv), torch.tensor([False, True]), lr=0.1)
    assert torch.equal(st.dv[0], torch.zeros_like(st.dv[0]))
    assert (st.dv[1] != 0).all()
    assert st.step.tolist() == [0, 1]


def test_value_delta_is_the_change_weighted_by_attention_at_its_positions():
    # dense reference: V' = V + delta scattered at the controlled positions; P @ V' - P @ V
    torch.manual_seed(1)
    st = _state([[1, 3], [0, 2, 5]])
    st.delta = torch.randn_like(st.dv) * st.valid[:, None, :, None]  # padding slots stay zero in use
    heads, S = 4, 6  # 2 query heads per kv head
    probs = torch.softmax(torch.randn(2, heads, 1, S), dim=-1)
    dense = torch.zeros(2, 2, S, 4)  # [B, kv, S, d]
    for b in range(2):
        for j in range(int(st.valid[b].sum())):
            dense[b, :, st.pos[b, j]] += st.delta[b, :, j]
    ref = probs @ dense.repeat_interleave(2, dim=1)  # HF's repeat_kv: head h reads kv head h // 2
    torch.testing.assert_close(value_delta(probs, st), ref)
    other = torch.randn_like(st.dv) * st.valid[:, None, :, None]
    torch.testing.assert_close(value_delta(probs, st, other), probs @ _dense(st, other).repeat_interleave(2, dim=1))


def _dense(st, per_slot, S=6):
    """[B, kv, n, d] per controlled slot -> [B, kv, S, d] scattered at the slots' cache positions."""
    out = torch.zeros(per_slot.shape[0], per_slot.shape[1], S, per_slot.shape[3], dtype=per_slot.dtype)
    for b in range(per_slot.shape[0]):
        for j in range(int(st.valid[b].sum())):
            out[b, :, st.pos[b, j]] += per_slot[b, :, j]
    return out


def _values(B=2, kv=2, S=6, d=4, dtype=torch.bfloat16, seed=2):
    torch.manual_seed(seed)
    return (3 * torch.randn(B, kv, S, d)).to(dtype)


def _paper_update(V, dV, dims):
    """The figure's formula in float64: (V + dV) / ||V + dV|| * ||V||, V and dV [kv, n, d] of one row."""
    new = V + dV
    norm = torch.linalg.vector_norm
    return new / norm(new, dim=dims, keepdim=True) * norm(V, dim=dims, keepdim=True)


@pytest.mark.parametrize("norm,dims", [("vector", (-1,)), ("block", (0, 1, 2))])
def test_value_change_is_the_norm_keeping_update(norm, dims):
    st = _state([[1, 3], [0, 2, 5]])
    values = _values()
    dv = 0.5 * torch.randn_like(st.dv) * st.valid[:, None, :, None]
    delta = value_change(values, st, dv, norm)
    for b in range(2):
        n = int(st.valid[b].sum())
        V = values[b].double()[:, st.pos[b, :n]]  # [kv, n, d]
        ref = _paper_update(V, dv[b, :, :n].double(), dims) - V
        torch.testing.assert_close(delta[b, :, :n].double(), ref, rtol=1e-5, atol=1e-5)
        new = V + delta[b, :, :n].double()
        norm_of = torch.linalg.vector_norm
        torch.testing.assert_close(norm_of(new, dim=dims), norm_of(V, dim=dims), rtol=1e-5, atol=1e-5)
    assert torch.equal(delta[0, :, 2], torch.zeros_like(delta[0, :, 2]))  # padding
    assert torch.equal(value_change(values, st, dv, "none"), dv)


@pytest.mark.parametrize("norm", ["vector", "block"])
def test_value_change_gradient_is_the_formulas(norm):
    # at a general dV, and at dV = 0 (where the forward value is exactly 0 but the gradient is not)
    st = _state([[0, 1, 2, 4]])
    values = _values(B=1, seed=3)
    dims = (-1,) if norm == "vector" else (0, 1, 2)
    V = values[0].double()[:, st.pos[0]]
    cot = torch.randn_like(st.dv)
    for dv0 in (0.3 * torch.randn_like(st.dv), torch.zeros_like(st.dv)):
        dv = dv0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((value_change(values, st, dv, norm) * cot).sum(), dv)
        ref_dv = dv0[0].double().requires_grad_(True)
        (ref,) = torch.autograd.grad(((_paper_update(V, ref_dv, dims) - V) * cot[0].double()).sum(), ref_dv)
        assert ref.abs().max() > 0
        torch.testing.assert_close(g[0].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["vector", "block", "none"])
def test_value_change_is_exactly_zero_where_dv_is_zero(dtype, norm):
    # not zero up to rounding: lr = 0 must be greedy token for token
    st = _state([[1, 3], [0, 2, 5]])
    for seed in range(5):
        values = _values(dtype=dtype, seed=seed)
        assert torch.equal(value_change(values, st, torch.zeros_like(st.dv), norm), torch.zeros_like(st.dv))
    # per vector: a vector whose dV is zero is left exactly as it is, the others turn
    dv = torch.zeros_like(st.dv)
    dv[1, :, 1] = 0.7
    delta = value_change(values, st, dv, "vector")
    assert torch.equal(delta[1, :, 0], torch.zeros_like(delta[1, :, 0])) and (delta[1, :, 1] != 0).any()


def test_value_change_handles_zero_vectors():
    # a zero value vector has no direction: no NaN in forward or backward, and it stays zero
    st = _state([[1, 3]])
    values = _values(B=1)
    values[0, :, 1] = 0
    dv = (0.1 * torch.ones_like(st.dv)).requires_grad_(True)
    for norm in ("vector", "block"):
        delta = value_change(values, st, dv, norm)
        (g,) = torch.autograd.grad(delta.sum(), dv)
        assert torch.isfinite(delta).all() and torch.isfinite(g).all()
    assert torch.equal(value_change(values, st, dv, "vector")[0, :, 0], torch.zeros(2, 4))


def test_controller_select_keeps_rows_in_order():
    st = _state([[0], [1, 2], [3]])
    st.dv = torch.arange(float(st.dv.numel())).view_as(st.dv)
    st.delta = -st.dv
    st.last_alpha = torch.tensor([1, -1, 0])
    kept = st.select(torch.tensor([2, 0]))
    assert kept.pos[:, 0].tolist() == [3, 0]
    assert torch.equal(kept.dv[1], st.dv[0]) and torch.equal(kept.delta[1], st.delta[0])
    assert kept.last_alpha.tolist() == [0, 1]
    both = ControllerState.concat(kept, _state([[0, 1, 2]]))
    assert both.delta.shape == (3, 2, 3, 4) and torch.equal(both.delta[0, :, :1], st.delta[2, :, :1])
    assert torch.equal(both.delta[:2, :, 2:], torch.zeros(2, 2, 1, 4)) and both.last_alpha.tolist() == [0, 1, 0]


def _adam_moves(alphas, reset):
    """dV after each update of loss alpha * sum(dV) (gradient alpha everywhere), lr 1; reset: restart
    Adam on a switch of alpha's sign, as controller.reset_moments_on_switch does."""
    st, last, out = _state([[0]]), 0, []
    for a in alphas:
        if reset and last and a != last:
            reset_moments(st, torch.tensor([True]))
        adam_step(st, torch.full_like(st.dv, float(a)), torch.tensor([True]), lr=1.0)
        out.append(float(st.dv[0, 0, 0, 0]))
        last = a
    return out


def test_adam_carries_the_old_sign_across_a_switch_unless_reset():
    # four updates that lower the loss (alpha = +1: dV goes down), then alpha = -1 (dV should go up)
    plain = _adam_moves([1, 1, 1, 1, -1, -1], reset=False)
    assert plain[4] < plain[3] and plain[5] < plain[4]  # the first two -1 updates still move dV down
    fresh = _adam_moves([1, 1, 1, 1, -1, -1], reset=True)
    assert fresh[:4] == plain[:4]
    assert fresh[4] == pytest.approx(plain[3] + 1.0, abs=1e-4) and fresh[5] > fresh[4]  # a fresh Adam: lr * sign, the new way


def test_peak_from_step_ignores_a_high_opening_token():
    # a chat model: one high-entropy first token, then thinking (rise) and converging (fall)
    seq = [4.0] + [1.0 + 0.05 * i for i in range(30)] + [0.2] * 30
    _, emas, peak_spec = run_policy(seq)
    assert peak_spec == 0  # the specified rule dates the peak at the opening token
    _, emas2, peak = run_policy(seq, peak_from=16)
    assert emas2 == emas  # the EMA itself is unchanged
    assert peak == max(range(16, 32), key=lambda i: emas[i]) and peak > 16
