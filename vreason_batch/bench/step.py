"""`vreason-batch bench --workload step`: ATen ops, host syncs and ms per decode step (greedy, V-Reason at k = 2, HF generate).

Figures, not a test. One batch of `--batch` video prompts (two lengths, so rows are padded), EOS
disabled, float32 on CPU unless --dtype says otherwise:

- ops: ATen ops dispatched (a TorchDispatchMode counter; on a GPU each is about one kernel launch,
  except views, which are counted apart as well). Ours: the batch is prefilled (not counted), then
  the driver loop's body (`decode_one_token`, then `record_step` and `retire`, as in
  driver.decode_requests) is counted over `--new-tokens` steps: "step" is decode_one_token,
  "readback" the rest. V-Reason at k = 2 updates on every other step, so its figure is the mean
  over an even number of steps (update and plain steps are also given apart). HF: `generate` of N
  tokens minus `generate` of 1 token (its prefill and first token), over the N - 1 steps between:
  HF's decoding step with generate's own per-token work (logits processors, stopping checks).
  The same difference over `decode_requests` checks that the loop body is all the driver does.
- host syncs: calls of Tensor.item / tolist / __bool__ / cpu / numpy / __int__ / __float__ /
  __index__ (each reads a tensor on the host: a device sync on a GPU), counted the same way; and,
  as a second view, ATen ops that would wait for a GPU (`.item()`'s op, torch.equal, nonzero,
  boolean-mask indexing, ...: `sync_ops`), which also catches syncs that no Tensor method shows.
- per layer / fixed: ops inside the decoder layers before the last (HF's: forward hooks; ours,
  engine/stack.py's: its per-layer function), per layer; the rest is fixed. `*_28_layers_est` is
  fixed + per layer x 28 (Qwen2.5-VL-7B's depth): an ESTIMATE from the model run, scaled by
  layers, not a measurement of the 7B model.
- ms: mean ms per step over `--new-tokens` steps after 2 warm-up steps (prefill not timed): ours the
  loop body, HF generate's steps from a clock it calls after every token (a stopping criterion).
  Median of `--repeats`, all interleaved (the machine's load hits all alike), one untimed run first.
- compiled: the same loop body with runtime.compile's step (a layer before the last, the last layer's
  attention and its head as torch.compile graphs; the first untimed run compiles them), its ms per
  step for greedy and V-Reason, and whether decode_requests makes the same tokens compiled and eager
  in both modes.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections import Counter
from typing import Any

import torch

from vreason_batch.bench.counters import Tally, counting

SLOT_COUNTS = (8, 32)  # issue 22, section 3: ms per step at 8 and at 32 slots
GOALS = {"greedy_vs_hf_ops": 1.0, "vreason_vs_hf_ops": 1.1}  # issue 22, section 1
DEEP_LAYERS = 28  # Qwen2.5-VL-7B


def _loop_body(lm, head, st, settings, stops, tally: Tally | None = None) -> None:
    """One iteration of driver.decode_requests' loop over live rows `st` (no admissions)."""
    from vreason_batch.engine.step import decode_one_token, record_step

    with tally.counting("step") if tally else contextlib.nullcontext():
        step = decode_one_token(lm, head, st, settings)
    with tally.counting("readback") if tally else contextlib.nullcontext():
        st.retire(record_step(st, step, set(lm.eos_token_ids), stops, settings.max_new_tokens))


def _prefilled(lm, prompts, settings, compiled: bool = False):
    from vreason_batch.engine.driver import last_layer_for
    from vreason_batch.engine.prefill import prefill
    from vreason_batch.engine.step import StopStrings

    head = last_layer_for(lm, compiled)
    return head, prefill(lm, head, prompts, settings), StopStrings(lm.tokenizer, settings.stop_strings)


