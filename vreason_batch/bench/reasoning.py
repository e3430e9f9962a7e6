"""`vreason-batch bench --workload reasoning | prefill`: what continuous batching and shared prefills buy.

reasoning: SmolLM2 (real weights) on the generated reasoning set, answers of mixed length (up to
`--new-tokens`, stopping at EOS), decoded twice at the same slot count: static batches of `--slots`
rows, each running until its longest row ends (what the model actor did before), and continuous
batching over the same slots (`decode_requests`). tokens/s = output tokens / wall time, prefills
included; occupancy = busy slot-steps / all slot-steps (and the same before the drain, the steps
after the last row was admitted, where slots free up with nothing left to fill them). Both runs decode the same rows, so their
outputs are compared too (float32: identical). Then an actor lifetime of `--calls` calls of as many
prompts each: one call at a time, each draining its slots, against `--calls-per-actor` calls in
flight on one engine (job/stages/feeding.py, runtime.calls_per_actor): `lifetime_slot_occupancy`.

prefill: annotation work, several questions on each of a few videos, in several modes. Separate:
one prefill per (sample, mode), as before (every row runs the vision tower and its whole prompt).
Shared: one vision pass and one system + video prefix per video, each question's suffix after it,
the cache copied per mode. Prefill time, vision passes and prefill tokens of each.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def _reasoning_requests(lm, n: int, modes: tuple[str, ...], first: int = 0):
    """Requests for rows [first, first + n) of the generated reasoning set."""
    from vreason_batch.engine.api import Request
    from vreason_batch.engine.prompting import build_text_inputs
    from vreason_batch.bench.reasoning_set import make_reasoning_set

    rows = make_reasoning_set(first + n)[first:]
    return [Request(r["id"], build_text_inputs(lm.tokenizer, r["question"], r.get("options"), r["problem_type"],
                                               "reasoning"), modes) for r in rows]


def run_reasoning_bench(args) -> dict[str, Any]:
    import torch

    from vreason_batch.bench.decode import _settings
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.api import EngineStats, Request
    from vreason_batch.engine.driver import decode_requests
    from vreason_batch.engine.loading import load_model
    from vreason_batch.engine.models import BUILTIN_SMOLLM2

    if args.threads:
        torch.set_num_threads(args.threads)
    n_new, slots, n_prompts = args.new_tokens or 256, args.slots, args.prompts or 48
    modes = tuple(args.modes.split(","))
    lm = load_model(ModelConfig(name_or_path=args.model or BUILTIN_SMOLLM2, device=args.device, dtype=args.dtype))
    reqs = _reasoning_requests(lm, n_prompts, modes)
    s = _settings(modes[0], n_new, update_every=2)
    print(f"model: {lm.name}  {lm.device} {lm.dtype}  threads {torch.get_num_threads()}; {len(reqs)} prompts x "
          f"{','.join(modes)}, up to {n_new} new tokens (EOS stops), {slots} slots, {args.repeats} repeats")

    def static():
        out, total = {}, EngineStats()
        # rows in the order a static actor batch would take them: `slots` (sample, mode) rows at a time
        pairs = [(r, m) for r in reqs for m in r.modes]
        for i in range(0, len(pairs), slots):
            chunk = [Request(r.key, r.inputs, (m,)) for r, m in pairs[i:i + slots]]
            got, st = decode_requests(lm, chunk, s, slots)
            out.update(got)
            total.add(st)
        return out, total

    def continuous():
        return decode_requests(lm, reqs, s, slots)

    figures: dict[str, Any] = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                               "prompts": len(reqs), "modes": list(modes), "max_new_tokens": n_new, "slots": slots}
    walls: dict[str, list[float]] = {"static": [], "continuous": []}
    results = {}
    for rep in range(args.repeats):
        for name, fn in (("static", static), ("continuous", continuous)):  # interleaved: the machine's load hits both
            t = time.perf_counter()
            out, st = fn()
            walls[name].append(time.perf_counter() - t)
            results[name] = (out, st)
            print(f"  repeat {rep + 1} {name:<10} {st.output_tokens / walls[name][-1]:8.1f} tokens/s  "
                  f"occupancy {st.occupancy:.3f}  steps {st.decode_steps}  wall {walls[name][-1]:.1f} s", flush=True)
    _batching_figures(figures, walls, results, slots)
    if args.calls > 1:
        calls = [_reasoning_requests(lm, n_prompts, modes, first=c * n_prompts) for c in range(args.calls)]
        _lifetime_figures(figures, lm, calls, s, slots, args.calls_per_actor)
    return figures


def _lifetime(lm, calls: list[list], s, slots: int, at_once: int):
    """A model actor's lifetime: `calls` (each a list of requests) through one SharedEngine, `at_once`
    of them in flight as Ray Data runs them (runtime.calls_per_actor); 1: each call drains its slots
    before the next starts. -> (results, EngineStats summed over the runs, wall seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from vreason_batch.engine.api import EngineStats
    from vreason_batch.engine.driver import decode_requests
    from vreason_batch.job.stages.feeding import SharedEngine

    total = EngineStats()

    def run(first, more, finished):
        _, st = decode_requests(lm, first, s, slots, more=more if at_once > 1 else None, finished=finished)
        total.add(st)

    def heal(reqs, failed):
        raise failed or RuntimeError("a decode run failed")  # a bench reports, it does not heal

    engine = SharedEngine(run, heal)
    t = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        outs = list(pool.map(engine.decode, calls))
    engine.wait_idle()
    wall = time.perf_counter() - t
    return {k: v for out in outs for k, v in out.items()}, total, wall


def _lifetime_figures(figures: dict[str, Any], lm, calls: list[list], s, slots: int, at_once: int) -> None:
    """Slot occupancy over an actor lifetime of several calls: fed (`at_once` calls in flight) vs drained."""
    print(f"  actor lifetime: {len(calls)} calls of {len(calls[0])} prompts, {at_once} calls in flight "
          f"(runtime.calls_per_actor) vs one at a time", flush=True)
    runs = {}
    for name, n in (("drained", 1), ("fed", at_once)):
        out, st, wall = _lifetime(lm, calls, s, slots, n)
        runs[name] = out
        figures[f"lifetime_{name}_slot_occupancy"] = round(st.occupancy, 4)
        figures[f"lifetime_{name}_decode_steps"] = st.decode_steps
        figures[f"lifetime_{name}_tokens_per_s"] = round(st.output_tokens / wall, 2)
        print(f"  lifetime {name:<8} occupancy {st.occupancy:.3f}  steps {st.decode_steps}  "
              f"{st.output_tokens / wall:8.1f} tokens/s  wall {wall:.1f} s", flush=True)
    figures["lifetime_calls"], figures["lifetime_prompts_per_call"] = len(calls), len(calls[0])
    figures["lifetime_calls_in_flight"] = at_once
    figures["lifetime_slot_occupancy"] = figures["lifetime_fed_slot_occupancy"]
    d, f = runs["drained"], runs["fed"]
    figures["lifetime_identical_outputs"] = sum(d[k].token_ids == f[k].token_ids for k in d)
    figures["lifetime_rows"] = len(d)
    print(f"  lifetime_slot_occupancy {figures['lifetime_slot_occupancy']} (drained: "
          f"{figures['lifetime_drained_slot_occupancy']}); {figures['lifetime_identical_outputs']}/{len(d)} outputs identical")


def _batching_figures(figures: dict[str, Any], walls: dict[str, list[float]], results: dict, slots: int) -> None:
    """Static vs continuous: each one's tokens/s, occupancy and steps, and their outputs compared, into `figures`."""
    for name in walls:
        out, st = results[name]
        figures[f"{name}_tokens_per_s"] = round(st.output_tokens / statistics.median(walls[name]), 2)
        figures[f"{name}_tokens_per_s_runs"] = [round(st.output_tokens / w, 2) for w in walls[name]]
        figures[f"{name}_slot_occupancy"] = round(st.occupancy, 4)
        figures[f"{name}_slot_occupancy_while_queued"] = round(st.occupancy_while_queued, 4)
        figures[f"{name}_decode_steps"] = st.decode_steps
        figures[f"{name}_drain_steps"] = st.decode_steps - st.queued_slot_steps // slots  # after the last admission
        figures["output_tokens"] = st.output_tokens
    s_out, c_out = results["static"][0], results["continuous"][0]
    figures["identical_outputs"] = sum(s_out[k].token_ids == c_out[k].token_ids for k in s_out)
    figures["rows"] = len(s_out)
    lengths = sorted(r.num_output_tokens for r in c_out.values())
    figures["answer_tokens_min_median_max"] = [lengths[0], lengths[len(lengths) // 2], lengths[-1]]
    figures["continuous_vs_static"] = round(figures["continuous_tokens_per_s"] / figures["static_tokens_per_s"], 3)
    print(f"  static {figures['static_tokens_per_s']} tokens/s (occupancy {figures['static_slot_occupancy']}), "
          f"continuous {figures['continuous_tokens_per_s']} tokens/s (occupancy {figures['continuous_slot_occupancy']}, "
          f"{figures['continuous_slot_occupancy_while_queued']} while rows waited): "
          f"{figures['continuous_vs_static']}x; answers {figures['answer_tokens_min_median_max']} tokens (min/median/max); "
          f"{figures['identical_outputs']}/{figures['rows']} outputs identical")


def run_prefill_bench(args) -> dict[str, Any]:
    """Annotation prefill: `--videos` videos x `--questions` questions x the modes, separate vs shared."""
    import numpy as np
    import torch

    from vreason_batch.bench.decode import _load, _settings
    from vreason_batch.engine.api import EngineStats, Request
    from vreason_batch.engine.prefill import prefill_rows, prefill_units
    from vreason_batch.engine.last_layer import LastLayer
    from vreason_batch.engine.prompting import build_video_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _load(args)
    if not lm.is_vl:
        raise SystemExit("--workload prefill needs a video model (e.g. builtin:tiny-qwen2.5-vl or --arch)")
    modes = tuple(args.modes.split(","))
    questions = ["What happens in the video?", "How many people appear, and what are they doing?",
                 "Is the scene indoors or outdoors? Explain briefly.", "What colour is the largest object?"]
    questions = (questions * (args.questions // len(questions) + 1))[: args.questions]
    reqs = []
    for v in range(args.videos):
        frames = np.random.default_rng(v).integers(0, 255, (args.frames, 336, 448, 3), dtype=np.uint8)
        for q, text in enumerate(questions):
            x = build_video_inputs(lm.tokenizer, lm.vision, frames, 2.0, text, None, "free_form", "reasoning",
                                   min_pixels=min(args.max_pixels, 128 * 28 * 28), max_pixels=args.max_pixels)
            reqs.append(Request(f"v{v}-q{q}", x, modes, f"video-{v}"))
    head = LastLayer(lm.last_layer_parts())
    s = _settings(modes[0], 1)
    vid = lm.vision.video_token_id

    def separate():  # before: every (sample, mode) row prefilled on its own, `--slots` rows per batch
        st = EngineStats()
        rows = [Request(r.key, r.inputs, (m,)) for r in reqs for m in r.modes]
        for i in range(0, len(rows), args.slots):
            prefill_rows(lm, head, prefill_units(rows[i:i + args.slots], vid), s, st)
        return st

    def shared():  # now: one unit per video (its questions share the prefix), modes share the prefill
        st = EngineStats()
        for unit in prefill_units(reqs, vid):
            prefill_rows(lm, head, [unit], s, st)
        return st

    figures: dict[str, Any] = {"model": lm.name, "dtype": str(lm.dtype).replace("torch.", ""), "videos": args.videos,
                               "questions_per_video": args.questions, "modes": list(modes),
                               "video_tokens": reqs[0].inputs.num_video_tokens,
                               "prompt_tokens": [len(r.inputs.input_ids) for r in reqs[: args.questions]]}
    print(f"model: {lm.name} {lm.dtype}; {args.videos} videos x {args.questions} questions x {len(modes)} modes; "
          f"{figures['video_tokens']} video tokens per prompt; median of {args.repeats}")
    times, stats = _time_prefills((("separate", separate), ("shared", shared)), args.repeats)
    _prefill_figures(figures, times, stats)
    return figures


def _prefill_figures(figures: dict[str, Any], times: dict[str, list[float]], stats: dict) -> None:
    """Separate vs shared: each one's prefill seconds, vision passes and prefill tokens, and the
    speedup, into `figures`."""
    for name in times:
        st = stats[name]
        figures[f"{name}_prefill_s"] = round(statistics.median(times[name]), 4)
        figures[f"{name}_prefill_s_runs"] = [round(t, 4) for t in times[name]]
        figures[f"{name}_vision_encodes"] = st.vision_encodes
        figures[f"{name}_prefill_tokens"] = st.prefill_tokens
        print(f"  {name:<9} prefill {figures[f'{name}_prefill_s']:.3f} s  vision passes {st.vision_encodes}  "
              f"prefill tokens {st.prefill_tokens}")
    figures["prefill_speedup"] = round(figures["separate_prefill_s"] / figures["shared_prefill_s"], 2)
    print(f"  shared prefill is {figures['prefill_speedup']}x faster")


def _time_prefills(runs, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Each (name, fn) of `runs` once to warm up, then `repeats` timed rounds, interleaved so the machine's
    load hits every run alike -> ({name: seconds of each round}, {name: EngineStats of its last round})."""
    import torch

    with torch.no_grad():
        for name, fn in runs:
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name, _ in runs}
        stats = {}
        for _ in range(repeats):
            for name, fn in runs:
                t = time.perf_counter()
                stats[name] = fn()
                times[name].append(time.perf_counter() - t)
    return times, stats
