"""The ``--positive`` predicate over the labelled cells' obs: SQL, as ``--positive-sql`` and ``--where`` take.

:func:`evaluate_predicate` reads a predicate as SQL first (``cell_type = 'Norn cell' AND donor_id IN ('d1', 'd2')``,
checked by the index's whitelist and run sandboxed: :mod:`query.hunt.sql_predicate`). For compatibility, a
predicate that is not allowed SQL but is a valid older pandas-query-like predicate
(``cell_type == 'Norn cell' and donor_id in ['d1', 'd2']``) is evaluated as one (:func:`evaluate_pandas_predicate`).
``==`` is also valid SQL here and means ``=``.

The pandas-like form is parsed with :mod:`ast` and evaluated by walking the tree; only these forms are accepted:

* column names (bare identifiers, or any name in backticks: ```cell type` == 'x'``) and literals
  (strings, numbers, ``True``/``False``/``None``, lists/tuples/sets of literals);
* comparisons ``== != < <= > >=`` and ``in`` / ``not in`` (a list of literals), chained comparisons;
* ``and`` / ``or`` / ``not`` and their pandas spellings ``&`` / ``|`` / ``~``; parentheses.

Nothing else (calls, attributes, subscripts, arithmetic) is evaluated, so a predicate cannot run code.
Missing values never match a comparison (``!=`` included). A predicate is at most ``index.predicate.MAX_LENGTH`` characters
and :data:`MAX_DEPTH` levels of nesting deep; longer or deeper ones are refused with an InputError.
"""

from __future__ import annotations

import ast
import logging
import operator
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from scatlas.atlas.errors import InputError
from scatlas.atlas.validate import escaped, escaped_list
from scatlas.index import predicate_text
from scatlas.query.hunt.sql_predicate import EXAMPLE, PredicateFailed, evaluate_sql_predicate

logger = logging.getLogger(__name__)

_BACKTICK = re.compile(r"`([^`]*)`")
_PANDAS_MARKS = re.compile(r"==|\[|`|&|~|(?<!\|)\|(?!\|)|\b(?:True|False|None)\b")
_SQL_STRING = re.compile(r"'(?:[^']|'')*'")

MAX_DEPTH = 100
"""Deepest nesting of the predicate's syntax tree accepted (``not not ... x``, nested parentheses)."""

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str | int | float | bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand, text)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise InputError(f"predicate {_shown(text)}: only literals (strings, numbers, True/False/None) may appear in lists")


