"""Sigma rules compiled to Python predicates over detection records.

pySigma parses and validates each rule, applies the ringfence field mapping pipeline and
resolves the condition (`1 of selection_*`, `not filter`, modifiers) into a tree of
ConditionAND/OR/NOT over field = value leaves. This module turns that tree into closures,
once per rule, and indexes rules by log source category and by the executable name a rule
requires, so each event is checked only against rules that could match it. Rules it cannot
evaluate faithfully are reported as unsupported with the reason; it never half-loads a rule.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sigma.collection import SigmaCollection
from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.exceptions import SigmaError
from sigma.rule import SigmaDetection, SigmaDetectionItem, SigmaRule
from sigma.types import (
    CompareOperators,
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaExpansion,
    SigmaFieldReference,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaRegularExpressionFlag,
    SigmaString,
    SpecialChars,
)

from server.detection import RuleError
from server.detection.fields import (
    FIELD_MAPPING,
    RINGFENCE_FIELDS,
    Fields,
    Record,
    fields_of,
    lowered,
    sigma_pipeline,
    unmappable_reason,
)

logger = logging.getLogger(__name__)

PACK_DIR = Path(__file__).parent / "rules" / "sigma-linux"
MAX_RULE_BYTES = 256 << 10
SEVERITIES = ("informational", "low", "medium", "high", "critical")
MEMO_ENTRIES = 65_536        # remembered verdicts (distinct field values) before starting over


class Facts(NamedTuple):
    """A record as predicates see it: raw text by field and lower-cased text by field, each
    computed on first use (`facts.raw[name]` is None when the event has no such field)."""

    raw: Fields
    low: Fields


Predicate = Callable[[Facts], bool]


class Unsupported(Exception):
    """Raised while compiling: the rule uses something this evaluator cannot do faithfully."""


@dataclass(frozen=True)
class RuleInfo:
    rule_id: str
    title: str
    level: str
    status: str
    author: str
    description: str
    category: str
    product: str
    source: str                         # file path or "custom:<id>"
    tags: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    falsepositives: tuple[str, ...] = ()
    sigma_fields: tuple[str, ...] = ()  # Sigma field names the detection uses

    @property
    def severity(self) -> str:
        return self.level if self.level in SEVERITIES else "medium"


@dataclass(frozen=True)
class CompiledRule:
    info: RuleInfo
    predicate: Predicate = field(repr=False)
    # Lower-cased executable base names one of which the event must have, or None when the
    # rule must be checked against every event of its category.
    anchors: frozenset[str] | None = None
    # Record fields the rule reads; None when it searches every value (keywords).
    fields: frozenset[str] | None = frozenset()
    # The resolved condition trees (OR-ed), from which RuleIndex generates its matchers.
    trees: tuple[object, ...] = field(default=(), repr=False, compare=False)

    def matches(self, facts: Facts) -> bool:
        return self.predicate(facts)


@dataclass(frozen=True)
class UnsupportedRule:
    info: RuleInfo
    reason: str
    unmapped_fields: tuple[str, ...] = ()


LoadedRule = CompiledRule | UnsupportedRule


def facts_of(record: Record) -> Facts:
    """Facts of a ready-made record (tests, tools)."""
    return facts_of_fields(fields_of(record))


def facts_of_fields(raw: Fields) -> Facts:
    return Facts(raw, lowered(raw))


# -- leaves ---------------------------------------------------------------------------------

@dataclass
class _Strings:
    """String patterns of one field (OR-ed): plain comparisons and regular expressions."""

    eq: set[str] = field(default_factory=set)
    starts: list[str] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    contains: list[str] = field(default_factory=list)
    regexes: list[re.Pattern[str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.eq or self.starts or self.ends or self.contains or self.regexes)

    def matcher(self) -> Callable[[str], bool]:
        eq, starts, ends = frozenset(self.eq), tuple(self.starts), tuple(self.ends)
        contains, regexes = tuple(self.contains), tuple(self.regexes)

        def test(v: str) -> bool:
            if v in eq or (starts and v.startswith(starts)) or (ends and v.endswith(ends)):
                return True
            for c in contains:
                if c in v:
                    return True
            for r in regexes:
                if r.search(v):
                    return True
            return False
        return test

    def predicate(self, view: int, name: str) -> Predicate:
        test = self.matcher()

        def on_field(facts: Facts) -> bool:
            v = facts[view][name]
            return v is not None and test(v)
        return on_field

    def keyword(self, view: int) -> Predicate:
        test = self.matcher()
        return lambda facts: any(test(v) for v in facts[view].present().values())


def _wildcard_regex(parts: Sequence[object], flags: int) -> re.Pattern[str]:
    out = []
    for part in parts:
        if part is SpecialChars.WILDCARD_MULTI:
            out.append(".*")
        elif part is SpecialChars.WILDCARD_SINGLE:
            out.append(".")
        else:
            out.append(re.escape(str(part)))
    return re.compile("^" + "".join(out) + "$", flags | re.DOTALL)


def _add_string(value: SigmaString, cased: bool, target: _Strings) -> None:
    parts = list(value.s)
    for part in parts:
        if not isinstance(part, (str, SpecialChars)):
            raise Unsupported(f"placeholder {part} in value {value.original!r} needs a list "
                              "that ringfence does not define")
    norm = (lambda s: s) if cased else str.lower
    texts = [p for p in parts if isinstance(p, str)]
    multi = SpecialChars.WILDCARD_MULTI
    if SpecialChars.WILDCARD_SINGLE in parts:
        target.regexes.append(_wildcard_regex(parts, 0 if cased else re.IGNORECASE))
    elif not any(isinstance(p, SpecialChars) for p in parts):
        target.eq.add(norm("".join(texts)))
    elif len(parts) == 2 and parts[0] is multi and isinstance(parts[1], str):
        target.ends.append(norm(parts[1]))
    elif len(parts) == 2 and parts[1] is multi and isinstance(parts[0], str):
        target.starts.append(norm(parts[0]))
    elif len(parts) == 3 and parts[0] is multi and parts[2] is multi and isinstance(parts[1], str):
        target.contains.append(norm(parts[1]))
    elif parts == [multi]:
        target.regexes.append(re.compile(".", re.DOTALL))  # any non-empty value
    else:
        target.regexes.append(_wildcard_regex(parts, 0 if cased else re.IGNORECASE))


def _regex_flags(value: SigmaRegularExpression) -> int:
    flags = 0
    for flag in value.flags:
        flags |= {SigmaRegularExpressionFlag.IGNORECASE: re.IGNORECASE,
                  SigmaRegularExpressionFlag.MULTILINE: re.MULTILINE,
                  SigmaRegularExpressionFlag.DOTALL: re.DOTALL}[flag]
    return flags


def _leaf(name: str, value: object) -> Predicate:
    """One `field = value` leaf that is not a plain string (strings are grouped elsewhere)."""
    if isinstance(value, SigmaNull):
        return lambda facts: facts[0][name] is None
    if isinstance(value, SigmaExists):
        want = bool(value.exists)
        return lambda facts: (facts[0][name] is not None) == want
    if isinstance(value, SigmaCIDRExpression):
        network = value.network

        def in_network(facts: Facts) -> bool:
            text = facts[0][name]
            if not text:
                return False
            try:
                return ipaddress.ip_address(text) in network
            except ValueError:
                return False
        return in_network
    if isinstance(value, SigmaCompareExpression):
        number = value.number.number
        op = value.op

        def compare(facts: Facts) -> bool:
            text = facts[0][name]
            try:
                n = float(text) if text is not None else None
            except ValueError:
                return False
            if n is None:
                return False
            return {CompareOperators.LT: n < number, CompareOperators.LTE: n <= number,
                    CompareOperators.GT: n > number, CompareOperators.GTE: n >= number,
                    CompareOperators.NEQ: n != number}[op]
        return compare
    if isinstance(value, SigmaFieldReference):
        other = value.field
        if other not in _ALL_FIELDS:
            raise Unsupported(f"fieldref to {other}, which ringfence does not record")
        starts, ends = value.starts_with, value.ends_with

        def same(facts: Facts) -> bool:
            a, b = facts[1][name], facts[1][other]
            if a is None or b is None:
                return False
            if starts:
                return a.startswith(b)
            if ends:
                return a.endswith(b)
            return a == b
        return same
    raise Unsupported(f"value type {type(value).__name__} ({value}) of field {name} is not "
                      "supported by the ringfence evaluator")


_ALL_FIELDS = frozenset().union(*RINGFENCE_FIELDS.values())


def _string_parts(name: str | None, values: Iterable[object]) -> list[tuple[_Strings, int]]:
    """The patterns of an OR of string/number/bool/regex values on one field (None: keyword
    search), each with the view it tests: 1 lower-cased, 0 raw."""
    folded, cased, raw_regex = _Strings(), _Strings(), _Strings()
    for value in values:
        if isinstance(value, SigmaCasedString):
            _add_string(value, True, cased)
        elif isinstance(value, SigmaString):
            _add_string(value, False, folded)
        elif isinstance(value, SigmaNumber):
            folded.eq.add(str(value.number))
        elif isinstance(value, SigmaBool):
            folded.eq.add("true" if value.boolean else "false")
        elif isinstance(value, SigmaRegularExpression):
            try:
                raw_regex.regexes.append(re.compile(value.regexp.to_plain(),
                                                    _regex_flags(value)))
            except re.error as e:
                raise Unsupported(f"regular expression {value.regexp} does not compile in "
                                  f"Python: {e}") from e
        else:
            raise Unsupported(f"value {value} of field {name} is not a string")
    if name is None:
        # Keywords are full-text searches: a plain keyword matches anywhere in a value.
        for strings in (folded, cased):
            strings.contains.extend(sorted(strings.eq))
            strings.eq.clear()
    return [(strings, view) for strings, view in ((folded, 1), (cased, 0), (raw_regex, 0))
            if not strings.empty()]


def _string_group(name: str | None, values: Iterable[object]) -> Predicate:
    """OR of string/number/bool/regex values on one field (None: keyword search)."""
    return _or([strings.keyword(view) if name is None else strings.predicate(view, name)
                for strings, view in _string_parts(name, values)])


_STRINGISH = (SigmaString, SigmaNumber, SigmaBool, SigmaRegularExpression)


# -- tree -----------------------------------------------------------------------------------

def _and(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda facts: a(facts) and b(facts)
    items = tuple(preds)

    def all_of(facts: Facts) -> bool:
        for p in items:
            if not p(facts):
                return False
        return True
    return all_of


def _or(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    items = tuple(preds)

    def any_of(facts: Facts) -> bool:
        for p in items:
            if p(facts):
                return True
        return False
    return any_of


def _compile(node: object) -> Predicate:
    if isinstance(node, ConditionAND):
        return _and([_compile(a) for a in node.args])
    if isinstance(node, ConditionNOT):
        inner = _compile(node.args[0])
        return lambda facts: not inner(facts)
    if isinstance(node, ConditionOR):
        # Leaves on the same field are merged into one test (one lookup, C-level
        # startswith/endswith over tuples) instead of one closure per value.
        groups: dict[str | None, list[object]] = {}
        preds: list[Predicate] = []
        for a in node.args:
            if isinstance(a, ConditionFieldEqualsValueExpression) and isinstance(a.value,
                                                                                 _STRINGISH):
                groups.setdefault(a.field, []).append(a.value)
            elif isinstance(a, ConditionValueExpression) and isinstance(a.value, _STRINGISH):
                groups.setdefault(None, []).append(a.value)
            else:
                preds.append(_compile(a))
        return _or([_string_group(f, vs) for f, vs in groups.items()] + preds)
    if isinstance(node, ConditionFieldEqualsValueExpression):
        if isinstance(node.value, SigmaExpansion):
            # base64offset, windash ...: any of the expanded values.
            return _or([_compile(ConditionFieldEqualsValueExpression(node.field, v))
                        for v in node.value.values])
        if isinstance(node.value, _STRINGISH):
            return _string_group(node.field, [node.value])
        return _leaf(node.field, node.value)
    if isinstance(node, ConditionValueExpression):
        if isinstance(node.value, _STRINGISH):
            return _string_group(None, [node.value])
        raise Unsupported(f"keyword value {node.value} is not a string")
    raise Unsupported(f"condition element {type(node).__name__} is not supported")


def _fields(node: object) -> frozenset[str] | None:
    """Record fields a condition tree reads (None: keywords read every field)."""
    if isinstance(node, ConditionValueExpression):
        return None
    if isinstance(node, ConditionFieldEqualsValueExpression):
        extra = {node.value.field} if isinstance(node.value, SigmaFieldReference) else set()
        return frozenset({node.field} | extra)
    out: set[str] = set()
    for a in getattr(node, "args", ()):
        sub = _fields(a)
        if sub is None:
            return None
        out |= sub
    return frozenset(out)


def _anchors(node: object) -> frozenset[str] | None:
    """Executable base names (lower case) one of which any match must have, or None."""
    if isinstance(node, ConditionAND):
        found = [a for a in (_anchors(x) for x in node.args) if a is not None]
        return min(found, key=len) if found else None
    if isinstance(node, ConditionOR):
        out: set[str] = set()
        for a in node.args:
            sub = _anchors(a)
            if sub is None:
                return None
            out |= sub
        return frozenset(out)
    if isinstance(node, ConditionFieldEqualsValueExpression) and node.field == "process.exe":
        value = node.value
        if isinstance(value, SigmaString) and not isinstance(value, SigmaCasedString):
            parts = list(value.s)
            tail = parts[-1] if parts else None
            if (isinstance(tail, str) and "/" in tail and
                    not tail.endswith("/") and
                    (len(parts) == 1 or (len(parts) == 2 and
                                         parts[0] is SpecialChars.WILDCARD_MULTI))):
                return frozenset({tail.rsplit("/", 1)[1].lower()})
    return None


# -- rules ----------------------------------------------------------------------------------

def _items(detection: SigmaDetection) -> Iterable[SigmaDetectionItem]:
    for item in detection.detection_items:
        if isinstance(item, SigmaDetection):
            yield from _items(item)
        else:
            yield item


def _info(rule: SigmaRule, source: str, sigma_fields: tuple[str, ...] = ()) -> RuleInfo:
    def names(values: object) -> tuple[str, ...]:
        return tuple(str(v) for v in (values or []))  # type: ignore[attr-defined]
    return RuleInfo(
        rule_id=str(rule.id) if rule.id else (rule.name or rule.title),
        title=rule.title, level=rule.level.name.lower() if rule.level else "medium",
        status=rule.status.name.lower() if rule.status else "",
        author=rule.author or "", description=(rule.description or "").strip(),
        category=rule.logsource.category or "", product=rule.logsource.product or "",
        source=source, tags=tuple(f"{t.namespace}.{t.name}" for t in rule.tags),
        references=names(rule.references), falsepositives=names(rule.falsepositives),
        sigma_fields=sigma_fields)


def compile_rule(rule: SigmaRule, source: str) -> LoadedRule:
    """Map, check and compile one parsed rule: a CompiledRule, or UnsupportedRule + reason."""
    used: list[str] = []
    for detection in rule.detection.detections.values():
        for item in _items(detection):
            if item.field is not None and item.field not in used:
                used.append(item.field)
    info = _info(rule, source, tuple(used))
    if rule.errors:
        return UnsupportedRule(info, "; ".join(str(e) for e in rule.errors))
    category = rule.logsource.category or ""
    if rule.logsource.product not in (None, "linux"):
        return UnsupportedRule(info, f"log source product {rule.logsource.product} is not "
                                     "Linux")
    if category not in FIELD_MAPPING:
        what = f"category {category}" if category else (
            f"service {rule.logsource.service}" if rule.logsource.service else "no category")
        return UnsupportedRule(info, f"log source {what} is not a kind of event ringfence "
                                     f"records (it has {', '.join(FIELD_MAPPING)})")
    if info.status in ("deprecated", "unsupported"):
        return UnsupportedRule(info, f"the rule's status is {info.status}")
    unmapped = tuple(f for f in used if f not in FIELD_MAPPING[category])
    if unmapped:
        reasons = "; ".join(f"{f}: {unmappable_reason(f, category)}" for f in unmapped)
        return UnsupportedRule(info, f"uses fields ringfence cannot map ({reasons})", unmapped)
    try:
        sigma_pipeline().apply(rule)
        trees = [c.parse() for c in rule.detection.parsed_condition]
        predicate = _or([_compile(t) for t in trees])
        anchor_sets = [_anchors(t) for t in trees]
        field_sets = [_fields(t) for t in trees]
    except Unsupported as e:
        return UnsupportedRule(info, str(e))
    except SigmaError as e:
        return UnsupportedRule(info, f"pySigma cannot process the rule: {e}")
    anchors: frozenset[str] | None = None
    if all(a is not None for a in anchor_sets):
        anchors = frozenset().union(*(a for a in anchor_sets if a is not None))
    fields = (None if any(f is None for f in field_sets) else
              frozenset().union(*(f for f in field_sets if f is not None)))
    return CompiledRule(info, predicate, anchors, fields, tuple(trees))


def load_yaml(text: str, source: str) -> list[LoadedRule]:
    """Every rule in a YAML document (one or several); raise RuleError if it is not Sigma."""
    if len(text.encode()) > MAX_RULE_BYTES:
        raise RuleError(source, f"larger than {MAX_RULE_BYTES} bytes; is this a rule file?")
    try:
        collection = SigmaCollection.from_yaml(text, collect_errors=True)
    except SigmaError as e:
        raise RuleError(source, f"not a valid Sigma rule: {e}") from e
    except Exception as e:  # the YAML parser raises its own types
        raise RuleError(source, f"not valid YAML: {e}") from e
    out: list[LoadedRule] = []
    for rule in collection.rules:
        if not isinstance(rule, SigmaRule):
            out.append(UnsupportedRule(RuleInfo(
                str(getattr(rule, "id", "") or getattr(rule, "name", "") or "?"),
                getattr(rule, "title", "correlation"), "medium", "", "", "", "", "", source),
                "correlation rules are not supported"))
            continue
        if rule.errors:
            raise RuleError(source, "not a valid Sigma rule: " +
                            "; ".join(str(e) for e in rule.errors))
        out.append(compile_rule(rule, source))
    if not out:
        errors = "; ".join(str(e) for e in collection.errors) or "no rule in the document"
        raise RuleError(source, f"not a valid Sigma rule: {errors}")
    return out


def load_file(path: Path) -> list[LoadedRule]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RuleError(str(path), f"cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise RuleError(str(path), "not UTF-8 text") from e
    return load_yaml(text, str(path))


def load_pack(directory: Path = PACK_DIR) -> list[LoadedRule]:
    """Every .yml rule under `directory`, sorted by path (a bad file becomes unsupported)."""
    out: list[LoadedRule] = []
    for path in sorted(directory.rglob("*.yml")):
        rel = os.path.relpath(path, directory)
        try:
            out.extend(load_file(path))
        except RuleError as e:
            out.append(UnsupportedRule(RuleInfo(rel, rel, "medium", "", "", "", "", "",
                                                str(path)), e.reason))
    return out


# -- generated matchers ---------------------------------------------------------------------
#
# The closures above are the reference evaluator: one call per condition node. The live path
# instead runs one generated Python function per log source category, compiled once when the
# index is built: each field value is fetched once into a local, needles are constants in the
# source (lower-cased at load), regular expressions are precompiled, and each rule's condition
# is one inline boolean expression. tests/unit/server/detection/test_detection_codegen.py
# checks that both give exactly the same matches.

Matcher = Callable[[Facts], list[int]]


class _Source:
    """Constants and field locals of generated code. Constants live in one namespace shared
    by every function of an index; locals are per function."""

    def __init__(self, namespace: dict[str, object]) -> None:
        self.namespace = namespace
        self.locals: dict[tuple[int, str], str] = {}

    def const(self, value: object) -> str:
        name = f"_k{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def var(self, view: int, name: str) -> str:
        local = self.locals.get((view, name))
        if local is None:
            local = self.locals[(view, name)] = f"{'rl'[view]}{len(self.locals)}"
        return local

    def prologue(self) -> list[str]:
        return [f"    {local} = {'low' if view else 'raw'}[{name!r}]"
                for (view, name), local in self.locals.items()]


def _strings_expr(src: _Source, name: str, values: Iterable[object]) -> str:
    alternatives = []
    for strings, view in _string_parts(name, values):
        v = src.var(view, name)
        tests = []
        if len(strings.eq) == 1:
            tests.append(f"{v} == {next(iter(strings.eq))!r}")
        elif strings.eq:
            tests.append(f"{v} in {src.const(frozenset(strings.eq))}")
        if strings.starts:
            tests.append(f"{v}.startswith({tuple(strings.starts)!r})")
        if strings.ends:
            tests.append(f"{v}.endswith({tuple(strings.ends)!r})")
        tests.extend(f"{c!r} in {v}" for c in strings.contains)
        tests.extend(f"{src.const(r)}.search({v}) is not None" for r in strings.regexes)
        alternatives.append(f"({v} is not None and ({' or '.join(tests)}))")
    return "(" + " or ".join(alternatives) + ")" if alternatives else "False"


def _leaf_expr(src: _Source, name: str, value: object) -> str:
    if isinstance(value, SigmaNull):
        return f"({src.var(0, name)} is None)"
    if isinstance(value, SigmaExists):
        return f"({src.var(0, name)} is {'not ' if value.exists else ''}None)"
    if isinstance(value, SigmaFieldReference) and value.field in _ALL_FIELDS:
        a, b = src.var(1, name), src.var(1, value.field)
        test = (f"{a}.startswith({b})" if value.starts_with else
                f"{a}.endswith({b})" if value.ends_with else f"{a} == {b}")
        return f"({a} is not None and {b} is not None and {test})"
    # CIDR and numeric comparisons are rare: the reference closure does them.
    return f"{src.const(_leaf(name, value))}(facts)"


def _expr(src: _Source, node: object) -> str:
    """A condition tree as one Python boolean expression (the same semantics as _compile)."""
    if isinstance(node, ConditionAND):
        return "(" + " and ".join(_expr(src, a) for a in node.args) + ")"
    if isinstance(node, ConditionNOT):
        return f"(not {_expr(src, node.args[0])})"
    if isinstance(node, ConditionOR):
        groups: dict[str | None, list[object]] = {}
        parts: list[str] = []
        for a in node.args:
            if isinstance(a, ConditionFieldEqualsValueExpression) and isinstance(a.value,
                                                                                 _STRINGISH):
                groups.setdefault(a.field, []).append(a.value)
            elif isinstance(a, ConditionValueExpression) and isinstance(a.value, _STRINGISH):
                groups.setdefault(None, []).append(a.value)
            else:
                parts.append(_expr(src, a))
        for name, values in groups.items():
            parts.insert(0, _keyword_expr(src, values) if name is None else
                         _strings_expr(src, name, values))
        return "(" + " or ".join(parts) + ")" if parts else "False"
    if isinstance(node, ConditionFieldEqualsValueExpression):
        if isinstance(node.value, SigmaExpansion):
            return "(" + " or ".join(
                _expr(src, ConditionFieldEqualsValueExpression(node.field, v))
                for v in node.value.values) + ")"
        if isinstance(node.value, _STRINGISH):
            return _strings_expr(src, node.field, [node.value])
        return _leaf_expr(src, node.field, node.value)
    if isinstance(node, ConditionValueExpression) and isinstance(node.value, _STRINGISH):
        return _keyword_expr(src, [node.value])
    raise Unsupported(f"condition element {type(node).__name__} is not supported")


def _keyword_expr(src: _Source, values: list[object]) -> str:
    # Keyword searches read every field; the reference closure does them.
    return f"{src.const(_string_group(None, values))}(facts)"


def _rule_expr(src: _Source, rule: CompiledRule) -> str:
    if rule.trees:
        try:
            return " or ".join(_expr(src, t) for t in rule.trees)
        except Unsupported:
            pass
    return f"{src.const(rule.predicate)}(facts)"


def _function(name: str, signature: str, head: list[str], src: _Source,
              rules: Iterable[tuple[int, CompiledRule]], tail: list[str]) -> list[str]:
    body = [f"    if {_rule_expr(src, rule)}:\n        out.append({i})  # {rule.info.rule_id}"
            for i, rule in rules]
    return [f"def {name}({signature}):", *head, *src.prologue(), *body, *tail, ""]


def generate_matchers(rules: Sequence[CompiledRule]) -> tuple[str, dict[str, Matcher]]:
    """The source of one function per category, and the functions. A function returns the
    indexes (into `rules`) of the rules that match, in the order RuleIndex.candidates checks
    them: rules without an executable anchor, then the ones anchored on the event's."""
    namespace: dict[str, object] = {}
    lines: list[str] = []
    names: dict[str, str] = {}
    # Per category: executable base name -> generated function, filled once they exist.
    dispatches: list[tuple[dict[str, Callable[..., None]], dict[str, str]]] = []
    categories = list(dict.fromkeys(r.info.category for r in rules))
    for c, category in enumerate(categories):
        here = [(i, r) for i, r in enumerate(rules) if r.info.category == category]
        by_exe: dict[str, list[tuple[int, CompiledRule]]] = {}
        for i, r in here:
            for exe in sorted(r.anchors or ()):
                by_exe.setdefault(exe, []).append((i, r))
        table: dict[str, str] = {}
        for x, (exe, anchored) in enumerate(sorted(by_exe.items())):
            table[exe] = f"_c{c}_exe{x}"
            lines += _function(table[exe], "facts, raw, low, out", [], _Source(namespace),
                               anchored, [])
        head = ["    raw, low = facts", "    out = []"]
        tail = ["    return out"]
        if table:
            functions: dict[str, Callable[..., None]] = {}
            dispatches.append((functions, table))
            dispatch = _Source(namespace).const(functions)
            tail = ["    exe = low['process.exe']",
                    "    if exe is not None:",
                    f"        anchored = {dispatch}.get(exe.rsplit('/', 1)[-1])",
                    "        if anchored is not None:",
                    "            anchored(facts, raw, low, out)",
                    "    return out"]
        names[category] = f"_c{c}"
        lines += _function(names[category], "facts", head, _Source(namespace),
                           ((i, r) for i, r in here if r.anchors is None), tail)
    source = "\n".join(lines)
    exec(compile(source, "<ringfence generated matchers>", "exec"), namespace)  # noqa: S102
    for functions, table in dispatches:
        functions.update((exe, namespace[fn]) for exe, fn in table.items())  # type: ignore[misc]
    matchers: dict[str, Matcher] = {
        category: namespace[fn] for category, fn in names.items()}  # type: ignore[misc]
    return source, matchers


