"""The ``calculate`` tool: arithmetic by simpleeval (an AST evaluator, never ``eval``), bounded
so that no expression costs more than a few milliseconds or a few kilobytes.

Bounds, each checked before any work: the expression's length, its nesting, the digits of any
number in it; then during evaluation, every power and product is estimated before it is
computed, and a result over ``MAX_RESULT_DIGITS`` is refused.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from simpleeval import SimpleEval

MAX_EXPRESSION_CHARS = 300
MAX_NESTING = 20
MAX_LITERAL_DIGITS = 30
MAX_RESULT_DIGITS = 100
_NUMBER = re.compile(r"\d[\d_]*")


class CalculationError(ValueError):
    """The expression is refused or fails; the message says why, for the model or a user."""


def _digits(value: Any) -> float:
    """About how many decimal digits ``value`` has (0 for zero)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    magnitude = abs(value)
    if magnitude == 0 or (isinstance(magnitude, float) and not math.isfinite(magnitude)):
        return 0.0
    if isinstance(magnitude, int):
        return magnitude.bit_length() * math.log10(2)
    return max(0.0, math.log10(magnitude))


def _numbers(*values: Any) -> None:
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculationError("only numbers can be calculated with")


def _checked(value: Any) -> Any:
    _numbers(value)
    if _digits(value) > MAX_RESULT_DIGITS:
        raise CalculationError(f"the result would have over {MAX_RESULT_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationError("the result is not a finite number")
    return value


def _power(base: Any, exponent: Any) -> Any:
    _numbers(base, exponent)
    if isinstance(exponent, int | float) and abs(exponent) > 10_000:
        raise CalculationError("that exponent is too large")
    if _digits(base) * abs(float(exponent)) > MAX_RESULT_DIGITS:
        raise CalculationError(f"the result would have over {MAX_RESULT_DIGITS} digits")
    if base == 0 and exponent < 0:
        raise CalculationError("zero cannot be raised to a negative power")
    return _checked(operator.pow(base, exponent))


def _times(left: Any, right: Any) -> Any:
    _numbers(left, right)
    if _digits(left) + _digits(right) > MAX_RESULT_DIGITS + 1:
        raise CalculationError(f"the result would have over {MAX_RESULT_DIGITS} digits")
    return _checked(operator.mul(left, right))


def _divide(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def run(left: Any, right: Any) -> Any:
        _numbers(left, right)
        if right == 0:
            raise CalculationError("division by zero")
        return _checked(op(left, right))

    return run


def _plain(op: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        _numbers(*args)
        return _checked(op(*args))

    return run


OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: _plain(operator.add),
    ast.Sub: _plain(operator.sub),
    ast.Mult: _times,
    ast.Div: _divide(operator.truediv),
    ast.FloorDiv: _divide(operator.floordiv),
    ast.Mod: _divide(operator.mod),
    ast.Pow: _power,
    ast.USub: _plain(operator.neg),
    ast.UAdd: _plain(operator.pos),
}


def _sqrt(x: float) -> float:
    if x < 0:
        raise CalculationError("no square root of a negative number")
    return math.sqrt(x)


def _log(x: float, base: float = math.e) -> float:
    if x <= 0 or base <= 0 or base == 1:
        raise CalculationError("a logarithm needs a positive number and base")
    return math.log(x, base)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": _sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "log": _log,
    "log10": lambda x: _log(x, 10),
    "exp": lambda x: _power(math.e, x),
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
NAMES = {"pi": math.pi, "e": math.e}


def _prepare(expression: str) -> str:
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    text = text.replace(",", "") if re.fullmatch(r"[\d,.\s+\-*/()%]+", text) else text
    if not text:
        raise CalculationError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    depth = deepest = 0
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise CalculationError(f"the expression nests deeper than {MAX_NESTING} levels")
    if any(len(n.replace("_", "")) > MAX_LITERAL_DIGITS for n in _NUMBER.findall(text)):
        raise CalculationError(f"a number in it has over {MAX_LITERAL_DIGITS} digits")
    return text


def calculate(expression: str) -> str:
    """The value of ``expression`` as text ("397.8"), or CalculationError saying why not."""
    text = _prepare(expression)
    evaluator = SimpleEval(operators=OPERATORS, functions=FUNCTIONS, names=NAMES)
    try:
        value = evaluator.eval(text)
    except CalculationError:
        raise
    except (SyntaxError, TypeError, KeyError, AttributeError) as exc:
        raise CalculationError(f"that is not an expression I can evaluate ({exc})") from None
    except (ArithmeticError, ValueError, RecursionError, MemoryError) as exc:
        raise CalculationError(f"the calculation failed ({exc or type(exc).__name__})") from None
    except Exception as exc:  # simpleeval's own refusals (unknown names, functions, …)
        raise CalculationError(f"that is not allowed: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculationError("the result is not a number")
    _checked(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)
