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

The text is tokenised and parsed by hand into :mod:`pyarrow.compute` expressions, never evaluated as
Python, so a query can read columns and nothing else. Errors name the problem and point at it.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from speclabel.core.errors import UsageError
from speclabel.core.flags import flag_by_name, flag_names


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
_COMPARISONS = {"<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal"}
_COMPARISONS.update({"=": "equal", "==": "equal", "!=": "not_equal", "<>": "not_equal"})
_FUNCTIONS = ("abs", "has_flag")
MAX_QUERY_LENGTH = 10_000


@dataclass(frozen=True)
class Token:
    kind: str  # number, string, name, keyword, op, end
    text: str
    pos: int


@dataclass(frozen=True)
class Node:
    """A parsed sub-expression: its Arrow expression (or Python value for literals) and its kind."""

    value: object
    kind: str  # number, string, bool, timestamp, null, other
    pos: int
    literal: bool = False

    def expr(self) -> pc.Expression:
        return self.value if isinstance(self.value, pc.Expression) else pc.scalar(self.value)


def kind_of(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_timestamp(dtype):
        return "timestamp"
    return "other"


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

    def fail(self, message: str, token: Token | Node, length: int | None = None):
        pos = token.pos
        if length is None:
            length = len(token.text) if isinstance(token, Token) else 1
        raise QueryError(_pointed(message, self.text, pos, length))

    @staticmethod
    def describe(token: Token) -> str:
        return "the end of the query" if token.kind == "end" else repr(token.text)

    # -- grammar ----------------------------------------------------------------------------------

    def parse(self) -> pc.Expression:
        if self.token.kind == "end":
            raise QueryError("the query is empty")
        node = self.or_expr()
        if self.token.kind != "end":
            self.fail(f"unexpected {self.describe(self.token)} (missing 'and' / 'or'?)", self.token)
        if node.kind != "bool":
            self.fail(f"the query must be a condition (e.g. feh < -1), not a {node.kind}", node)
        return node.expr()

    def or_expr(self) -> Node:
        node = self.and_expr()
        while op := self.accept("or"):
            right = self.and_expr()
            node = self.logical(node, right, op, lambda a, b: a | b)
        return node

    def and_expr(self) -> Node:
        node = self.not_expr()
        while op := self.accept("and"):
            right = self.not_expr()
            node = self.logical(node, right, op, lambda a, b: a & b)
        return node

    def not_expr(self) -> Node:
        if op := self.accept("not"):
            node = self.not_expr()
            self.require(node, "bool", f"'not' needs a condition, not a {node.kind}")
            return Node(~node.expr(), "bool", op.pos)
        return self.comparison()

    def logical(self, left: Node, right: Node, op: Token, combine) -> Node:
        for side in (left, right):
            self.require(side, "bool", f"'{op.text}' joins conditions, not a {side.kind}")
        return Node(combine(left.expr(), right.expr()), "bool", left.pos)

    def comparison(self) -> Node:
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
            compare = getattr(pc, _COMPARISONS[token.text])
            return Node(compare(left.expr(), right.expr()), "bool", left.pos)
        if self.accept("is"):
            negate = self.accept("not") is not None
            self.expect("null", "'null' after 'is'")
            test = pc.is_null(left.expr())
            return Node(~test if negate else test, "bool", left.pos)
        negate = self.accept("not")
        if self.accept("in"):
            return self.membership(left, negate is not None)
        if self.accept("between"):
            low = self.sum()
            self.expect("and", "'and' between the bounds of 'between'")
            high = self.sum()
            left_low, low = self.comparable(left, low, token)
            left_high, high = self.comparable(left, high, token)
            inside = (left_low.expr() >= low.expr()) & (left_high.expr() <= high.expr())
            return Node(~inside if negate else inside, "bool", left.pos)
        if negate:
            self.fail("expected 'in' or 'between' after 'not'", self.token)
        return left

    def membership(self, left: Node, negate: bool) -> Node:
        self.expect("(", "'(' to start the list of values")
        values = []
        while True:
            item = self.unary()
            if not item.literal:
                self.fail("'in (...)' takes literal values (numbers or quoted strings)", item)
            _, item = self.comparable(left, item, self.token)
            values.append(item.value)
            if not self.accept(","):
                break
        self.expect(")", "',' or ')' in the list of values")
        if left.literal:
            self.fail("'in' needs a column on its left", left)
        column = left.expr()
        field_type = self.type_of(left)
        try:  # a safe cast: 2.5 must not become 2 for an integer column
            value_set = pa.array(values).cast(field_type) if field_type is not None else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            column, value_set = column.cast(pa.float64()), pa.array(values, pa.float64())
        test = pc.is_in(column, value_set=value_set)
        return Node(~test if negate else test, "bool", left.pos)

    def sum(self) -> Node:
        node = self.term()
        while op := self.accept("+", "-"):
            node = self.arithmetic(node, self.term(), op)
        return node

    def term(self) -> Node:
        node = self.unary()
        while op := self.accept("*", "/"):
            node = self.arithmetic(node, self.unary(), op)
        return node

    def arithmetic(self, left: Node, right: Node, op: Token) -> Node:
        for side in (left, right):
            self.require(side, "number", f"'{op.text}' needs numbers, not a {side.kind}")
        a, b = left.expr(), right.expr()
        if op.text == "/":  # integer columns would otherwise divide as integers
            a, b = a.cast(pa.float64()), b.cast(pa.float64())
        function = {"+": pc.add_checked, "-": pc.subtract_checked, "*": pc.multiply_checked, "/": pc.divide}
        return Node(function[op.text](a, b), "number", left.pos)

    def unary(self) -> Node:
        if op := self.accept("-"):
            node = self.unary()
            self.require(node, "number", f"'-' needs a number, not a {node.kind}")
            if node.literal:
                return Node(-node.value, "number", op.pos, literal=True)
            return Node(pc.negate_checked(node.expr()), "number", op.pos)
        return self.primary()

    def primary(self) -> Node:
        token = self.advance()
        if token.kind == "number":
            value = float(token.text) if re.search(r"[.eE]", token.text) else int(token.text)
            return Node(value, "number", token.pos, literal=True)
        if token.kind == "string":
            return Node(_unquote(token.text), "string", token.pos, literal=True)
        if token.kind == "keyword" and token.text in ("true", "false"):
            return Node(token.text == "true", "bool", token.pos, literal=True)
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
            return Node(pc.field(token.text), kind_of(self.schema.field(token.text).type), token.pos)
        self.fail(f"expected a column, a number or a quoted string, found {self.describe(token)}", token)

    def function(self, name: Token) -> Node:
        self.advance()  # "("
        if name.text.lower() == "abs":
            arg = self.sum()
            self.expect(")", "')' after the argument of abs")
            self.require(arg, "number", f"abs() needs a number, not a {arg.kind}")
            return Node(pc.abs_checked(arg.expr()), "number", name.pos)
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
            test = pc.bit_wise_and(pc.field("flags"), pc.scalar(pa.scalar(bits, pa.int32()))) != 0
            return Node(test, "bool", name.pos)
        self.fail(f"unknown function {name.text!r}; functions are: {', '.join(_FUNCTIONS)}", name)

    # -- types ------------------------------------------------------------------------------------

    def require(self, node: Node, kind: str, message: str) -> None:
        if node.kind != kind:
            self.fail(message, node)

    def type_of(self, node: Node) -> pa.DataType | None:
        if isinstance(node.value, pc.Expression):
            name = _field_name(node.value)
            if name is not None:
                return self.schema.field(name).type
        return None

    def comparable(self, left: Node, right: Node, op: Token) -> tuple[Node, Node]:
        """Both sides, made comparable (a quoted date against a timestamp column), or an error."""
        if left.kind == right.kind and left.kind != "other":
            return left, right
        for a, b in ((left, right), (right, left)):
            if a.kind == "timestamp" and b.kind == "string" and b.literal:
                stamp = Node(_timestamp(b, self), "timestamp", b.pos, literal=True)
                return (a, stamp) if a is left else (stamp, a)
        bad = right if left.kind != "other" else left
        self.fail(
            f"cannot compare a {left.kind} with a {right.kind}"
            + (" (quote strings: 'DR5')" if "string" in (left.kind, right.kind) else ""),
            bad,
        )


def _field_name(expr: pc.Expression) -> str | None:
    """The column name of a bare field reference, else None."""
    match = re.fullmatch(r"(\w+)", str(expr))
    return match.group(1) if match else None


def _timestamp(node: Node, parser: Parser) -> pa.Scalar:
    try:
        value = dt.datetime.fromisoformat(node.value)
    except ValueError:
        parser.fail(
            f"{node.value!r} is not an ISO date or time (e.g. '2026-01-31' or '2026-01-31T12:00Z')", node
        )
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return pa.scalar(value, pa.timestamp("us", tz="UTC"))


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """The Arrow filter expression of a query over a table with ``schema``; raises :class:`QueryError`."""
    return Parser(text, schema).parse()


def parse_value(text: str, schema: pa.Schema) -> pc.Expression:
    """The float64 Arrow expression of a number computed from columns (``MG1 - FEH - 7.53``), in the
    language of :func:`parse_where` (arithmetic, ``abs``, parentheses); raises :class:`QueryError`."""
    parser = Parser(text, schema)
    if parser.token.kind == "end":
        raise QueryError("the expression is empty")
    node = parser.or_expr()
    if parser.token.kind != "end":
        parser.fail(f"unexpected {parser.describe(parser.token)}", parser.token)
    parser.require(node, "number", f"the expression must be a number (e.g. MG1 - FEH), not a {node.kind}")
    return node.expr().cast(pa.float64())


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
