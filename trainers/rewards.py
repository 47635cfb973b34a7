"""Verifiable rewards for reasoning RL, with TRL's reward signature:
`f(completions, **dataset_columns) -> list[float | None]`.

A completion is expected in the format the SFT recipe teaches (`modeling_moe.trainers.reasoning_data`)::

    <think> ...reasoning... </think>
    <answer> ...result... </answer>

- `format_reward`: 1.0 when the completion is exactly one `<think>` block followed by one non-empty `<answer>` block.
- `countdown_reward` (columns `numbers`, `target`): 1.0 when the answer is an arithmetic expression that uses only the
  given numbers, each at most once, and equals the target exactly.
- `math_accuracy_reward` (column `answer`): 1.0 when the answer is the reference number (integers, decimals, fractions,
  thousands separators, a leading `$` or trailing `%`); non-numeric references fall back to `math-verify` when it is
  installed and to a normalised string comparison otherwise.
- `accuracy_reward`: `countdown_reward` on rows with `numbers`/`target`, `math_accuracy_reward` on the others (for a
  mixture of tasks).

Completions are plain strings or TRL's conversational form (`[{"role": "assistant", "content": ...}]`). A reward is
`None` for a row that lacks the columns it needs (TRL then ignores it for that row).

Answers are parsed, never `eval`ed: `parse_expression` is a small hand-written parser for numbers, `+ - * /`, unary
signs and parentheses, with exact rational arithmetic. It refuses, before doing any work, text longer than
`MAX_EXPRESSION_CHARS`, more than `MAX_DEPTH` nested parentheses, literals longer than `MAX_LITERAL_DIGITS` digits and
any other character (names, `__import__`, `**`, `^`, ...); intermediate values are bounded by `MAX_VALUE_BITS`. Powers
are off by default; with `allow_power=True` the exponent must be a small integer and the result's size is bounded
before it is computed, so `9**9**9` is refused in microseconds.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 18
MAX_VALUE_BITS = 256
MAX_EXPONENT = 64


class ExpressionError(ValueError):
    """The text is not an expression the parser accepts (or it is too large to be worth evaluating)."""


# --------------------------------------------------------------------------------------------------- completions


def completion_text(completion) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages; the last one counts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    return ""


_TAG = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def is_well_formatted(text: str) -> bool:
    """Exactly `<think>...</think>` then `<answer>...</answer>` (non-empty), nothing but whitespace around them."""
    if len(_TAG.findall(text)) != 4:  # first: with four tags the match below runs in linear time
        return False
    match = _FORMAT.fullmatch(text)
    return match is not None and bool(match.group(2).strip())


def extract_answer(text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>` block (blocks taken left to right, each ending at the
    first closing tag after it), or None. Linear in the text, also with many unclosed tags."""
    answer, start = None, text.find("<answer>")
    while start >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        answer = text[start + len("<answer>"):end]
        start = text.find("<answer>", end + len("</answer>"))
    return None if answer is None else answer.strip()


# ------------------------------------------------------------------------------------------------ safe arithmetic

_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_OPERATOR_ALIASES = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-"}


@dataclass(frozen=True)
class Number:
    value: Fraction
    text: str


@dataclass(frozen=True)
class UnaryOp:
    op: str
    operand: object


@dataclass(frozen=True)
class BinaryOp:
    op: str
    left: object
    right: object


