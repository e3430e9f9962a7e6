"""engine/stack.py: the decode step's layers before the last, run by us, give HF's numbers bit for bit."""

import pytest
import torch

from engine_util import decode_settings, tiny_lm, video_inputs
from vreason_batch.config import ModelConfig
from vreason_batch.engine import hf_standins, stack
from vreason_batch.engine.api import Request
from vreason_batch.engine.driver import decode_requests
from vreason_batch.engine.loading import load_model

N = 16
MODES = ("greedy", "vreason", "vreason_lite")
FIELDS = ("token_ids", "finish_reason", "entropy", "entropy_post", "entropy_ema", "alpha", "controller_updates")


@pytest.fixture(scope="module")
def samples():
    return [video_inputs(0, 4, 112, 112), video_inputs(1, 6, 84, 140, "How many people are in the room?"),
            video_inputs(2, 2, 56, 84, "Is it raining?")]


def settings():
    return decode_settings("greedy", N, lr=1e-2, update_every=2, steps_per_update=2)


def run(lm, samples, monkeypatch, own: bool, slots: int = 2):
    """Every mode of every sample over `slots` slots (rows admitted and retired mid-run), with the stack
    or with HF's forward; the slab regrows every 2 tokens, so the stack's cache writes cross reallocations.
    Returns (results, Stack.forward calls, decode steps)."""
    calls = []
    forward = stack.Stack.forward
    with monkeypatch.context() as m:
        m.setattr(hf_standins, "SLAB_HEADROOM", 2)
        m.setattr(stack.Stack, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
        if not own:
            m.setattr(stack, "unsupported", lambda lm: "switched off by the test")
        got, stats = decode_requests(lm, [Request(i, x, MODES) for i, x in enumerate(samples)], settings(), slots)
    return got, len(calls), stats.decode_steps


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stack_equals_hf_forward_bit_for_bit(samples, monkeypatch, dtype):
    lm = tiny_lm() if dtype == "float32" else load_model(ModelConfig(dtype=dtype))
    assert stack.unsupported(lm) is None
    ours, calls, steps = run(lm, samples, monkeypatch, own=True)
    hf, hf_calls, _ = run(lm, samples, monkeypatch, own=False)
    assert calls == steps > N and hf_calls == 0  # every step ran the stack, or none did
    assert ours.keys() == hf.keys()
    for k in hf:
        for name in FIELDS:  # exact: the same modules, the same op order, the same SDPA call
            assert getattr(ours[k], name) == getattr(hf[k], name), (k, name)


def test_unsupported_models_keep_hf_forward(samples, monkeypatch):
    eager = load_model(ModelConfig(attn_implementation="eager"))
    assert "eager" in stack.unsupported(eager)
    got, calls, _ = run(eager, samples[:1], monkeypatch, own=True, slots=1)
    assert calls == 0 and got[(0, "greedy")].token_ids
    lm = tiny_lm()
    cfg = lm.text_model().config
    saved = cfg.model_type
    try:
        cfg.model_type = "gemma"  # another decoder layer: the stack must not guess
        assert "gemma" in stack.unsupported(lm)
    finally:
        cfg.model_type = saved


def test_the_whole_greedy_step_compiles_as_one_fullgraph_graph(samples):
    """Issue 22, section 2's check: torch.compile(fullgraph=True) of the whole greedy step (decode_one_token:
    embedding, rotary, the layers before the last, the last layer and its head, entropy, policy, token
    choice) succeeds, so the step has no graph break; it makes the eager step's tokens, step after step
    as the cache grows, and keeps the host's counters (rows, cache length) as the eager step does."""
    from torch._dynamo.utils import counters
    from vreason_batch.engine.driver import last_layer_for
    from vreason_batch.engine.precision import ieee_float32
    from vreason_batch.engine.prefill import prefill
    from vreason_batch.engine.step import decode_one_token

    lm, s = tiny_lm(), decode_settings("greedy", N)
    torch._dynamo.reset()
    counters.clear()
    with ieee_float32(), torch.no_grad():
        head = last_layer_for(lm, False)
        eager, compiled = prefill(lm, head, samples, s), prefill(lm, head, samples, s)
        step = torch.compile(decode_one_token, fullgraph=True, dynamic=True)
        for _ in range(10):
            want, got = decode_one_token(lm, head, eager, s), step(lm, head, compiled, s)
            assert torch.equal(got.token, want.token)
            torch.testing.assert_close(got.entropy, want.entropy, atol=1e-4, rtol=0)
            assert [r.tokens_seen for r in compiled.rows] == [r.tokens_seen for r in eager.rows]
            assert compiled.cache.layers[0].keys.shape == eager.cache.layers[0].keys.shape
    assert 1 <= counters["stats"]["unique_graphs"] <= 2  # one graph for every cache length, not one per step
