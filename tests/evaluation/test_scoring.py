"""Answer extraction and scoring on hand-written model outputs."""

import pytest

from vreason_batch.evaluation.scoring import accuracy_by, extract_answer, score

OPTIONS = ["A. a red car", "B. a blue truck", "C. a green bus", "D. nothing moves"]


# ---- multiple choice: extraction ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>The truck is blue.</think><answer>B</answer>", "B"),
        ("<answer>B. a blue truck</answer>", "B"),
        ("<answer>(C)</answer>", "C"),
        ("<answer>b</answer>", "B"),
        ("<answer> C) </answer>", "C"),
        ("<answer>Option D</answer>", "D"),
        # an option's text, with or without its label or article, maps to its letter
        ("<answer>a green bus</answer>", "C"),
        ("<answer>Nothing moves.</answer>", "D"),
        ("<answer>A. a red car</answer>", "A"),
        # the LAST tag wins: the prompt template's empty tag and a restated answer come first
        ("Format: <answer></answer>. <think>A or B?</think><answer>A</answer> wait <answer>B</answer>", "B"),
        # truncated output: the last tag was never closed
        ("<think>hmm</think><answer>C", "C"),
        # no tag at all: fall back to the last option letter in the text
        ("<think>A is wrong, B is close.</think> The answer is (C).", "C"),
        ("I considered (A) and (B); the answer is D", "D"),
        ("the answer: B. Because (A) is red.", "B"),
        ("Looking again, C.", "C"),
        ("Between A and B, I pick B", "B"),
        # E and F are not options here, so they are ignored
        ("The answer is (E). Maybe F. Probably B)", "B"),
        ("nothing to see here", None),
        ("", None),
    ],
)
def test_extract_multiple_choice(text, expected):
    assert extract_answer(text, "multiple_choice", OPTIONS) == expected


def test_extract_multiple_choice_letter_beyond_options_in_tag_is_kept_as_written():
    # Kept visible for analysts; it can never equal a valid ground-truth letter.
    assert extract_answer("<answer>E</answer>", "multiple_choice", OPTIONS) == "E"
    assert extract_answer("<answer>E</answer>", "multiple_choice", None) == "E"


def test_extract_multiple_choice_article_is_not_option_a():
    assert extract_answer("<answer>a purple boat</answer>", "multiple_choice", OPTIONS) == "a purple boat"
    assert extract_answer("I think the answer is a purple boat", "multiple_choice", OPTIONS) is None


def test_extract_without_options_accepts_any_letter():
    assert extract_answer("So the answer is (F).", "multiple_choice", None) == "F"
    assert extract_answer("So the answer is (F).", "multiple_choice", []) == "F"


# ---- numbers: extraction --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>3</answer>", "3"),
        ("<answer>about 1,234 people</answer>", "1234"),
        ("<answer>-2.5</answer>", "-2.5"),
        ("<answer>\u22127</answer>", "-7"),
        ("<answer>+4</answer>", "4"),
        ("<answer>.5</answer>", ".5"),
        # several numbers in the tag: the last one is the answer
        ("<answer>2 chairs and 3 tables, so 5</answer>", "5"),
        # a range is two numbers, not a negative one
        ("<think>between 2-3 metres</think>", "3"),
        ("<think>there are 12 cars; no, 14.</think>", "14"),
        ("The room is 1,250.5 square feet. <answer>", "1250.5"),
        ("<answer>twelve</answer>", "twelve"),
        ("no digits here", None),
    ],
)
@pytest.mark.parametrize("problem_type", ["numerical", "regression"])
def test_extract_numbers(text, expected, problem_type):
    assert extract_answer(text, problem_type, None) == expected


# ---- free form: extraction ------------------------------------------------------------------


def test_extract_free_form():
    assert extract_answer("<think>x</think><answer> The red car. </answer>", "free_form", None) == "The red car."
    assert extract_answer("<think>x</think> a dog jumps", "free_form", None) == "a dog jumps"
    assert extract_answer("  a dog jumps\n", "free_form", None) == "a dog jumps"
    assert extract_answer("<think>only thinking</think>", "free_form", None) is None


def test_unknown_problem_type_is_an_error():
    with pytest.raises(ValueError, match="problem_type"):
        extract_answer("<answer>B</answer>", "true_false", None)
    with pytest.raises(ValueError, match="problem_type"):
        score("B", "B", "true_false")


# ---- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize("gt", ["B", "(B)", "B. a blue truck", "<answer>B</answer>", " b "])
def test_score_multiple_choice_ground_truth_formats(gt):
    assert score("B", gt, "multiple_choice") == (True, 1.0)
    assert score("C", gt, "multiple_choice") == (False, 0.0)