def _tokenize(text: str, allow_power: bool) -> list[str]:
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens, i = [], 0
    while i < len(text):
        char = _OPERATOR_ALIASES.get(text[i], text[i])
        if char.isspace():
            i += 1
        elif char.isdigit() or char == ".":
            match = _NUMBER.match(text, i)
            if match is None:
                raise ExpressionError(f"malformed number at {i}")
            literal = match.group()
            if sum(c.isdigit() for c in literal) > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number with more than {MAX_LITERAL_DIGITS} digits")
            tokens.append(literal)
            i = match.end()
        elif text.startswith("**", i) or char == "^":
            if not allow_power:
                raise ExpressionError("powers are not allowed")
            tokens.append("**")
            i += 2 if char == "*" else 1
        elif char in "+-*/()":
            tokens.append(char)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {text[i]!r}")
    if tokens.count("**") > 4:
        raise ExpressionError("more than 4 powers")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ; unary := ('+'|'-') unary | power ;
    power := atom ('**' unary)? ; atom := NUMBER | '(' expr ')'"""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.pos += 1
        return token

    def parse(self):
        if not self.tokens:
            raise ExpressionError("empty expression")
        node = self.expr()
        if self.peek() is not None:
            raise ExpressionError(f"unexpected {self.peek()!r}")
        return node

    def expr(self):
        node = self.term()
        while self.peek() in ("+", "-"):
            node = BinaryOp(self.take(), node, self.term())
        return node

    def term(self):
        node = self.unary()
        while self.peek() in ("*", "/"):
            node = BinaryOp(self.take(), node, self.unary())
        return node

    def unary(self):
        negative, signs = False, 0
        while self.peek() in ("+", "-"):
            signs += 1
            if signs > MAX_DEPTH:
                raise ExpressionError("too many unary signs")
            negative ^= self.take() == "-"
        node = self.power()
        return UnaryOp("-", node) if negative else node

    def power(self):
        node = self.atom()
        if self.peek() == "**":
            self.take()
            node = BinaryOp("**", node, self.unary())
        return node

    def atom(self):
        token = self.take()
        if token == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError(f"more than {MAX_DEPTH} nested parentheses")
            node = self.expr()
            if self.take() != ")":
                raise ExpressionError("unbalanced parentheses")
            self.depth -= 1
            return node
        if token[0].isdigit() or token[0] == ".":
            return Number(Fraction(token), token)
        raise ExpressionError(f"unexpected {token!r}")


def parse_expression(text: str, allow_power: bool = False):
    """Parse `text` into a tree of `Number`, `UnaryOp` and `BinaryOp` nodes; raise `ExpressionError` if it is not a
    bounded arithmetic expression. Accepts `×`/`÷` for `*`/`/`."""
    return _Parser(_tokenize(text, allow_power)).parse()


def _check_size(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_VALUE_BITS or value.denominator.bit_length() > MAX_VALUE_BITS:
        raise ExpressionError("intermediate value too large")
    return value


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    if op == "+":
        return _check_size(left + right)
    if op == "-":
        return _check_size(left - right)
    if op == "*":
        return _check_size(left * right)
    if op == "/":
        if right == 0:
            raise ExpressionError("division by zero")
        return _check_size(left / right)
    if op == "**":
        if right.denominator != 1 or abs(right.numerator) > MAX_EXPONENT:
            raise ExpressionError(f"exponent must be an integer of magnitude <= {MAX_EXPONENT}")
        if left == 0 and right < 0:
            raise ExpressionError("division by zero")
        bits = max(left.numerator.bit_length(), left.denominator.bit_length()) * abs(right.numerator)
        if bits > MAX_VALUE_BITS:
            raise ExpressionError("power too large")
        return _check_size(left ** int(right))
    raise ExpressionError(f"unknown operator {op!r}")


def evaluate(node, steps: list | None = None) -> Fraction:
    """Exact value of a parsed expression (iterative post-order, so no recursion limit is involved). When `steps` is
    a list, each operation is appended to it in evaluation order: `(left, op, right, result)`, and
    `(None, "neg", operand, result)` for the negation of a parenthesised sub-expression."""
    stack, values = [(node, False)], []
    while stack:
        current, visited = stack.pop()
        if isinstance(current, Number):
            values.append(current.value)
        elif isinstance(current, UnaryOp):
            if visited:
                operand = values.pop()
                if steps is not None and not isinstance(current.operand, Number):
                    steps.append((None, "neg", operand, -operand))
                values.append(-operand)
            else:
                stack += [(current, True), (current.operand, False)]
        elif isinstance(current, BinaryOp):
            if visited:
                right, left = values.pop(), values.pop()
                result = _apply(current.op, left, right)
                if steps is not None:
                    steps.append((left, current.op, right, result))
                values.append(result)
            else:
                stack += [(current, True), (current.right, False), (current.left, False)]
        else:
            raise ExpressionError(f"unknown node {current!r}")
    return values[0]


def literals(node) -> list[Fraction]:
    """The number literals of a parsed expression, left to right."""
    found, stack = [], [node]
    while stack:
        current = stack.pop()
        if isinstance(current, Number):
            found.append(current.value)
        elif isinstance(current, UnaryOp):
            stack.append(current.operand)
        elif isinstance(current, BinaryOp):
            stack += [current.right, current.left]
    return found


def safe_eval(text: str, allow_power: bool = False) -> Fraction:
    """Value of an arithmetic expression, exactly; `ExpressionError` for anything else."""
    return evaluate(parse_expression(text, allow_power=allow_power))


def format_number(value: Fraction) -> str:
    """An integer as is, otherwise a decimal when it terminates within 6 places, else `p/q`."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = value * 10**6
    if scaled.denominator == 1:  # exact digits, not a float's (wrong above 2**53)
        whole, millionths = divmod(abs(scaled.numerator), 10**6)
        return f"{'-' if value < 0 else ''}{whole}.{millionths:06d}".rstrip("0")
    return f"{value.numerator}/{value.denominator}"