def count_our_steps(lm, prompts, settings, steps: int) -> tuple[list[Counter], Counter]:
    """Per step: the loop body's counts, {"step.ops": .., "readback.read.tolist": .., ...}; and the
    counts of `retire` when every other row finishes (what a step where rows finish adds)."""
    from vreason_batch.engine.precision import ieee_float32

    tally, per_step = Tally(), []
    with ieee_float32(), torch.no_grad():
        head, st, stops = _prefilled(lm, prompts, settings)
        with counting(lm, tally):
            for _ in range(steps):
                tally.counts.clear()
                _loop_body(lm, head, st, settings, stops, tally)
                per_step.append(Counter({f"{region}.{k}": v for region, c in tally.counts.items() for k, v in c.items()}))
            with tally.counting("retire"):
                st.retire(list(range(0, len(st.rows), 2)))
    return per_step, tally.counts["retire"]


def count_by_difference(lm, run, n: int) -> Counter:
    """(counts of run(n) - counts of run(1)) / (n - 1): per step, the prefill and first token taken out."""
    tally = Tally()
    with counting(lm, tally):
        for tokens in (1, n):
            with tally.counting(str(tokens)):
                run(tokens)
    return Counter({k: (tally.counts[str(n)][k] - tally.counts["1"][k]) / (n - 1) for k in tally.counts[str(n)]})


def our_timer(lm, prompts, settings, steps: int, compiled: bool = False):
    """() -> the loop body's mean ms per step over `steps` steps, after a prefill and 2 warm-up steps
    (`compiled`: runtime.compile's step; its graphs are compiled in the first run)."""
    from vreason_batch.engine.precision import ieee_float32

    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    def run() -> float:
        with ieee_float32(), torch.no_grad():
            head, st, stops = _prefilled(lm, prompts, settings, compiled)
            for _ in range(2):
                _loop_body(lm, head, st, settings, stops)
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                _loop_body(lm, head, st, settings, stops)
            sync()
            return 1000 * (time.perf_counter() - t) / steps
    return run


def hf_timer(lm, prompts, steps: int):
    """() -> HF generate's mean ms per step over `steps` steps after 2 warm-up steps, from a clock that
    generate calls after every token (a stopping criterion that never stops)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    run = _hf_generate(lm, prompts)

    class Clock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def timed() -> float:
        clock = Clock()
        run(steps + 3, StoppingCriteriaList([clock]))  # times[0]: the prefill's token; then 2 warm-up steps
        return 1000 * (clock.times[-1] - clock.times[2]) / (len(clock.times) - 3)
    return timed


def interleaved_ms(timers: dict, repeats: int) -> dict[str, float]:
    """Median ms per step of each timer; one untimed run each, then the repeats in turn (the machine's load hits all alike)."""
    for timer in timers.values():
        timer()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer())
    return {name: round(statistics.median(v), 3) for name, v in samples.items()}


def _mean_counts(per_step: list[Counter]) -> Counter:
    keys = set().union(*per_step)
    return Counter({k: sum(c[k] for c in per_step) / len(per_step) for k in keys})


def _reads(c: Counter, prefix: str = "") -> float:
    return sum(v for k, v in c.items() if k.startswith(prefix) and ".read." in f".{k}")


def _per_layer(c: Counter, ops: float, views: float, prefix: str, layers: int) -> dict[str, float]:
    """Ops (all, and not views) per decoder layer counted, the fixed rest, and the 28-layer estimate:
    fixed + per layer x the layers that would run at 28 (our last layer runs in last_layer.py, in `fixed`)."""
    calls = c[f"{prefix}layer_calls"]  # decoder layers counted per step: all for HF, all but the last for us
    out = {}
    for kind, total, inside in (("ops", ops, c[f"{prefix}layer_ops"]),
                                ("non_view_ops", ops - views, c[f"{prefix}layer_ops"] - c[f"{prefix}layer_view_ops"])):
        per_layer = inside / calls if calls else 0.0
        out |= {f"{kind}_per_layer": per_layer, f"fixed_{kind}": total - inside,
                f"{kind}_per_step_28_layers_est": total - inside + per_layer * (calls + DEEP_LAYERS - layers)}
    return out


