"""Rule-based GRPO rewards: 4DThinker accuracy/format, the evaluation choice extractor, MLLM-4D ST-reward."""

from __future__ import annotations

import math

import pytest

from fourd_jax.answers import STOCK_PHRASES, extract_choice, solution_key
from fourd_jax.train.rewards import (
    FourDThinkerWeights,
    STRewardWeights,
    center_score,
    fourdthinker_accuracy,
    fourdthinker_format,
    fourdthinker_reward,
    parse_centers,
    st_accuracy,
    st_format,
    st_reward,
)

LATENTS = "<|latent_start|>" + "<|latent_pad|>" * 4 + "<|latent_end|>"

# ---------------------------------------------------------------------------------------------
# 4DThinker accuracy


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<think>x</think><answer>D</answer>", "D", 1.0),
        ("<think>x</think><answer>D</answer>", "D. Pan Right", 1.0),
        ("<think>x</think><answer>D</answer>", "  d. pan right ", 1.0),  # key is stripped, upper-cased
        ("<think>x</think><answer>C</answer>", "D. Pan Right", 0.0),
        ("<answer>  B  </answer>", "B", 1.0),
        # Several answer spans: the first one wins.
        ("<answer>A</answer><answer>B</answer>", "A", 1.0),
        ("<answer>A</answer><answer>B</answer>", "B", 0.0),
        # Lower-case tags: the answer regex ignores case.
        # "c" is no capital letter; the whole-text retry then reads the "A" of "ANSWER".
        ("<think>x</think><ANSWER>c</ANSWER>", "C", 0.0),
        ("<think>x</think><ANSWER>c</ANSWER>", "A", 1.0),
        ("<think>x</think><answer>C</ANSWER>", "C", 1.0),
        ("<Answer>E</Answer>", "E", 1.0),
        # Stock phrases: "Best answer:" would otherwise be read as B.
        ("<answer>The answer is C</answer>", "C", 1.0),
        ("<answer>Best answer: C</answer>", "C", 1.0),
        ("<answer>Best option: D</answer>", "D", 1.0),
        ("<answer>Answer: E</answer>", "E", 1.0),
        ("<answer>The best answer is F</answer>", "F", 1.0),
        # A letter inside prose: the first capital A-F after phrase removal.
        ("<answer>I think the answer is probably B because it moves</answer>", "B", 1.0),
        ("I think the answer is probably B because it moves", "B", 1.0),
        # No tags at all: the whole completion.
        ("  C  ", "C", 1.0),
        # Letters outside A-F never count.
        ("<answer>G</answer>", "G", 0.0),
        # Empty completion / empty solution.
        ("", "A", 0.0),
        ("<answer>A</answer>", "", 0.0),
        ("<answer>A</answer>", "   ", 0.0),
    ],
)
def test_fourdthinker_accuracy(completion, solution, expected):
    assert fourdthinker_accuracy(completion, solution) == expected


def test_accuracy_lower_case_content_falls_back_to_whole_completion():
    # The span "c" holds no capital; the retry on the whole text finds the "A" of the upper-case tag.
    assert extract_choice("<ANSWER>c</ANSWER>", "ABCDEF") == "A"
    assert extract_choice("<answer>c</answer>", "ABCDEF") is None


def test_accuracy_empty_answer_span_retries_whole_completion():
    # Nothing in the span; the retry reads the thinking, where "C" (of "Camera") comes first.
    completion = "<think>Camera pans right, so D.</think><answer> </answer>"
    assert fourdthinker_accuracy(completion, "C") == 1.0
    assert fourdthinker_accuracy(completion, "D") == 0.0


def test_accuracy_unclosed_answer_tag_reads_whole_completion():
    # No closed pair: the whole completion, where phrase removal leaves "<answer> B".
    assert fourdthinker_accuracy("<answer>The answer is B", "B") == 1.0
    # Here the think text comes first and its first capital A-F is "D" (of "Dolly").
    assert fourdthinker_accuracy("<think>Dolly in.</think><answer>A", "D") == 1.0


