"""The decode loop on the tiny Qwen2.5-VL: equivalences with independent references, batching,
the controller's effect, Lite, stops, and the precision of the controller in bfloat16 / float16."""

import copy
import dataclasses
import statistics

import pytest
import torch

from engine_util import decode_settings as settings_for
from engine_util import tiny_lm, video_inputs
from vreason_batch.config import ModelConfig
from vreason_batch.engine.controller import entropy_from_logits
from vreason_batch.engine.api import DecodeResult
from vreason_batch.engine.driver import decode_batch
from vreason_batch.engine.prefill import prefill, prune_video_tokens
from vreason_batch.engine.step import StopStrings, decode_one_token, entropy_and_grad, forward_last_token
from vreason_batch.engine.last_layer import LastLayer
from vreason_batch.engine.loading import load_model
from vreason_batch.engine.prompting import collate
from vreason_batch.io.schema import OUTPUT_COLUMNS

N = 24


def settings(mode, n=N, **kw):
    return settings_for(mode, n, **kw)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def samples():
    # different frame counts and sizes -> different numbers of video tokens and prompt lengths
    return [video_inputs(0, 4, 112, 112), video_inputs(1, 6, 84, 140, "How many people are in the room?")]


@pytest.fixture(scope="module")
def greedy_single(lm, samples):
    return [decode_batch(lm, [s], settings("greedy"))[0] for s in samples]


def hf_inputs(lm, batch):
    """What the HF processor would hand generate: including mm_token_type_ids (2 = video), without
    which transformers 5 silently falls back to 1D positions."""
    inputs = collate(lm, batch)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == lm.vision.video_token_id).int() * 2
    return inputs


def paper_values(V, dv, norm):
    """The last layer's values at the controlled positions as the paper's figure updates them:
    (V + dV) / ||V + dV|| * ||V|| (norm per vector, or over the whole block), or V + dV (`none`).
    V, dv: [kv, n, d]."""
    if norm == "none":
        return V + dv
    dims = (-1,) if norm == "vector" else (0, 1, 2)
    new = V + dv
    size = torch.linalg.vector_norm
    return new / size(new, dim=dims, keepdim=True) * size(V, dim=dims, keepdim=True)


def full_model_logits(lm, sample, tokens, dv=None, pos=None, norm="vector"):
    """Reference: HF's own full forward (no cache, every layer HF's) over prompt + `tokens`, batch of
    one, with the last layer's values at cache positions `pos` ([n]) replaced by `paper_values` of
    HF's own values there, computed in float64; dv [kv, n, d]. Returns the fp32 logits at the last
    position [V]."""
    inputs = hf_inputs(lm, [sample])
    pos_ids = lm.prompt_position_ids(inputs)  # [4, 1, T]
    extra = torch.tensor(tokens, dtype=torch.long).view(1, -1)
    steps = torch.arange(1, len(tokens) + 1).view(1, 1, -1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra).int()], dim=1)
    position_ids = torch.cat([pos_ids, pos_ids[..., -1:] + steps], dim=-1)
    hook = None
    if dv is not None:
        kv, _, d = dv.shape

        def replace_values(module, args, out):  # v_proj output [1, L, kv * d]; values carry no rotary embedding
            L = out.shape[1]
            values = out[0].reshape(L, kv, d)
            V = values[pos].permute(1, 0, 2).double()  # [kv, n, d]
            new = paper_values(V, dv.double(), norm).permute(1, 0, 2).to(out.dtype)
            return values.index_put((pos,), new).reshape(1, L, kv * d)

        hook = lm.last_layer().self_attn.v_proj.register_forward_hook(replace_values)
    try:
        out = lm.model(**inputs, position_ids=position_ids, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    return out.logits[0, -1].float()


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_greedy_equals_hf_generate(lm, samples, greedy_single):
    for s, ours in zip(samples, greedy_single):
        inputs = hf_inputs(lm, [s])
        hf = lm.model.generate(**inputs, max_new_tokens=N, do_sample=False)
        assert ours.token_ids == hf[0, inputs["input_ids"].shape[1]:].tolist()[: len(ours.token_ids)]
        assert ours.num_output_tokens == len(ours.entropy) == N


def test_greedy_batch_equals_hf_generate_left_padded(lm, samples):
    inputs = hf_inputs(lm, samples)
    hf = lm.model.generate(**inputs, max_new_tokens=N, do_sample=False)
    ours = decode_batch(lm, samples, settings("greedy"))
    for i, r in enumerate(ours):
        assert r.token_ids == hf[i, inputs["input_ids"].shape[1]:].tolist()


def test_eager_attention_decodes_as_sdpa(lm, samples):
    # the layers before the last run HF's eager kernel with its own additive mask form
    eager = load_model(ModelConfig(attn_implementation="eager"))
    assert eager.model.config._attn_implementation == "eager"
    s = settings("vreason", n=12, lr=1e-2, update_every=2)
    for e, v in zip(decode_batch(eager, samples, s), decode_batch(lm, samples, s)):
        assert e.token_ids == v.token_ids and e.alpha == v.alpha
        torch.testing.assert_close(e.entropy, v.entropy, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rule,norm", [("paper", "vector"), ("switch", "none"), ("always_min", "block"),
                                       ("always_max", "vector")])
