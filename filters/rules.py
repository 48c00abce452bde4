"""Selection rules as safe expressions: comparisons of known columns with numbers, joined by and/or/not.

`aesthetic >= 6 and pwatermark < 0.5` is parsed with `ast` and evaluated over numpy columns by a small
interpreter: no `eval`, no attribute access, no calls. A missing value (NaN) fails every comparison.
Derived columns from the decoded size: `min_side`, `max_side`, `area`, `aspect` (long / short side).
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re

import numpy as np

from latentmill.errors import InputError

COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def derived_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add min_side, max_side, area and aspect from width and height (decoded pixels)."""
    if "width" in columns and "height" in columns:
        w, h = columns["width"].astype(float), columns["height"].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            columns = columns | {
                "min_side": np.minimum(w, h),
                "max_side": np.maximum(w, h),
                "area": w * h,
                "aspect": np.maximum(w, h) / np.minimum(w, h),
            }
    return columns


MAX_RULE_LENGTH = 2_000
MAX_RULE_DEPTH = 50


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


class Rule:
    """A named boolean expression over columns; `passes(columns)` gives the mask of rows that pass."""

    def __init__(self, name: str, expression: str, known: list[str]):
        self.name, self.expression = name, expression
        shown = expression if len(expression) <= 80 else expression[:77] + "..."
        if len(expression) > MAX_RULE_LENGTH:
            raise InputError(
                f"rule {shown!r}: {len(expression):,} characters; a rule may have {MAX_RULE_LENGTH:,}."
            )
        if expression.count("(") + len(re.findall(r"\bnot\b", expression)) > MAX_RULE_DEPTH:
            raise InputError(
                f"rule {shown!r}: nested too deeply (at most {MAX_RULE_DEPTH} levels of not and parentheses)."
            )
        try:
            tree = ast.parse(expression, mode="eval")
        except (SyntaxError, RecursionError, MemoryError) as err:
            raise InputError(
                f"rule {shown!r}: not a valid expression ({getattr(err, 'msg', type(err).__name__)})."
            ) from None
        self._check(tree.body, known)
        self.tree = tree.body

    def _check(self, node, known):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
            for value in node.values:
                self._check(value, known)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand, known)
        elif isinstance(node, ast.Compare):
            if not all(type(op) in COMPARE for op in node.ops):
                raise InputError(f"rule {self.expression!r}: only <, <=, >, >=, ==, != compare.")
            for operand in [node.left, *node.comparators]:
                self._check_operand(operand, known)
        else:
            raise InputError(
                f"rule {self.expression!r}: only comparisons of columns with numbers, joined by "
                f"and/or/not, are allowed (found {type(node).__name__})."
            )

    def _check_operand(self, node, known):
        if isinstance(node, ast.Name):
            if node.id not in known:
                near = difflib.get_close_matches(node.id, known, n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise InputError(
                    f"rule {self.expression!r}: unknown column {node.id!r}.{hint} Known: {', '.join(known)}."
                )
        elif (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
        ):
            self._check_operand(node.operand, known)
        elif not (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            raise InputError(
                f"rule {self.expression!r}: compare columns with numbers only (found {ast.unparse(node)!r})."
            )
        elif not math.isfinite(_as_float(node.value)):
            raise InputError(
                f"rule {self.expression[:80]!r}: the number {str(node.value)[:20]}... is not a finite float."
            )

    def passes(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        return self._eval(self.tree, columns)

    def _value(self, node, columns):
        if isinstance(node, ast.Name):
            return columns[node.id].astype(float)
        if isinstance(node, ast.UnaryOp):
            return -self._value(node.operand, columns)
        return float(node.value)

    def _eval(self, node, columns) -> np.ndarray:
        if isinstance(node, ast.BoolOp):
            parts = [self._eval(v, columns) for v in node.values]
            return (
                np.logical_and.reduce(parts) if isinstance(node.op, ast.And) else np.logical_or.reduce(parts)
            )
        if isinstance(node, ast.UnaryOp):
            return ~self._eval(node.operand, columns)
        left = self._value(node.left, columns)
        result = None
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self._value(right_node, columns)
            with np.errstate(invalid="ignore"):
                part = COMPARE[type(op)](left, right) & ~np.isnan(left) & ~np.isnan(right)
            result = part if result is None else result & part
            left = right
        return np.broadcast_to(result, len(next(iter(columns.values())))).copy()


# Published cuts. LAION-Aesthetics V2 subsets (https://laion.ai/blog/laion-aesthetics/) are defined by the
# improved predictor's score alone; Stable Diffusion v1.2+'s "laion-improved-aesthetics" (model card of
# runwayml/stable-diffusion-v1-5): original size >= 512x512, aesthetic > 5.0, pwatermark < 0.5.
PRESETS: dict[str, list[tuple[str, str]]] = {
    "laion-aesthetics-v2-5plus": [("min_aesthetic", "aesthetic >= 5")],
    "laion-aesthetics-v2-6plus": [("min_aesthetic", "aesthetic >= 6")],
    "laion-aesthetics-v2-6.5plus": [("min_aesthetic", "aesthetic >= 6.5")],
    "sd-v1": [
        ("min_side", "min_side >= 512"),
        ("min_aesthetic", "aesthetic > 5"),
        ("max_pwatermark", "pwatermark < 0.5"),
    ],
}
