"""User SQL predicates over the index's ``cells`` table (``--where``, ``--positive-sql``), checked before they run.

A predicate is wrapped as ``SELECT soma_joinid FROM cells WHERE (<predicate>)``; DuckDB's own parser turns that
statement into a syntax tree (``json_serialize_sql``, on a private in-memory connection with file access and
extension loading off, which parses without executing anything) and the tree must be exactly one plain SELECT of
that column from that table, whose WHERE clause holds only:

* names of the cells table's columns (one part, compared case-insensitively as DuckDB does) and literals;
* comparisons (``= <> < <= > >=``, ``IS [NOT] DISTINCT FROM``, ``BETWEEN``, ``IN (...)``, ``IS [NOT] NULL``),
  ``AND`` / ``OR`` / ``NOT``, ``CASE``, ``COLLATE``, ``CAST`` to a plain scalar type;
* the scalar functions and operators in :data:`FUNCTIONS` (``LIKE``, ``ILIKE``, ``lower``, ``regexp_matches`` ...).

Anything else (subqueries, table functions such as ``read_text``, set operations, several statements, lambdas,
parameters, window or aggregate functions) is refused with an :class:`InputError`. The statement that was checked
is the one that runs (:attr:`Predicate.sql`): DuckDB writes it back from the checked tree
(``json_deserialize_sql``), so nothing the tree does not hold can run.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from scatlas.atlas.errors import InputError
from scatlas.atlas.validate import escaped

logger = logging.getLogger(__name__)

ID_COLUMN = "soma_joinid"
CELLS_TABLE = "cells"

MAX_LENGTH = 10_000
"""Longest predicate accepted, in characters."""
MAX_DEPTH = 100
"""Deepest nesting of expressions accepted in a predicate's syntax tree."""
EXAMPLE = "cell_type = 'B cell' AND tissue IN ('blood', 'lung')"

FUNCTIONS: frozenset[str] = frozenset(
    {
        # operators DuckDB spells as functions: LIKE, NOT LIKE, ILIKE, NOT ILIKE, GLOB, SIMILAR TO, arithmetic, ||
        "~~", "!~~", "~~*", "!~~*", "~~~", "regexp_full_match", "+", "-", "*", "/", "//", "%", "||",
        # ... and LIKE / ILIKE with an ESCAPE character
        "like_escape", "not_like_escape", "ilike_escape", "not_ilike_escape",
        # text
        "lower", "upper", "lcase", "ucase", "trim", "ltrim", "rtrim", "length", "strlen", "starts_with",
        "ends_with", "prefix", "suffix", "contains", "regexp_matches", "substring", "substr", "strpos", "instr",
        "position", "concat",
        # numbers
        "abs", "round", "floor", "ceil", "ceiling", "sign", "sqrt", "ln", "log", "log2", "log10", "greatest",
        "least", "isnan", "isinf", "isfinite",
        # missing values
        "ifnull", "nullif",
    }
)
"""Scalar functions (lower-case names as DuckDB's parser gives them) a predicate may call."""

CAST_TYPES: frozenset[str] = frozenset(
    {
        "boolean", "bool", "logical", "tinyint", "int1", "smallint", "int2", "short", "integer", "int", "int4",
        "signed", "bigint", "int8", "long", "hugeint", "int128", "utinyint", "usmallint", "uinteger", "ubigint",
        "uhugeint", "float", "float4", "real", "double", "float8", "decimal", "numeric", "varchar", "text",
        "string", "char", "bpchar", "date", "time", "timestamp", "datetime",
    }
)
"""Types a predicate may CAST to (lower case)."""