def our_figures(per_step: list[Counter], retire: Counter, layers: int) -> dict[str, Any]:
    """The loop body's figures per step from `count_our_steps`: ops, views, host syncs, per layer;
    and what retiring every other row adds."""
    c = _mean_counts(per_step)
    ops, views = c["step.ops"] + c["readback.ops"], c["step.view_ops"] + c["readback.view_ops"]
    out = {"ops_per_step": ops, "step_ops": c["step.ops"], "readback_ops": c["readback.ops"],
           "view_ops_per_step": views, "non_view_ops_per_step": ops - views,
           "host_syncs_per_step": _reads(c), "step_host_syncs": _reads(c, "step."),
           "sync_ops_per_step": c["step.sync_ops"] + c["readback.sync_ops"],
           "readback_host_syncs": _reads(c, "readback."),
           "host_syncs_by_call": {k: v for k, v in sorted(c.items()) if ".read." in k and v},
           "update_step_ops": statistics.fmean(s["step.ops"] + s["readback.ops"] for s in per_step[0::2]),
           "plain_step_ops": statistics.fmean(s["step.ops"] + s["readback.ops"] for s in per_step[1::2]),
           "retire_half_host_syncs": _reads(retire), "retire_half_sync_ops": retire["sync_ops"]}
    return out | _per_layer(c, ops, views, "step.", layers)


def hf_figures(c: Counter, layers: int) -> dict[str, Any]:
    out = {"ops_per_step": c["ops"], "view_ops_per_step": c["view_ops"], "non_view_ops_per_step": c["ops"] - c["view_ops"],
           "host_syncs_per_step": _reads(c), "sync_ops_per_step": c["sync_ops"], "host_syncs_by_call": {k: v for k, v in sorted(c.items()) if k.startswith("read.") and v}}
    return out | _per_layer(c, c["ops"], c["view_ops"], "", layers)


def _hf_generate(lm, prompts):
    """run(n): HF generate of exactly n tokens on the batch (greedy, no EOS)."""
    from vreason_batch.engine.prompting import collate

    inputs = collate(lm, prompts)
    if lm.is_vl:
        inputs["mm_token_type_ids"] = lm.video_mask(inputs).int() * 2  # 2 = video, as HF's processor gives

    def run(n: int, stopping_criteria=None) -> None:
        with torch.no_grad():
            lm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=lm.pad_token_id, eos_token_id=None, stopping_criteria=stopping_criteria)
    return run


def _driver(lm, prompts, mode: str, **ctrl):
    """run(n): decode_batch of exactly n tokens per row (EOS disabled on `lm`)."""
    from vreason_batch.bench.decode import _settings
    from vreason_batch.engine.driver import decode_batch

    return lambda n: decode_batch(lm, prompts, _settings(mode, n, **ctrl))


def run_step_bench(args) -> dict[str, Any]:
    from vreason_batch.bench.decode import _load, _prompt, _settings

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = copy.copy(_load(args))
    lm.eos_token_ids = []  # every row makes exactly the tokens asked for
    n = max(2, args.new_tokens or 16)
    n += n % 2  # V-Reason at k = 2: as many update steps as plain ones
    layers = len(lm.text_model().layers)
    # two prompt lengths, so that rows are padded (HF then builds a mask every step, as in real batches)
    prompts = [_prompt(lm, max(2, args.frames - 2 * (i % 2)), args.max_pixels, i) for i in range(args.batch)]
    runs = {"greedy": _settings("greedy", n + 8), "vreason": _settings("vreason", n + 8, update_every=2)}
    print(f"model: {lm.name}  device: {lm.device} {lm.dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"batch {len(prompts)} prompts of {sorted({len(p.input_ids) for p in prompts})} tokens; {layers} decoder "
          f"layers; counts over {n} steps, ms the median of {args.repeats}")
    figures: dict[str, Any] = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                               "batch": len(prompts), "steps": n, "layers": layers, "update_every": 2}
    hf = {} if args.no_hf else hf_figures(count_by_difference(lm, _hf_generate(lm, prompts), n), layers)
    ours = {name: our_figures(*count_our_steps(lm, prompts, s, n), layers) for name, s in runs.items()}
    for name, fig in (("hf", hf), *ours.items()):
        figures.update({f"{name}_{k}": _rounded(v) for k, v in fig.items()})
    figures["greedy_driver_ops_per_step"] = count_by_difference(lm, _driver(lm, prompts, "greedy"), n)["ops"]
    timers = {name: our_timer(lm, prompts, s, n) for name, s in runs.items()}
    timers |= {f"compiled_{name}": our_timer(lm, prompts, s, n, compiled=True) for name, s in runs.items()}
    if hf:
        timers["hf"] = hf_timer(lm, prompts, n)
    figures.update({f"{name}_ms_per_step": ms for name, ms in interleaved_ms(timers, args.repeats).items()})
    figures["eager_ms_per_step"] = figures["greedy_ms_per_step"]  # the greedy step, eager and compiled
    figures["compiled_ms_per_step"] = figures["compiled_greedy_ms_per_step"]
    figures["compiled_equals_eager"] = compiled_equals_eager(lm, prompts, runs)
    figures["vreason_vs_greedy_ms"] = round(figures["vreason_ms_per_step"] / figures["greedy_ms_per_step"], 3)
    if hf:
        figures["greedy_vs_hf_ms"] = round(figures["greedy_ms_per_step"] / figures["hf_ms_per_step"], 3)
        _goals(figures)
    figures.update(slot_figures(lm, lambda i: _prompt(lm, max(2, args.frames - 2 * (i % 2)), args.max_pixels, i),
                                runs["greedy"], n))
    not_measured = {} if hf else {"hf_ops_per_step": "--no-hf"}  # JSON keys this run could not measure, and why
    figures.update({k: None for k in not_measured}, not_measured=not_measured)
    _print(figures)
    return figures


