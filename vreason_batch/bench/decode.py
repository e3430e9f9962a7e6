"""`vreason-batch bench` (workloads decode, the default, and precision): decode speed and memory per mode.

decode: speed and peak memory per mode, in one process, on one model and prompt; precision
(`run_precision`): the controller's effect in float32 and in a lower precision, on the same weights.

Figures, not a test: every timing is the median of `--repeats` runs after one warm-up, with EOS
disabled so every run makes exactly `--new-tokens` tokens. ms/token includes the prefill, the same
for every mode. Memory: on CUDA the allocator's peak above the level before the run; on CPU the peak
resident set size above the level at the start of one run, measured in a forked child.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import numpy as np


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_peak_mib(fn) -> float:
    """Peak RSS growth of one fn() run, measured in a forked child (CPU only).

    The child starts with the parent's pages (model loaded, allocator warm); its ru_maxrss is its
    own peak, so peak - RSS-at-fork is what this run needed. Measuring in the parent instead reads
    ~0: memory freed by an earlier run stays mapped and is silently reused.
    """
    import resource

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run once, report, leave without running any cleanup of the parent's
        import torch

        # an OpenMP pool used before fork hangs the child (libgomp); one thread never uses it,
        # as in PyTorch's own DataLoader workers. Threads do not change what is allocated.
        torch.set_num_threads(1)
        os.close(r)
        base = _rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        os.write(w, str(max(0, peak - base)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return int(out) / 2**20 if out else float("nan")


def _measure(fn, repeats: int, device) -> tuple[float, float]:
    """(median seconds, peak memory MiB above the starting level) of fn()."""
    import torch

    fn()  # warm-up: lazy inits, allocator growth
    times = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), _cpu_peak_mib(fn)


def _load(args):
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.loading import load_model, load_random_architecture
    from vreason_batch.engine.models import BUILTIN_TINY

    mcfg = ModelConfig(name_or_path=args.model or BUILTIN_TINY, device=args.device, dtype=args.dtype)
    if args.arch:
        if not args.random_init:
            raise SystemExit("--arch builds an architecture from its config: add --random-init (no weights are loaded)")
        return load_random_architecture(args.arch, mcfg)
    lm = load_model(mcfg)
    if lm.name == BUILTIN_TINY:
        lm.name = f"{BUILTIN_TINY} (random init)"
    return lm


def _prompt(lm, frames: int, max_pixels: int, seed: int):
    from vreason_batch.engine.prompting import build_text_inputs, build_video_inputs

    q = "What happens in the video, and why? Answer step by step."
    if not lm.is_vl:
        return build_text_inputs(lm.tokenizer, q, None, "free_form", "reasoning")
    rng = np.random.default_rng(seed)
    fr = rng.integers(0, 255, (frames, 336, 448, 3), dtype=np.uint8)
    return build_video_inputs(lm.tokenizer, lm.vision, fr, 2.0, q, None, "free_form", "reasoning",
                              min_pixels=min(max_pixels, 128 * 28 * 28), max_pixels=max_pixels)


def _settings(mode: str, n: int, **ctrl):
    from vreason_batch.config import ControllerConfig, DecodingConfig, LiteConfig
    from vreason_batch.engine.api import DecodeSettings

    return DecodeSettings.build(mode, DecodingConfig(max_new_tokens=n, stop_strings=[]), ControllerConfig(**ctrl), LiteConfig())


def _model_bytes(lm) -> int:
    return sum(p.numel() * p.element_size() for p in lm.model.parameters())


def run_bench(args) -> dict[str, Any]:
    if getattr(args, "workload", "decode") == "precision":
        return run_precision(args)
    import torch

    from vreason_batch.engine.driver import decode_batch
    from vreason_batch.engine.modes import MODES
    from vreason_batch.engine.prompting import collate

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _load(args)
    lm.eos_token_ids = []  # every run makes exactly N tokens
    n = args.new_tokens = args.new_tokens or 64
    x = _prompt(lm, args.frames, args.max_pixels, 0)
    print(f"model: {lm.name}  device: {lm.device} {lm.dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"host: {platform.processor() or platform.machine()}  "
          f"{torch.cuda.get_device_name() if lm.device.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if lm.device.type == 'cuda' else 'CPU cores'}")
    print(f"prompt: {len(x.input_ids)} tokens ({x.num_video_tokens} video), {n} new tokens, median of {args.repeats}")

    def ours(mode: str, batch: int = 1, **ctrl):
        s = _settings(mode, n, **ctrl)
        prompts = [x] + [_prompt(lm, args.frames, args.max_pixels, i) for i in range(1, batch)]
        return lambda: decode_batch(lm, prompts, s)

    inputs = collate(lm, [x])
    if lm.is_vl:
        inputs["mm_token_type_ids"] = lm.video_mask(inputs).int() * 2

    def hf():
        with torch.no_grad():
            lm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=lm.pad_token_id, eos_token_id=None)

    model_mib = _model_bytes(lm) / 2**20
    figures: dict[str, Any] = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                               "prompt_tokens": len(x.input_ids), "video_tokens": x.num_video_tokens, "new_tokens": n,
                               "model_mib": round(model_mib, 1)}
    runs = [] if args.no_hf else [("hf_generate", hf)]
    # every registered mode at the default k = 2, and V-Reason at k = 1
    runs += [(m, ours(m, update_every=2) if MODES[m].controlled else ours(m)) for m in MODES]
    runs.insert(len(runs) - len(MODES) + 1, ("vreason_k1", ours("vreason", update_every=1)))
    _time_runs(figures, runs, n, args.repeats, lm.device)
    _compare_to_greedy(figures, model_mib, with_hf=not args.no_hf)

    if args.batch > 1:
        _time_batches(figures, lambda b: ours("vreason", batch=b, update_every=2), args.batch, n, args.repeats,
                      lm.device)
    print("  " + "   ".join(f"{k} {figures[k]}x" for k in ("greedy_vs_hf", "vreason_vs_greedy", "vreason_k1_vs_greedy",
                                                             "batch_speedup") if k in figures))
    return figures


def _time_runs(figures: dict[str, Any], runs: list, n: int, repeats: int, device) -> None:
    """ms/token and peak memory of each (key, fn) in `runs`, into `figures` (printed as they come)."""
    for key, fn in runs:
        sec, mem = _measure(fn, repeats, device)
        figures[f"{key}_ms_per_token"] = round(1000 * sec / n, 3)
        figures[f"{key}_peak_mem_mib"] = round(mem, 1)
        print(f"  {key:<14} {1000 * sec / n:8.2f} ms/token   peak mem +{mem:8.1f} MiB")


def _compare_to_greedy(figures: dict[str, Any], model_mib: float, with_hf: bool) -> None:
    """Greedy against HF generate, and each V-Reason run's time and memory against greedy's, into `figures`."""
    g_ms, g_mem = figures["greedy_ms_per_token"], figures["greedy_peak_mem_mib"]
    if with_hf:
        figures["greedy_vs_hf"] = round(g_ms / figures["hf_generate_ms_per_token"], 3)
    for key in ("vreason", "vreason_k1", "vreason_lite"):
        figures[f"{key}_vs_greedy"] = round(figures[f"{key}_ms_per_token"] / g_ms, 3)
        # peak memory over greedy's, as a share of greedy's whole peak (weights + its run)
        extra = figures[f"{key}_peak_mem_mib"] - g_mem
        figures[f"{key}_mem_overhead_pct"] = round(100 * extra / (model_mib + g_mem), 2)
    print(f"  memory over greedy (share of greedy's peak incl. {model_mib:.0f} MiB of weights): "
          f"vreason {figures['vreason_mem_overhead_pct']:+.2f}%  vreason_lite {figures['vreason_lite_mem_overhead_pct']:+.2f}%")


def _time_batches(figures: dict[str, Any], run_of_batch, batch: int, n: int, repeats: int, device) -> None:
    """tokens/s of V-Reason at batch 1 and at `batch` (`run_of_batch(b)` gives the run), and the speedup."""
    for b in (1, batch):
        sec, _ = _measure(run_of_batch(b), repeats, device)
        figures[f"batch{b}_tokens_per_s"] = round(b * n / sec, 2)
        print(f"  vreason batch {b:<3} {b * n / sec:8.1f} tokens/s")
    figures["batch_speedup"] = round(figures[f"batch{batch}_tokens_per_s"] / figures["batch1_tokens_per_s"], 2)


def run_precision(args) -> dict[str, Any]:
    """The controller's effect in float32 and in a lower precision, on the same weights (cast).

    What a user sees: lr = 0 against greedy, `always_min` / `always_max` at lr 1e-3 and 1e-2
    against greedy (mean entropy of the chosen-from logits over all tokens, and over the tokens
    both runs decode from the same text), and how far single updates move entropy (switch rule, k = 1).
    """
    import copy

    import torch

    from vreason_batch.engine.driver import decode_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    lm32 = _load(argparse_copy(args, dtype="float32"))
    low_dtype = torch.float16 if args.dtype == "float16" else torch.bfloat16
    lm_low = copy.copy(lm32)
    lm_low.model, lm_low.dtype = copy.deepcopy(lm32.model).to(low_dtype), low_dtype
    for lm in (lm32, lm_low):
        lm.eos_token_ids = []
    n = args.new_tokens or 64
    prompts = [_prompt(lm32, 4 + i, args.max_pixels, i) for i in range(args.prompts or 4)]
    print(f"model: {lm32.name}; {len(prompts)} prompts, {n} tokens, k = 2; float32 vs {low_dtype} (same weights)")

    figures: dict[str, Any] = {"model": lm32.name, "prompts": len(prompts), "new_tokens": n, "low_dtype": str(low_dtype)}
    for tag, lm in (("float32", lm32), (str(low_dtype).replace("torch.", ""), lm_low)):
        g = decode_batch(lm, prompts, _settings("greedy", n))
        z = decode_batch(lm, prompts, _settings("vreason", n, lr=0.0))
        figures[f"{tag}_lr0_identical"] = sum(a.token_ids == b.token_ids for a, b in zip(z, g))
        print(f"  {tag}: lr 0 vs greedy: {figures[f'{tag}_lr0_identical']}/{len(prompts)} identical")
        for rule, lr in (("always_min", 1e-3), ("always_min", 1e-2), ("always_max", 1e-2)):
            v = decode_batch(lm, prompts, _settings("vreason", n, lr=lr, rule=rule))
            key = f"{tag}_{rule}_lr{lr:g}"
            figures[f"{key}_dH"] = _mean(x.entropy_post[i] for x in v for i in range(n)) - _mean(
                x.entropy_post[i] for x in g for i in range(n))
            figures[f"{key}_dH_shared"] = _mean(_same_text_entropy_diffs(v, g))
            figures[f"{key}_unchanged"] = sum(a.token_ids == b.token_ids for a, b in zip(v, g))
            print(f"  {tag}: {rule} lr {lr:g}: mean dH {figures[f'{key}_dH']:+.5f} nats (same-text tokens "
                  f"{figures[f'{key}_dH_shared']:+.6f}), {figures[f'{key}_unchanged']}/{len(prompts)} outputs unchanged")
        v = decode_batch(lm, prompts, _settings("vreason", min(n, 24), lr=1e-3, update_every=1, rule="switch"))
        moves = [abs(p - q) for x in v for q, p, a in zip(x.entropy, x.entropy_post, x.alpha) if a]
        figures[f"{tag}_switch_updates"] = len(moves)
        figures[f"{tag}_switch_updates_no_change"] = sum(m == 0 for m in moves)
        figures[f"{tag}_switch_median_move"] = statistics.median(moves)
        print(f"  {tag}: switch lr 1e-3 k=1: {len(moves)} updates, {figures[f'{tag}_switch_updates_no_change']} change "
              f"nothing, median |dH| {figures[f'{tag}_switch_median_move']:.2e}")
    return figures


def _mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def _same_text_entropy_diffs(v, g) -> list[float]:
    """Per-token entropy differences up to and including the first token that differs."""
    out = []
    for a, b in zip(v, g):
        k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids) - 1)
        out += [p - q for p, q in zip(a.entropy_post[: k + 1], b.entropy_post[: k + 1])]
    return out


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})