_COMPARISONS = frozenset(
    {
        "COMPARE_EQUAL", "COMPARE_NOTEQUAL", "COMPARE_LESSTHAN", "COMPARE_GREATERTHAN",
        "COMPARE_LESSTHANOREQUALTO", "COMPARE_GREATERTHANOREQUALTO", "COMPARE_DISTINCT_FROM",
        "COMPARE_NOT_DISTINCT_FROM",
    }
)
_OPERATORS = frozenset(
    {"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN", "COMPARE_NOT_IN", "OPERATOR_COALESCE"}
)
_NODE_META = frozenset({"class", "type", "alias", "query_location", "query_location_length"})
_NODE_FIELDS: dict[str, frozenset[str]] = {  # the fields each allowed expression class may carry
    "COLUMN_REF": frozenset({"column_names"}),
    "CONSTANT": frozenset({"literal", "value"}),
    "COMPARISON": frozenset({"left", "right"}),
    "CONJUNCTION": frozenset({"children"}),
    "OPERATOR": frozenset({"children"}),
    "BETWEEN": frozenset({"input", "lower", "upper"}),
    "CAST": frozenset({"child", "try_cast", "type_expr", "cast_type"}),
    "CASE": frozenset({"case_checks", "else_expr"}),
    "COLLATE": frozenset({"child", "collation"}),
    "FUNCTION": frozenset(
        {"function_name", "schema", "catalog", "filter", "order_bys", "distinct", "is_operator", "export_state",
         "arguments", "children", "qualified_name", "is_legacy_function_call"}
    ),
}
_CONSTRUCTS = {  # how refused expression classes are named in messages
    "SUBQUERY": "a subquery", "WINDOW": "a window function", "LAMBDA": "a lambda", "PARAMETER": "a parameter",
    "STAR": "a * / COLUMNS(...) expression", "POSITIONAL_REFERENCE": "a positional reference (#n)",
    "DEFAULT": "DEFAULT", "FUNCTION_REF": "a table function",
}
_VALIDATOR_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "max_expression_depth": 4 * MAX_DEPTH,
}


@dataclass(frozen=True)
class Predicate:
    """A user predicate that passed :func:`validate_predicate`.

    ``text``: the predicate as given (stripped); ``sql``: the exact statement that was checked, and the one to run:
    ``SELECT soma_joinid FROM cells WHERE (<text>)``.
    """

    text: str
    sql: str
    columns: tuple[str, ...] = ()
    """The columns it reads (as the table names them)."""
    negated_sql: str = ""
    """The statement selecting the cells the predicate is false for: ``NOT`` around the checked WHERE clause, written
    back from the checked tree like ``sql``. SQL's three-valued logic decides: a cell for which the predicate is
    NULL (``cell_type = 'DC'`` where cell_type is missing: its label is unknown) is in neither set, while one for
    which it is false whatever the missing values hold (``cell_type = 'DC' AND tissue = 'lung'`` for a T cell of
    unknown tissue) is a negative; ``coalesce`` / ``IS NULL`` in the predicate say otherwise where wanted."""


