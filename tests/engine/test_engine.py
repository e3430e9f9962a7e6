"""The engine (decode_requests) on the tiny Qwen2.5-VL: continuous batching, modes in one batch, and
one prefill per sample / one prefix per video, each against one-at-a-time decoding in float32."""

import pytest
import torch

from engine_util import decode_settings, tiny_lm, video_inputs
from vreason_batch.engine.api import EngineStats, Request
from vreason_batch.engine.driver import decode_batch, decode_requests
from vreason_batch.engine.prefill import prefill
from vreason_batch.engine.state import DecodeState
from vreason_batch.engine.last_layer import LastLayer

N = 16
MODES = ("greedy", "vreason", "vreason_lite")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def samples():
    # different frame counts and sizes: different prompt lengths and numbers of video tokens
    return [video_inputs(0, 4, 112, 112), video_inputs(1, 6, 84, 140, "How many people are in the room?"),
            video_inputs(2, 2, 56, 84, "Is it raining?"), video_inputs(3, 4, 84, 84, "What is on the table?")]


def settings(mode="greedy", n=N, **kw):
    # k = 2 and two Adam steps: a row admitted at an odd step is at the other phase of k
    return decode_settings(mode, n, lr=1e-2, update_every=2, steps_per_update=2, **kw)


def assert_same(got, want):
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    assert got.alpha == want.alpha
    assert got.controller_updates == want.controller_updates
    assert got.num_video_tokens_kept == want.num_video_tokens_kept
    for name in ("entropy", "entropy_post", "entropy_ema"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-3), name


@pytest.fixture(scope="module")
def early_eos(lm, samples):
    """An end-of-sequence set under which rows finish at different, odd and even, steps."""
    first = decode_batch(lm, samples[:2], settings())
    return sorted(set(lm.eos_token_ids) | {first[0].token_ids[6], first[1].token_ids[9]})


def with_eos(lm, eos, fn):
    saved = list(lm.eos_token_ids)
    lm.eos_token_ids = eos
    try:
        return fn()
    finally:
        lm.eos_token_ids = saved


def test_continuous_equals_one_at_a_time_in_every_mode(lm, samples, early_eos):
    s = settings()
    reqs = [Request(i, x, MODES) for i, x in enumerate(samples)]
    got, stats = with_eos(lm, early_eos, lambda: decode_requests(lm, reqs, s, slots=3))
    want = {(i, m): with_eos(lm, early_eos, lambda: decode_batch(lm, [x], settings(m))[0])
            for i, x in enumerate(samples) for m in MODES}
    assert set(got) == set(want)
    for key in want:
        assert_same(got[key], want[key])
    # rows really left early, at both phases of k, and slots were refilled while others ran
    ends = {r.num_output_tokens for r in got.values() if r.finish_reason == "eos"}
    assert any(n % 2 for n in ends) and any(n % 2 == 0 for n in ends), ends
    assert stats.busy_slot_steps == sum(r.num_output_tokens for r in got.values())
    assert stats.decode_steps < stats.busy_slot_steps / 3 * 1.5  # far fewer steps than one row at a time
    assert 0.5 < stats.occupancy <= 1.0
    assert stats.occupancy_while_queued == 1.0  # a freed slot is refilled before the next step


def test_modes_share_one_batch_and_one_prefill(lm, samples):
    s = settings()
    reqs = [Request(i, x, MODES) for i, x in enumerate(samples[:2])]
    got, stats = decode_requests(lm, reqs, s, slots=6)
    assert stats.decode_steps == N  # all six rows in one batch, from the first step to the last
    assert stats.vision_encodes == 2
    assert stats.prefill_tokens == sum(len(x.input_ids) - 1 for x in samples[:2])
    for m in MODES:
        alone = decode_batch(lm, samples[:2], settings(m))
        for i in range(2):
            assert_same(got[(i, m)], alone[i])
    assert got[(0, "greedy")].controller_updates == 0 and got[(0, "vreason")].controller_updates == N // 2
    assert got[(0, "vreason_lite")].num_video_tokens_kept < got[(0, "vreason")].num_video_tokens_kept


def test_questions_on_one_video_share_its_prefix(lm):
    questions = ["What colour is the car?", "Where is the dog going, and why?", "Count the birds."]
    xs = [video_inputs(5, 4, 112, 112, q) for q in questions]
    s = settings()
    shared, st_shared = decode_requests(lm, [Request(i, x, ("greedy", "vreason"), "v.mp4") for i, x in enumerate(xs)], s, 6)
    apart, st_apart = decode_requests(lm, [Request(i, x, ("greedy", "vreason")) for i, x in enumerate(xs)], s, 6)
    assert st_shared.vision_encodes == 1 and st_apart.vision_encodes == 3
    # the prefix ends where the questions part: the system prompt, the video and the user turn's start
    prefix = 0
    while all(x.input_ids[prefix] == xs[0].input_ids[prefix] for x in xs):
        prefix += 1
    assert prefix > xs[0].num_video_tokens
    assert st_shared.prefill_tokens == st_apart.prefill_tokens - 2 * prefix
    for key in apart:
        assert_same(shared[key], apart[key])