class _Evaluator:
    def __init__(self, frame: pd.DataFrame, text: str, names: dict[str, str]) -> None:
        self.frame = frame
        self.text = text
        self.names = names  # placeholder identifier -> real column name (backticks)

    def fail(self, what: str) -> InputError:
        return InputError(
            f"predicate {_shown(self.text)}: {what}. Use column comparisons such as \"cell_type == 'Norn cell'\", "
            "\"disease in ['CKD', 'normal']\", combined with and / or / not"
        )

    def mask(self, node: ast.AST) -> pd.Series:
        value = self.value(node)
        if not isinstance(value, pd.Series):
            raise self.fail("the expression does not compare a column (it is a constant)")
        if value.dtype != bool:
            if pd.api.types.is_bool_dtype(value):
                return value.fillna(False).astype(bool)
            raise self.fail("a column must be compared to something (e.g. col == 'x'); bare non-boolean column")
        return value

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if isinstance(node, ast.Name):
            column = self.names.get(node.id, node.id)
            if column not in self.frame.columns:
                raise InputError(
                    f"predicate {_shown(self.text)}: unknown column {escaped(column)}; the cells have: "
                    f"{escaped_list(self.frame.columns, 40)}"
                )
            return self.frame[column]
        if isinstance(node, ast.Constant):
            return _literal(node, self.text)
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return [_literal(e, self.text) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            return _literal(node, self.text)
        if isinstance(node, ast.BoolOp):
            masks = [self.mask(v) for v in node.values]
            out = masks[0]
            for m in masks[1:]:
                out = (out & m) if isinstance(node.op, ast.And) else (out | m)
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
            left, right = self.mask(node.left), self.mask(node.right)
            return (left & right) if isinstance(node.op, ast.BitAnd) else (left | right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.Invert):
            return ~self.mask(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        raise self.fail(f"{type(node).__name__} expressions are not allowed")

    def compare(self, node: ast.Compare) -> pd.Series:
        out: pd.Series | None = None
        left = self.value(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.value(right_node)
            result = self.compare_one(op, left, right)
            out = result if out is None else (out & result)
            left = right
        assert out is not None
        return out

    def compare_one(self, op: ast.cmpop, left: Any, right: Any) -> pd.Series:
        if isinstance(op, ast.In | ast.NotIn):
            if not isinstance(left, pd.Series) or not isinstance(right, list):
                raise self.fail("'in' needs a column on the left and a list of values on the right")
            series = left
            result = series.isin(right) & series.notna()
            return ~result & series.notna() if isinstance(op, ast.NotIn) else result
        fn = _COMPARE.get(type(op))
        if fn is None:
            raise self.fail(f"operator {type(op).__name__} is not allowed")
        if isinstance(left, list) or isinstance(right, list):
            raise self.fail("lists can only be used with 'in' / 'not in'")
        if not isinstance(left, pd.Series) and not isinstance(right, pd.Series):
            raise self.fail("a comparison must involve a column")
        try:
            result = fn(left, right)
        except TypeError as exc:
            raise self.fail("cannot compare these values (a text column with a number, or the reverse?)") from exc
        series = left if isinstance(left, pd.Series) else right
        valid = series.notna()
        if isinstance(left, pd.Series) and isinstance(right, pd.Series):
            valid &= right.notna()
        return pd.Series(np.asarray(result, dtype=bool), index=series.index) & valid


def evaluate_predicate(frame: pd.DataFrame, predicate: str) -> np.ndarray:
    """Boolean mask (numpy, one per row of ``frame``) of the rows matching ``predicate``: SQL, or the older
    pandas-like form when it is not allowed SQL but is valid that way (see the module docstring).

    InputError when it is neither, saying which syntax is expected and why it was refused.
    """
    text = _checked_text(predicate)
    try:
        return evaluate_sql_predicate(frame, text)
    except PredicateFailed:
        raise
    except InputError as sql_error:
        try:
            mask = evaluate_pandas_predicate(frame, text)
        except InputError as pandas_error:
            if _looks_pandas(text):
                raise InputError(
                    f"{pandas_error} (or write it as an SQL predicate such as \"{EXAMPLE}\")"
                ) from None
            quotes = " In SQL strings take single quotes; double quotes name columns." if '"' in text else ""
            raise InputError(
                f"{sql_error} (expected an SQL predicate such as \"{EXAMPLE}\", as --positive-sql and --where "
                f"take).{quotes}"
            ) from None
        logger.info("the positive predicate was read in the older pandas-like form; SQL such as %r is preferred",
                    EXAMPLE)
        return mask


def evaluate_classes(frame: pd.DataFrame, predicate: str) -> tuple[np.ndarray, np.ndarray]:
    """``(positive, negative)`` boolean masks of the rows of ``frame``: where ``predicate`` is true, and where it is
    false. A row where it is neither (SQL's NULL: a missing value in a column it compares) is in neither mask, so
    that an unlabelled cell is never taken for a negative. With the older pandas-like form, which has no NULL,
    every row that does not match is a negative (a warning says so when the predicate's columns miss values)."""
    positive = evaluate_predicate(frame, predicate)
    text = _checked_text(predicate)
    try:
        negative = evaluate_sql_predicate(frame, text, negate=True)
    except PredicateFailed:
        raise
    except InputError:  # not SQL: the older pandas-like form
        negative = ~positive
        named = [c for c in frame.columns if str(c) in text]
        if named and bool(frame[named].isna().any(axis=1).to_numpy()[negative].any()):
            logger.warning("cells with a missing value in the predicate's columns are taken as negatives, as the "
                           "older pandas-like form has no NULL; write the predicate in SQL to leave them out")
    return positive, negative


def _looks_pandas(text: str) -> bool:
    """``text`` uses a spelling of the pandas-like form (``==``, lists, backticks, ``& | ~``,
    ``True``/``False``/``None``) outside single-quoted strings."""
    return bool(_PANDAS_MARKS.search(_SQL_STRING.sub("''", text)))


def _checked_text(predicate: str) -> str:
    return predicate_text(predicate, what="positive predicate", example=EXAMPLE)


def evaluate_pandas_predicate(frame: pd.DataFrame, predicate: str) -> np.ndarray:
    """Boolean mask of the rows matching the older pandas-like ``predicate`` (``cell_type == 'x'``)."""
    text = _checked_text(predicate)
    names: dict[str, str] = {}

    def quote(m: re.Match[str]) -> str:
        key = f"__col{len(names)}__"
        names[key] = m.group(1)
        return key

    source = _BACKTICK.sub(quote, text)
    tree = _parse(source, text)
    frame = frame.reset_index(drop=True)
    try:
        mask = _Evaluator(frame, text, names).mask(tree.body)
    except (RecursionError, MemoryError):
        raise _too_deep(text) from None
    return mask.to_numpy(dtype=bool)


def _parse(source: str, text: str) -> ast.Expression:
    """``source`` parsed as one expression, at most :data:`MAX_DEPTH` deep; InputError otherwise."""
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise InputError(f"predicate {_shown(text)} is not a valid expression: {exc.msg}") from exc
    except (RecursionError, MemoryError):
        raise _too_deep(text) from None
    if _depth(tree) > MAX_DEPTH:
        raise _too_deep(text)
    return tree


def _depth(tree: ast.AST) -> int:
    """Nesting depth of ``tree`` (walked iteratively, stopping once past :data:`MAX_DEPTH`)."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _too_deep(text: str) -> InputError:
    return InputError(
        f"predicate {_shown(text)} is nested more than {MAX_DEPTH} levels deep; flatten it, e.g. "
        "\"cell_type in ['a', 'b'] and donor_id == 'd1'\""
    )


def _shown(text: str, limit: int = 200) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