class _Refused(Exception):
    """A construct the predicate may not use (``what``), turned into an :class:`InputError` by the caller."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def select_sql(predicate: str) -> str:
    """The statement a predicate is checked as, and run as."""
    return f"SELECT {ID_COLUMN} FROM {CELLS_TABLE} WHERE ({predicate})"


def shown(predicate: str, limit: int = 200) -> str:
    """``predicate`` quoted for a message, cut to ``limit`` characters."""
    text = predicate if len(predicate) <= limit else predicate[:limit] + "..."
    return repr(text)


def allowed_help() -> str:
    """What a predicate may use, with an example (the end of every refusal)."""
    return (
        "A predicate may use the cells table's columns, literals, comparisons (= <> < <= > >= BETWEEN IN LIKE ILIKE "
        "IS [NOT] NULL), AND / OR / NOT, CASE, CAST to a scalar type and the functions "
        f"{', '.join(sorted(f for f in FUNCTIONS if f.isidentifier()))}; e.g. \"{EXAMPLE}\""
    )


def predicate_text(predicate: str | None, *, what: str = "where filter", example: str = EXAMPLE) -> str:
    """``predicate`` stripped; InputError (naming it ``what``, suggesting ``example``) when it is empty or longer
    than :data:`MAX_LENGTH`."""
    text = (predicate or "").strip()
    if not text:
        raise InputError(f"the {what} is empty; pass an SQL predicate such as \"{example}\"")
    if len(text) > MAX_LENGTH:
        raise InputError(
            f"the {what} is {len(text):,} characters long; at most {MAX_LENGTH:,} are accepted: "
            "shorten it (e.g. IN (...) instead of many ORs)"
        )
    return text


def validate_predicate(predicate: str, columns: Mapping[str, str], *, what: str = "where filter") -> Predicate:
    """Check a user SQL predicate over the cells table and return it with the statement to run.

    ``columns``: the cells table's column names -> DuckDB types (named in messages); ``what``: how messages name
    the predicate. InputError when it is empty, too long or too deeply nested, not valid SQL, or uses anything
    but the columns, literals, operators and functions listed in the module docstring.
    """
    text = predicate_text(predicate, what=what)
    sql = select_sql(text)
    tree = _parse(sql, text, what)
    try:
        _check_statements(tree)
        where = tree["statements"][0]["node"]["where_clause"]
        referenced = _check_where(where, {c.lower() for c in columns})
    except _Refused as exc:
        raise InputError(f"invalid {what} {shown(text)}: {exc.what} is not allowed. {allowed_help()}") from None
    except _UnknownColumn as exc:
        raise InputError(
            f"invalid {what} {shown(text)}: unknown column {exc.name!r}. Columns of the cells table: "
            f"{describe_columns(columns)}"
        ) from None
    actual = {c.lower(): c for c in columns}
    read = tuple(sorted({actual[c] for c in referenced if c in actual}))
    return Predicate(text=text, sql=_rendered(tree, text, what), columns=read,
                     negated_sql=_rendered(_negated(tree, text, what), text, what))


MAX_LISTED_COLUMNS = 40
"""Columns named in a message at most (then how many more)."""


def describe_columns(columns: Mapping[str, str]) -> str:
    """``name (TYPE), ...`` of the cells table, for messages: a name that is not printable or over 60 characters
    quoted and escaped (:func:`atlas.validate.escaped`; a name may hold a newline), at most
    :data:`MAX_LISTED_COLUMNS` of them."""
    items = list(columns.items())
    text = ", ".join(f"{name if name.isprintable() and len(name) <= 60 else escaped(name, 60)} ({kind})"
                     for name, kind in items[:MAX_LISTED_COLUMNS])
    return text + (f" and {len(items) - MAX_LISTED_COLUMNS} more" if len(items) > MAX_LISTED_COLUMNS else "")


# -- parsing ----------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_VALIDATOR: list[Any] = []  # the private in-memory connection, made on first use


def _validator() -> Any:
    """The in-memory DuckDB connection predicates are parsed on (file access and extension loading off)."""
    import duckdb

    if not _VALIDATOR:
        con = duckdb.connect(":memory:", config=dict(_VALIDATOR_CONFIG))
        con.execute("SET lock_configuration=true")
        _VALIDATOR.append(con)
    return _VALIDATOR[0]


def _rendered(tree: dict[str, Any], text: str, what: str) -> str:
    """The SQL DuckDB writes back from the checked syntax tree: what runs is exactly what was checked, even where
    the parser drops a clause it does not keep in the tree (an unused ``WINDOW``)."""
    import duckdb

    try:
        with _LOCK:
            row = _validator().execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchall()
    except duckdb.Error:
        raise InputError(f"invalid {what} {shown(text)}: DuckDB could not write it back as SQL; simplify it") from None
    return str(row[0][0])


def _negated(tree: dict[str, Any], text: str, what: str) -> dict[str, Any]:
    """The checked statement's tree with ``NOT (...)`` around its WHERE clause: built on the tree, so that the
    negation covers exactly the expression that was checked (text such as ``a) OR (b`` is one expression only once
    parsed)."""
    negated = _parse(select_sql("NOT (TRUE)"), text, what)
    where = negated["statements"][0]["node"]["where_clause"]
    if where.get("type") != "OPERATOR_NOT" or len(where.get("children") or []) != 1:
        raise InputError(f"invalid {what} {shown(text)}: DuckDB gave an unexpected syntax tree for its negation")
    where["children"][0] = tree["statements"][0]["node"]["where_clause"]
    return negated


def _parse(sql: str, text: str, what: str) -> dict[str, Any]:
    """DuckDB's syntax tree of ``sql`` (nothing is executed); InputError when it is not valid SQL."""
    import duckdb

    try:
        with _LOCK:
            raw = _validator().execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
        tree = json.loads(raw)
    except RecursionError:
        raise _too_deep(text, what) from None
    except duckdb.Error as exc:  # the parser itself gave up: name the error class only
        raise InputError(f"invalid {what} {shown(text)}: DuckDB could not parse it ({type(exc).__name__})") from None
    if not isinstance(tree, dict):
        raise InputError(f"invalid {what} {shown(text)}: DuckDB gave no syntax tree for it")
    if tree.get("error"):
        message = str(tree.get("error_message") or "")
        if "expression depth" in message:
            raise _too_deep(text, what)
        first = message.strip().splitlines()[0] if message.strip() else "a syntax error"
        if ";" in text or "Only SELECT" in first:
            raise InputError(
                f"invalid {what} {shown(text)}: it must be one SQL predicate, not several statements (no ';' and no "
                f"statement other than the condition itself); e.g. \"{EXAMPLE}\""
            )
        raise InputError(
            f"invalid {what} {shown(text)}: not a valid SQL predicate ({first}). Write one condition over the "
            f"columns of the cells table, e.g. \"{EXAMPLE}\""
        )
    statements = tree.get("statements")
    if not isinstance(statements, list) or len(statements) != 1:
        raise InputError(
            f"invalid {what} {shown(text)}: it must be one SQL predicate, not several statements (no ';'); "
            f"e.g. \"{EXAMPLE}\""
        )
    return tree