def compiled_equals_eager(lm, prompts, runs: dict) -> bool:
    """Whether runtime.compile's step makes every row's tokens the eager step's, in each of `runs`' modes."""
    from vreason_batch.engine.api import Request
    from vreason_batch.engine.driver import decode_requests

    def tokens(name, s, compiled):
        got, _ = decode_requests(lm, [Request(i, p, (name,)) for i, p in enumerate(prompts)], s, len(prompts), compiled)
        return [got[(i, name)].token_ids for i in range(len(prompts))]
    return all(tokens(name, s, False) == tokens(name, s, True) for name, s in runs.items())


def slot_figures(lm, prompt_of, settings, steps: int, admissions: int = 4) -> dict[str, Any]:
    """The slot cache (issue 22, section 3): at each of SLOT_COUNTS slots, a full state decodes `steps`
    steps (ms per step, the loop body), then `admissions` times a row is retired and a freshly
    prefilled one written into its slot: the cache bytes copied per admission beside the admitted
    row's own prefill (goal: equal), and whether the live cache's buffers stayed where they were."""
    from vreason_batch.engine.api import EngineStats
    from vreason_batch.engine.precision import ieee_float32
    from vreason_batch.engine.state import DecodeState

    out: dict[str, Any] = {}
    with ieee_float32(), torch.no_grad():
        for slots in SLOT_COUNTS:
            head, first, stops = _prefilled(lm, [prompt_of(i) for i in range(slots)], settings)
            st = DecodeState.with_slots(first, slots)
            _loop_body(lm, head, st, settings, stops)  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                _loop_body(lm, head, st, settings, stops)
            out[f"ms_per_step_{slots}_slots"] = round((time.perf_counter() - t0) * 1e3 / steps, 2)
            stats, buffers = EngineStats(), [layer.keys.untyped_storage().data_ptr() for layer in st.cache.layers]
            for r in range(admissions):
                _, new, _ = _prefilled(lm, [prompt_of(slots + r)], settings)
                st.retire([r])
                st.fill([r], new, stats)
            out[f"copied_bytes_per_admission_{slots}_slots"] = stats.copied_cache_bytes // admissions
            out[f"admitted_rows_cache_bytes_{slots}_slots"] = stats.admitted_cache_bytes // admissions
            out[f"batch_cache_bytes_{slots}_slots"] = st.cache_bytes()
            out[f"cache_moved_{slots}_slots"] = buffers != [layer.keys.untyped_storage().data_ptr() for layer in st.cache.layers]
    # the headline pair, at the larger slot count
    out["copied_bytes_per_admission"] = out[f"copied_bytes_per_admission_{SLOT_COUNTS[-1]}_slots"]
    out["admitted_rows_cache_bytes"] = out[f"admitted_rows_cache_bytes_{SLOT_COUNTS[-1]}_slots"]
    return out