# ------------------------------------------------------------------------------------------------ number answers

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")


def parse_number(text) -> Fraction | None:
    """A number written as an answer: `42`, `-3.5`, `1,234`, `3/4`, `$12`, `15%`, `\\boxed{7}`, with a trailing
    period allowed; None for anything else (expressions, words, scientific notation, more than 18 digits)."""
    if isinstance(text, (int, Fraction)) and not isinstance(text, bool):
        return Fraction(text)
    if isinstance(text, float):
        return Fraction(text).limit_denominator(10**9) if text == text and abs(text) != float("inf") else None
    if not isinstance(text, str) or len(text) > 64:
        return None
    text = text.strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", text)
    if boxed:
        text = boxed.group(1).strip()
    text = text.rstrip(".").strip()
    if text[:1] in ("−", "–"):  # a typographic minus
        text = "-" + text[1:]
    sign = text[:1] if text[:1] in "+-" else ""
    text = sign + text[len(sign):].lstrip().removeprefix("$").removesuffix("%").strip()
    text = _THOUSANDS.sub("", text).replace(" ", "")
    if not _PLAIN_NUMBER.fullmatch(text) or sum(c.isdigit() for c in text) > MAX_LITERAL_DIGITS:
        return None
    numerator, _, denominator = text.partition("/")
    if denominator and int(denominator) == 0:
        return None
    value = Fraction(numerator)
    return value / int(denominator) if denominator else value


def numbers_match(predicted: Fraction, reference: Fraction, rel_tol: float = 1e-6) -> bool:
    """Exactly equal, or, for a reference that is not an integer (1/3), within a relative `rel_tol` (0.333333)."""
    if predicted == reference:
        return True
    return reference.denominator != 1 and abs(predicted - reference) <= rel_tol * max(abs(reference), 1)


def _normalise_text(text: str) -> str:
    return re.sub(r"\s+", "", text).rstrip(".").lower()


_POWER_TOWER = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*[\w.]+\s*[})]?\s*(?:\^|\*\*)")
MATH_VERIFY_TIMEOUT_S = 1  # math-verify's own default is 5 s per call