def _too_deep(text: str, what: str) -> InputError:
    return InputError(
        f"invalid {what} {shown(text)}: it is nested more than {MAX_DEPTH} levels deep; flatten it "
        f"(e.g. IN (...) instead of nested ORs), as in \"{EXAMPLE}\""
    )


# -- the statement around the predicate --------------------------------------------------------------------------


def _empty(value: Any) -> bool:
    """``value`` holds nothing (None, "", False, 0, empty containers, or dicts/lists of such)."""
    if isinstance(value, dict):
        return all(_empty(v) for v in value.values())
    if isinstance(value, list):
        return all(_empty(v) for v in value)
    return not value


def _check_statements(tree: dict[str, Any]) -> None:
    """The one statement is ``SELECT soma_joinid FROM cells WHERE ...`` and nothing more."""
    statement = tree["statements"][0]
    node = statement.get("node") or {}
    kind = node.get("type")
    if kind == "SET_OPERATION_NODE":
        raise _Refused("UNION / INTERSECT / EXCEPT")
    if kind != "SELECT_NODE":
        raise _Refused(f"a {str(kind).lower()} statement")
    if not _empty(statement.get("named_param_map")):
        raise _Refused("a parameter")
    select = node.get("select_list") or []
    ok_select = (
        len(select) == 1
        and select[0].get("class") == "COLUMN_REF"
        and select[0].get("column_names") == [ID_COLUMN]
        and not select[0].get("alias")
    )
    if not ok_select:
        raise _Refused("selecting anything but the cell ids")
    _check_from(node.get("from_table") or {})
    known = {"type", "select_list", "from_table", "where_clause", "aggregate_handling"}
    for key, value in node.items():
        if key not in known and not _empty(value):
            raise _Refused(_clause_name(key))
    if node.get("aggregate_handling", "STANDARD_HANDLING") != "STANDARD_HANDLING":
        raise _Refused("GROUP BY ALL")
    if node.get("where_clause") is None:
        raise _Refused("an empty condition")