def test_accuracy_long_prose_without_letter_gives_nothing():
    prose = "the camera slowly moves to the right while the object stays still in the middle of view"
    assert len(prose.split()) > 10
    assert fourdthinker_accuracy(f"<answer>{prose}</answer>", "A") == 0.0
    assert extract_choice(f"<answer>{prose}</answer>", "ABCDEF") is None
    # Short text without a letter: also nothing.
    assert extract_choice("<answer>no idea</answer>", "ABCDEF") is None
    # Long prose that does contain a capital letter still yields it.
    assert extract_choice(f"<answer>{prose} so B</answer>", "ABCDEF") == "B"


def test_accuracy_latent_tokens_in_completion():
    completion = f"<think>{LATENTS} pan</think><answer>{LATENTS}D</answer>"
    assert fourdthinker_accuracy(completion, "D") == 1.0
    assert extract_choice(completion) == "D"
    # Latent tokens alone carry no letter.
    assert extract_choice(LATENTS) is None
    assert fourdthinker_accuracy(LATENTS, "A") == 0.0


def test_solution_key():
    assert solution_key("D. Pan Right") == "D"
    assert solution_key(" b ") == "B"
    assert solution_key("") == ""


def test_stock_phrases_longer_before_contained():
    # A phrase listed after one it contains would be cut up before it could be removed whole.
    for i, later in enumerate(STOCK_PHRASES):
        for earlier in STOCK_PHRASES[:i]:
            assert earlier not in later, (earlier, later)


# ---------------------------------------------------------------------------------------------
# extract_choice (evaluation)


def test_extract_choice_restricts_letters():
    assert extract_choice("<answer>E</answer>") is None  # default letters ABCD
    assert extract_choice("<answer>E</answer>", "ABCDEF") == "E"
    # "E" comes first but only A-D count: the first of those is "B".
    assert extract_choice("<answer>E or B</answer>", "ABCD") == "B"
    assert extract_choice("<answer>E or B</answer>", "ABCDEF") == "E"


def test_extract_choice_matches_reward_reading():
    for completion in ("<answer>The answer is C</answer>", "<answer>Best answer: A</answer>",
                       "I think the answer is probably B because", f"{LATENTS}<answer>D</answer>"):
        letter = extract_choice(completion, "ABCDEF")
        assert letter is not None
        assert fourdthinker_accuracy(completion, letter) == 1.0


def test_extract_choice_edge_cases():
    assert extract_choice("") is None
    assert extract_choice("   ") is None
    assert extract_choice("<answer></answer>") is None
    # First answer span wins even when a later one has a letter of the set.
    assert extract_choice("<answer>C</answer> <answer>A</answer>") == "C"


# ---------------------------------------------------------------------------------------------
# 4DThinker format and combined reward


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reason</think><answer>A</answer>", 1.0),
        ("<think>reason</think>\n \t <answer>A</answer>", 1.0),  # whitespace between is fine
        ("<think>multi\nline</think>\n<answer>\nA\n</answer>", 1.0),  # DOTALL
        ("preamble <think>r</think><answer>A</answer> trailing", 1.0),  # found anywhere
        (f"<think>{LATENTS}</think><answer>B</answer>", 1.0),
        ("<answer>A</answer><think>reason</think>", 0.0),  # think after answer
        ("<think>reason</think> so <answer>A</answer>", 0.0),  # text between
        ("<think>reason</think>", 0.0),
        ("<answer>A</answer>", 0.0),
        ("<think>reason<answer>A</answer>", 0.0),  # unclosed think
        ("<think>reason</think><answer>A", 0.0),  # unclosed answer
        ("<THINK>reason</THINK><ANSWER>A</ANSWER>", 0.0),  # format is case-sensitive
        ("<thinking>reason</thinking><answer>A</answer>", 0.0),  # not the 4DThinker tags
        ("", 0.0),
    ],
)
def test_fourdthinker_format(completion, expected):
    assert fourdthinker_format(completion) == expected