def _rounded(v):
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 2) if isinstance(v, float) else v


def _goals(figures: dict[str, Any]) -> None:
    """Our ops per step against HF's, at the model's depth and at the 28-layer estimate, against the goals
    (which count all ops); the same ratios without views (no kernel launch) beside them."""
    for est in ("", "_28_layers_est"):
        for name in ("greedy", "vreason"):
            key = f"{name}_vs_hf_ops{est}"
            figures[key] = round(figures[f"{name}_ops_per_step{est}"] / figures[f"hf_ops_per_step{est}"], 3)
            figures[f"{key}_goal_met"] = figures[key] <= GOALS[f"{name}_vs_hf_ops"]
            figures[f"{name}_vs_hf_non_view_ops{est}"] = round(
                figures[f"{name}_non_view_ops_per_step{est}"] / figures[f"hf_non_view_ops_per_step{est}"], 3)
    figures["host_syncs_goal_met"] = max(figures["greedy_host_syncs_per_step"], figures["vreason_host_syncs_per_step"]) <= 1


def _print(f: dict[str, Any]) -> None:
    names = [n for n in ("hf", "greedy", "vreason") if f.get(f"{n}_ops_per_step") is not None]
    print(f"  {'':<8} {'ops/step':>9} {'views':>7} {'syncs':>6} {'per layer':>10} {'fixed':>7} "
          f"{'28-layer est':>13} {'ms/step':>8}")
    for n in names:
        print(f"  {n:<8} {f[f'{n}_ops_per_step']:9.1f} {f[f'{n}_view_ops_per_step']:7.1f} "
              f"{f[f'{n}_host_syncs_per_step']:6.2f} {f[f'{n}_ops_per_layer']:10.1f} {f[f'{n}_fixed_ops']:7.1f} "
              f"{f[f'{n}_ops_per_step_28_layers_est']:13.1f} {f.get(f'{n}_ms_per_step', float('nan')):8.3f}")
    for n in ("greedy", "vreason"):
        print(f"  {n}: step {f[f'{n}_step_ops']} ops / {f[f'{n}_step_host_syncs']} syncs, readback "
              f"{f[f'{n}_readback_ops']} ops / {f[f'{n}_readback_host_syncs']} syncs; update steps "
              f"{f[f'{n}_update_step_ops']} ops, plain {f[f'{n}_plain_step_ops']}; retiring {f['batch'] // 2 + f['batch'] % 2} "
              f"of {f['batch']} rows: {f[f'{n}_retire_half_host_syncs']} syncs")
    print(f"  greedy through decode_requests: {f['greedy_driver_ops_per_step']} ops/step; ms ratios in this run: "
          f"vreason / greedy {f['vreason_vs_greedy_ms']}x" + (f", greedy / HF {f['greedy_vs_hf_ms']}x" if "greedy_vs_hf_ms" in f else ""))
    if "greedy_vs_hf_ops" in f:
        print("  ops vs HF (goal greedy <= 1.0, vreason <= 1.1): " + ", ".join(
            f"{n} {f[f'{n}_vs_hf_ops{e}']}x{' (28-layer est)' if e else ''} "
            f"{'met' if f[f'{n}_vs_hf_ops{e}_goal_met'] else 'NOT met'}"
            for e in ("", "_28_layers_est") for n in ("greedy", "vreason")))
        print("  without views: " + ", ".join(f"{n} {f[f'{n}_vs_hf_non_view_ops{e}']}x{' (28-layer est)' if e else ''}"
                                              for e in ("", "_28_layers_est") for n in ("greedy", "vreason")))
    print(f"  runtime.compile: greedy {f['compiled_greedy_ms_per_step']} ms/step (eager {f['greedy_ms_per_step']}), "
          f"vreason {f['compiled_vreason_ms_per_step']} (eager {f['vreason_ms_per_step']}); same tokens as eager: "
          f"{f['compiled_equals_eager']}")
    if f["not_measured"]:
        print("  not measured: " + "; ".join(f"{k} ({why})" for k, why in f["not_measured"].items()))