def _clause_name(key: str) -> str:
    names = {"modifiers": "ORDER BY / LIMIT / DISTINCT", "cte_map": "WITH (a common table expression)",
             "group_expressions": "GROUP BY", "group_sets": "GROUP BY", "having": "HAVING", "qualify": "QUALIFY",
             "sample": "USING SAMPLE"}
    return names.get(key, f"a {key} clause")


def _check_from(table: dict[str, Any]) -> None:
    """The FROM clause is the bare ``cells`` table (no alias, sample, time travel, join or function)."""
    if table.get("type") != "BASE_TABLE":
        raise _Refused("a join or table function")
    plain = (
        table.get("table_name") == CELLS_TABLE
        and not table.get("schema_name")
        and not table.get("catalog_name")
        and not table.get("alias")
    )
    if not plain:
        raise _Refused("a table other than cells")
    known = {"type", "table_name", "schema_name", "catalog_name", "alias", "query_location",
             "query_location_length", "qualified_name"}
    for key, value in table.items():
        if key not in known and not _empty(value):
            raise _Refused(f"{key.upper()} on the table")


# -- the WHERE clause ----------------------------------------------------------------------------------------------


class _UnknownColumn(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _check_where(root: Any, columns: set[str]) -> set[str]:
    """Walk the WHERE clause (iteratively, at most :data:`MAX_DEPTH` deep); raise on anything not allowed. Returns
    the (lower-cased) names of the columns it reads."""
    referenced: set[str] = set()
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Refused(f"nesting deeper than {MAX_DEPTH} levels")
        for child in _check_node(node, columns):
            stack.append((child, depth + 1))
        if node.get("class") == "COLUMN_REF":  # checked by _check_node: one bare, known name
            referenced.add(str(node["column_names"][0]).lower())
    return referenced


def _check_node(node: Any, columns: set[str]) -> list[Any]:
    """Check one expression node on its own; return its child expressions."""
    if not isinstance(node, dict):
        raise _Refused("an unrecognised expression")
    cls = str(node.get("class"))
    fields = _NODE_FIELDS.get(cls)
    if fields is None:
        raise _Refused(_CONSTRUCTS.get(cls, f"a {cls.lower()} expression"))
    for key, value in node.items():
        if key not in _NODE_META and key not in fields and not _empty(value):
            raise _Refused(f"the {key} of a {cls.lower()} expression")
    if node.get("alias"):
        raise _Refused("an alias (AS)")
    return _CHECKS[cls](node, columns)


def _column_ref(node: dict[str, Any], columns: set[str]) -> list[Any]:
    names = node.get("column_names") or []
    if len(names) != 1 or not isinstance(names[0], str):
        raise _Refused(f"the qualified name {'.'.join(map(str, names))!r} (use a bare column name)")
    if names[0].lower() not in columns:
        raise _UnknownColumn(names[0])
    return []


def _constant(node: dict[str, Any], columns: set[str]) -> list[Any]:
    return []


def _comparison(node: dict[str, Any], columns: set[str]) -> list[Any]:
    if node.get("type") not in _COMPARISONS:
        raise _Refused(f"the comparison {node.get('type')}")
    return [node.get("left"), node.get("right")]


def _conjunction(node: dict[str, Any], columns: set[str]) -> list[Any]:
    if node.get("type") not in ("CONJUNCTION_AND", "CONJUNCTION_OR"):
        raise _Refused(f"the conjunction {node.get('type')}")
    return list(node.get("children") or [])


def _operator(node: dict[str, Any], columns: set[str]) -> list[Any]:
    kind = str(node.get("type"))
    if kind not in _OPERATORS:
        raise _Refused(f"the operator {kind} (e.g. [] indexing, struct or list construction)")
    return list(node.get("children") or [])


def _between(node: dict[str, Any], columns: set[str]) -> list[Any]:
    return [node.get("input"), node.get("lower"), node.get("upper")]


def _case(node: dict[str, Any], columns: set[str]) -> list[Any]:
    out: list[Any] = []
    for check in node.get("case_checks") or []:
        if not isinstance(check, dict) or set(check) - {"when_expr", "then_expr"}:
            raise _Refused("an unrecognised CASE branch")
        out += [check.get("when_expr"), check.get("then_expr")]
    if node.get("else_expr") is not None:
        out.append(node["else_expr"])
    return out


def _collate(node: dict[str, Any], columns: set[str]) -> list[Any]:
    return [node.get("child")]


def _cast(node: dict[str, Any], columns: set[str]) -> list[Any]:
    type_expr = node.get("type_expr")
    if type_expr is not None:
        _check_type(type_expr)
    else:  # older DuckDB: the target type as a LogicalType
        cast_type = node.get("cast_type") or {}
        name = str(cast_type.get("id", "")).lower()
        if name not in CAST_TYPES or not _empty(cast_type.get("type_info")):
            raise _Refused(f"a CAST to {name or 'an unrecognised type'}")
    return [node.get("child")]


def _check_type(type_expr: Any) -> None:
    """A CAST target: a plain scalar type, with at most literal modifiers (DECIMAL(10, 2), VARCHAR(20))."""
    if not isinstance(type_expr, dict) or type_expr.get("class") != "TYPE":
        raise _Refused("a CAST to an unrecognised type")
    name = str(type_expr.get("type_name", ""))
    if name.lower() not in CAST_TYPES or type_expr.get("schema") or type_expr.get("catalog"):
        raise _Refused(f"a CAST to {name}")
    for mod in type_expr.get("children") or []:
        if not isinstance(mod, dict) or mod.get("class") != "CONSTANT":
            raise _Refused(f"a CAST to {name} with a non-literal modifier")
    known = {"class", "type", "alias", "query_location", "query_location_length", "catalog", "schema",
             "type_name", "children", "qualified_name"}
    for key, value in type_expr.items():
        if key not in known and not _empty(value):
            raise _Refused(f"a CAST to {name} with {key}")


def _function(node: dict[str, Any], columns: set[str]) -> list[Any]:
    name = str(node.get("function_name", ""))
    if name.lower() not in FUNCTIONS:
        raise _Refused(f"the function {name}()")
    if node.get("schema") or node.get("catalog"):
        raise _Refused(f"a schema-qualified function ({node.get('catalog') or ''}.{node.get('schema')}.{name})")
    if node.get("distinct") or node.get("export_state") or not _empty(node.get("filter")):
        raise _Refused(f"DISTINCT / FILTER / EXPORT_STATE on {name}()")
    order_bys = node.get("order_bys") or {}
    if not isinstance(order_bys, dict) or not _empty(order_bys.get("orders")):
        raise _Refused(f"ORDER BY inside {name}()")
    return list(_arguments(node, name))


def _arguments(node: dict[str, Any], name: str) -> Iterator[Any]:
    """A function's argument expressions; named arguments (``x := 1``) are refused."""
    if "arguments" in node:
        for arg in node.get("arguments") or []:
            if not isinstance(arg, dict) or arg.get("name") or set(arg) - {"name", "expression"}:
                raise _Refused(f"a named argument to {name}()")
            yield arg.get("expression")
    else:
        yield from node.get("children") or []


_CHECKS = {
    "COLUMN_REF": _column_ref, "CONSTANT": _constant, "COMPARISON": _comparison, "CONJUNCTION": _conjunction,
    "OPERATOR": _operator, "BETWEEN": _between, "CAST": _cast, "CASE": _case, "COLLATE": _collate,
    "FUNCTION": _function,
}