def _math_verify_equal(predicted: str, reference: str) -> bool | None:
    """math-verify's verdict when it is installed (LaTeX and symbolic answers), else None. Power towers (`9^9^9`,
    `10^{10^{10}}`) are refused before it sees them: it would spend its whole timeout on one."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    if _POWER_TOWER.search(predicted):
        return False
    try:
        gold = parse(reference, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        return bool(gold) and bool(verify(gold, parse(predicted, parsing_timeout=MATH_VERIFY_TIMEOUT_S),
                                          timeout_seconds=MATH_VERIFY_TIMEOUT_S))
    except Exception:
        return False


def is_correct_answer(predicted: str | None, reference) -> bool:
    """Whether an extracted answer matches the reference answer."""
    if predicted is None or reference is None:
        return False
    reference_value = parse_number(reference)
    if reference_value is not None:
        predicted_value = parse_number(predicted)
        return predicted_value is not None and numbers_match(predicted_value, reference_value)
    reference = str(reference)
    if _normalise_text(predicted) == _normalise_text(reference):
        return True
    if len(predicted) <= MAX_EXPRESSION_CHARS:
        verdict = _math_verify_equal(predicted, reference)
        if verdict is not None:
            return verdict
    return False


def is_countdown_solution(expression: str | None, numbers, target) -> bool:
    """Whether `expression` (optionally followed by `= target`) uses only `numbers`, each at most once, and equals
    `target` exactly."""
    if expression is None or numbers is None or target is None:
        return False
    left, equals, right = expression.partition("=")
    if equals:
        right_value = parse_number(right)
        if right_value is None or right_value != Fraction(target):
            return False
        expression = left
    try:
        tree = parse_expression(expression)
        used = Counter(literals(tree))
        value = evaluate(tree)
    except ExpressionError:
        return False
    available = Counter(Fraction(n) for n in numbers)
    if any(count > available[number] for number, count in used.items()):
        return False
    return value == Fraction(target)


# ------------------------------------------------------------------------------------------------ reward functions


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for `<think>...</think><answer>...</answer>` (one of each, answer non-empty, only whitespace around)."""
    return [1.0 if is_well_formatted(completion_text(c)) else 0.0 for c in completions]


def countdown_reward(completions, numbers=None, target=None, **kwargs) -> list[float | None]:
    """1.0 when the `<answer>` is an expression over the given `numbers` (each at most once) equal to `target`."""
    numbers = numbers if numbers is not None else [None] * len(completions)
    target = target if target is not None else [None] * len(completions)
    rewards = []
    for completion, row_numbers, row_target in zip(completions, numbers, target):
        if row_numbers is None or row_target is None:
            rewards.append(None)
            continue
        answer = extract_answer(completion_text(completion))
        rewards.append(1.0 if is_countdown_solution(answer, row_numbers, row_target) else 0.0)
    return rewards


def math_accuracy_reward(completions, answer=None, **kwargs) -> list[float | None]:
    """1.0 when the `<answer>` equals the `answer` column (numerically when it is a number)."""
    answer = answer if answer is not None else [None] * len(completions)
    rewards = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        rewards.append(1.0 if is_correct_answer(predicted, reference) else 0.0)
    return rewards


def accuracy_reward(completions, numbers=None, target=None, answer=None, **kwargs) -> list[float | None]:
    """Task-agnostic correctness: the countdown check on rows with `numbers` and `target`, the answer check on the
    others."""
    n = len(completions)
    numbers = numbers if numbers is not None else [None] * n
    target = target if target is not None else [None] * n
    answer = answer if answer is not None else [None] * n
    rewards = []
    for completion, row_numbers, row_target, reference in zip(completions, numbers, target, answer):
        if row_numbers is not None and row_target is not None:
            rewards += countdown_reward([completion], [row_numbers], [row_target])
        else:
            rewards += math_accuracy_reward([completion], [reference])
    return rewards


REWARD_FUNCS = {
    "format_reward": format_reward,
    "countdown_reward": countdown_reward,
    "math_accuracy_reward": math_accuracy_reward,
    "accuracy_reward": accuracy_reward,
}


__all__ = [
    "ExpressionError",
    "REWARD_FUNCS",
    "accuracy_reward",
    "completion_text",
    "countdown_reward",
    "evaluate",
    "extract_answer",
    "format_number",
    "format_reward",
    "is_correct_answer",
    "is_countdown_solution",
    "is_well_formatted",
    "literals",
    "math_accuracy_reward",
    "parse_expression",
    "parse_number",
    "safe_eval",
]