def test_fourdthinker_reward_combines():
    good = "<think>pan</think> <answer>The answer is D</answer>"
    assert fourdthinker_reward(good, "D. Pan Right") == pytest.approx({"accuracy": 1.0, "format": 1.0, "reward": 1.2})
    assert fourdthinker_reward(good, "A") == pytest.approx({"accuracy": 0.0, "format": 1.0, "reward": 0.2})
    assert fourdthinker_reward("D", "D") == pytest.approx({"accuracy": 1.0, "format": 0.0, "reward": 1.0})
    assert fourdthinker_reward("", "D") == {"accuracy": 0.0, "format": 0.0, "reward": 0.0}
    custom = fourdthinker_reward(good, "D", accuracy_weight=0.5, format_weight=2.0)
    assert custom["reward"] == pytest.approx(2.5)
    weights = FourDThinkerWeights()
    assert (weights.accuracy, weights.format) == (1.0, 0.2)


# ---------------------------------------------------------------------------------------------
# MLLM-4D ST-reward


def st_completion(cam0="[0.00, 0.00, 0.00]", obj0="[1.00, 0.50, 4.00]", cam1="[0.50, 0.00, 0.10]",
                  obj1="[2.00, 0.50, 4.00]", answer="B", sentence="The object moves right.") -> str:
    """A completion in the ST-CoT layout of fourd_jax.data.qa.mllm4d."""
    lines = ["Spatial State (Initial Frame):", f"- Camera Center: {cam0}", f"- Object Center: {obj0}",
             "Spatial State (Final Frame):", f"- Camera Center: {cam1}", f"- Object Center: {obj1}"]
    return "<thinking>" + "\n".join(lines) + f"\n{sentence}</thinking><answer>{answer}</answer>"


CAMERA = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.1]]
OBJECT = [[1.0, 0.5, 4.0], [2.0, 0.5, 4.0]]


def test_st_reward_exact():
    parts = st_reward(st_completion(), "B", CAMERA, OBJECT)
    assert parts == pytest.approx({"format": 1.0, "accuracy": 1.0, "camera": 1.0, "object": 1.0, "reward": 1.0})
    wrong = st_reward(st_completion(answer="C"), "B", CAMERA, OBJECT)
    assert wrong["accuracy"] == 0.0
    assert wrong["reward"] == pytest.approx(0.4)
    weights = STRewardWeights()
    assert (weights.format, weights.accuracy, weights.camera, weights.object) == (0.2, 0.6, 0.1, 0.1)


def test_st_reward_perturbed_centres():
    # Camera: initial exact, final off by (0.3, 0.4, 0) -> distances 0 and 0.5.
    # Object: initial off by 1.0 along z, final off by (2, 3, 6) -> distances 1 and 7.
    completion = st_completion(cam1="[0.8, 0.4, 0.1]", obj0="[1.0, 0.5, 5.0]", obj1="[4, 3.5, 10]")
    parts = st_reward(completion, "B", CAMERA, OBJECT)
    assert parts["camera"] == pytest.approx(math.exp(-0.25))
    assert parts["object"] == pytest.approx(math.exp(-4.0))
    expected = 0.2 * 1.0 + 0.6 * 1.0 + 0.1 * math.exp(-0.25) + 0.1 * math.exp(-4.0)
    assert parts["reward"] == pytest.approx(expected)
    custom = st_reward(completion, "B", CAMERA, OBJECT, format_weight=0.0, accuracy_weight=0.0, camera_weight=1.0,
                       object_weight=0.0)
    assert custom["reward"] == pytest.approx(math.exp(-0.25))