def test_vreason_with_lr0_is_greedy(lm, samples, greedy_single, rule, norm):
    out = decode_batch(lm, samples, settings("vreason", lr=0.0, update_every=1, rule=rule, value_norm=norm))
    for r, g in zip(out, greedy_single):
        assert r.token_ids == g.token_ids
        assert r.controller_updates == N
        assert r.entropy == pytest.approx(g.entropy, abs=1e-4)


def test_vreason_changes_the_decode(lm, samples, greedy_single):
    # one update moves H by ~1e-4 nats on this random model: a large lr is needed to flip tokens
    out = decode_batch(lm, samples, settings("vreason", lr=0.1, update_every=1, rule="always_max"))
    assert any(r.token_ids != g.token_ids for r, g in zip(out, greedy_single))


def _steps(lm, sample, s, n):
    """Drive the loop by hand: [(dV after the step [kv, n_ctrl, d], Step)], and the controlled positions."""
    head = LastLayer(lm.last_layer_parts())
    with torch.no_grad():
        st = prefill(lm, head, [sample], s)
        out = []
        for _ in range(n):
            step = decode_one_token(lm, head, st, s)
            out.append((st.ctrl.dv[0].clone(), step))
    return out, st.ctrl.pos[0]


@pytest.mark.parametrize("norm", ["vector", "block", "none"])
def test_dv_reaches_every_step_as_in_the_full_model(lm, samples, norm):
    # k = 2: odd steps make no update; their logits must still carry dV (through the attention over
    # the cache), exactly as HF's full model with the last layer's values V_new (paper_values) computes them
    sample = samples[0]
    s = settings("vreason", lr=0.1, update_every=2, rule="always_max", value_norm=norm)
    trace, pos = _steps(lm, sample, s, 6)
    tokens = [int(step.token) for _, step in trace]
    for t, (dv, step) in enumerate(trace):
        ref = full_model_logits(lm, sample, tokens[:t], dv, pos, norm)
        assert int(ref.argmax()) == tokens[t]
        assert float((step.logits[0] - ref).abs().max()) < 1e-4, t  # measured <= 2.4e-5
        # without dV the reference is elsewhere (measured >= 2.9e-3), so this test can fail
        base = full_model_logits(lm, sample, tokens[:t])
        assert float((base - ref).abs().max()) > 1e-3, t


@pytest.mark.parametrize("norm", ["vector", "block", "none"])
def test_update_gradient_equals_full_model_autograd(lm, samples, norm):
    sample = samples[1]
    s = settings("vreason", lr=1e-2, update_every=1)
    head = LastLayer(lm.last_layer_parts())
    with torch.no_grad():
        st = prefill(lm, head, [sample], s)
        att = forward_last_token(lm, head, st)
    torch.manual_seed(0)
    st.ctrl.dv = 0.05 * torch.randn_like(st.ctrl.dv)  # a general point, not dV = 0
    _, h, _, grad = entropy_and_grad(head, att, st.ctrl, lambda h: -torch.ones_like(h), norm)

    dv = st.ctrl.dv[0].clone().requires_grad_(True)
    with torch.enable_grad():
        ref_h = entropy_from_logits(full_model_logits(lm, sample, [], dv, st.ctrl.pos[0], norm)[None])
        (ref_grad,) = torch.autograd.grad(-ref_h.sum(), dv)
    assert float(h[0]) == pytest.approx(float(ref_h.detach()), abs=1e-5)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad[0], ref_grad, rtol=1e-3, atol=1e-4 * float(ref_grad.abs().max()))


