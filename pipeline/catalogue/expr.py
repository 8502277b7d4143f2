"""A small, safe filter language for catalogue queries, parsed into Arrow expressions.

Examples::

    feh < -1 and mgfe_std < 0.05
    release in ('DR5', 'DR6') and not has_flag(low_snr, high_std)
    teff between 4000 and 5200 and (logg < 3.5 or object is null)
    abs(alfe - mgfe) > 0.2 and processed_at >= '2026-01-01'

Grammar (keywords are case-insensitive; column names are exact, `backticks` quote odd ones)::

    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := sum [ op sum | "is" ["not"] "null" | ["not"] "in" "(" literal ("," literal)* ")"
                        | ["not"] "between" sum "and" sum ]          op: < <= > >= = == != <>
    sum        := term (("+" | "-") term)*
    term       := unary (("*" | "/") unary)*
    unary      := "-" unary | primary
    primary    := number | 'string' | "string" | true | false | column | function "(" args ")"
                  | "(" or_expr ")"
    function   := abs(sum) | has_flag(flag, ...)      (flags: see pipeline/flags.py)

The text is tokenised and parsed by hand into typed nodes (:mod:`.expr_ast`), never evaluated as
Python, so a query can read columns and nothing else; errors name the problem and point at it. The
nodes become Arrow expressions (:mod:`.expr_arrow`, the reference semantics) or DuckDB SQL with the
same results (:mod:`.expr_sql`, what ``speclabel query`` runs).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speclabel.core.errors import UsageError
from speclabel.core.flags import flag_by_name, flag_names

from .expr_arrow import arithmetic_type, to_arrow
from .expr_ast import (
    TIMESTAMP,
    Abs,
    Arithmetic,
    Cast,
    Column,
    Compare,
    Expr,
    HasFlag,
    In,
    IsNull,
    Literal,
    Logical,
    Negate,
    Not,
)


class QueryError(UsageError):
    """A query (filter, column list, cone) is not valid; the message says where and why."""


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
  | (?P<quoted>`[^`]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|<>|==|=|<|>|\+|-|\*|/|\(|\)|,)
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "between", "true", "false"}
_COMPARISONS = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "=": "=", "==": "=", "!=": "!=", "<>": "!="}
_FUNCTIONS = ("abs", "has_flag")
MAX_QUERY_LENGTH = 10_000
_INTEGER_TYPES = (pa.int8(), pa.int16(), pa.int32(), pa.int64())


@dataclass(frozen=True)
class Token:
    kind: str  # number, string, name, keyword, op, end
    text: str
    pos: int


def unknown_column(name: str, names: list[str], *, where: str = "") -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; columns are: {', '.join(names)}"
    return f"unknown column {name!r}{where}{hint}"


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_QUERY_LENGTH:
        raise QueryError(f"query is {len(text)} characters long; the limit is {MAX_QUERY_LENGTH}")
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise QueryError(_pointed(f"unexpected character {text[pos]!r}", text, pos, 1))
        kind, token_text = match.lastgroup, match.group()
        if kind == "name" and token_text.lower() in _KEYWORDS:
            kind, token_text = "keyword", token_text.lower()
        elif kind == "quoted":
            kind, token_text = "name", token_text[1:-1]
        if kind != "space":
            tokens.append(Token(kind, token_text, pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _pointed(message: str, text: str, pos: int, length: int) -> str:
    return f"{message}\n  {text}\n  {' ' * pos}{'^' * max(1, length)} (position {pos})"


def _unquote(token_text: str) -> str:
    quote = token_text[0]
    body = token_text[1:-1].replace(quote * 2, quote)
    return re.sub(r"\\(.)", r"\1", body)


class Parser:
    """Recursive descent over the tokens of one query, against the columns of ``schema``."""

    def __init__(self, text: str, schema: pa.Schema) -> None:
        self.text = text
        self.schema = schema
        self.tokens = tokenize(text)
        self.i = 0

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def token(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def accept(self, *texts: str) -> Token | None:
        if self.token.kind in ("keyword", "op") and self.token.text in texts:
            return self.advance()
        return None

    def expect(self, text: str, what: str) -> Token:
        token = self.accept(text)
        if token is None:
            self.fail(f"expected {what}, found {self.describe(self.token)}", self.token)
        return token

    def fail(self, message: str, token: Token | Expr, length: int | None = None):
        pos = token.pos
        if length is None:
            length = len(token.text) if isinstance(token, Token) else 1
        raise QueryError(_pointed(message, self.text, pos, length))

    @staticmethod
    def describe(token: Token) -> str:
        return "the end of the query" if token.kind == "end" else repr(token.text)

    # -- grammar ----------------------------------------------------------------------------------

    def parse(self, *, condition: bool = True) -> Expr:
        if self.token.kind == "end":
            raise QueryError("the query is empty")
        node = self.or_expr()
        if self.token.kind != "end":
            self.fail(f"unexpected {self.describe(self.token)} (missing 'and' / 'or'?)", self.token)
        if condition and node.kind != "bool":
            self.fail(f"the query must be a condition (e.g. feh < -1), not a {node.kind}", node)
        return node

    def or_expr(self) -> Expr:
        node = self.and_expr()
        while op := self.accept("or"):
            node = self.logical(node, self.and_expr(), op)
        return node

    def and_expr(self) -> Expr:
        node = self.not_expr()
        while op := self.accept("and"):
            node = self.logical(node, self.not_expr(), op)
        return node

    def not_expr(self) -> Expr:
        if op := self.accept("not"):
            node = self.not_expr()
            self.require(node, "bool", f"'not' needs a condition, not a {node.kind}")
            return Not(node, pos=op.pos)
        return self.comparison()

    def logical(self, left: Expr, right: Expr, op: Token) -> Expr:
        for side in (left, right):
            self.require(side, "bool", f"'{op.text}' joins conditions, not a {side.kind}")
        return Logical(op.text, left, right, pos=left.pos)

    def comparison(self) -> Expr:
        left = self.sum()
        token = self.token
        if token.kind == "op" and token.text in _COMPARISONS:
            self.advance()
            if self.token.kind == "keyword" and self.token.text == "null":
                self.fail("compare with null using 'is null' or 'is not null'", self.token)
            right = self.sum()
            left, right = self.comparable(left, right, token)
            if token.text not in ("=", "==", "!=", "<>") and left.kind == "bool":
                self.fail(f"'{token.text}' does not order true/false values", token)
            return Compare(_COMPARISONS[token.text], left, right, pos=left.pos)
        if self.accept("is"):
            negate = self.accept("not") is not None
            self.expect("null", "'null' after 'is'")
            test = IsNull(left, pos=left.pos)
            return Not(test, pos=left.pos) if negate else test
        negate = self.accept("not")
        if self.accept("in"):
            return self.membership(left, negate is not None)
        if self.accept("between"):
            low = self.sum()
            self.expect("and", "'and' between the bounds of 'between'")
            high = self.sum()
            left_low, low = self.comparable(left, low, token)
            left_high, high = self.comparable(left, high, token)
            inside = Logical(
                "and",
                Compare(">=", left_low, low, pos=left.pos),
                Compare("<=", left_high, high, pos=left.pos),
                pos=left.pos,
            )
            return Not(inside, pos=left.pos) if negate else inside
        if negate:
            self.fail("expected 'in' or 'between' after 'not'", self.token)
        return left

    def membership(self, left: Expr, negate: bool) -> Expr:
        self.expect("(", "'(' to start the list of values")
        values = []
        while True:
            item = self.unary()
            if not isinstance(item, Literal):
                self.fail("'in (...)' takes literal values (numbers or quoted strings)", item)
            _, item = self.comparable(left, item, self.token)
            values.append(item.value)
            if not self.accept(","):
                break
        self.expect(")", "',' or ')' in the list of values")
        if isinstance(left, Literal):
            self.fail("'in' needs a column on its left", left)
        operand = left
        try:  # a safe cast: 2.5 must not become 2 for an integer column
            value_set = pa.array(values)
            if isinstance(left, Column):
                value_set = value_set.cast(left.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            operand = Cast(left, pa.float64(), pos=left.pos)
            value_set = pa.array(values, pa.float64())
        test = In(operand, value_set, pos=left.pos)
        return Not(test, pos=left.pos) if negate else test

    def sum(self) -> Expr:
        node = self.term()
        while op := self.accept("+", "-"):
            node = self.arithmetic(node, self.term(), op)
        return node

    def term(self) -> Expr:
        node = self.unary()
        while op := self.accept("*", "/"):
            node = self.arithmetic(node, self.unary(), op)
        return node

    def arithmetic(self, left: Expr, right: Expr, op: Token) -> Expr:
        for side in (left, right):
            self.require(side, "number", f"'{op.text}' needs numbers, not a {side.kind}")
        dtype = arithmetic_type(op.text, left.dtype, right.dtype)
        return Arithmetic(op.text, left, right, dtype, pos=left.pos)

    def unary(self) -> Expr:
        if op := self.accept("-"):
            node = self.unary()
            self.require(node, "number", f"'-' needs a number, not a {node.kind}")
            if isinstance(node, Literal):
                return self.number(-node.value, op)
            return Negate(node, pos=op.pos)
        return self.primary()

    def number(self, value: int | float, token: Token) -> Literal:
        """A number literal of the narrowest type that holds it exactly, as Arrow binds literals (so
        ``sky + 1`` stays int32 and ``snr * 0.5`` float32, while ``snr * 0.1`` is float64)."""
        if isinstance(value, int):
            for dtype in _INTEGER_TYPES:
                if -(2 ** (dtype.bit_width - 1)) <= value < 2 ** (dtype.bit_width - 1):
                    return Literal(value, dtype, pos=token.pos)
            self.fail(f"{value} is out of range for a 64-bit integer (write it as {value:.3e})", token)
        with np.errstate(over="ignore"):
            single = float(np.float32(value)) == value
        return Literal(value, pa.float32() if single else pa.float64(), pos=token.pos)

    def primary(self) -> Expr:
        token = self.advance()
        if token.kind == "number":
            value = float(token.text) if re.search(r"[.eE]", token.text) else int(token.text)
            return self.number(value, token)
        if token.kind == "string":
            return Literal(_unquote(token.text), pa.string(), pos=token.pos)
        if token.kind == "keyword" and token.text in ("true", "false"):
            return Literal(token.text == "true", pa.bool_(), pos=token.pos)
        if token.kind == "op" and token.text == "(":
            node = self.or_expr()
            self.expect(")", "')'")
            return node
        if token.kind == "name":
            if self.token.kind == "op" and self.token.text == "(":
                return self.function(token)
            if token.text not in self.schema.names:
                hint = f" (to compare with a text value, quote it: '{token.text}')"
                self.fail(unknown_column(token.text, self.schema.names) + hint, token)
            return Column(token.text, self.schema.field(token.text).type, pos=token.pos)
        self.fail(f"expected a column, a number or a quoted string, found {self.describe(token)}", token)

    def function(self, name: Token) -> Expr:
        self.advance()  # "("
        if name.text.lower() == "abs":
            arg = self.sum()
            self.expect(")", "')' after the argument of abs")
            self.require(arg, "number", f"abs() needs a number, not a {arg.kind}")
            return Abs(arg, pos=name.pos)
        if name.text.lower() == "has_flag":
            if "flags" not in self.schema.names:
                self.fail("has_flag() needs the 'flags' column, which this catalogue lacks", name)
            bits = 0
            while True:
                token = self.advance()
                if token.kind not in ("name", "string"):
                    self.fail(f"has_flag() takes flag names: {', '.join(flag_names())}", token)
                flag = _unquote(token.text) if token.kind == "string" else token.text
                try:
                    bits |= flag_by_name(flag)
                except KeyError:
                    self.fail(f"unknown flag {flag!r}; flags are: {', '.join(flag_names())}", token)
                if not self.accept(","):
                    break
            self.expect(")", "',' or ')' in has_flag(...)")
            return HasFlag(int(bits), pos=name.pos)
        self.fail(f"unknown function {name.text!r}; functions are: {', '.join(_FUNCTIONS)}", name)

    # -- types ------------------------------------------------------------------------------------

    def require(self, node: Expr, kind: str, message: str) -> None:
        if node.kind != kind:
            self.fail(message, node)

    def comparable(self, left: Expr, right: Expr, op: Token) -> tuple[Expr, Expr]:
        """Both sides, made comparable (a quoted date against a timestamp column), or an error."""
        if left.kind == right.kind and left.kind != "other":
            return left, right
        for a, b in ((left, right), (right, left)):
            if a.kind == "timestamp" and b.kind == "string" and isinstance(b, Literal):
                stamp = Literal(_timestamp(b, self), TIMESTAMP, pos=b.pos)
                return (a, stamp) if a is left else (stamp, a)
        bad = right if left.kind != "other" else left
        self.fail(
            f"cannot compare a {left.kind} with a {right.kind}"
            + (" (quote strings: 'DR5')" if "string" in (left.kind, right.kind) else ""),
            bad,
        )


def _timestamp(node: Literal, parser: Parser) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(node.value)
    except ValueError:
        parser.fail(
            f"{node.value!r} is not an ISO date or time (e.g. '2026-01-31' or '2026-01-31T12:00Z')", node
        )
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value


def parse(text: str, schema: pa.Schema, *, condition: bool = True) -> Expr:
    """The parsed, type-checked query over a table with ``schema`` (a condition unless
    ``condition=False``, which also accepts a number such as ``mg1 - feh``); raises :class:`QueryError`."""
    return Parser(text, schema).parse(condition=condition)


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """The Arrow filter expression of a query over a table with ``schema``; raises :class:`QueryError`."""
    return to_arrow(parse(text, schema))


def parse_value(text: str, schema: pa.Schema) -> pc.Expression:
    """The float64 Arrow expression of a number computed from columns (``MG1 - FEH - 7.53``), in the
    language of :func:`parse_where` (arithmetic, ``abs``, parentheses); raises :class:`QueryError`."""
    node = parse(text, schema, condition=False)
    if node.kind != "number":
        raise QueryError(f"the expression must be a number (e.g. MG1 - FEH), not a {node.kind}")
    return to_arrow(node).cast(pa.float64())


def split_conjunction(text: str) -> list[str]:
    """The parts of ``a and b and c`` joined by top-level ``and`` (one part when an ``or`` joins them at
    the top level): the cuts of a selection, each reported on its own. ``between x and y`` stays whole."""
    tokens = tokenize(text)
    depth, open_between, starts, ends = 0, 0, [0], []
    for token in tokens[:-1]:
        if token.kind == "op" and token.text in "()":
            depth += 1 if token.text == "(" else -1
        elif depth == 0 and token.kind == "keyword" and token.text == "or":
            return [text.strip()]
        elif depth == 0 and token.kind == "keyword" and token.text == "between":
            open_between += 1
        elif depth == 0 and token.kind == "keyword" and token.text == "and":
            if open_between:
                open_between -= 1
            else:
                ends.append(token.pos)
                starts.append(token.pos + len(token.text))
    ends.append(len(text))
    return [text[a:b].strip() for a, b in zip(starts, ends, strict=True)]