def test_score_multiple_choice_ground_truth_text_starting_with_a_capital_letter():
    # "B. A red car": the letter is B, not the last capital-letter word.
    assert score("B", "B. A red car", "multiple_choice") == (True, 1.0)


def test_score_no_ground_truth_or_no_prediction():
    for problem_type in ("multiple_choice", "numerical", "regression", "free_form"):
        assert score("B", None, problem_type) == (None, None)
        assert score("B", "  ", problem_type) == (None, None)
        assert score(None, "3", problem_type) == (False, 0.0)


@pytest.mark.parametrize(
    "pred, gt, correct",
    [
        ("3", "3", True),
        ("3.0", "3", True),
        ("3", "3.00", True),
        ("1234", "1,234", True),
        ("-2", "-2.0", True),
        ("-2", "2", False),
        ("3.5", "3", False),
        ("twelve", "twelve", True),
        ("twelve", "12", False),
    ],
)
def test_score_numerical(pred, gt, correct):
    assert score(pred, gt, "numerical") == (correct, 1.0 if correct else 0.0)


@pytest.mark.parametrize(
    "pred, gt, mra",
    [
        # |110-100|/100 = 0.10 < 1-theta for theta in 0.50..0.85 (8 of 10), not 0.90 (strict) nor 0.95
        ("110", "100", 0.8),
        # 0.25: theta in 0.50..0.70 (5 of 10): exactly the correctness boundary
        ("75", "100", 0.5),
        # 0.30: theta in 0.50..0.65 (4 of 10)
        ("13", "10", 0.4),
        ("4.0", "4", 1.0),
        # |-1.1-(-1)|/|-1| = 0.1 as for 110 vs 100: the sign of gt does not matter
        ("-1.1", "-1", 0.8),
        ("2.5", "5", 0.0),
        ("1,000", "1000", 1.0),
    ],
)
def test_score_regression_mra(pred, gt, mra):
    correct, value = score(pred, gt, "regression")
    assert value == pytest.approx(mra)
    assert correct is (mra >= 0.5)


def test_score_regression_edge_cases():
    assert score("no idea", "10", "regression") == (False, 0.0)
    assert score("0", "0", "regression") == (True, 1.0)
    assert score("0.1", "0", "regression") == (False, 0.0)
    assert score("3", "unknown", "regression") == (None, None)


@pytest.mark.parametrize(
    "pred, gt, correct",
    [
        ("The red car.", "red car", True),
        ("a  Red, car!", "the red car", True),
        ("An apple", "apple", True),
        ("red cars", "red car", False),
        ("the blue car", "red car", False),
    ],
)
def test_score_free_form(pred, gt, correct):
    assert score(pred, gt, "free_form") == (correct, 1.0 if correct else 0.0)


def test_extract_then_score_round_trip():
    text = "<think>Counting chairs: 1, 2, 3... then 4 by the door.</think><answer>4</answer>"
    assert score(extract_answer(text, "numerical", None), "4.0", "numerical") == (True, 1.0)
    text = "<think>It is not A.</think> Therefore the answer is (C)."
    assert score(extract_answer(text, "multiple_choice", OPTIONS), "C. a green bus", "multiple_choice") == (True, 1.0)


# ---- grouping -------------------------------------------------------------------------------


def test_accuracy_by():
    rows = [
        {"dataset": "vsi", "mode": "greedy", "correct": True, "score": 1.0, "error_type": None},
        {"dataset": "vsi", "mode": "greedy", "correct": False, "score": 0.4, "error_type": None},
        {"dataset": "vsi", "mode": "greedy", "correct": None, "score": None, "error_type": "video_unreadable"},
        {"dataset": "vsi", "mode": "vreason", "correct": True, "score": 0.8, "error_type": None},
        {"dataset": "anno", "mode": "vreason", "correct": None, "score": None, "error_type": None},
    ]
    groups = accuracy_by(rows)
    assert [(g["dataset"], g["mode"]) for g in groups] == [("anno", "vreason"), ("vsi", "greedy"), ("vsi", "vreason")]
    anno, greedy, vreason = groups
    assert anno == {
        "dataset": "anno",
        "mode": "vreason",
        "n": 1,
        "n_errors": 0,
        "n_scored": 0,
        "accuracy": None,
        "mean_score": None,
    }
    assert (greedy["n"], greedy["n_errors"], greedy["n_scored"]) == (3, 1, 2)
    assert greedy["accuracy"] == 0.5
    assert greedy["mean_score"] == pytest.approx(0.7)
    assert (vreason["accuracy"], vreason["mean_score"]) == (1.0, 0.8)

    by_mode = accuracy_by(rows, keys=("mode",))
    assert [(g["mode"], g["n"]) for g in by_mode] == [("greedy", 3), ("vreason", 2)]
