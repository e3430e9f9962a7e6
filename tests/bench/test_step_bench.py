"""`bench --workload step`: its JSON, and the op and host-sync counters (bench/counters.py) it is built on."""

import contextlib
import io
import json
import operator

import pytest
import torch

from vreason_batch.bench.counters import OpCounter, Tally, count_host_reads
from vreason_batch.cli import main

ISSUE_KEYS = ("hf_ops_per_step", "greedy_ops_per_step", "vreason_ops_per_step", "greedy_host_syncs_per_step",
              "vreason_host_syncs_per_step", "eager_ms_per_step", "compiled_ms_per_step", "compiled_equals_eager",
              "copied_bytes_per_admission", "admitted_rows_cache_bytes")


@pytest.fixture(scope="module")
def figures():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--workload", "step", "--json", "--batch", "2", "--new-tokens", "2", "--repeats", "1",
                   "--frames", "4"])
    assert rc == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_json_carries_the_issue_keys(figures):
    assert set(ISSUE_KEYS) <= set(figures)
    assert figures["not_measured"] == {}
    assert figures["eager_ms_per_step"] > 0 and figures["compiled_ms_per_step"] > 0
    # runtime.compile's step makes the eager step's tokens, greedy and vreason
    assert figures["compiled_equals_eager"] is True


def test_an_admission_copies_the_admitted_rows_own_prefill_alone(figures):
    for slots in (8, 32):
        copied, own = figures[f"copied_bytes_per_admission_{slots}_slots"], figures[f"admitted_rows_cache_bytes_{slots}_slots"]
        assert copied == own > 0 and figures[f"batch_cache_bytes_{slots}_slots"] > own * (slots - 1)
        assert figures[f"cache_moved_{slots}_slots"] is False and figures[f"ms_per_step_{slots}_slots"] > 0
    assert figures["copied_bytes_per_admission"] == figures["copied_bytes_per_admission_32_slots"]


def test_op_counts_are_positive_integers(figures):
    for key in ("hf_ops_per_step", "greedy_ops_per_step", "greedy_step_ops", "vreason_update_step_ops",
                "vreason_plain_step_ops", "hf_ops_per_layer", "greedy_ops_per_layer"):
        assert figures[key] > 0 and float(figures[key]).is_integer(), key
    # k = 2 over an even number of steps: the mean of one update step and one plain step
    assert figures["vreason_ops_per_step"] == (figures["vreason_update_step_ops"] + figures["vreason_plain_step_ops"]) / 2
    assert figures["vreason_update_step_ops"] > figures["vreason_plain_step_ops"] >= figures["greedy_ops_per_step"]
    # the layers before the last: engine/stack.py's against HF's (our last is last_layer.py's, in "fixed")
    assert 0 < figures["greedy_ops_per_layer"] == figures["vreason_ops_per_layer"] < figures["hf_ops_per_layer"]


def test_host_syncs_are_the_readback_alone(figures):
    # the step reads nothing on the host; the driver reads the new tokens (and their records) once a step
    for mode in ("greedy", "vreason"):
        assert figures[f"{mode}_step_host_syncs"] == 0
        assert figures[f"{mode}_host_syncs_by_call"] == {"readback.read.tolist": 1}
        assert figures[f"{mode}_host_syncs_per_step"] == 1
        assert figures[f"{mode}_sync_ops_per_step"] == 0  # nor an op that waits for the device (mask indexing, ...)
    # a step where rows finish reads each finished row's counters (peak step; controller updates where
    # controlled) and where the live rows' padding starts: 1 of the 2 rows retired here
    assert figures["greedy_retire_half_host_syncs"] == 1 + 1 and figures["vreason_retire_half_host_syncs"] == 2 + 1
    assert figures["hf_host_syncs_per_step"] >= 1  # HF's loop checks on the host whether every row has finished


def test_the_loop_body_is_all_the_driver_does_per_step(figures):
    assert figures["greedy_driver_ops_per_step"] == figures["greedy_ops_per_step"]


def _counted(fn):
    tally = Tally()
    with count_host_reads(tally), OpCounter(tally), tally.counting("toy"):
        fn()
    return tally.counts["toy"]


def test_the_op_counter_counts_ops_and_views():
    a, b = torch.ones(4), torch.ones(4)
    c = _counted(lambda: (a + b).view(2, 2).mul(2))
    assert c["ops"] == 3 and c["view_ops"] == 1


def test_the_op_counter_counts_ops_that_wait_for_the_device():
    t, mask, idx = torch.arange(4.0), torch.tensor([True, False, True, False]), torch.tensor([0, 2])
    assert _counted(lambda: (t[mask], t[idx], torch.equal(t, t), t.sum().item(), t[idx].repeat_interleave(idx + 1)))[
        "sync_ops"] == 4  # the mask, equal, item, repeat_interleave; not the integer index
    assert _counted(lambda: (t[idx], t.repeat_interleave(2), torch.where(mask, t, 0)))["sync_ops"] == 0


def test_the_host_read_counter_catches_each_read():
    t = torch.tensor([3])

    def reads():
        t.item(), t.tolist(), bool(t), t.cpu(), t.numpy(), int(t), float(t), operator.index(t)

    c = _counted(reads)
    assert {k: v for k, v in c.items() if k.startswith("read.")} == {
        f"read.{m}": 1 for m in ("item", "tolist", "__bool__", "cpu", "numpy", "__int__", "__float__", "__index__")}
    assert _counted(lambda: t + 1)["read.item"] == 0


def test_the_host_read_counter_leaves_tensor_as_it_was():
    before = dict(torch.Tensor.__dict__)
    with count_host_reads(Tally()):
        pass
    assert dict(torch.Tensor.__dict__) == before


def test_a_sync_put_into_the_step_is_counted_in_the_step(monkeypatch):
    from engine_util import decode_settings, tiny_lm, video_inputs
    from vreason_batch.bench.step import count_our_steps
    from vreason_batch.engine import step

    choose = step.choose_tokens

    def reading(logits, *args):
        logits.sum().item()  # what a `bool(due.any())` or a stop check on the device would cost
        return choose(logits, *args)

    monkeypatch.setattr(step, "choose_tokens", reading)
    per_step, _ = count_our_steps(tiny_lm(), [video_inputs(0), video_inputs(1, 6)], decode_settings("greedy", 8), 2)
    assert [(c["step.read.item"], c["step.sync_ops"], c["readback.read.tolist"]) for c in per_step] == [(1, 1, 1)] * 2
