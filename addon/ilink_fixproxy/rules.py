"""Load and validate rules.yaml into small immutable spec objects.

The YAML is read as a node tree (``yaml.compose``) rather than as plain Python data so that
every error can name the file, the line and the column of the offending value. Nothing here
touches the network or mitmproxy's runtime: this module is pure and separately tested.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from mitmproxy import flowfilter

from .jsonedit import Path as JsonPath
from .jsonedit import parse_path

DEFAULT_RULES_NAME = "default_rules.yaml"
SUPPORTED_VERSION = 1
MAX_RETRIES = 3
MAX_DEADLINE_S = 60.0

# A hostname, or a "*." wildcard over a suffix. Deliberately strict: these become regexes for
# mitmproxy's allow_hosts, and a typo there would silently stop interception.
_HOST_RE = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class RulesError(ValueError):
    """A rules file that cannot be used; the message says where and what is expected."""


# --------------------------------------------------------------------------- spec objects


@dataclass(frozen=True)
class Regex:
    """A string value that must match this regular expression (re.search)."""

    pattern: re.Pattern[str]

    def describe(self) -> str:
        return f"matches /{self.pattern.pattern}/"


@dataclass(frozen=True)
class Missing:
    """The field is absent (or JSON null)."""

    def describe(self) -> str:
        return "is missing"


@dataclass(frozen=True)
class Equals:
    """The field equals this scalar (type-strict: true is not 1)."""

    value: str | int | float | bool

    def describe(self) -> str:
        return f"= {_show(self.value)}"


Alternative = Regex | Missing | Equals


@dataclass(frozen=True)
class Condition:
    """A field condition: any one of the alternatives holds."""

    path: JsonPath
    alternatives: tuple[Alternative, ...]

    def describe(self) -> str:
        name = ".".join(self.path)
        return " or ".join(f"{name} {alt.describe()}" for alt in self.alternatives)


@dataclass(frozen=True)
class Match:
    filter_expr: str
    filter: Callable[[Any], bool] = field(compare=False, repr=False)
    request_has: tuple[JsonPath, ...]
    request_match: tuple[Condition, ...]
    response_status: tuple[int, ...]
    response_any: tuple[tuple[Condition, ...], ...]


@dataclass(frozen=True)
class Action:
    remove: JsonPath
    retries: int
    deadline_s: float


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    match: Match
    action: Action
    line: int


@dataclass(frozen=True)
class RuleSet:
    source: str
    hosts: tuple[str, ...]
    rules: tuple[Rule, ...]


# --------------------------------------------------------------------------- loading


def default_rules_text() -> str:
    return resources.files(__package__).joinpath(DEFAULT_RULES_NAME).read_text("utf-8")


def load_file(path: str | Path) -> RuleSet:
    """Read and parse a rules file; RulesError for a missing, unreadable or invalid file."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise RulesError(f"{p}: rules file not found") from None
    except IsADirectoryError:
        raise RulesError(f"{p}: is a directory, expected a rules YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{p}: cannot read rules file: {e}") from None
    return parse(text, str(p))


def load_default() -> RuleSet:
    return parse(default_rules_text(), f"<packaged {DEFAULT_RULES_NAME}>")


def parse(text: str, source: str = "rules.yaml") -> RuleSet:
    """Parse rules YAML text. Raises RulesError naming source:line:column and the fix."""
    return _Parser(source).ruleset(text)


def host_patterns(hosts: Iterable[str]) -> list[str]:
    """Regexes for mitmproxy's allow_hosts, which it matches against "host:port"."""
    out = []
    for host in hosts:
        if host.startswith("*."):
            out.append(r"^(?:[^.:]+\.)+" + re.escape(host[2:]) + r":\d+$")
        else:
            out.append("^" + re.escape(host) + r":\d+$")
    return out


