"""Answer extraction and scoring: choice letters, numbers (exact and MRA), free text.

Pure functions on strings (the standard library, plus the problem types from io.schema). The model
is prompted to answer inside `<answer>...</answer>`; when it does not, a fallback looks for the
answer in the whole output.

Scoring by problem type (`io.schema.PROBLEM_TYPES`):
- multiple_choice: the option letters must be equal; score 1.0 / 0.0.
- numerical: equal as numbers when both parse (3 == 3.0 == "3"), else equal as normalised strings.
- regression: mean relative accuracy (MRA) as defined in the VSI-Bench paper,
  MRA = mean over theta in {0.50, 0.55, ..., 0.95} of 1[|pred - gt| / |gt| < 1 - theta].
  `correct` is MRA >= 0.5, i.e. a relative error under 30%: our choice, so that regression rows
  also count toward a plain accuracy. VSI-Bench's released code differs slightly from its paper
  (11 thresholds from np.linspace and `<=`); we follow the paper.
- free_form: exact match after SQuAD-style normalisation (case, punctuation, articles, spaces).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vreason_batch.io.schema import PROBLEM_TYPES

_OPEN_TAG = "<answer>"
_CLOSE_TAG = "</answer>"
_END_THINK = "</think>"

# A number as models write it: optional sign, optional thousands separators, optional decimals.
# The sign only counts when it does not follow a word character, so "2-3" reads as 2 and 3.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")

# Letter patterns for multiple choice, strongest first; within a tier the LAST match wins,
# because models restate options while reasoning and conclude at the end.
_LETTER_TIERS = (
    # Only the keyword ignores case: "the answer is a red car" must not read as option A.
    re.compile(r"(?i:answer|option|choice)\s*(?:is|:)\s*:?[\s*(]*([A-Z])\b"),
    re.compile(r"\(([A-Z])\)|\b([A-Z])[.)](?!\w)"),
    re.compile(r"\b([A-Z])\b"),
)
# "B", "B.", "(B)", "B) red", "B: red", "B. the red car" at the start of an answer.
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:]|(?=\s)|$)")
# A lowercase letter only when it is the whole answer ("b", "(b)"): "a red car" is not option A.
_LONE_LOWER = re.compile(r"^\(?([a-z])\)?\.?$")
# An option's own label, as in ["A. red car", "B. blue car"].
_OPTION_LABEL = re.compile(r"^\(?[A-Z][.):]\s*")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

# 1 - theta for theta in {0.50, 0.55, ..., 0.95}, written as k/100 so that a relative error of
# exactly 0.1 compares as 0.1 < 0.1 (False) rather than against 1 - 0.9 = 0.09999999999999998.
_MRA_TOLERANCES = tuple(k / 100 for k in range(50, 0, -5))


def _check_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")


def _answer_tag(text: str) -> str | None:
    """Content of the LAST `<answer>` tag, up to `</answer>` or the end of text (a truncated output)."""
    lower = text.lower()
    start = lower.rfind(_OPEN_TAG)
    if start < 0:
        return None
    content = text[start + len(_OPEN_TAG) :]
    end = content.lower().find(_CLOSE_TAG)
    return content[:end] if end >= 0 else content


def _in_range(letter: str, n_options: int) -> bool:
    return ord(letter) - ord("A") < n_options


def _find_letter(text: str, n_options: int) -> str | None:
    for pattern in _LETTER_TIERS:
        letters = [next(g for g in m.groups() if g) for m in pattern.finditer(text)]
        valid = [x for x in letters if _in_range(x, n_options)]
        if valid:
            return valid[-1]
    return None


def _choice_letter(answer: str, options: Sequence[str] | None) -> str | None:
    """Reduce an answer ("B. the red car", "(B)", "b", an option's text) to its option letter."""
    n_options = len(options) if options else 26
    answer = answer.strip().strip("\"'*` ")
    if options:
        wanted = normalize_text(answer)
        for i, option in enumerate(options):
            if wanted and wanted in (normalize_text(option), normalize_text(_OPTION_LABEL.sub("", option))):
                return chr(ord("A") + i)
    m = _LEADING_LETTER.match(answer) or _LONE_LOWER.match(answer)
    if m and _in_range(m.group(1).upper(), n_options):
        return m.group(1).upper()
    return _find_letter(answer, n_options)


def _numbers(text: str) -> list[str]:
    """Every number in text, thousands separators removed ("1,234.5" -> "1234.5")."""
    return [m.group(0).replace(",", "").lstrip("+") for m in _NUMBER.finditer(text.replace("\u2212", "-"))]


def _to_float(text: str) -> float | None:
    """The last number in a string ("-3", "about 1,200 m" -> 1200.0); None when there is none."""
    found = _numbers(text)
    return float(found[-1]) if found else None


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _normalize_number_string(text: str) -> str:
    text = text.strip().lower().replace(",", "")
    return re.sub(r"\.0+$", "", text)


def extract_answer(text: str, problem_type: str, options: list[str] | None = None) -> str | None:
    """The model's answer in `text`: a letter, a number string, or free text; None when there is none.

    Inside the last `<answer>` tag: multiple choice is reduced to its letter (an unrecognisable
    answer is returned as written, so it scores wrong but stays visible); numbers lose their
    thousands separators. Without a tag: the last option letter, the last number, or, for free
    form, the text after `</think>` (the whole text when there is no think block).
    """
    _check_type(problem_type)
    if not text:
        return None
    tagged = _answer_tag(text)
    if tagged is not None and tagged.strip():
        content = tagged.strip()
        if problem_type == "multiple_choice":
            return _choice_letter(content, options) or content
        if problem_type in ("numerical", "regression"):
            found = _numbers(content)
            return found[-1] if found else content
        return content
    if problem_type == "multiple_choice":
        return _find_letter(text, len(options) if options else 26)
    if problem_type in ("numerical", "regression"):
        found = _numbers(text)
        return found[-1] if found else None
    conclusion = text.rsplit(_END_THINK, 1)[-1].strip()
    return conclusion or None


def _mra(pred: float, gt: float) -> float:
    if gt == 0:
        # Relative error is undefined at gt = 0: only an exact 0 is right.
        return 1.0 if pred == 0 else 0.0
    rel = abs(pred - gt) / abs(gt)
    return sum(rel < tol for tol in _MRA_TOLERANCES) / len(_MRA_TOLERANCES)


def score(pred: str | None, gt: str | None, problem_type: str) -> tuple[bool | None, float | None]:
    """(correct, score) of an extracted answer against the ground truth.

    No ground truth: (None, None), the row is not scored. No prediction: (False, 0.0).
    A ground truth may be written like a model answer ("(B)", "B. text", "<answer>B</answer>").
    A regression ground truth that is not a number cannot be scored: (None, None).
    """
    _check_type(problem_type)
    if gt is None or not gt.strip():
        return None, None
    if pred is None:
        return False, 0.0
    gt = _answer_tag(gt) or gt
    pred = _answer_tag(pred) or pred

    if problem_type == "regression":
        gt_value = _to_float(gt)
        if gt_value is None:
            return None, None
        pred_value = _to_float(pred)
        if pred_value is None:
            return False, 0.0
        mra = _mra(pred_value, gt_value)
        return mra >= 0.5, mra

    if problem_type == "multiple_choice":
        gt_letter, pred_letter = _choice_letter(gt, None), _choice_letter(pred, None)
        if gt_letter is not None:
            correct = gt_letter == pred_letter
        else:
            correct = normalize_text(gt) == normalize_text(pred)
    elif problem_type == "numerical":
        gt_norm, pred_norm = _normalize_number_string(gt), _normalize_number_string(pred)
        try:
            correct = float(gt_norm) == float(pred_norm)
        except ValueError:
            correct = gt_norm == pred_norm
    else:
        correct = normalize_text(gt) == normalize_text(pred)
    return correct, 1.0 if correct else 0.0


def accuracy_by(
    rows: Iterable[Mapping[str, Any]], keys: Sequence[str] = ("dataset", "mode")
) -> list[dict[str, Any]]:
    """Per-group counts and accuracy over output rows (dicts with `correct`, `score`, `error_type`).

    n: rows; n_errors: rows with an error_type; n_scored: rows with `correct` set;
    accuracy: mean of `correct` over scored rows; mean_score: mean of `score` where set.
    Groups are sorted by key; accuracy / mean_score are None for a group with nothing scored.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for group_key in sorted(groups, key=lambda t: tuple("" if v is None else str(v) for v in t)):
        members = groups[group_key]
        correct = [bool(r["correct"]) for r in members if r.get("correct") is not None]
        scores = [float(r["score"]) for r in members if r.get("score") is not None]
        out.append(
            {
                **dict(zip(keys, group_key)),
                "n": len(members),
                "n_errors": sum(r.get("error_type") is not None for r in members),
                "n_scored": len(correct),
                "accuracy": sum(correct) / len(correct) if correct else None,
                "mean_score": sum(scores) / len(scores) if scores else None,
            }
        )
    return out