def _switch_rule_alphas(entropy, beta=0.9, delta=0.1, min_explore=16):
    """The switch rule as the README states it, in plain Python: (alphas, emas)."""
    alphas, emas, m, best, passed = [], [], None, None, False
    for t, h in enumerate(entropy):
        m = h if t == 0 else beta * m + (1 - beta) * h
        best = m if best is None else max(best, m)
        if not passed and t >= min_explore and m < (1 - delta) * best:
            passed = True
        alphas.append(1 if passed else (-1 if h < m else 1))
        emas.append(m)
    return alphas, emas


def _paper_rule_alphas(emas):
    """The paper's rule (Fig. 2a) from an EMA trace, in plain Python and in this project's sign:
    +1 (lower entropy) where the EMA is below its running maximum, -1 (raise it) where it is at it."""
    return [1 if m < max(emas[: t + 1]) else -1 for t, m in enumerate(emas)]


def _ema(entropy, beta=0.9):
    out = []
    for t, h in enumerate(entropy):
        out.append(h if t == 0 else beta * out[-1] + (1 - beta) * h)
    return out


@pytest.mark.parametrize("rule", ["paper", "switch"])
def test_recorded_alpha_is_the_rule_recomputed_from_the_traces(lm, samples, rule):
    out = decode_batch(lm, samples, settings("vreason", n=40, lr=1e-2, update_every=2, min_explore_tokens=4, rule=rule))
    seen = set()
    for r in out:
        assert r.entropy_ema == pytest.approx(_ema(r.entropy), abs=1e-5)
        if rule == "paper":  # from the recorded EMA itself: its values are the ones the rule compared
            alphas = _paper_rule_alphas(r.entropy_ema)
        else:
            alphas, _ = _switch_rule_alphas(r.entropy, min_explore=4)
        assert r.alpha == [a if t % 2 == 0 else 0 for t, a in enumerate(alphas)]
        seen |= set(r.alpha)
    assert {-1, 1} <= seen  # both signs occurred, so a constant alpha would fail this test


def test_reset_moments_on_switch_acts_from_the_first_switch_on(lm, samples):
    # both runs are the same up to the first update whose alpha differs from the last one; from
    # there the restarted Adam moves dV differently
    s = dict(n=16, lr=1e-2, update_every=1, rule="switch", min_explore_tokens=100)
    plain = decode_batch(lm, samples[:1], settings("vreason", **s))[0]
    fresh = decode_batch(lm, samples[:1], settings("vreason", reset_moments_on_switch=True, **s))[0]
    first = next(t for t in range(1, 16) if plain.alpha[t] != plain.alpha[t - 1])
    assert fresh.alpha[: first + 1] == plain.alpha[: first + 1]
    assert fresh.entropy_post[:first] == plain.entropy_post[:first]
    assert fresh.entropy_post[first] != plain.entropy_post[first]


def test_batched_equals_single_vreason(lm, samples):
    s = settings("vreason", lr=1e-2, update_every=2, steps_per_update=2)
    batched = decode_batch(lm, samples, s)
    for sample, b in zip(samples, batched):
        single = decode_batch(lm, [sample], s)[0]
        assert b.token_ids == single.token_ids
        assert b.alpha == single.alpha
        assert b.controller_updates == single.controller_updates == N // 2
        assert b.entropy == pytest.approx(single.entropy, abs=1e-3)
        assert b.entropy_ema == pytest.approx(single.entropy_ema, abs=1e-3)


def _unique_token_step(mine, other, lo=3):
    """A step of `mine` whose token appears neither earlier in `mine` nor anywhere in `other`."""
    for s in range(lo, len(mine) - 2):
        if mine[s] not in other and mine[s] not in mine[:s]:
            return s
    raise AssertionError("no usable token: the fixture outputs are degenerate")