def test_parse_centers_null_skipped_and_order():
    completion = st_completion(obj0="null", obj1="null", cam1="[1, -2.5, 3e-1]")
    assert parse_centers(completion, "Camera Center") == [[0.0, 0.0, 0.0], [1.0, -2.5, 0.3]]
    assert parse_centers(completion, "Object Center") == []
    # Unknown object: empty truth, no prediction -> 1.
    parts = st_reward(completion, "B", [[0, 0, 0], [1, -2.5, 0.3]], [])
    assert parts["object"] == 1.0
    assert parts["camera"] == pytest.approx(1.0)
    # One null of two: one prediction against two truths is a count mismatch.
    half = st_completion(obj0="null")
    assert parse_centers(half, "Object Center") == [[2.0, 0.5, 4.0]]
    assert st_reward(half, "B", CAMERA, OBJECT)["object"] == 0.0


@pytest.mark.parametrize("bad", ["[1.0, abc, 2.0]", "[1.0, 2.0,]", "[true, 0, 0]", "[NaN, 0, 0]", "[1, \"2\", 3]",
                                 "[Infinity, 0, 0]"])
def test_parse_centers_malformed_empties_list(bad):
    completion = st_completion(obj1=bad)
    assert parse_centers(completion, "Object Center") == []
    # Truth non-empty, prediction empty -> 0; the camera list is unaffected.
    parts = st_reward(completion, "B", CAMERA, OBJECT)
    assert parts["object"] == 0.0
    assert parts["camera"] == pytest.approx(1.0)


def test_center_score_rules():
    assert center_score([], []) == 1.0
    assert center_score([[0, 0, 0]], []) == 0.0
    assert center_score([], [[0, 0, 0]]) == 0.0
    assert center_score([[0, 0, 0]], [[0, 0, 0], [1, 1, 1]]) == 0.0  # count mismatch
    assert center_score([[0, 0, 0], [1, 1, 1], [2, 2, 2]], [[0, 0, 0], [1, 1, 1]]) == 0.0
    assert center_score([[0, 0], [1, 1, 1]], [[0, 0, 0], [1, 1, 1]]) == 0.0  # shape mismatch
    assert center_score([[0, 0, 0, 0], [1, 1, 1]], [[0, 0, 0], [1, 1, 1]]) == 0.0
    assert center_score([[3, 4, 0]], [[0, 0, 0]]) == pytest.approx(math.exp(-5.0))


def test_st_reward_shape_and_count_mismatch_in_text():
    two_d = st_completion(cam0="[0, 0]")
    assert st_reward(two_d, "B", CAMERA, OBJECT)["camera"] == 0.0
    extra = st_completion() + " Camera Center: [9, 9, 9]"
    assert st_reward(extra, "B", CAMERA, OBJECT)["camera"] == 0.0
    # No predictions at all against known centres.
    assert st_reward("<answer>B</answer>", "B", CAMERA, OBJECT)["camera"] == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        # Thinking + answer (0.5); any thinking span with its tags is > 20 chars (0.1).
        ("<thinking>x</thinking><answer>B</answer>", 0.6),
        ("<thinking></thinking><answer>B</answer>", 0.6),
        # Thinking alone: only the length part.
        ("<thinking>long enough reasoning</thinking>", 0.1),
        # Answer alone: nothing.
        ("<answer>B</answer>", 0.0),
        # Centres alone (no tags): only the 0.4.
        ("Camera Center: [0, 0, 0] Object Center: [1, 2, 3]", 0.4),
        ("Object Center:[1,2,3]\nCamera Center:\n[0,0,0]", 0.4),
        # One kind of centre, or null centres, is not enough for the 0.4.
        ("<thinking>Camera Center: [0, 0, 0]</thinking><answer>B</answer>", 0.6),
        ("<thinking>Camera Center: null Object Center: null</thinking><answer>B</answer>", 0.6),
        # Everything.
        ("<thinking>Camera Center: [0, 0, 0] Object Center: [1, 2, 3]</thinking><answer>B</answer>", 1.0),
        # Unclosed or wrong tags.
        ("<thinking>unclosed <answer>B</answer>", 0.0),
        ("<think>x</think><answer>B</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_st_format(completion, expected):
    assert st_format(completion) == pytest.approx(expected)


def test_st_format_each_part():
    full = st_completion()
    assert st_format(full) == pytest.approx(1.0)
    # Removing the answer span drops exactly 0.5.
    assert st_format(full.replace("<answer>B</answer>", "")) == pytest.approx(0.5)
    # Removing the object centres drops exactly 0.4.
    assert st_format(full.replace("Object Center", "Object")) == pytest.approx(0.6)
    # Without thinking tags both 0.5 and 0.1 go; the centres still give 0.4.
    assert st_format(full.replace("<thinking>", "").replace("</thinking>", "")) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("<answer>B</answer>", "B", 1.0),
        ("<answer>  B \n</answer>", "B", 1.0),
        ("<answer>B</answer><answer>C</answer>", "C", 0.0),  # first span wins
        ("<answer>B. Move right</answer>", "B", 0.0),  # exact match, not a letter read
        ("<answer>b</answer>", "B", 0.0),
        ("<ANSWER>B</ANSWER>", "B", 0.0),  # not an answer span: whole text compared
        ("  B  ", "B", 1.0),  # no span: whole stripped completion
        ("<answer>B", "B", 0.0),
        ("", "B", 0.0),
        ("", "", 1.0),
    ],
)
def test_st_accuracy(completion, answer, expected):
    assert st_accuracy(completion, answer) == expected


