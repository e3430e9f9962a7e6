"""The decode loop's driver: every mode in modes.py, batched over the KV cache, with continuous batching.

Its shape follows gpt-fast's generate.py, one piece a module: prefill.py fills the cache with the
prompts (all but their last token) and starts rows from them; step.py's `decode_one_token`
advances every live row by one token and `record_step` appends it to the rows' traces;
state.py's `DecodeState.retire` is the one place rows leave. `decode_requests` drives them with
continuous batching (`decode_batch` is its one-batch case).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

import torch

from vreason_batch.engine import stack
from vreason_batch.engine.api import DecodeResult, DecodeSettings, EngineStats, Request
from vreason_batch.engine.last_layer import LastLayer
from vreason_batch.engine.models import LoadedModel
from vreason_batch.engine.precision import ieee_float32
from vreason_batch.engine.prefill import Prefilled, prefill_units
from vreason_batch.engine.prompting import ModelInputs
from vreason_batch.engine.state import DecodeState
from vreason_batch.engine.step import StopStrings, decode_one_token, record_step

log = logging.getLogger(__name__)


def _admit(lm: LoadedModel, head: LastLayer, pending: deque, free: int, stats: EngineStats) -> Prefilled:
    """Prefill the next units from `pending` (at least one; more while they add up to fewer than
    `free` rows and are of the same kind, text or video, as the first)."""
    units = [pending.popleft()]
    rows = units[0].rows
    while pending and rows < free and pending[0].has_video == units[0].has_video:
        units.append(pending.popleft())
        rows += units[-1].rows
    return Prefilled.of(lm, head, units, stats)


def _deliver(lm: LoadedModel, rows: list, results: dict, finished: Callable[[dict], None] | None) -> None:
    """The results of rows that just finished, into `results` and to `finished`."""
    if rows:
        now = {(row.key, row.mode): row.result(lm.tokenizer) for row in rows}
        results.update(now)
        if finished is not None:
            finished(now)


def last_layer_for(lm: LoadedModel, compiled: bool) -> LastLayer:
    """The step's last layer, with the layers before it where stack.py runs them (else HF's forward does);
    a compiled one is kept on `lm`, so that its graphs are compiled once per model."""
    if not compiled:
        return _step_layers(lm, False)
    if "head" not in lm.compiled_heads:
        lm.compiled_heads["head"] = _step_layers(lm, True)
    return lm.compiled_heads["head"]


def _step_layers(lm: LoadedModel, compiled: bool) -> LastLayer:
    why = stack.unsupported(lm)
    if why is not None:
        log.debug("the decode step runs HF's forward for the layers before the last: %s", why)
    return LastLayer(lm.last_layer_parts(), compiled, stack=None if why else stack.Stack(lm, compiled))


def decode_requests(lm: LoadedModel, requests: list[Request], settings: DecodeSettings, slots: int,
                    compiled: bool = False, more: Callable[[], list[Request]] | None = None,
                    finished: Callable[[dict[tuple[Any, str], DecodeResult]], None] | None = None,
                    ) -> tuple[dict[tuple[Any, str], DecodeResult], EngineStats]:
    """Decode every (request, mode) with continuous batching over `slots` rows.

    When a row finishes, its slot is refilled at once: the next requests are prefilled (one prefill
    per request shared by its modes, one prefix per video shared by its questions) and join the
    running batch, each row with its own step counter, policy and controller. Rows that do not fit
    yet wait, prefilled (one cache row per request; the modes' copies are made as rows start), for
    the next free slot: at most one prefill's requests wait at a time. `settings.mode` is not used: each
    request names its modes. Float32 matmuls run at IEEE precision throughout (precision.py), whatever
    the process's `torch.set_float32_matmul_precision`, which is restored on return. Returns
    ({(key, mode): result}, stats). `compiled` (runtime.compile): the step's layers before the last (stack.py),
    its last layer's attention and head (last_layer.py) run through torch.compile.

    A run fed while it decodes (feeding.py): `more()` is asked for further requests whenever slots are free
    and nothing waits (the run ends when it has none and every row is done), and `finished` gets each
    step's finished rows' results as they finish; the state then has all `slots` rows.
    """
    if slots < 1:
        raise ValueError("slots must be >= 1")
    head = last_layer_for(lm, compiled)
    eos, stops = set(lm.eos_token_ids), StopStrings(lm.tokenizer, settings.stop_strings)
    stats = EngineStats()
    video_token = lm.vision.video_token_id if lm.vision else None
    pending = deque(prefill_units(requests, video_token))
    # the state's rows: never more than the call has rows (a free slot still costs compute every step)
    capacity = slots if more is not None else min(slots, sum(u.rows for u in pending))
    live: DecodeState | None = None
    ready: Prefilled | None = None  # prefilled requests whose rows wait for a slot
    results: dict[tuple[Any, str], DecodeResult] = {}
    # the last layer stands in once for the whole call: no module is swapped per step (issue 22, section 2)
    with ieee_float32(), torch.no_grad(), lm.last_layer_stood_in():
        while True:
            free = live.free_slots() if live is not None else list(range(capacity))
            if more is not None and free and ready is None and not pending:
                pending.extend(prefill_units(more(), video_token))
            while free and (ready is not None or pending):
                if ready is None:
                    ready = _admit(lm, head, pending, len(free), stats)
                for admit in ready.start_rows(len(free), head, settings, stats):
                    if live is None:
                        live = DecodeState.with_slots(admit, capacity, stats)
                    else:
                        live.fill(free[:admit.size], admit, stats)
                    free = free[admit.size:]
                if not ready.todo:
                    ready = None
            if live is None:
                break
            stats.count_step(live.live, slots, queued=ready is not None or bool(pending))
            step = decode_one_token(lm, head, live, settings)
            before = len(live.done)
            live.retire(record_step(live, step, eos, stops, settings.max_new_tokens))
            _deliver(lm, live.done[before:], results, finished)
            if not live.live:  # every slot free: the next rows start a fresh state, as long as their own cache
                live = None
    stats.output_tokens = sum(r.num_output_tokens for r in results.values())
    return results, stats


def decode_batch(lm: LoadedModel, batch: list[ModelInputs], settings: DecodeSettings,
                 compiled: bool = False) -> list[DecodeResult]:
    """Decode `batch` together in `settings.mode`; each sample keeps its own controller state. One
    result per input, in order."""
    mode = settings.mode.name
    out, _ = decode_requests(lm, [Request(i, x, (mode,)) for i, x in enumerate(batch)], settings, len(batch), compiled)
    return [out[(i, mode)] for i in range(len(batch))]
