"""Sampling: the token choice's maths on fixed logits, and on the tiny model that a row's draws are its own."""

import dataclasses

import pytest
import torch

from engine_util import decode_settings, tiny_lm, video_inputs
from vreason_batch.config import config_from_dict
from vreason_batch.engine.api import Request
from vreason_batch.engine.driver import decode_requests
from vreason_batch.engine.sampling import Sampling, choose_tokens, row_seed, uniform


def test_uniform_is_a_pure_function_of_seed_counter_and_id():
    seeds, counters = torch.tensor([1, 2, 1]), torch.tensor([5, 5, 6])
    u = uniform(seeds, counters, 1000)
    assert torch.equal(u, uniform(seeds, counters, 1000))  # the same numbers every time
    assert torch.equal(uniform(seeds[:1], counters[:1], 1000)[0], u[0])  # whatever else is in the batch
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])  # another seed, another counter
    assert float(u.min()) > 0 and float(u.max()) < 1
    many = uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), 4096).flatten()
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.var()) - 1 / 12) < 0.005


@pytest.mark.parametrize("bits", [0, -1], ids=["all-zero", "all-one"])
def test_uniform_stays_inside_0_1_at_the_extreme_bits(bits, monkeypatch):
    import vreason_batch.engine.sampling as sampling

    monkeypatch.setattr(sampling, "_mix", lambda x: torch.full_like(x, bits))  # every draw's bits the same
    u = uniform(torch.tensor([1]), torch.tensor([1]), 3)
    assert bool(((u > 0) & (u < 1)).all()) and bool(torch.isfinite(-torch.log(-torch.log(u))).all())


def test_row_seed_depends_on_seed_key_and_mode():
    seeds = {row_seed(s, k, m) for s in (0, 1) for k in ("a", "b") for m in ("greedy", "vreason")}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)
    assert row_seed(0, "a", "vreason") == row_seed(0, "a", "vreason")


def draws(logits, s, n=20000):
    """n draws from one row's logits, one per token index."""
    b = logits.expand(n, -1)
    return choose_tokens(b, s, torch.full((n,), 7), torch.arange(n))


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 2.0):
        freq = torch.bincount(draws(logits, Sampling(temperature=t)), minlength=4).double() / 20000
        want = torch.softmax(logits[0].double() / t, dim=-1)
        # 20,000 draws: a standard error under 0.0036 for every p; 5 of them is far out
        assert torch.allclose(freq, want, atol=0.018), (t, freq, want)


def test_filters_keep_only_the_tokens_they_say():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -3.0]])
    p = torch.softmax(logits[0], dim=-1)
    assert set(draws(logits, Sampling(temperature=1.0, top_k=2)).tolist()) == {0, 1}
    # top_p 0.6: token 0 alone holds 0.48 < 0.6, tokens 0 and 1 hold 0.77: both kept, no other
    assert float(p[0]) < 0.6 < float(p[:2].sum())
    assert set(draws(logits, Sampling(temperature=1.0, top_p=0.6)).tolist()) == {0, 1}
    # min_p 0.5: tokens at least half as likely as token 0 (0 and 1; token 2 is 0.37 of it)
    assert set(draws(logits, Sampling(temperature=1.0, min_p=0.5)).tolist()) == {0, 1}
    assert set(draws(logits, Sampling(temperature=1.0, top_p=1e-6)).tolist()) == {0}
    assert set(draws(logits, Sampling(temperature=1.0)).tolist()) == {0, 1, 2, 3, 4}


def test_temperature_zero_is_argmax_whatever_the_other_knobs():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    s = Sampling(temperature=0.0, top_p=0.3, top_k=3, min_p=0.2, seed=9)
    assert torch.equal(choose_tokens(logits, s, torch.arange(6), torch.arange(6)), logits.argmax(dim=-1))


# --- on the tiny model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def requests():
    xs = [video_inputs(0, 4, 112, 112), video_inputs(1, 6, 84, 140, "How many people are in the room?"),
          video_inputs(2, 2, 56, 84, "Is it raining?"), video_inputs(3, 4, 84, 84, "What is on the table?")]
    return [Request(f"s{i}", x, ("greedy", "vreason")) for i, x in enumerate(xs)]


def run(lm, requests, slots, **sampling):
    s = decode_settings("greedy", 12, lr=1e-2, update_every=2)
    s = dataclasses.replace(s, sampling=Sampling(**sampling))
    out, _ = decode_requests(lm, requests, s, slots=slots)
    return {k: r for k, r in out.items()}


def tokens(results):
    return {k: r.token_ids for k, r in results.items()}


def test_sampled_rows_are_their_own_whatever_the_slots_and_batch(lm, requests):
    one = run(lm, requests, slots=1, temperature=1.0, seed=1)
    four = run(lm, requests, slots=4, temperature=1.0, seed=1)
    again = run(lm, requests, slots=4, temperature=1.0, seed=1)
    alone = run(lm, requests[2:3], slots=2, temperature=1.0, seed=1)  # another batch, another slot
    assert tokens(one) == tokens(four) == tokens(again)
    assert {k: v for k, v in tokens(one).items() if k[0] == "s2"} == tokens(alone)
    other_seed = run(lm, requests, slots=4, temperature=1.0, seed=2)
    greedy = run(lm, requests, slots=4)
    assert tokens(other_seed) != tokens(one) and tokens(one) != tokens(greedy)
    for r in one.values():  # sampled rows under V-Reason keep whole traces
        n = r.num_output_tokens
        assert len(r.entropy) == len(r.entropy_post) == len(r.entropy_ema) == len(r.alpha) == n > 0
    assert any(r.controller_updates for (k, m), r in one.items() if m == "vreason")


def test_temperature_zero_and_top_p_near_zero_are_greedy(lm, requests):
    greedy = tokens(run(lm, requests, slots=4))
    assert tokens(run(lm, requests, slots=4, temperature=0.0, top_p=0.5, seed=3)) == greedy
    assert tokens(run(lm, requests, slots=4, temperature=1.0, top_p=1e-6, seed=3)) == greedy


def test_sampling_settings_are_in_the_config_hash_only_when_they_matter():
    base = config_from_dict({"input": {"manifest": "m.jsonl"}, "output": {"uri": "out"},
                             "model": {"name_or_path": "builtin:tiny-qwen2.5-vl"}})

    def hashed(**decoding):
        return base.model_copy(update={"decoding": base.decoding.model_copy(update=decoding)}).config_hash()

    assert hashed(seed=5, top_p=0.3) == base.config_hash()  # greedy: the knobs change nothing
    sampled = hashed(temperature=0.7)
    assert sampled != base.config_hash() and hashed(temperature=0.7, seed=1) != sampled
    assert hashed(temperature=0.7, top_k=5) != sampled
