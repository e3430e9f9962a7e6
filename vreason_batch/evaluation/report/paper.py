"""The paper's own figures, shown beside a run's for the benchmarks of `configs/benchmarks/`.

Fig. 1 of Sridhar et al., "Video Reasoning without Training" (arXiv 2510.17045): accuracy (%) and
mean output tokens per benchmark for Qwen2.5-VL-7B-Instruct, V-Reason-7B, V-Reason-7B pruned
(Lite) and Video-R1-7B (RL-trained). A run's dataset is matched to a benchmark by its name
(Video-R1's `data_source`, e.g. "VSI-Bench", or the manifest's file name, e.g. eval_vsibench.json);
its greedy, vreason and vreason_lite modes sit beside the paper's row for the same method.
"""

from __future__ import annotations

import re
from typing import Any

SOURCE = "the paper's Fig. 1 (arXiv 2510.17045), Qwen2.5-VL-7B-Instruct"
PAPER_ARMS = ("Qwen2.5-VL-7B", "V-Reason-7B", "V-Reason-7B (pruned, Lite)", "Video-R1-7B (RL)")
# our mode -> the paper's arm it reproduces (Video-R1 is a trained model: no mode of ours)
MODE_TO_PAPER = {"greedy": PAPER_ARMS[0], "vreason": PAPER_ARMS[1], "vreason_lite": PAPER_ARMS[2]}

# benchmark key (as `benchmark_of` normalises a dataset name) -> (name, {arm: (accuracy %, mean tokens)})
FIG1: dict[str, tuple[str, dict[str, tuple[float, float]]]] = {
    "videommmu": ("VideoMMMU", dict(zip(PAPER_ARMS, ((45.8, 551), (46.3, 324), (47.4, 324), (48.8, 453))))),
    "mmvu": ("MMVU", dict(zip(PAPER_ARMS, ((61.3, 298), (62.7, 211), (65.0, 219), (64.0, 483))))),
    "mvbench": ("MVBench", dict(zip(PAPER_ARMS, ((60.7, 124), (60.9, 126), (60.6, 132), (64.1, 410))))),
    "tempcompass": ("TempCompass", dict(zip(PAPER_ARMS, ((72.4, 96), (73.3, 100), (72.3, 98), (73.3, 412))))),
    "videomme": ("Video-MME", dict(zip(PAPER_ARMS, ((53.7, 144), (54.9, 149), (53.5, 149), (58.7, 427))))),
    "vsibench": ("VSI-Bench", dict(zip(PAPER_ARMS, ((33.8, 146), (37.1, 146), (37.3, 145), (30.9, 392))))),
}
# VSI-Bench's mean relative accuracy (%), the paper's second VSI-Bench figure
VSI_MRA = dict(zip(PAPER_ARMS, (22.3, 23.4, 23.7, 39.2)))

NOTE = (
    "The paper's figures are copied from its Fig. 1 (Qwen2.5-VL-7B-Instruct, the authors' own protocol);"
    " they are not recomputed here. A run compares with them only if it ran the same model and protocol"
    " (configs/benchmarks/). 'vs paper' is the run's accuracy minus the paper's for the same method, in"
    " points. On VSI-Bench our accuracy counts a regression row as correct at MRA >= 0.5 and our score is"
    " the mean over rows of MRA (regression) or 1/0 (multiple choice); the paper's MRA is over its"
    " numerical questions alone, so neither matches its figures exactly."
)


def benchmark_of(dataset: str) -> str | None:
    """The FIG1 key of a dataset name ("VSI-Bench", "eval_vsibench.json", "video_mme"), or None."""
    name = dataset.strip().lower()
    name = re.sub(r"\.(jsonl?|parquet|csv)$", "", name)
    name = re.sub(r"^eval[_-]", "", name)
    key = re.sub(r"[^a-z0-9]", "", name)
    return key if key in FIG1 else None


def _f(x, spec: str) -> str:
    return "–" if x is None else f"{x:{spec}}"


HEADER = ["benchmark", "run / mode (or the paper's method)", "accuracy %", "mean out tokens", "score",
          "the paper, same method: accuracy % / tokens", "vs paper (pts)"]


def beside_paper(arms_by_dataset: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    """Rows of the table "beside the paper", one block per benchmark found among the datasets.

    arms_by_dataset: {dataset: {arm label: {"mode", "accuracy" (0..1 or None), "tokens", "score"}}}.
    Each block: the run's arms (beside the paper's figure for the same method), then the paper's
    four methods as rows of their own. Datasets that are not a paper benchmark are left out.
    """
    rows: list[list[str]] = []
    for dataset in sorted(arms_by_dataset):
        key = benchmark_of(dataset)
        if key is None:
            continue
        name, fig = FIG1[key]
        label = name if dataset == name else f"{name} ({dataset})"
        for arm, m in arms_by_dataset[dataset].items():
            paper = fig.get(MODE_TO_PAPER.get(m["mode"], ""))
            acc = None if m["accuracy"] is None else 100.0 * m["accuracy"]
            rows.append([
                label, arm, _f(acc, ".1f"), _f(m["tokens"], ".1f"), _f(m["score"], ".3f"),
                "–" if paper is None else f"{paper[0]:.1f} / {paper[1]:.0f}",
                "–" if paper is None or acc is None else f"{acc - paper[0]:+.1f}",
            ])
        for arm in PAPER_ARMS:
            acc, tokens = fig[arm]
            mra = f"MRA {VSI_MRA[arm]:.1f}%" if key == "vsibench" else "–"
            rows.append([label, f"paper: {arm}", f"{acc:.1f}", f"{tokens:.0f}", mra, "", ""])
    return rows
