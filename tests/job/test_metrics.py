"""The model actors' metrics: what one batch records, under which names and tags (no Ray needed:
ray.util.metrics' classes are replaced by recorders)."""

from __future__ import annotations

import pytest

from vreason_batch.job import metrics as m


class Recorder:
    def __init__(self, name, description="", boundaries=None, tag_keys=None):
        self.name, self.tag_keys, self.calls = name, tuple(tag_keys or ()), []

    def _add(self, value, tags):
        assert set(tags) == set(self.tag_keys), (self.name, tags)  # every tag set, no other
        self.calls.append((value, tags))

    def inc(self, value=1.0, tags=None):
        assert value > 0  # ray.util.metrics.Counter refuses 0
        self._add(value, tags)

    def observe(self, value, tags=None):
        self._add(value, tags)


@pytest.fixture
def actor_metrics(monkeypatch):
    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Counter", Recorder)
    monkeypatch.setattr(ray.util.metrics, "Histogram", Recorder)
    return m.ActorMetrics("node:42")


def row(mode, error=None, tokens=None, updates=None):
    return {"mode": mode, "error_type": error, "num_output_tokens": tokens, "controller_updates": updates}


def calls(am, metric):
    return am._m[metric.name].calls


def test_one_mode_of_a_batch(actor_metrics):
    am = actor_metrics
    rows = [row("vreason", tokens=10, updates=4), row("vreason", tokens=6, updates=0),
            row("vreason", error="video_not_found")]
    am.record_mode("vreason", rows, 1.5)
    tags = {"actor": "node:42", "mode": "vreason"}
    assert calls(am, m.ROWS) == [(2, {**tags, "status": "ok"}), (1, {**tags, "status": "error"})]
    assert calls(am, m.OUTPUT_TOKENS) == [(16, tags)]
    assert calls(am, m.CONTROLLER_UPDATES) == [(4, tags)]
    assert calls(am, m.DECODE_SECONDS) == [(1.5, tags)]


def test_error_rows_only_and_frame_wait(actor_metrics):
    am = actor_metrics
    am.record_mode("greedy", [row("greedy", error="decode_error")], None)  # nothing decoded
    am.record_frame_wait(0.25)
    tags = {"actor": "node:42", "mode": "greedy"}
    assert calls(am, m.ROWS) == [(1, {**tags, "status": "error"})]
    assert calls(am, m.OUTPUT_TOKENS) == calls(am, m.CONTROLLER_UPDATES) == calls(am, m.DECODE_SECONDS) == []
    assert calls(am, m.FRAME_WAIT_SECONDS) == [(0.25, {"actor": "node:42"})]


def test_histogram_boundaries_are_valid_for_ray():
    for d in m.METRICS:
        if d.kind == "histogram":
            assert d.boundaries and all(b > 0 for b in d.boundaries) and list(d.boundaries) == sorted(set(d.boundaries))
        else:
            assert d.kind == "counter" and not d.boundaries
