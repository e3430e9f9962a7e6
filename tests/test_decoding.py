"""The decode loop on the tiny Qwen2.5-VL: equivalences, batching, controller effect, Lite, stops."""

import pytest
import torch

from engine_util import tiny_lm, video_inputs
from vreason_batch.config import ControllerConfig
from vreason_batch.decoding import DecodeSettings, _collate, _hit_stop, _prune_lite, decode_batch

N = 24


def settings(mode, **ctrl):
    return DecodeSettings(mode=mode, max_new_tokens=N, stop_strings=[], controller=ControllerConfig(**ctrl))


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
    inputs = _collate(lm, batch)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == lm.vision.video_token_id).int() * 2
    return inputs


def test_greedy_equals_hf_generate(lm, samples, greedy_single):
    for s, ours in zip(samples, greedy_single):
        inputs = hf_inputs(lm, [s])
        hf = lm.model.generate(**inputs, max_new_tokens=N, do_sample=False)
        hf_tokens = hf[0, inputs["input_ids"].shape[1]:].tolist()
        assert ours.token_ids == hf_tokens[: len(ours.token_ids)]
        assert ours.num_output_tokens == len(ours.entropy) == N


def test_greedy_batch_equals_hf_generate_left_padded(lm, samples):
    inputs = hf_inputs(lm, samples)
    hf = lm.model.generate(**inputs, max_new_tokens=N, do_sample=False)
    ours = decode_batch(lm, samples, settings("greedy"))
    for i, r in enumerate(ours):
        assert r.token_ids == hf[i, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("rule", ["switch", "always_min", "always_max"])
def test_vreason_with_lr0_is_greedy(lm, samples, greedy_single, rule):
    out = decode_batch(lm, samples, settings("vreason", lr=0.0, update_every=1, rule=rule))
    for r, g in zip(out, greedy_single):
        assert r.token_ids == g.token_ids
        assert r.controller_updates == N
        assert r.entropy == pytest.approx(g.entropy, abs=1e-4)


def test_vreason_changes_the_decode(lm, samples, greedy_single):
    # one update moves H by ~1e-3 nats on this random model: a large lr is needed to flip tokens
    out = decode_batch(lm, samples, settings("vreason", lr=0.1, update_every=1, rule="always_max"))
    assert any(r.token_ids != g.token_ids for r, g in zip(out, greedy_single))


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


def test_finished_sample_leaves_batch_and_others_are_unaffected(lm, samples):
    s = settings("vreason", lr=1e-2, update_every=1)
    singles = [decode_batch(lm, [x], s)[0] for x in samples]
    # make a token that sample 0 emits at step 5 an end-of-sequence token, absent from sample 1's output
    stop_tok = singles[0].token_ids[5]
    if stop_tok in singles[1].token_ids or stop_tok in singles[0].token_ids[:5]:
        pytest.skip("no token unique to sample 0 at step 5 for this seed")
    saved = list(lm.eos_token_ids)
    lm.eos_token_ids = saved + [stop_tok]
    try:
        out = decode_batch(lm, samples, s)
    finally:
        lm.eos_token_ids = saved
    assert out[0].finish_reason == "eos"
    assert out[0].token_ids == singles[0].token_ids[:5]
    assert out[0].num_output_tokens == 6 and out[0].controller_updates == 6
    assert out[1].token_ids == singles[1].token_ids
    assert out[1].entropy == pytest.approx(singles[1].entropy, abs=1e-3)
    assert out[0].latency_s < out[1].latency_s


@pytest.mark.parametrize("alpha_rule,sign", [("always_min", -1), ("always_max", 1)])
def test_one_update_moves_entropy_in_alpha_direction(lm, samples, alpha_rule, sign):
    r = decode_batch(lm, samples[:1], DecodeSettings(mode="vreason", max_new_tokens=1, stop_strings=[],
                                                     controller=ControllerConfig(lr=1e-3, update_every=1, rule=alpha_rule)))[0]
    change = r.entropy_post[0] - r.entropy[0]
    assert change * sign > 0, (r.entropy, r.entropy_post)


def test_more_steps_move_entropy_further(lm, samples):
    def change(steps):
        r = decode_batch(lm, samples[:1], DecodeSettings(mode="vreason", max_new_tokens=1, stop_strings=[],
                         controller=ControllerConfig(lr=1e-3, update_every=1, steps_per_update=steps, rule="always_min")))[0]
        return r.entropy_post[0] - r.entropy[0]
    assert change(4) < change(1) < 0


def test_update_every_k(lm, samples):
    r = decode_batch(lm, samples[:1], settings("vreason", lr=1e-2, update_every=3))[0]
    assert [i for i, a in enumerate(r.alpha) if a != 0] == list(range(0, N, 3))
    assert r.controller_updates == len(range(0, N, 3))
    # no update: the chosen logits are the pre-update ones
    assert all(r.entropy_post[i] == r.entropy[i] for i in range(N) if i % 3)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_lite_keeps_stated_fraction_and_decodes(lm, samples, ratio):
    out = decode_batch(lm, samples, DecodeSettings(mode="vreason_lite", max_new_tokens=N, stop_strings=[],
                                                   prune_ratio=ratio, controller=ControllerConfig(lr=1e-2)))
    for s, r in zip(samples, out):
        assert r.num_video_tokens == s.num_video_tokens
        assert r.num_video_tokens_kept == s.num_video_tokens - int(s.num_video_tokens * ratio)
        assert r.num_output_tokens == N and len(r.token_ids) == N


def test_lite_batched_equals_single(lm, samples):
    s = DecodeSettings(mode="vreason_lite", max_new_tokens=12, stop_strings=[], controller=ControllerConfig(lr=1e-2))
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
    new_attn, new_video, kept = _prune_lite(cache, attn, video, cache.layers[-1].values, 0.5)
    assert kept.tolist() == [2]
    for layer in cache.layers:
        # the two lowest-norm video tokens (positions 2 and 4) are gone, order kept
        assert layer.keys[0, 0, :, 0].tolist() == [0.0, 1.0, 3.0, 5.0]
    assert new_attn.tolist() == [[1, 1, 1, 1]]
    assert new_video.tolist() == [[False, True, True, False]]


def test_stop_strings(lm):
    tok = lm.tokenizer
    ids = tok("<think>x</think><answer>B</answer>", add_special_tokens=False)["input_ids"]
    assert _hit_stop(tok, ids, ["</answer>"], len("</answer>"))
    assert not _hit_stop(tok, ids[:-1], ["</answer>"], len("</answer>"))


def test_stop_string_ends_decode(lm, samples, greedy_single):
    # stop on the text of greedy's 4th token: the decode must end right there
    target = lm.tokenizer.decode(greedy_single[0].token_ids[3:4])
    if not target.strip() or target in lm.tokenizer.decode(greedy_single[0].token_ids[:3]):
        pytest.skip("4th token is not a usable stop string for this seed")
    r = decode_batch(lm, samples[:1], DecodeSettings(mode="greedy", max_new_tokens=N, stop_strings=[target]))[0]
    assert r.finish_reason == "stop_string"
    assert r.token_ids == greedy_single[0].token_ids[:4]