def test_a_video_key_over_different_videos_does_not_share(lm):
    # the same key on different frames (a caller's mistake) must not mix the videos up
    xs = [video_inputs(5, 4, 112, 112), video_inputs(6, 2, 56, 56)]
    got, stats = decode_requests(lm, [Request(i, x, ("greedy",), "same") for i, x in enumerate(xs)], settings(), 2)
    assert stats.vision_encodes == 2
    for i, x in enumerate(xs):
        assert got[(i, "greedy")].token_ids == decode_batch(lm, [x], settings())[0].token_ids


def test_static_chunks_run_below_capacity(lm, samples, early_eos):
    # the baseline continuous batching beats: one static batch runs until its longest row ends
    s = settings()
    reqs = [Request(i, x, ("greedy",)) for i, x in enumerate(samples)]
    got, static = with_eos(lm, early_eos, lambda: decode_requests(lm, reqs[:2], s, slots=2))
    lengths = [r.num_output_tokens for r in got.values()]
    assert lengths[0] != lengths[1]
    assert static.decode_steps == max(lengths)
    assert static.occupancy == pytest.approx(sum(lengths) / (2 * max(lengths)))


def storage(t):
    return t.untyped_storage().data_ptr()


def test_retire_frees_the_slot_in_place_and_trims_padding_no_live_row_needs(lm, samples):
    head = LastLayer(lm.last_layer_parts())
    s = settings("vreason")
    with torch.no_grad():
        st = prefill(lm, head, [samples[1], samples[2]], s)  # samples[1] has the longer prompt
    lengths = st.pad_mask.sum(dim=1).tolist()
    assert lengths[0] > lengths[1]
    before = st.ctrl.pos[1][st.ctrl.valid[1]].clone()
    kept_values = st.cache.layers[-1].values[1, :, -lengths[1]:].clone()
    buffers = [storage(layer.keys) for layer in st.cache.layers]
    st.retire([0])
    assert st.rows[0] is None and st.live == 1 and st.free_slots() == [0] and [r.key for r in st.done] == [0]
    assert st.pad_mask.shape == (2, lengths[1]) and bool(st.pad_mask[1].all()) and not bool(st.pad_mask[0].any())
    assert not bool(st.controlled[0]) and not bool(st.ctrl.valid[0].any())
    # nothing was copied: the cache is a narrower view of the same buffers, the live row's values unchanged
    assert [storage(layer.keys) for layer in st.cache.layers] == buffers
    assert st.cache.layers[0].keys.shape[:3] == (2, st.cache.layers[0].keys.shape[1], lengths[1])
    assert torch.equal(st.cache.layers[-1].values[1], kept_values)
    # the controller's positions moved with the cache: still the same video tokens
    after = st.ctrl.pos[1][st.ctrl.valid[1]]
    assert torch.equal(after, before - (lengths[0] - lengths[1]))


def test_merge_left_pads_the_shorter_state(lm, samples):
    head = LastLayer(lm.last_layer_parts())
    with torch.no_grad():
        a = prefill(lm, head, [samples[2]], settings("vreason"))
        b = prefill(lm, head, [samples[1]], settings("greedy"))
    m = DecodeState.merge(a, b)
    S = b.pad_mask.shape[1]
    pad = S - a.pad_mask.shape[1]
    assert m.pad_mask.shape == (2, S) and int(m.pad_mask[0, :pad].sum()) == 0
    assert torch.equal(m.cache.layers[-1].values[0, :, pad:], a.cache.layers[-1].values[0])
    assert m.controlled.tolist() == [True, False]
    assert torch.equal(m.ctrl.pos[0][m.ctrl.valid[0]], a.ctrl.pos[0][a.ctrl.valid[0]] + pad)
    assert not bool(m.ctrl.valid[1].any())


def test_every_per_row_field_follows_its_row_through_merge_and_retire(lm, samples):
    head = LastLayer(lm.last_layer_parts())
    with torch.no_grad():
        a = prefill(lm, head, [samples[0], samples[2]], settings("vreason"))
        b = prefill(lm, head, [samples[1]], settings("greedy"))
    m = DecodeState.merge(a, b)
    m.retire([1])  # samples[2], in the middle: its slot is freed, rows 0 and 2 stay where they are
    assert [(r.key, r.mode) if r else None for r in m.rows] == [(0, "vreason"), None, (0, "greedy")]
    assert [r.key for r in m.done] == [1]
    assert m.controlled.tolist() == [True, False, False]
    assert m.next_ids[[0, 2]].tolist() == [[samples[0].input_ids[-1]], [samples[1].input_ids[-1]]]
    assert torch.equal(m.next_pos[..., 0, :], a.next_pos[..., 0, :])
    assert torch.equal(m.next_pos[..., 2, :], b.next_pos[..., 0, :])
    assert m.policy.steps.shape == (3,) and m.ctrl.dv.shape[0] == 3 and not bool(m.ctrl.valid[1:].any())
    # each row keeps its own tokens; the cache is as long as the longer of the two
    lengths = [int(a.pad_mask[0].sum()), int(b.pad_mask[0].sum())]
    assert m.pad_mask.shape[1] == max(lengths) and m.pad_mask.sum(dim=1).tolist() == [lengths[0], 0, lengths[1]]
    assert m.cache.layers[0].keys.shape[0] == 3 and m.cache.layers[0].keys.shape[2] == max(lengths)