# ---------------------------------------------------------------------------------------------
# ST-reward with unknown (null) true centres: upstream drops them before pairing.


def test_center_score_null_truth_dropped_before_pairing():
    # Truth [[1, 2, 3], None]: one known centre; one prediction pairs with it.
    assert center_score([[1, 2, 3]], [[1, 2, 3], None]) == pytest.approx(1.0)
    # Off by (3, 4, 0): distance 5.
    assert center_score([[4, 6, 3]], [[1, 2, 3], None]) == pytest.approx(math.exp(-5.0))
    # The unknown entry may be the initial one as well.
    assert center_score([[0, 0, 1]], [None, [0, 0, 0]]) == pytest.approx(math.exp(-1.0))
    # Two predictions against one known centre: a count mismatch.
    assert center_score([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], None]) == 0.0
    # Nothing known: 1 iff nothing predicted.
    assert center_score([], [None, None]) == 1.0
    assert center_score([[0, 0, 0]], [None, None]) == 0.0
    assert center_score([[0, 0, 0], [1, 1, 1]], [None, None]) == 0.0
    assert center_score([], None) == 1.0
    assert center_score([[0, 0, 0]], None) == 0.0


def test_st_reward_null_truth():
    # Only the initial object centre is known and only it is predicted (the final one written null).
    one = st_completion(obj0="[1.0, 0.5, 4.6]", obj1="null")
    parts = st_reward(one, "B", CAMERA, [[1.0, 0.5, 4.0], None])
    assert parts["object"] == pytest.approx(math.exp(-0.6))
    assert parts["camera"] == pytest.approx(1.0)
    assert parts["reward"] == pytest.approx(0.2 + 0.6 + 0.1 + 0.1 * math.exp(-0.6))
    # Both object centres predicted although only one is known: count mismatch.
    assert st_reward(st_completion(), "B", CAMERA, [[1.0, 0.5, 4.0], None])["object"] == 0.0
    # No object known: null predictions score 1, numbers score 0.
    nulls = st_completion(obj0="null", obj1="null")
    assert st_reward(nulls, "B", CAMERA, [None, None])["object"] == 1.0
    assert st_reward(st_completion(), "B", CAMERA, [None, None])["object"] == 0.0
    # Camera truth with a null final centre, prediction with both: mismatch; with the final one null: exact.
    assert st_reward(st_completion(), "B", [[0.0, 0.0, 0.0], None], OBJECT)["camera"] == 0.0
    cam_null = st_completion(cam1="null")
    assert st_reward(cam_null, "B", [[0.0, 0.0, 0.0], None], OBJECT)["camera"] == pytest.approx(1.0)
