"""Just enough PromQL for the shipped rules: metric names of any expression, and an evaluator.

`metric_names` finds every metric an expression selects (strings, label matchers, ranges and
grouping clauses removed; functions, aggregations and keywords skipped).

`evaluate` understands a small subset, on one instant (samples from one scrape, as Prometheus
would store them): numbers, `time()`, selectors with `=`, `!=`, `=~` matchers, `max|min|sum by
(labels) (expr)`, binary `-`, and comparisons `>`, `<`, `==` between a vector and a scalar, or
two vectors with `on (labels) group_left ()`. Anything else raises, so a rule rewritten beyond
it fails loudly instead of being checked by something that does not understand it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.samples import Sample

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]
Value = Vector | float

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {
        *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile"),
        *("count_values", "group", "by", "without", "on", "ignoring", "group_left"),
        *("group_right", "and", "or", "unless", "offset", "bool", "inf", "nan"),
    }
)


def metric_names(expr: str) -> set[str]:
    """Every metric name the expression selects."""
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub('""', expr))))
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if match.group() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(match.group())
    return names


def instant(samples: Iterable[Sample], **target: str) -> dict[str, Vector]:
    """Scraped samples by name, with the target labels Prometheus attaches (job, instance)."""
    found: dict[str, Vector] = {}
    for s in samples:
        labels = frozenset({**s.labels, **target, "__name__": s.name}.items())
        found.setdefault(s.name, {})[labels] = s.value
    return found


_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<name>[A-Za-z_:][\w:]*)"
    r"|(?P<str>\"(?:[^\"\\]|\\.)*\")|(?P<op>=~|!=|==|[-+*/<>(){},=]))"
)


def _tokens(expr: str) -> list[str]:
    tokens, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"cannot read {expr[pos:]!r}")
        tokens.append(match.group().strip())
        pos = match.end()
    return tokens


@dataclass
class _Parser:
    tokens: list[str]
    series: Mapping[str, Vector]
    now: float
    at: int = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected!r} at {token!r}")
        self.at += 1
        return token

    def comparison(self) -> Value:
        left = self.difference()
        op = self.peek()
        if op not in (">", "<", "=="):
            return left
        self.take()
        on = self._matching()
        return _compare(left, op, self.difference(), on)

    def _matching(self) -> tuple[str, ...] | None:
        if self.peek() != "on":
            return None
        self.take()
        on = self._labels()
        self.take("group_left")
        if self._labels():
            raise ValueError("group_left with labels is not supported")
        return on

    def difference(self) -> Value:
        value = self.term()
        while self.peek() == "-":
            self.take()
            value = _minus(value, self.term())
        return value

    def term(self) -> Value:
        token = self.take()
        if token == "(":
            inner = self.comparison()
            self.take(")")
            return inner
        if re.fullmatch(r"\d.*", token):
            return float(token)
        if token == "time":
            self.take("(")
            self.take(")")
            return self.now
        if token in ("max", "min", "sum"):
            return self._aggregate(token)
        return self._select(token)

    def _aggregate(self, op: str) -> Vector:
        self.take("by")
        by = self._labels()
        self.take("(")
        inner = self.comparison()
        self.take(")")
        if not isinstance(inner, dict):
            raise ValueError(f"{op} of a scalar")
        groups: dict[Labels, list[float]] = {}
        for labels, value in inner.items():
            key = frozenset((k, v) for k, v in labels if k in by)
            groups.setdefault(key, []).append(value)
        return {key: _AGGREGATE[op](values) for key, values in groups.items()}

    def _select(self, name: str) -> Vector:
        matchers = []
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label, op, text = self.take(), self.take(), self.take()
                matchers.append((label, op, text[1:-1]))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        return {
            labels: value
            for labels, value in self.series.get(name, {}).items()
            if all(_matches(dict(labels).get(k, ""), op, v) for k, op, v in matchers)
        }

    def _labels(self) -> tuple[str, ...]:
        self.take("(")
        names = []
        while self.peek() != ")":
            token = self.take()
            if token != ",":
                names.append(token)
        self.take(")")
        return tuple(names)


def _matches(actual: str, op: str, wanted: str) -> bool:
    if op == "=":
        return actual == wanted
    if op == "!=":
        return actual != wanted
    if op == "=~":
        return re.fullmatch(wanted, actual) is not None
    raise ValueError(f"matcher {op!r} is not supported")


def _drop_name(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _minus(left: Value, right: Value) -> Value:
    if isinstance(left, float) and isinstance(right, dict):
        return {_drop_name(k): left - v for k, v in right.items()}
    if isinstance(left, dict) and isinstance(right, float):
        return {_drop_name(k): v - right for k, v in left.items()}
    raise ValueError("only scalar - vector and vector - scalar are supported")


_AGGREGATE: Mapping[str, Callable[[list[float]], float]] = {
    "max": max,
    "min": min,
    "sum": lambda values: float(sum(values)),
}
_COMPARE: Mapping[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


def _compare(left: Value, op: str, right: Value, on: tuple[str, ...] | None) -> Vector:
    test = _COMPARE[op]
    if not isinstance(left, dict):
        raise ValueError("the left side of a comparison must be a vector")
    if isinstance(right, float):
        if on is not None:
            raise ValueError("on () with a scalar")
        return {k: v for k, v in left.items() if test(v, right)}
    if on is None:
        raise ValueError("vector comparisons need on (...) group_left ()")
    by_key = {frozenset((k, v) for k, v in labels if k in on): v for labels, v in right.items()}
    if len(by_key) != len(right):
        raise ValueError("many-to-many matching: the right side repeats a label set")
    found = {}
    for labels, value in left.items():
        other = by_key.get(frozenset((k, v) for k, v in labels if k in on))
        if other is not None and test(value, other):
            found[labels] = value
    return found


def evaluate(expr: str, series: Mapping[str, Vector], now: float) -> Value:
    """The expression's value at `now` over one scrape's `series` (see the module docstring)."""
    parser = _Parser(_tokens(expr), series, now)
    value = parser.comparison()
    if parser.peek() is not None:
        raise ValueError(f"unsupported PromQL from {parser.peek()!r}")
    return value
