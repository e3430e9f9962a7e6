"""The first-GPU check (issue 22, section 5), printed, not asserted: run by scripts/gpu_check.sh.

  python -m vreason_batch.bench.gpu gemm       the float32-output GEMM (hi/lo on CUDA) and the chunked
                                               path against float64, on the 7B's shapes
  python -m vreason_batch.bench.gpu agreement  bfloat16 greedy against HF generate on the built-in
                                               model (token agreement), and lr = 0 against greedy
  python -m vreason_batch.bench.gpu step       the 7B architecture, random weights: greedy and vreason,
                                               eager and runtime.compile's step, ms per decode step
                                               and peak memory at batch 1, 8, 32,
                                               beside the bandwidth floor (weights + cache read once)
Common flags: --device (auto), --arch (qwen2.5-vl-7b for step), --batches, --new-tokens, --json.
On a CPU it runs too (small shapes, the tiny architecture), which is how the test checks it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

# Peak memory bandwidth by device name (bytes/s), for the floor: a decode step reads every weight once.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def _device(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm(device, small: bool) -> dict[str, Any]:
    """Max relative error against float64 of the fast path (hi/lo, CUDA) and of the chunked path."""
    import torch

    from vreason_batch.engine import last_layer

    shapes = [(1, 256, 512), (8, 512, 256)] if small else [(1, 3584, 18944), (8, 3584, 3584), (32, 3584, 152064)]
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=g).to(device)
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, torch.bfloat16)
        ref = x.double() @ w.double().t()
        row: dict[str, Any] = {"shape": [m, k, n]}
        for path, fn in (("matmul32", lambda: last_layer._matmul32(x, w, transpose=True)),
                         ("chunked", lambda: torch.cat([x @ w[i:i + 4096].float().t() for i in range(0, n, 4096)], -1))):
            y = fn()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(5):
                y = fn()
            _sync(device)
            row[f"{path}_ms"] = round(1000 * (time.perf_counter() - t0) / 5, 3)
            row[f"{path}_max_rel_err"] = float(((y.double() - ref).abs().max() / ref.abs().max()).item())
        out.append(row)
        print(f"  gemm {m}x{k} @ {k}x{n}: matmul32 {row['matmul32_ms']} ms, rel err {row['matmul32_max_rel_err']:.2e}; "
              f"chunked {row['chunked_ms']} ms, rel err {row['chunked_max_rel_err']:.2e}")
    return {"gemm": out}


def agreement(device, new_tokens: int) -> dict[str, Any]:
    """bf16 greedy (ours) against HF generate on the built-in model; lr = 0 against greedy."""
    import torch

    from vreason_batch.bench.decode import _prompt, _settings
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.driver import decode_batch
    from vreason_batch.engine.loading import load_model
    from vreason_batch.engine.prompting import collate

    lm = load_model(ModelConfig(device=device.type, dtype="bfloat16"))
    lm.eos_token_ids = []
    prompts = [_prompt(lm, 4, 112 * 112, seed) for seed in range(4)]
    ours = decode_batch(lm, prompts, _settings("greedy", new_tokens))
    zero = decode_batch(lm, prompts, _settings("vreason", new_tokens, lr=0.0))
    same = total = 0
    for x, r in zip(prompts, ours):
        inputs = collate(lm, [x])
        inputs["mm_token_type_ids"] = lm.video_mask(inputs).int() * 2
        with torch.no_grad():
            hf = lm.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=lm.pad_token_id, eos_token_id=None)[0, inputs["input_ids"].shape[1]:].tolist()
        prefix = next((i for i, (a, b) in enumerate(zip(hf, r.token_ids)) if a != b), len(hf))
        same, total = same + prefix, total + len(hf)
    figures = {"bf16_greedy_vs_hf_tokens_agreeing": same, "bf16_greedy_vs_hf_tokens": total,
               "lr0_equals_greedy": [a.token_ids for a in ours] == [b.token_ids for b in zero]}
    print(f"  bf16 greedy vs HF generate: {same}/{total} tokens agree (up to the first difference); "
          f"lr=0 == greedy: {figures['lr0_equals_greedy']}")
    return figures


def _ms_per_step(lm, prompts, settings_of, n: int, repeats: int, compiled: bool) -> float:
    """(time of n tokens - time of 1 token) / (n - 1): the decode step alone, prefill excluded (the
    warm-up run compiles runtime.compile's graphs)."""
    from vreason_batch.engine.driver import decode_batch

    def run(k):
        decode_batch(lm, prompts, settings_of(k), compiled)
        _sync(lm.device)

    times = {}
    for k in (1, n):
        run(k)  # warm-up
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(k)
            samples.append(time.perf_counter() - t0)
        times[k] = statistics.median(samples)
    return 1000 * (times[n] - times[1]) / (n - 1)


def step(device, arch: str, batches: list[int], n: int, repeats: int) -> dict[str, Any]:
    """ms per decode step and peak memory of greedy and vreason at each batch, with the bandwidth floor."""
    import torch

    from vreason_batch.bench.decode import _model_bytes, _prompt, _settings
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.loading import load_random_architecture

    lm = load_random_architecture(arch, ModelConfig(device=device.type, dtype="bfloat16"))
    lm.eos_token_ids = []
    weights = _model_bytes(lm)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    rows = []
    for b in batches:
        prompts = [_prompt(lm, 4, 112 * 112, seed) for seed in range(b)]
        for mode, compiled in [(m, c) for c in (False, True) for m in ("greedy", "vreason")]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = _ms_per_step(lm, prompts, lambda k: _settings(mode, k, update_every=2), n, repeats, compiled)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            floor = 1000 * weights / bw if bw else None
            rows.append({"batch": b, "mode": mode, "ms_per_step": round(ms, 3), "peak_mem_gib": peak and round(peak, 2),
                         "bandwidth_floor_ms": floor and round(floor, 3), "eager": not compiled})
            print(f"  {arch} batch {b:3d} {mode:8s} {'compiled' if compiled else 'eager':8s} {ms:8.2f} ms/step  peak {peak and round(peak, 2)} GiB  "
                  f"floor {floor and round(floor, 2)} ms (weights {weights / 2**30:.1f} GiB once a step)")
    return {"device_name": name, "weights_gib": round(weights / 2**30, 2), "step": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["gemm", "agreement", "step"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--arch", default="qwen2.5-vl-7b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="gemm: small shapes (a CPU smoke run)")
    ap.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    args = ap.parse_args(argv)
    device = _device(args.device)
    if args.part == "gemm":
        figures = gemm(device, args.small)
    elif args.part == "agreement":
        figures = agreement(device, args.new_tokens)
    else:
        figures = step(device, args.arch, [int(b) for b in args.batches.split(",")], args.new_tokens, args.repeats)
    if args.json:
        print(json.dumps({"part": args.part, "device": str(device), **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