def test_finished_sample_leaves_batch_and_others_are_unaffected(lm, samples):
    s = settings("vreason", lr=1e-2, update_every=1)
    singles = [decode_batch(lm, [x], s)[0] for x in samples]
    step = _unique_token_step(singles[0].token_ids, singles[1].token_ids)
    saved = list(lm.eos_token_ids)
    lm.eos_token_ids = saved + [singles[0].token_ids[step]]  # sample 0 ends at `step`, sample 1 never
    try:
        out = decode_batch(lm, samples, s)
    finally:
        lm.eos_token_ids = saved
    assert out[0].finish_reason == "eos"
    assert out[0].token_ids == singles[0].token_ids[:step]
    assert out[0].num_output_tokens == step + 1 and out[0].controller_updates == step + 1
    assert out[1].token_ids == singles[1].token_ids
    assert out[1].entropy == pytest.approx(singles[1].entropy, abs=1e-3)
    assert out[0].latency_s < out[1].latency_s


@pytest.mark.parametrize("alpha_rule,sign", [("always_min", -1), ("always_max", 1)])
def test_one_update_moves_entropy_in_alpha_direction(lm, samples, alpha_rule, sign):
    r = decode_batch(lm, samples[:1], settings("vreason", n=1, lr=1e-3, update_every=1, rule=alpha_rule))[0]
    change = r.entropy_post[0] - r.entropy[0]
    assert change * sign > 0, (r.entropy, r.entropy_post)


def test_more_steps_move_entropy_further(lm, samples):
    def change(steps):
        r = decode_batch(lm, samples[:1], settings("vreason", n=1, lr=1e-3, update_every=1, steps_per_update=steps,
                                                   rule="always_min"))[0]
        return r.entropy_post[0] - r.entropy[0]
    assert change(4) < change(1) < 0


def test_update_every_k(lm, samples, greedy_single):
    r = decode_batch(lm, samples[:1], settings("vreason", lr=1e-2, update_every=3, rule="always_min"))[0]
    updates = [i for i, a in enumerate(r.alpha) if a != 0]
    assert updates == list(range(0, N, 3))
    assert r.controller_updates == len(updates)
    g = greedy_single[0]
    shared = first_divergence(r.token_ids, g.token_ids) or N
    assert shared > 6
    # between updates the chosen-from logits are the pre-update ones, and they carry the dV of the
    # last update: their entropy is not greedy's (it would be if dV were only applied on update steps)
    between = [t for t in range(1, shared) if t % 3]
    assert all(r.entropy_post[t] == r.entropy[t] for t in between)
    # without dV these steps compute exactly greedy's logits; dV moves most of them (a few move
    # below fp32's resolution of an entropy near 9.5 nats)
    moved = [t for t in between if r.entropy[t] != g.entropy[t]]
    assert len(moved) >= 0.75 * len(between), (moved, between)


def test_decode_result_fields_are_output_columns(greedy_single):
    cols = greedy_single[0].columns()
    assert set(cols) == {f.name for f in dataclasses.fields(DecodeResult)} - {"token_ids"}
    assert set(cols) <= set(OUTPUT_COLUMNS)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_lite_keeps_stated_fraction_and_decodes(lm, samples, ratio):
    out = decode_batch(lm, samples, settings("vreason_lite", prune_ratio=ratio, lr=1e-2))
    for s, r in zip(samples, out):
        assert r.num_video_tokens == s.num_video_tokens
        assert r.num_video_tokens_kept == s.num_video_tokens - int(s.num_video_tokens * ratio)
        assert r.num_output_tokens == N and len(r.token_ids) == N


def test_lite_with_nothing_pruned_is_vreason(lm, samples):
    lite = decode_batch(lm, samples, settings("vreason_lite", prune_ratio=0.0, lr=1e-2))
    full = decode_batch(lm, samples, settings("vreason", lr=1e-2))
    for li, v in zip(lite, full):
        assert li.token_ids == v.token_ids and li.alpha == v.alpha
        assert li.entropy_post == pytest.approx(v.entropy_post, abs=1e-6)
        assert li.num_video_tokens_kept == li.num_video_tokens