def test_a_row_admitted_into_a_free_slot_copies_only_its_own_prefill(lm, samples):
    head = LastLayer(lm.last_layer_parts())
    with torch.no_grad():
        first = prefill(lm, head, [samples[0], samples[1]], settings("vreason"))  # the longer prompts
        short = prefill(lm, head, [samples[2]], settings("vreason"))
        long = prefill(lm, head, [samples[1]], settings("greedy"))
    stats = EngineStats()
    st = DecodeState.with_slots(first, 4, stats)
    assert st.size == 4 and st.free_slots() == [2, 3] and stats.copied_cache_bytes == stats.admitted_cache_bytes
    st.retire([0])
    S = st.pad_mask.shape[1]
    others = [layer.values[1].clone() for layer in st.cache.layers]
    buffers = [storage(layer.keys) for layer in st.cache.layers]
    before = stats.copied_cache_bytes
    st.fill([0], short, stats)  # shorter than the live rows: right-aligned into slot 0, nothing else moves
    assert stats.copied_cache_bytes - before == short.cache_bytes()
    assert [storage(layer.keys) for layer in st.cache.layers] == buffers
    assert all(torch.equal(layer.values[1], o) for layer, o in zip(st.cache.layers, others))
    Sn = short.pad_mask.shape[1]
    assert torch.equal(st.cache.layers[-1].values[0, :, S - Sn:], short.cache.layers[-1].values[0])
    assert not bool(st.cache.layers[-1].values[0, :, :S - Sn].any()) and not bool(st.pad_mask[0, :S - Sn].any())
    assert torch.equal(st.ctrl.pos[0][st.ctrl.valid[0]], short.ctrl.pos[0][short.ctrl.valid[0]] + S - Sn)
    assert st.rows[0].key == 0 and st.controlled.tolist()[:2] == [True, True]
    # a row longer than the live cache: every row moves left by the difference, counted
    st.retire([1])  # the longer prompt leaves: the cache is trimmed to the short row's length
    assert st.pad_mask.shape[1] == Sn
    g = long.pad_mask.shape[1] - st.pad_mask.shape[1]
    assert g > 0
    before, whole = stats.copied_cache_bytes, st.cache_bytes()
    st.fill([1], long, stats)
    assert stats.copied_cache_bytes - before == whole + long.cache_bytes()
    assert st.pad_mask.shape[1] == long.pad_mask.shape[1] and not bool(st.controlled[1])
    assert torch.equal(st.cache.layers[-1].values[0, :, -Sn:], short.cache.layers[-1].values[0])  # right-aligned still
    assert stats.admissions == 3


def test_the_last_layer_stands_in_once_per_decode_call_not_per_step(lm, samples, monkeypatch):
    from vreason_batch.engine import hf_standins

    made, make = [], hf_standins.last_layer_input
    monkeypatch.setattr(hf_standins, "last_layer_input", lambda: made.append(1) or make())
    original = lm.text_model().layers[-1]
    got, stats = decode_requests(lm, [Request(i, x, ("greedy", "vreason")) for i, x in enumerate(samples[:2])], settings(), 2)
    assert stats.decode_steps >= N and len(made) == 1  # prefills and every step under one stand-in
    assert lm.text_model().layers[-1] is original and lm.last_layer() is original  # and the layer is back
    assert got[(0, "greedy")].token_ids == decode_batch(lm, [samples[0]], settings())[0].token_ids


def test_compiled_step_equals_the_eager_one_token_for_token(lm, samples, early_eos):
    """runtime.compile: the layers before the last (stack.py), the last layer's attention and its head as
    torch.compile graphs (fullgraph, so a graph break fails; a graph per cache length would pass dynamo's
    recompile limit and fail too), in every mode, with rows admitted and retired mid-run (batch and cache
    length change)."""
    from torch._dynamo.utils import counters

    reqs = [Request(i, x, MODES) for i, x in enumerate(samples)]
    eager, _ = with_eos(lm, early_eos, lambda: decode_requests(lm, reqs, settings(), 5))
    torch._dynamo.reset()  # graphs an earlier test compiled (bench, same functions) would be reused uncounted
    counters.clear()
    compiled, _ = with_eos(lm, early_eos, lambda: decode_requests(lm, reqs, settings(), 5, compiled=True))
    assert counters["stats"]["unique_graphs"] >= 3  # the earlier layers, the attention and the head ran compiled
    assert lm.compiled_heads["head"].stack is not None
    assert compiled.keys() == eager.keys()
    for k in eager:
        assert_same(compiled[k], eager[k])
    again, _ = decode_requests(lm, reqs[:1], settings(), 2, compiled=True)  # the graphs are kept on the model
    assert lm.compiled_heads and again[(0, "vreason")].token_ids == decode_batch(lm, samples[:1], settings("vreason"))[0].token_ids