class RuleIndex:
    """Compiled rules by category and anchor executable name: what to check for an event."""

    def __init__(self, rules: Iterable[CompiledRule]) -> None:
        self.rules = tuple(rules)
        self._any: dict[str, tuple[CompiledRule, ...]] = {}
        self._by_exe: dict[str, dict[str, tuple[CompiledRule, ...]]] = {}
        any_lists: dict[str, list[CompiledRule]] = {}
        exe_lists: dict[str, dict[str, list[CompiledRule]]] = {}
        for rule in self.rules:
            category = rule.info.category
            if rule.anchors is None:
                any_lists.setdefault(category, []).append(rule)
            else:
                for name in rule.anchors:
                    exe_lists.setdefault(category, {}).setdefault(name, []).append(rule)
        self._any = {c: tuple(v) for c, v in any_lists.items()}
        self._by_exe = {c: {n: tuple(v) for n, v in m.items()} for c, m in exe_lists.items()}
        # Real fleets launch the same commands over and over: the verdicts for a category
        # depend only on the fields its rules read, so they are memoized on those values
        # (not for categories with keyword rules, which read every value).
        self._memo_fields: dict[str, tuple[str, ...]] = {}
        for category in set(self._any) | set(self._by_exe):
            rules_here = [r for r in self.rules if r.info.category == category]
            if all(r.fields is not None for r in rules_here):
                self._memo_fields[category] = tuple(sorted(frozenset().union(
                    *(r.fields for r in rules_here if r.fields is not None))))
        self._memo: dict[tuple[object, ...], list[CompiledRule]] = {}
        self.memo_hits = self.memo_misses = 0
        self.source, self._matchers = generate_matchers(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def candidates(self, category: str, facts: Facts) -> Iterable[CompiledRule]:
        always = self._any.get(category, ())
        by_exe = self._by_exe.get(category)
        if not by_exe:
            return always
        exe = facts[1]["process.exe"]
        if exe is None:
            return always
        anchored = by_exe.get(exe.rsplit("/", 1)[-1])
        return always + anchored if anchored else always

    def match_reference(self, category: str, facts: Facts) -> list[CompiledRule]:
        """The matching rules by the reference closures (no memo): what match() must equal."""
        return [r for r in self.candidates(category, facts) if r.predicate(facts)]

    def match_generated(self, category: str, facts: Facts) -> list[CompiledRule]:
        """The matching rules by the generated function of the category (no memo)."""
        matcher = self._matchers.get(category)
        if matcher is None:
            return []
        rules = self.rules
        return [rules[i] for i in matcher(facts)]

    def match(self, category: str, facts: Facts) -> list[CompiledRule]:
        fields = self._memo_fields.get(category)
        if fields is None:
            return self.match_generated(category, facts)
        key = (category, *map(facts[0].__getitem__, fields))
        hit = self._memo.get(key)
        if hit is not None:
            self.memo_hits += 1
            return hit
        self.memo_misses += 1
        result = self.match_generated(category, facts)
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = result
        return result
