"""Reward functions and the safe arithmetic parser, against hand-written cases (right, wrong, malformed, hostile)."""

import time
from fractions import Fraction

import pytest

from modeling_moe.trainers.rewards import (
    ExpressionError,
    accuracy_reward,
    countdown_reward,
    extract_answer,
    format_number,
    format_reward,
    math_accuracy_reward,
    parse_number,
    safe_eval,
)


def wrap(answer, think="reasoning"):
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"


def conversational(text):
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize("expression, value", [
    ("94*4 - 61 - 6", 309),
    ("42*(30 - 4 - 23)", 126),
    ("2 - -1", 3),
    ("-( ( -6915 / 5 ) - 7652 + 4844 ) - 7314", -3123),
    ("1/3 + 1/6", Fraction(1, 2)),
    ("3 × 4 ÷ 6", 2),
    ("  7  ", 7),
    ("2.5 * 4", 10),
])
def test_safe_eval_values(expression, value):
    assert safe_eval(expression) == value


@pytest.mark.parametrize("expression", [
    "9**9**9",
    "2^10",
    "__import__('os').system('true')",
    "().__class__",
    "open('/etc/passwd')",
    "lambda: 1",
    "1 if 1 else 2",
    "x + 1",
    "1e999999",
    "1/0",
    "(1 + 2",
    "1 + 2)",
    "",
    "+",
    "1 2",
    "(" * 50 + "1" + ")" * 50,
    "(" * 100000 + "1" + ")" * 100000,
    "-" * 100 + "1",
    "9" * 40,
    "1" + "*99999999" * 30,
])
def test_safe_eval_refuses_quickly(expression):
    start = time.perf_counter()
    with pytest.raises(ExpressionError):
        safe_eval(expression)
    assert time.perf_counter() - start < 0.05


def test_powers_only_when_allowed_and_bounded():
    assert safe_eval("2**10", allow_power=True) == 1024
    assert safe_eval("-2**2", allow_power=True) == -4  # Python's precedence
    assert safe_eval("2^-2", allow_power=True) == Fraction(1, 4)
    for hostile in ("9**9**9", "10**100", "2**0.5", "99999999**64"):
        start = time.perf_counter()
        with pytest.raises(ExpressionError):
            safe_eval(hostile, allow_power=True)
        assert time.perf_counter() - start < 0.05


def test_intermediate_values_are_bounded():
    with pytest.raises(ExpressionError):
        safe_eval("*".join(["999999999999999999"] * 14))


