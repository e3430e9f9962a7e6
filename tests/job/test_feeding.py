"""No drain at the end of a call (stages/feeding.py): the calls a model actor holds at once share one
engine run; each returns when its own rows are done; a failed run heals each of its calls on its own."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from vreason_batch.job.stages.feeding import SharedEngine
from vreason_batch.job.stages.healing import DeviceUnusable


def req(key, modes=("greedy",)):
    return SimpleNamespace(key=key, modes=modes)


def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def result(r, m):
    return f"{r.key}/{m}"


def finish(finished, reqs):
    finished({(r.key, m): result(r, m) for r in reqs for m in r.modes})


class Calls:
    """Each decode(requests) in its own thread, as Ray Data's concurrent actor calls; their outcomes."""

    def __init__(self, engine):
        self.engine, self.out, self.threads = engine, {}, []

    def start(self, name, requests):
        def call():
            try:
                self.out[name] = self.engine.decode(requests)
            except Exception as e:  # noqa: BLE001 - the test looks at it
                self.out[name] = e

        t = threading.Thread(target=call)
        t.start()
        self.threads.append(t)

    def join(self):
        for t in self.threads:
            t.join(10)
            assert not t.is_alive()
        return self.out


def test_the_next_call_fills_the_slots_the_current_one_frees_and_each_returns_when_its_rows_are_done():
    runs, calls = [], None
    a, b = [req("a0"), req("a1", ("greedy", "vreason"))], [req("b0")]

    def run(first, more, finished):
        runs.append([r.key for r in first])
        finish(finished, first[:1])
        until(lambda: engine.waiting_calls() == 1)  # b arrives while a's last row decodes
        joined = more()
        runs[-1] += [r.key for r in joined]
        finish(finished, first[1:])  # a's rows are all done: a returns while b's row still decodes
        until(lambda: "a" in calls.out)
        finish(finished, joined)
        assert more() == []

    engine = SharedEngine(run, heal=lambda reqs, e: pytest.fail("nothing failed"))
    calls = Calls(engine)
    calls.start("a", a)
    until(lambda: runs)
    calls.start("b", b)
    out = calls.join()
    assert runs == [["a0", "a1", "b0"]]  # one run, fed with b's request when slots were free
    assert out["a"] == {("a0", "greedy"): "a0/greedy", ("a1", "greedy"): "a1/greedy", ("a1", "vreason"): "a1/vreason"}
    assert out["b"] == {("b0", "greedy"): "b0/greedy"}  # each call exactly its own rows


def test_a_run_that_fails_heals_each_of_its_open_calls_on_its_own_and_keeps_the_rows_it_finished():
    healed, calls = [], None
    a, b = [req("a0"), req("a1")], [req("b0"), req("b1")]

    def run(first, more, finished):
        until(lambda: engine.waiting_calls() == 1)
        more()
        finish(finished, first[:1])
        raise ValueError("bad sample (injected)")

    def heal(reqs, failed):
        healed.append(([r.key for r in reqs], failed))
        return {(r.key, m): ("decode_error", "x") if r.key == "b1" else result(r, m) for r in reqs for m in r.modes}

    engine = SharedEngine(run, heal)
    calls = Calls(engine)
    calls.start("a", a)
    until(lambda: engine.waiting_calls() == 0)
    calls.start("b", b)
    out = calls.join()
    # two calls were in the run: each heals from its own first attempt (None), only its open requests
    assert healed == [(["a1"], None), (["b0", "b1"], None)]
    assert out["a"] == {("a0", "greedy"): "a0/greedy", ("a1", "greedy"): "a1/greedy"}
    assert out["b"] == {("b0", "greedy"): "b0/greedy", ("b1", "greedy"): ("decode_error", "x")}


def test_a_call_alone_in_a_failed_run_heals_from_that_failure_and_the_engine_serves_the_next_call():
    healed, err = [], ValueError("bad (injected)")
    runs = []

    def run(first, more, finished):
        runs.append(len(first))
        if len(runs) == 1:
            raise err
        finish(finished, first)

    engine = SharedEngine(run, lambda reqs, failed: healed.append(failed) or {(r.key, m): ("decode_error", "x")
                                                                             for r in reqs for m in r.modes})
    assert engine.decode([req("a0")]) == {("a0", "greedy"): ("decode_error", "x")}
    assert healed == [err]  # the run was this call's first attempt: not made again
    assert engine.decode([req("b0")]) == {("b0", "greedy"): "b0/greedy"}


def test_a_device_error_fails_every_call_of_the_run_and_heals_none():
    def run(first, more, finished):
        until(lambda: engine.waiting_calls() == 1)
        more()
        raise RuntimeError("CUDA error: an illegal memory access")

    engine = SharedEngine(run, lambda reqs, failed: pytest.fail("a poisoned device is not healed"))
    calls = Calls(engine)
    calls.start("a", [req("a0")])
    until(lambda: engine.waiting_calls() == 0)
    calls.start("b", [req("b0")])
    out = calls.join()
    assert all(isinstance(out[k], DeviceUnusable) and "illegal memory access" in str(out[k]) for k in "ab")


def test_a_call_with_a_key_in_the_run_waits_for_the_next_run():
    runs = []

    def run(first, more, finished):
        runs.append([r.key for r in first])
        if len(runs) == 1:
            until(lambda: engine.waiting_calls() == 1)
            assert more() == []  # "s0" decodes in this run already: its second call is not mixed in
        finish(finished, first)

    engine = SharedEngine(run, lambda reqs, failed: {})
    calls = Calls(engine)
    calls.start("first", [req("s0")])
    until(lambda: runs)
    calls.start("again", [req("s0")])
    out = calls.join()
    assert runs == [["s0"], ["s0"]] and out["first"] == out["again"] == {("s0", "greedy"): "s0/greedy"}


def test_healing_that_breaks_raises_in_the_calls_it_cost_and_the_engine_serves_on():
    def run(first, more, finished):
        if first[0].key == "a0":
            raise ValueError("bad (injected)")
        finish(finished, first)

    def heal(reqs, failed):
        raise KeyError("a bug in healing")

    engine = SharedEngine(run, heal)
    with pytest.raises(KeyError, match="a bug in healing"):  # never error rows for work not done
        engine.decode([req("a0")])
    assert engine.decode([req("b0")]) == {("b0", "greedy"): "b0/greedy"}
