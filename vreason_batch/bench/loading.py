"""Host memory while a model actor loads its model (issue 20), printed, not asserted: run as a script.

  python -m vreason_batch.bench.loading [--arch qwen2.5-vl-7b] [--dtype bfloat16] [--device auto]
                                        [--checkpoint DIR] [--json]

A --checkpoint directory without a config.json is filled first, and kept, with the architecture
built with random weights (17 GB on disk at 7B in bfloat16; without --checkpoint a temporary
directory), in a process of its own. Each way of loading then runs in a fresh process that
reports its peak RSS (VmHWM) and its anonymous / file-backed RSS, after loading and after every
weight has been read once (a loaded checkpoint's weights may still be pages of the file):
  staged:  from_pretrained onto the host, then .to(device)  (how actors loaded before)
  direct:  load_model, which passes device_map (weights go straight to their device)
On a CPU-only machine the device is the host, so both ways must hold the weights there: the
figure that shows the difference is taken with --device cuda.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, resource, sys, time, torch
way, path, device, dtype = sys.argv[1:5]
t0 = time.perf_counter()
if way == "staged":
    from transformers import Qwen2_5_VLForConditionalGeneration as C
    model = C.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
else:
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.loading import load_model
    model = load_model(ModelConfig(name_or_path=path, device=device, dtype=dtype)).model
load_s = time.perf_counter() - t0
def mem():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line[:3] in ("Rss", "VmH"))
    return {k: round(int(status[k].split()[0]) / 1024) for k in ("VmHWM", "RssAnon", "RssFile")}
loaded = mem()
with torch.no_grad():
    for p in model.parameters():
        p.float().sum().item()
used = mem()
print(json.dumps({"way": way, "load_s": round(load_s, 1), "peak_rss_mb": loaded["VmHWM"],
                  "rss_anon_mb": loaded["RssAnon"], "rss_file_mb": loaded["RssFile"],
                  "peak_rss_after_use_mb": used["VmHWM"], "rss_anon_after_use_mb": used["RssAnon"],
                  "rss_file_after_use_mb": used["RssFile"], "param_device": str(next(model.parameters()).device)}))
"""


_SAVE = """
import sys, torch
from vreason_batch.engine.loading import build_random_model, builtin_tokenizer_dir, load_tokenizer
arch, dtype, out = sys.argv[1:4]
build_random_model(arch, getattr(torch, dtype), "cpu").save_pretrained(out)
load_tokenizer(builtin_tokenizer_dir()).save_pretrained(out)
"""


def _checkpoint_gb(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-vl-7b")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--checkpoint", default=None, help="load this checkpoint instead of a random one")
    ap.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    args = ap.parse_args(argv)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="vreason-load-") as tmp:
        path = args.checkpoint or tmp
        if not (Path(path) / "config.json").is_file():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", _SAVE, args.arch, args.dtype, path], check=True, capture_output=True)
            print(f"saved {args.arch} with random weights in {time.perf_counter() - t0:.0f} s")
        weights_gb = round(_checkpoint_gb(path), 2)
        rows = []
        for way in ("staged", "direct"):
            out = subprocess.run([sys.executable, "-c", _CHILD, way, path, device, args.dtype],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{way:7s} load {r['load_s']:6.1f} s  peak RSS {r['peak_rss_mb']:7d} MB (anon {r['rss_anon_mb']}, "
                  f"file {r['rss_file_mb']})  after reading every weight: peak {r['peak_rss_after_use_mb']} MB "
                  f"(anon {r['rss_anon_after_use_mb']}, file {r['rss_file_after_use_mb']})  weights on {r['param_device']}")
    summary = {"arch": args.arch, "dtype": args.dtype, "device": device, "weights_gb": weights_gb,
               "host_peak_rss_mb": {r["way"]: r["peak_rss_mb"] for r in rows}, "runs": rows,
               "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
