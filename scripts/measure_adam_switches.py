"""How often the paper's rule switches alpha on real weights, and which way dV moves after a switch.

Issue 18: alpha multiplies the loss, so Adam's first moment carries the old sign across a switch.
This drives the engine's own decode loop (`prefill` + `decode_one_token`) on SmolLM2-135M over
the first prompts of the reasoning set, and records every Adam step the loop takes (by wrapping
`decoding.adam_step`): the gradient it was given (already weighted by alpha) and the step dV made.
A step "goes the new way" when it points against that gradient (cosine < 0 with it, i.e. it
lowers alpha * H to first order). Printed per setting: switches per sample, and for the first
three updates after a switch the share of steps that go the new way, their mean cosine with
-gradient and their size relative to Adam's full step (lr per element); and, for comparison,
the same for updates that did not follow a switch.

    python scripts/measure_adam_switches.py [--prompts 12] [--tokens 96] [--lr 1e-2] [--k 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict


def settings(args, reset: bool, rule: str):
    from vreason_batch.config import ControllerConfig, DecodingConfig, LiteConfig
    from vreason_batch.engine.decoding import DecodeSettings

    ctrl = ControllerConfig(lr=args.lr, update_every=args.k, rule=rule, reset_moments_on_switch=reset)
    return DecodeSettings.build("vreason", DecodingConfig(max_new_tokens=args.tokens, stop_strings=[]), ctrl, LiteConfig())


def measure(lm, prompts, args, reset: bool, rule: str) -> dict:
    import torch

    from vreason_batch.engine import decoding
    from vreason_batch.engine.last_layer import LastLayer

    s = settings(args, reset, rule)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (active, grad, before, after)
    original = decoding.adam_step

    def recording(state, grad, active, *a, **kw):
        before = state.dv.clone()
        original(state, grad, active, *a, **kw)
        steps.append((active.clone(), grad.clone(), before, state.dv.clone()))

    decoding.adam_step = recording
    try:
        head = LastLayer(lm.last_layer_parts())
        with torch.no_grad():
            st = decoding.prefill(lm, head, prompts, s)
            alphas = []  # [tokens][rows]
            for _ in range(args.tokens):
                alphas.append(decoding.decode_one_token(lm, head, st, s).alpha.tolist())
    finally:
        decoding.adam_step = original
    rows = len(prompts)
    per_row_updates: dict[int, list[int]] = defaultdict(list)  # row -> alpha of each update, in order
    by_lag: dict[str, list[tuple[float, float]]] = defaultdict(list)  # lag after a switch -> (cos, size)
    full = args.lr * (steps[0][1][0].numel() ** 0.5)  # Adam's full step: lr on every element
    step_i = 0
    for t in range(args.tokens):
        due = [r for r in range(rows) if alphas[t][r] != 0]
        if not due:
            continue
        for _ in range(s.controller.steps_per_update):
            active, grad, before, after = steps[step_i]
            step_i += 1
            for r in due:
                g, d = grad[r].flatten(), (after[r] - before[r]).flatten()
                if float(g.norm()) == 0 or float(d.norm()) == 0:
                    continue
                cos = float(torch.dot(d, -g) / (d.norm() * g.norm()))
                hist = per_row_updates[r] + [int(alphas[t][r])]
                last_switch = max((i for i in range(1, len(hist)) if hist[i] != hist[i - 1]), default=None)
                lag = len(hist) - 1 - last_switch if last_switch is not None else None
                key = f"update {lag + 1} after a switch" if lag is not None and lag < 3 else "no recent switch"
                by_lag[key].append((cos, float(d.norm()) / full))
        for r in due:
            per_row_updates[r].append(int(alphas[t][r]))
    switches = [sum(1 for a, b in zip(u, u[1:]) if a != b) for u in per_row_updates.values()]
    out = {"switches_per_sample_mean": statistics.fmean(switches), "switches_per_sample_max": max(switches),
           "updates_per_sample_mean": statistics.fmean(len(u) for u in per_row_updates.values())}
    for key, vals in sorted(by_lag.items()):
        out[key] = {"n": len(vals), "new_way": sum(c > 0 for c, _ in vals) / len(vals),
                    "cos_mean": statistics.fmean(c for c, _ in vals),
                    "size_vs_full_step": statistics.fmean(z for _, z in vals)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rules", default="paper,switch")
    args = ap.parse_args()

    from vreason_batch.bench.reasoning_set import make_reasoning_set
    from vreason_batch.config import ModelConfig
    from vreason_batch.engine.models import BUILTIN_SMOLLM2, load_model
    from vreason_batch.engine.prompting import build_text_inputs

    lm = load_model(ModelConfig(name_or_path=BUILTIN_SMOLLM2, device="cpu", dtype="float32"))
    lm.eos_token_ids = []  # every row runs the full length, so every row has the same number of updates
    prompts = [build_text_inputs(lm.tokenizer, r["question"], r.get("options"), r["problem_type"], "reasoning")
               for r in make_reasoning_set(args.prompts, seed=0)]
    print(f"SmolLM2-135M, {len(prompts)} prompts, {args.tokens} tokens, lr {args.lr:g}, k {args.k}")
    for rule in args.rules.split(","):
        for reset in (False, True):
            res = measure(lm, prompts, args, reset, rule)
            print(f"rule {rule}, reset_moments_on_switch {reset}:")
            for key, val in res.items():
                if isinstance(val, dict):
                    print(f"  {key}: n {val['n']}, goes the new way {100 * val['new_way']:.0f}%, "
                          f"cos with -grad {val['cos_mean']:+.3f}, size {val['size_vs_full_step']:.2f} of a full step")
                else:
                    print(f"  {key}: {val:.2f}")


if __name__ == "__main__":
    main()
