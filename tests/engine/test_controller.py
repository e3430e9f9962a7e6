"""Pure controller code: entropy, the alpha policy on hand-made sequences, Adam, dV in the cache."""

import math

import pytest
import torch

from vreason_batch.engine.controller import ControllerState, PolicyState, adam_step, entropy_from_logits, policy_step, value_delta


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


def run_policy(seq, rule="switch", beta=0.9, delta=0.1, min_explore=16, peak_from=0):
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
    alphas, emas, peak = run_policy(rise + wiggle + fall)
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


def test_value_delta_is_dv_weighted_by_attention_at_its_positions():
    # dense reference: V' = V + dV scattered at the controlled positions; P @ V' - P @ V
    torch.manual_seed(1)
    st = _state([[1, 3], [0, 2, 5]])
    st.dv = torch.randn_like(st.dv) * st.valid[:, None, :, None]  # padding slots stay zero in use
    heads, S = 4, 6  # 2 query heads per kv head
    probs = torch.softmax(torch.randn(2, heads, 1, S), dim=-1)
    dense = torch.zeros(2, 2, S, 4)  # [B, kv, S, d]
    for b in range(2):
        for j in range(int(st.valid[b].sum())):
            dense[b, :, st.pos[b, j]] += st.dv[b, :, j]
    ref = probs @ dense.repeat_interleave(2, dim=1)  # HF's repeat_kv: head h reads kv head h // 2
    torch.testing.assert_close(value_delta(probs, st), ref)


def test_controller_select_keeps_rows_in_order():
    st = _state([[0], [1, 2], [3]])
    st.dv = torch.arange(float(st.dv.numel())).view_as(st.dv)
    kept = st.select(torch.tensor([2, 0]))
    assert kept.pos[:, 0].tolist() == [3, 0]
    assert torch.equal(kept.dv[1], st.dv[0])


def test_peak_from_step_ignores_a_high_opening_token():
    # a chat model: one high-entropy first token, then thinking (rise) and converging (fall)
    seq = [4.0] + [1.0 + 0.05 * i for i in range(30)] + [0.2] * 30
    _, emas, peak_spec = run_policy(seq)
    assert peak_spec == 0  # the specified rule dates the peak at the opening token
    _, emas2, peak = run_policy(seq, peak_from=16)
    assert emas2 == emas  # the EMA itself is unchanged
    assert peak == max(range(16, 32), key=lambda i: emas[i]) and peak > 16