@pytest.mark.parametrize("text, value", [
    ("42", 42), (" -3.5 ", Fraction(-7, 2)), ("1,234", 1234), ("$12", 12), ("15%", 15), ("3/4", Fraction(3, 4)),
    ("\\boxed{7}", 7), ("288.", 288), ("5.0", 5), ("−5", -5), ("-$5", -5),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["12 apples", "2+3", "1e5", "nan", "", "9" * 30, "1/0", "__import__"])
def test_parse_number_refuses(text):
    assert parse_number(text) is None


# ---------------------------------------------------------------------------------------------------- format


def test_format_reward():
    good = [wrap("42"), "  <think>a</think>\n\n<answer> 7 </answer>\n", wrap("1+2", think="")]
    bad = [
        "<answer>42</answer>",                                      # no reasoning
        "<think>x</think>",                                         # no answer
        "<think>x</think><answer></answer>",                        # empty answer
        "<answer>1</answer><think>x</think>",                       # wrong order
        "<think>x</think><answer>1</answer> trailing text",         # text after the answer
        "preamble <think>x</think><answer>1</answer>",              # text before
        "<think>x<think>y</think><answer>1</answer>",               # nested / repeated tags
        "<think>x</think><answer>1</answer><answer>2</answer>",     # two answers
        "<think>x</think><answer>1",                                # unclosed
        "",
    ]
    assert format_reward(good) == [1.0] * len(good)
    assert format_reward(bad) == [0.0] * len(bad)
    assert format_reward([conversational(wrap("42"))]) == [1.0]  # TRL's conversational completions


def test_extract_answer_takes_the_last_block():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("<answer>a<answer>b</answer> x </answer>") == "a<answer>b"  # blocks left to right
    assert extract_answer("<answer>1</answer><answer>unclosed") == "1"
    assert extract_answer("no tags") is None


@pytest.mark.parametrize("text", ["<answer>" * 20000, "<think>" + "</think><answer>" * 10000,
                                  "<think>" * 10000 + "</answer>" * 10000])
def test_tags_in_long_hostile_text_are_read_in_linear_time(text):
    start = time.perf_counter()
    assert format_reward([text]) == [0.0] and math_accuracy_reward([text], answer=["1"]) == [0.0]
    assert time.perf_counter() - start < 0.1


# ------------------------------------------------------------------------------------------------- countdown


def test_countdown_reward_cases():
    numbers, target = [6, 61, 94, 4], 309
    cases = {
        wrap("94*4 - 61 - 6"): 1.0,              # right
        wrap("(94*4) - (61 + 6)"): 1.0,          # right, other bracketing
        wrap("94*4 - 61 - 6 = 309"): 1.0,        # right, with the target after "="
        wrap("94*4 - 61 - 6 = 310"): 0.0,        # wrong claim after "="
        wrap("94*4 - 61"): 0.0,                  # wrong value
        wrap("94*4 - 61 - 6 + 0"): 0.0,          # 0 is not given
        wrap("94*4 - 61 - 6 - 6 + 6"): 0.0,      # 6 reused
        wrap("94*4*1 - 61 - 6"): 0.0,            # 1 not given
        wrap("309"): 0.0,                        # the target itself
        wrap("94*4 - 61 - 6x"): 0.0,             # malformed expression
        wrap("9**9**9"): 0.0,                    # hostile
        wrap("__import__('os')"): 0.0,           # hostile
        wrap("(" * 40 + "94" + ")" * 40): 0.0,   # too deep
        "94*4 - 61 - 6": 0.0,                    # no answer tags
        "<answer>94*4 - 61 - 6": 0.0,            # unclosed tag
    }
    completions = list(cases)
    rewards = countdown_reward(completions, numbers=[numbers] * len(cases), target=[target] * len(cases))
    assert rewards == list(cases.values())


def test_countdown_allows_duplicates_only_as_given():
    assert countdown_reward([wrap("33*(90 - 57)/33")], numbers=[[90, 33, 33, 57]], target=[33]) == [1.0]
    assert countdown_reward([wrap("33*(90 - 57)/33")], numbers=[[90, 33, 57]], target=[33]) == [0.0]


def test_countdown_exact_division():
    assert countdown_reward([wrap("(10 - 4) / 4 * 2")], numbers=[[10, 4, 4, 2]], target=[3]) == [1.0]
    assert countdown_reward([wrap("10 / 3")], numbers=[[10, 3]], target=[3]) == [0.0]  # 3.33..., not 3


def test_countdown_missing_columns_give_none():
    assert countdown_reward([wrap("1+2")], numbers=[None], target=[None]) == [None]
    assert countdown_reward([wrap("1+2")]) == [None]


# ------------------------------------------------------------------------------------------------------ math


def test_math_accuracy_reward_cases():
    cases = [
        (wrap("288"), "288", 1.0),
        (wrap(" 288. "), "288", 1.0),
        (wrap("1,234"), "1234", 1.0),
        (wrap("$95"), "95", 1.0),
        (wrap("-61"), "-61", 1.0),
        (wrap("0.5"), "1/2", 1.0),
        (wrap("287"), "288", 0.0),
        (wrap("1000001"), "1000000", 0.0),         # integers: exactly, however large
        (wrap("123456790"), "123456789", 0.0),
        (wrap("0.333333"), "1/3", 1.0),            # a fraction: to six places
        (wrap("160 + 128"), "288", 0.0),          # an expression is not an answer
        (wrap("288 apples"), "288", 0.0),
        (wrap("9**9**9"), "288", 0.0),
        (wrap("__import__('os').system('x')"), "288", 0.0),
        ("288", "288", 0.0),                        # no tags
        ("<think>288</think>", "288", 0.0),
        (wrap("Paris"), "paris", 1.0),              # non-numeric reference: normalised text
    ]
    rewards = math_accuracy_reward([c for c, _, _ in cases], answer=[a for _, a, _ in cases])
    assert rewards == [r for _, _, r in cases]
    assert math_accuracy_reward([wrap("5")], answer=[None]) == [None]
    assert math_accuracy_reward([conversational(wrap("5"))], answer=["5"]) == [1.0]


def test_accuracy_reward_dispatches_per_row():
    completions = [wrap("3 + 4"), wrap("12"), wrap("3 + 4")]
    rewards = accuracy_reward(completions, numbers=[[3, 4], None, None], target=[7, None, None],
                              answer=[None, "12", "7"])
    assert rewards == [1.0, 1.0, 0.0]


def test_reward_signature_accepts_trl_keywords():
    # TRL passes prompts, completion_ids, trainer_state, log_extra, log_metric and every dataset column.
    extra = dict(prompts=["p"], completion_ids=[[1]], trainer_state=None, log_extra=None, log_metric=None,
                 task=["countdown"])
    assert format_reward([wrap("1")], **extra) == [1.0]
    assert countdown_reward([wrap("1+2")], numbers=[[1, 2]], target=[3], answer=[None], **extra) == [1.0]
    assert math_accuracy_reward([wrap("3")], answer=["3"], numbers=[None], target=[None], **extra) == [1.0]


def test_format_number_writes_exact_digits():
    assert format_number(Fraction(10**17 + 1, 2)) == "50000000000000000.5"
    assert format_number(Fraction(-7, 4)) == "-1.75" and format_number(Fraction(1, 3)) == "1/3"
    assert format_number(Fraction(12)) == "12" and format_number(Fraction(-1, 10**6)) == "-0.000001"


def test_symbolic_answers_refuse_power_towers_quickly():
    pytest.importorskip("math_verify")
    assert math_accuracy_reward([wrap("\\frac{2}{4}")], answer=["\\frac{1}{2}"]) == [1.0]
    for tower in ("9^9^9^9", "2**2**2**2**99", "$10^{10^{10^{10}}}$"):
        start = time.perf_counter()
        assert math_accuracy_reward([wrap(tower)], answer=["\\frac{1}{2}"]) == [0.0]
        assert time.perf_counter() - start < 0.5, tower
