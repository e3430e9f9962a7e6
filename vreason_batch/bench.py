"""`vreason-batch bench`: decode speed and peak memory per mode, in one process, on one model and prompt.

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
    from .config import ModelConfig
    from .models import (
        BUILTIN_TINY, LoadedModel, _vision_spec_from, build_random_model, builtin_tokenizer_dir, load_model,
        load_tokenizer, resolve_device_dtype,
    )

    mcfg = ModelConfig(name_or_path=args.model, device=args.device, dtype=args.dtype)
    if args.arch:
        if not args.random_init:
            raise SystemExit("--arch builds an architecture from its config: add --random-init (no weights are loaded)")
        device, dtype = resolve_device_dtype(mcfg)
        model = build_random_model(args.arch, dtype, device)
        tok = load_tokenizer(builtin_tokenizer_dir())
        return LoadedModel(model=model, tokenizer=tok, name=f"{args.arch} (random init)", device=device, dtype=dtype,
                           vision=_vision_spec_from(model), eos_token_ids=[], is_random_init=True)
    lm = load_model(mcfg)
    if lm.name == BUILTIN_TINY:
        lm.name = f"{BUILTIN_TINY} (random init)"
    return lm


def _prompt(lm, frames: int, max_pixels: int, seed: int):
    from .prompting import build_text_inputs, build_video_inputs

    q = "What happens in the video, and why? Answer step by step."
    if not lm.is_vl:
        return build_text_inputs(lm.tokenizer, q, None, "free_form", "reasoning")
    rng = np.random.default_rng(seed)
    fr = rng.integers(0, 255, (frames, 336, 448, 3), dtype=np.uint8)
    return build_video_inputs(lm.tokenizer, lm.vision, fr, 2.0, q, None, "free_form", "reasoning",
                              min_pixels=min(max_pixels, 128 * 28 * 28), max_pixels=max_pixels)


def run_bench(args) -> dict[str, Any]:
    import torch

    from .config import ControllerConfig
    from .decoding import DecodeSettings, _collate, decode_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = _load(args)
    lm.eos_token_ids = []  # every run makes exactly N tokens
    n = args.new_tokens
    x = _prompt(lm, args.frames, args.max_pixels, 0)
    print(f"model: {lm.name}  device: {lm.device} {lm.dtype}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"host: {platform.processor() or platform.machine()}  "
          f"{torch.cuda.get_device_name() if lm.device.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if lm.device.type == 'cuda' else 'CPU cores'}")
    print(f"prompt: {len(x.input_ids)} tokens ({x.num_video_tokens} video), {n} new tokens, median of {args.repeats}")

    def ours(mode: str, batch: int = 1, **ctrl):
        s = DecodeSettings(mode=mode, max_new_tokens=n, stop_strings=[], controller=ControllerConfig(**ctrl))
        prompts = [x] + [_prompt(lm, args.frames, args.max_pixels, i) for i in range(1, batch)]
        return lambda: decode_batch(lm, prompts, s)

    inputs = _collate(lm, [x])
    if lm.is_vl:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == lm.vision.video_token_id).int() * 2

    def hf():
        with torch.no_grad():
            lm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=lm.pad_token_id, eos_token_id=None)

    rows: list[tuple[str, float, float]] = []
    figures: dict[str, Any] = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                               "prompt_tokens": len(x.input_ids), "video_tokens": x.num_video_tokens, "new_tokens": n}
    for key, fn in [
        ("hf_generate", hf),
        ("greedy", ours("greedy")),
        ("vreason_k1", ours("vreason", update_every=1)),
        ("vreason", ours("vreason", update_every=2)),
        ("vreason_lite", ours("vreason_lite", update_every=2)),
    ]:
        sec, mem = _measure(fn, args.repeats, lm.device)
        ms = 1000 * sec / n
        figures[f"{key}_ms_per_token"] = round(ms, 3)
        figures[f"{key}_peak_mem_mib"] = round(mem, 1)
        rows.append((key, ms, mem))
        print(f"  {key:<14} {ms:8.2f} ms/token   peak mem +{mem:8.1f} MiB")
    figures["greedy_vs_hf"] = round(figures["greedy_ms_per_token"] / figures["hf_generate_ms_per_token"], 3)
    figures["vreason_vs_greedy"] = round(figures["vreason_ms_per_token"] / figures["greedy_ms_per_token"], 3)
    figures["vreason_k1_vs_greedy"] = round(figures["vreason_k1_ms_per_token"] / figures["greedy_ms_per_token"], 3)

    for b in (1, args.batch):
        sec, _ = _measure(ours("vreason", batch=b, update_every=2), args.repeats, lm.device)
        figures[f"batch{b}_tokens_per_s"] = round(b * n / sec, 2)
        print(f"  vreason batch {b:<3} {b * n / sec:8.1f} tokens/s")
    figures["batch_speedup"] = round(figures[f"batch{args.batch}_tokens_per_s"] / figures["batch1_tokens_per_s"], 2)
    print(f"  greedy/HF {figures['greedy_vs_hf']}x   vreason(k=2)/greedy {figures['vreason_vs_greedy']}x   "
          f"vreason(k=1)/greedy {figures['vreason_k1_vs_greedy']}x   batch {args.batch} vs 1: {figures['batch_speedup']}x")
    return figures