def test_lite_every_token_sees_the_pruned_cache(lm, samples):
    # Independent reference: HF's own model prefills all prompt tokens but the last; the
    # lowest-norm half of the video tokens (last layer's values, L2 over head_dim, mean over kv
    # heads) is cut out of every layer of HF's cache; HF then decodes from the last prompt token.
    from transformers import DynamicCache

    sample, n = samples[0], 6
    ours = decode_batch(lm, [sample], settings("vreason_lite", n=n, prune_ratio=0.5, lr=0.0))[0]
    inputs = hf_inputs(lm, [sample])
    pos = lm.prompt_position_ids(inputs)
    T = inputs["input_ids"].shape[1]
    cache = DynamicCache(config=lm.model.config)
    pre = {**inputs, "input_ids": inputs["input_ids"][:, :-1], "attention_mask": inputs["attention_mask"][:, :-1],
           "mm_token_type_ids": inputs["mm_token_type_ids"][:, :-1]}
    with torch.no_grad():
        lm.model(**pre, position_ids=pos[..., :-1], cache=cache, use_cache=True)
        video = torch.nonzero(inputs["input_ids"][0, :-1] == lm.vision.video_token_id).flatten()
        norms = cache.layers[-1].values[0].float().norm(dim=-1).mean(dim=0)  # [T-1]
        drop = video[torch.argsort(norms[video], stable=True)[: video.numel() // 2]]
        keep = torch.tensor([i for i in range(T - 1) if i not in set(drop.tolist())])
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        ids, p, tokens = inputs["input_ids"][:, -1:], pos[..., -1:], []
        for _ in range(n):
            length = cache.get_seq_length() + 1
            out = lm.model(input_ids=ids, attention_mask=torch.ones(1, length, dtype=torch.long), position_ids=p,
                           cache=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            ids, p = torch.tensor([[tokens[-1]]]), p + 1
    assert ours.num_video_tokens_kept == video.numel() - drop.numel()
    assert ours.token_ids == tokens


def test_lite_batched_equals_single(lm, samples):
    s = settings("vreason_lite", n=12, lr=1e-2)
    batched = decode_batch(lm, samples, s)
    for sample, b in zip(samples, batched):
        single = decode_batch(lm, [sample], s)[0]
        assert b.token_ids == single.token_ids
        assert b.entropy == pytest.approx(single.entropy, abs=1e-3)


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, layers):
        self.layers = layers


def test_prune_drops_lowest_norm_video_tokens_in_every_layer():
    # one row, 6 positions: positions 1..4 are video; value norms chosen by hand
    norms = torch.tensor([9.0, 3.0, 1.0, 4.0, 2.0, 9.0])
    values = norms.view(1, 1, 6, 1).expand(1, 2, 6, 1).clone()
    keys = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 2, 6, 1).clone()
    cache = _Cache([_Layer(keys.clone(), values.clone()), _Layer(keys.clone(), values.clone())])
    attn = torch.ones(1, 6, dtype=torch.long)
    video = torch.tensor([[False, True, True, True, True, False]])
    new_attn, new_video, kept = prune_video_tokens(cache, attn, video, 0.5)
    assert kept.tolist() == [2]
    for layer in cache.layers:
        # the two lowest-norm video tokens (positions 2 and 4) are gone, order kept
        assert layer.keys[0, 0, :, 0].tolist() == [0.0, 1.0, 3.0, 5.0]
    assert new_attn.tolist() == [[1, 1, 1, 1]]
    assert new_video.tolist() == [[False, True, True, False]]


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def decode(self, ids, **kw):
        self.calls.append(list(ids))
        return self.tok.decode(ids, **kw)


def test_stop_strings(lm):
    tok = _CountingTokenizer(lm.tokenizer)
    stops = StopStrings(tok, ["</answer>"])
    ids = lm.tokenizer("<think>x</think><answer>B</answer>", add_special_tokens=False)["input_ids"]
    assert stops.hit(ids) and not stops.hit(ids[:-1])
    # a token that cannot end "</answer>" (no '>' in it) costs one decode of itself, once, and no more
    plain = lm.tokenizer(" hello", add_special_tokens=False)["input_ids"]
    tok.calls.clear()
    for _ in range(3):
        assert not stops.hit(ids[:3] + plain)
    assert tok.calls == [plain[-1:]]


def test_stop_string_ends_decode(lm, samples, greedy_single):
    # stop on the text of a greedy token whose text did not occur before: the decode must end right there
    g, text = greedy_single[0].token_ids, lm.tokenizer.decode
    step = next((s for s in range(3, N - 2) if text(g[s:s + 1]).strip() and text(g[s:s + 1]) not in text(g[:s])), None)
    assert step is not None, "no usable stop string in the fixture output"
    r = decode_batch(lm, samples[:1], settings("greedy", stop_strings=[text(g[step:step + 1])]))[0]
    assert r.finish_reason == "stop_string"
    assert r.token_ids == g[: step + 1]


# --- precision: the controller must act the same whatever the model's dtype -------------------------

def _as_dtype(lm, dtype):
    low = copy.copy(lm)
    low.model, low.dtype = copy.deepcopy(lm.model).to(dtype), dtype
    return low


@pytest.fixture(scope="module")
def precision_runs(lm):
    """{dtype: {run: results}} on the same weights (fp32, and cast to bf16): 2 prompts, 24 tokens, k = 2."""
    prompts = [video_inputs(i, 4 + i, 112, 112) for i in range(2)]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = lm if dtype == torch.float32 else _as_dtype(lm, dtype)
        runs[dtype] = {name: decode_batch(m, prompts, settings(mode, n=24, **kw)) for name, mode, kw in (
            ("greedy", "greedy", {}),
            ("lr0", "vreason", {"lr": 0.0}),
            ("min", "vreason", {"lr": 1e-2, "rule": "always_min"}),
            ("max", "vreason", {"lr": 1e-2, "rule": "always_max"}),
        )}
    return runs


def shared_context_effect(runs, name):
    """Mean entropy of the chosen-from logits minus greedy's, over the steps where both decode from
    the same text (up to and including the first changed token). After a changed token the two
    runs continue different texts, and comparing their entropies says nothing about the controller."""
    diffs = []
    for v, g in zip(runs[name], runs["greedy"]):
        n = first_divergence(v.token_ids, g.token_ids)
        n = len(v.token_ids) if n is None else n + 1
        diffs += [a - b for a, b in zip(v.entropy_post[:n], g.entropy_post[:n])]
    return statistics.fmean(diffs)


def test_lr0_equals_greedy_in_bfloat16(precision_runs):
    bf16 = precision_runs[torch.bfloat16]
    for z, g in zip(bf16["lr0"], bf16["greedy"]):
        assert z.token_ids == g.token_ids and z.entropy_post == g.entropy_post


@pytest.mark.parametrize("name,sign", [("min", -1), ("max", 1)])
def test_bfloat16_controller_effect_matches_float32(precision_runs, name, sign):
    f32 = shared_context_effect(precision_runs[torch.float32], name)
    bf16 = shared_context_effect(precision_runs[torch.bfloat16], name)
    assert f32 * sign > 0
    assert 0.5 <= bf16 / f32 <= 2.0, (bf16, f32)


def test_float16_updates_move_entropy(lm, samples):
    # an entropy's gradient with respect to single value elements underflows in fp16; here the
    # gradient path is fp32, so every update moves the entropy, and in alpha's direction
    fp16 = _as_dtype(lm, torch.float16)
    for rule, sign in (("always_min", -1), ("always_max", 1)):
        r = decode_batch(fp16, samples[:1], settings("vreason", n=4, lr=1e-3, update_every=1, rule=rule))[0]
        changes = [hp - h for h, hp in zip(r.entropy, r.entropy_post)]
        assert all(c * sign > 0 for c in changes), (rule, changes)


def test_update_rows_are_known_on_the_host(lm, samples, monkeypatch):
    # the step branches on host counters, not on `bool(due.any())` (a device sync): they must name the
    # same rows as the device's `due`, step after step, and the step must not read a tensor's truth value
    s = settings("vreason", lr=0.1, update_every=2, rule="always_max")
    head = LastLayer(lm.last_layer_parts())
    syncs = []
    with torch.no_grad():
        st = prefill(lm, head, samples, s)
        for _ in range(5):
            expect = (st.controlled & (st.policy.steps % 2 == 0)).tolist()
            assert [r.tokens_seen % 2 == 0 for r in st.rows] == expect
            monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: syncs.append(t) or bool(t.item()))
            decode_one_token(lm, head, st, s)
            monkeypatch.undo()
            assert [r.tokens_seen for r in st.rows] == st.policy.steps.tolist()
    assert syncs == []