# --------------------------------------------------------------------------- the parser


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.SafeLoader("")

    # -- helpers

    def _fail(self, node: yaml.Node | None, where: str, what: str) -> RulesError:
        if node is None:
            return RulesError(f"{self.source}: {where}: {what}")
        mark = node.start_mark
        return RulesError(f"{self.source}:{mark.line + 1}:{mark.column + 1}: {where}: {what}")

    def _scalar(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def _mapping(
        self, node: yaml.Node, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self._fail(node, where, f"expected a mapping with keys {', '.join(allowed)}")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self._scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self._fail(key_node, where, "keys must be plain strings")
            if key not in allowed:
                raise self._fail(
                    key_node, where, f"unknown key {key!r} (expected one of: {', '.join(allowed)})"
                )
            if key in out:
                raise self._fail(key_node, where, f"duplicate key {key!r}")
            out[key] = value_node
        for key in required:
            if key not in out:
                raise self._fail(node, where, f"missing required key {key!r}")
        return out

    def _sequence(self, node: yaml.Node, where: str, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self._fail(node, where, f"expected a list of {what}")
        return list(node.value)

    def _string(self, node: yaml.Node, where: str) -> str:
        value = self._scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value.strip():
            raise self._fail(node, where, "expected a non-empty string")
        return value

    def _int(self, node: yaml.Node, where: str, lo: int, hi: int) -> int:
        value = self._scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(node, where, f"expected a whole number from {lo} to {hi}")
        return value

    def _json_path(self, node: yaml.Node, where: str) -> JsonPath:
        text = self._string(node, where)
        try:
            return parse_path(text)
        except ValueError as e:
            raise self._fail(
                node, where, f"{e} (expected a dotted JSON path like msg.context_token)"
            ) from None

    # -- grammar

    def ruleset(self, text: str) -> RuleSet:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise RulesError(f"{self.source}{where}: not valid YAML: {e.problem}") from None
        except yaml.YAMLError as e:
            raise RulesError(f"{self.source}: not valid YAML: {e}") from None
        if root is None:
            raise RulesError(f"{self.source}: the file is empty (expected version, hosts and rules)")
        top = self._mapping(root, "top level", ("version", "hosts", "rules"), ("version", "rules"))
        self._int(top["version"], "version", SUPPORTED_VERSION, SUPPORTED_VERSION)
        hosts = self._hosts(top["hosts"]) if "hosts" in top else ()
        rule_nodes = self._sequence(top["rules"], "rules", "rules")
        rules = tuple(self._rule(n, f"rules[{i}]") for i, n in enumerate(rule_nodes))
        seen: dict[str, Rule] = {}
        for rule in rules:
            if rule.name in seen:
                raise RulesError(
                    f"{self.source}:{rule.line}: rule name {rule.name!r} is used twice "
                    f"(first at line {seen[rule.name].line}); names must be unique"
                )
            seen[rule.name] = rule
        return RuleSet(source=self.source, hosts=hosts, rules=rules)

    def _hosts(self, node: yaml.Node) -> tuple[str, ...]:
        hosts = []
        for i, n in enumerate(self._sequence(node, "hosts", "hostnames")):
            host = self._string(n, f"hosts[{i}]").strip().lower().rstrip(".")
            if not _HOST_RE.match(host):
                raise self._fail(
                    n,
                    f"hosts[{i}]",
                    f"{host!r} is not a hostname (expected e.g. "
                    "ilinkai.weixin.qq.com or *.weixin.qq.com; no scheme, port or path)",
                )
            hosts.append(host)
        return tuple(hosts)

    def _rule(self, node: yaml.Node, where: str) -> Rule:
        m = self._mapping(
            node, where, ("name", "description", "match", "action"), ("name", "match", "action")
        )
        name = self._string(m["name"], f"{where}.name")
        where = f"rule {name!r}"
        description = self._string(m["description"], f"{where}.description") if "description" in m else ""
        action = self._action(m["action"], f"{where}.action")
        match = self._match(m["match"], f"{where}.match", action.remove)
        return Rule(
            name=name, description=description, match=match, action=action, line=node.start_mark.line + 1
        )

    def _match(self, node: yaml.Node, where: str, removed: JsonPath) -> Match:
        m = self._mapping(
            node,
            where,
            ("filter", "request_has", "request_match", "response_status", "response_any"),
            ("filter", "response_any"),
        )
        expr = self._string(m["filter"], f"{where}.filter")
        try:
            flt = flowfilter.parse(expr)
        except ValueError:
            raise self._fail(
                m["filter"],
                f"{where}.filter",
                f'{expr!r} is not a valid mitmproxy flow filter (e.g. "~m POST & ~u /ilink/bot/sendmessage")',
            ) from None

        if "request_has" in m:
            has_node = m["request_has"]
            nodes = (
                [has_node]
                if isinstance(has_node, yaml.ScalarNode)
                else self._sequence(has_node, f"{where}.request_has", "dotted JSON paths")
            )
            request_has = tuple(self._json_path(n, f"{where}.request_has") for n in nodes)
        else:
            request_has = ()
        # A request that does not carry the field we would remove is never re-issued, whatever
        # request_has says: re-sending an identical request cannot repair anything.
        if removed not in request_has:
            request_has = (*request_has, removed)

        request_match = (
            self._conditions(m["request_match"], f"{where}.request_match") if "request_match" in m else ()
        )

        if "response_status" in m:
            s_node = m["response_status"]
            nodes = (
                [s_node]
                if isinstance(s_node, yaml.ScalarNode)
                else self._sequence(s_node, f"{where}.response_status", "HTTP status codes")
            )
            statuses = tuple(self._int(n, f"{where}.response_status", 100, 599) for n in nodes)
        else:
            statuses = (200,)

        alternatives = self._sequence(
            m["response_any"], f"{where}.response_any", "field conditions like {ret: -2}"
        )
        if not alternatives:
            raise self._fail(
                m["response_any"], f"{where}.response_any", "must list at least one condition like {ret: -2}"
            )
        response_any = tuple(
            self._conditions(n, f"{where}.response_any[{i}]") for i, n in enumerate(alternatives)
        )
        return Match(
            filter_expr=expr,
            filter=flt,
            request_has=request_has,
            request_match=request_match,
            response_status=statuses,
            response_any=response_any,
        )

    def _conditions(self, node: yaml.Node, where: str) -> tuple[Condition, ...]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            raise self._fail(node, where, "expected a mapping of JSON path to value, e.g. {ret: -2}")
        conditions = []
        seen: set[JsonPath] = set()
        for key_node, value_node in node.value:
            path = self._json_path(key_node, where)
            if path in seen:
                raise self._fail(key_node, where, f"duplicate field {'.'.join(path)!r}")
            seen.add(path)
            conditions.append(Condition(path, self._alternatives(value_node, f"{where}.{'.'.join(path)}")))
        return tuple(conditions)

    def _alternatives(self, node: yaml.Node, where: str) -> tuple[Alternative, ...]:
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if not nodes:
            raise self._fail(node, where, "an empty list matches nothing; give at least one value")
        return tuple(self._alternative(n, where) for n in nodes)

    def _alternative(self, node: yaml.Node, where: str) -> Alternative:
        expected = 'expected a value (number, string, true/false), null for missing, or {regex: "..."}'
        if isinstance(node, yaml.MappingNode):
            m = self._mapping(node, where, ("regex",), ("regex",))
            text = self._string(m["regex"], f"{where}.regex")
            try:
                return Regex(re.compile(text))
            except re.error as e:
                raise self._fail(m["regex"], f"{where}.regex", f"invalid regular expression: {e}") from None
        if not isinstance(node, yaml.ScalarNode):
            raise self._fail(node, where, expected)
        value = self._scalar(node)
        if value is None:
            return Missing()
        if isinstance(value, str | int | float | bool):
            return Equals(value)
        raise self._fail(node, where, expected)

    def _action(self, node: yaml.Node, where: str) -> Action:
        m = self._mapping(node, where, ("remove", "retries", "deadline_s"), ("remove",))
        remove = self._json_path(m["remove"], f"{where}.remove")
        retries = self._int(m["retries"], f"{where}.retries", 0, MAX_RETRIES) if "retries" in m else 1
        deadline = 10.0
        if "deadline_s" in m:
            value = self._scalar(m["deadline_s"]) if isinstance(m["deadline_s"], yaml.ScalarNode) else None
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value <= MAX_DEADLINE_S
            ):
                raise self._fail(
                    m["deadline_s"],
                    f"{where}.deadline_s",
                    f"expected seconds, more than 0 and at most {MAX_DEADLINE_S:g}",
                )
            deadline = float(value)
        return Action(remove=remove, retries=retries, deadline_s=deadline)


# --------------------------------------------------------------------------- describing


def _show(value: Any) -> str:
    return (
        repr(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def describe(ruleset: RuleSet) -> str:
    """What each rule does, in words, for ``ilink-fixproxy check``."""
    n = len(ruleset.rules)
    lines = [f"{ruleset.source}: {n} rule{'s' if n != 1 else ''}"]
    if ruleset.hosts:
        lines.append(f"  forward mode intercepts TLS only for: {', '.join(ruleset.hosts)}")
    else:
        lines.append("  no hosts listed: forward mode intercepts TLS for every host")
    for rule in ruleset.rules:
        m, a = rule.match, rule.action
        lines.append("")
        lines.append(
            f"  {rule.name} (line {rule.line})" + (f": {rule.description}" if rule.description else "")
        )
        lines.append(f"    when the request matches  {m.filter_expr}")
        for path in m.request_has:
            lines.append(f"     and the request carries  {'.'.join(path)}")
        for cond in m.request_match:
            lines.append(f"     and in the request       {cond.describe()}")
        statuses = " or ".join(str(s) for s in m.response_status)
        lines.append(f"     and the answer is HTTP {statuses} JSON with")
        for i, conds in enumerate(m.response_any):
            lead = "         " if i == 0 else "      or "
            lines.append(lead + " and ".join(f"({c.describe()})" for c in conds))
        if a.retries == 0:
            lines.append("    then only annotate the flow (retries: 0, nothing is re-issued)")
        else:
            times = "once" if a.retries == 1 else f"up to {a.retries} times"
            lines.append(
                f"    then re-issue it without {'.'.join(a.remove)}, {times}, within {a.deadline_s:g} s "
                "of the request; if that fails the original answer is kept"
            )
    return "\n".join(lines)
