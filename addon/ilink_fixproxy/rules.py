"""Load and validate rules.yaml into small immutable spec objects.

The YAML is read as a node tree (``yaml.compose``) rather than as plain Python data so that
every error can name the file, the line and the column of the offending value. Nothing here
touches the network or mitmproxy's runtime: this module is pure and separately tested.
"""

from __future__ import annotations

import dataclasses
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
DEFAULT_UPDATES_FILTER = "~m POST & ~u /ilink/bot/getupdates"
SUPPORTED_VERSION = 1
MAX_RETRIES = 3
MAX_DEADLINE_S = 60.0
# mitmproxy's filter parser (pyparsing's infixNotation, no memoization) takes time exponential in
# nesting: measured 0.05 s for `(((~m POST)))`, 5 s for six parentheses, 80 s for eight, and as
# much for sixteen `!`, all while the proxy's event loop stands still (rules are reloaded on it).
# A filter is refused before parsing when its estimated cost passes this budget (see
# _filter_cost: about 0.2 s of parsing at the budget; real filters cost 2-10).
MAX_FILTER_COST = 512
# Deepest nesting of YAML collections a rules file may use. The grammar needs 6; PyYAML composes
# (and mitmproxy's filter parser parses) recursively, so thousands of levels would end in a
# RecursionError far from any line number. Checked on the event stream, which PyYAML produces
# without recursion, so the error can name the line.
MAX_NESTING = 32

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
    # What the gateway gets for a send iLink accepted without a message_id (docs/architecture.md
    # "Delivery evidence"): the answer as it came, marked ("report"), or a failure ("fail").
    unconfirmed: str = "report"


UNCONFIRMED_CHOICES = ("report", "fail")
NUDGE_MAX_CHARS = 500  # a line appended to a chat message, not a message of its own
ON_CLOSED_CHOICES = ("answer-locally", "pass-through", "defer")
DEFER_ANSWER_CHOICES = ("accepted", "error")


@dataclass(frozen=True)
class Outbox:
    """Deferred delivery: caps, expiry and pacing of the queue of sends to closed windows."""

    max_per_peer: int = 50
    max_total: int = 10_000
    max_age_s: float = 86400.0
    flush_max: int = 3
    flush_gap_s: float = 1.0
    max_attempts: int = 3


@dataclass(frozen=True)
class Cooldown:
    """Genuine rate limits: `after` of them within `within_s` cool the bot down for `for_s`."""

    after: int = 3
    within_s: float = 600.0
    for_s: float = 900.0


BUDGET_CHOICES = ("auto", "off")


@dataclass(frozen=True)
class Budget:
    """Sends per inbound message (README "Send budget"): `per_inbound` is "auto" (learnt per bot
    from iLink's first refusal of a send carrying the peer's newest token), "off", or a given
    number; a learnt limit is re-probed with one real send `reprobe_s` after it was learnt."""

    per_inbound: str | int = "auto"
    reprobe_s: float = 3600.0

    @property
    def on(self) -> bool:
        return self.per_inbound != "off"

    @property
    def given(self) -> int | None:
        return self.per_inbound if isinstance(self.per_inbound, int) else None


@dataclass(frozen=True)
class Nudge:
    """The window keeper (README "Window keeper"): once per window, `text` is appended to the
    first send that leaves `when_left` or fewer sends of a known budget (or, with `after_s`, the
    first send once the window is that old)."""

    text: str
    when_left: int = 1
    after_s: float | None = None


@dataclass(frozen=True)
class PeerState:
    """What the proxy remembers about peers for this rule (see README "Peer state")."""

    peer: JsonPath = ("msg", "to_user_id")
    client_id: JsonPath = ("msg", "client_id")
    substitute_fresh: bool = True
    remember_stale: bool = True
    on_closed: str = "answer-locally"
    closed_for_s: float = 3600.0
    dedupe_s: float = 600.0
    max_attempts: int = 2
    cooldown: Cooldown = Cooldown()
    defer_answer: str = "accepted"
    outbox: Outbox = Outbox()
    budget: Budget = Budget()
    nudge: Nudge | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    match: Match
    action: Action
    line: int
    peer_state: PeerState | None = None


@dataclass(frozen=True)
class Updates:
    """Where fresh context tokens are learnt: answers listing inbound messages (`msgs[]`)."""

    filter_expr: str
    filter: Callable[[Any], bool] = field(compare=False, repr=False)


@dataclass(frozen=True)
class RuleSet:
    source: str
    hosts: tuple[str, ...]
    rules: tuple[Rule, ...]
    updates: Updates | None = None

    @property
    def uses_peer_state(self) -> bool:
        return any(r.peer_state for r in self.rules)


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
    try:
        return _Parser(source).ruleset(text)
    except RulesError:
        raise
    except (RecursionError, ValueError, TypeError, OverflowError, MemoryError) as e:
        # A safety net: every known way for a file to break the parser is caught above with its
        # line; whatever is left must still be the one-line rules error callers handle (a reload
        # in the proxy keeps the last good rules, `check` exits 1), never a crash.
        raise RulesError(f"{source}: cannot be read as rules: {type(e).__name__}: {e}") from None


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

    def _scalar(self, node: yaml.Node, where: str) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except ValueError as e:
            # e.g. an integer of thousands of digits: Python refuses to convert it (int max str
            # digits); PyYAML lets that ValueError through without a mark
            raise self._fail(node, where, f"cannot read this value: {e}") from None
        except yaml.YAMLError as e:
            raise self._fail(node, where, f"cannot read this value: {e}") from None

    def _mapping(
        self, node: yaml.Node, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self._fail(node, where, f"expected a mapping with keys {', '.join(allowed)}")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self._scalar(key_node, where) if isinstance(key_node, yaml.ScalarNode) else None
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

    def _one_or_more(self, node: yaml.Node, where: str, what: str) -> list[yaml.Node]:
        """A scalar, or a sequence of them (`request_has: msg.x` or `[msg.x, msg.y]`)."""
        return [node] if isinstance(node, yaml.ScalarNode) else self._sequence(node, where, what)

    def _sequence(self, node: yaml.Node, where: str, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self._fail(node, where, f"expected a list of {what}")
        return list(node.value)

    def _string(self, node: yaml.Node, where: str) -> str:
        value = self._scalar(node, where) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value.strip():
            raise self._fail(node, where, "expected a non-empty string")
        return value

    def _int(self, node: yaml.Node, where: str, lo: int, hi: int) -> int:
        value = self._scalar(node, where) if isinstance(node, yaml.ScalarNode) else None
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
            self._check_nesting(text)
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise RulesError(f"{self.source}{where}: not valid YAML: {e.problem}") from None
        except yaml.YAMLError as e:
            raise RulesError(f"{self.source}: not valid YAML: {e}") from None
        if root is None:
            raise RulesError(f"{self.source}: the file is empty (expected version, hosts and rules)")
        top = self._mapping(root, "top level", ("version", "hosts", "updates", "rules"), ("version", "rules"))
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
        updates = None
        if "updates" in top or any(r.peer_state for r in rules):
            updates = self._updates(top.get("updates"))
        return RuleSet(source=self.source, hosts=hosts, rules=rules, updates=updates)

    def _check_nesting(self, text: str) -> None:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    mark = event.start_mark
                    raise RulesError(
                        f"{self.source}:{mark.line + 1}:{mark.column + 1}: nested more than "
                        f"{MAX_NESTING} levels deep (a rules file needs at most 6)"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1

    def _filter(self, node: yaml.Node, where: str) -> tuple[str, Callable[[Any], bool]]:
        expr = self._string(node, where)
        if _filter_cost(expr) > MAX_FILTER_COST:
            raise self._fail(
                node,
                where,
                "too many nested parentheses and '!' for mitmproxy's filter parser (its time grows "
                'exponentially with nesting); write it flatter, e.g. "~m POST & ~u /ilink/bot/sendmessage"',
            )
        try:
            return expr, flowfilter.parse(expr)
        except (ValueError, RecursionError):  # RecursionError: thousands of nested parentheses
            raise self._fail(
                node,
                where,
                f"{_clip(expr)!r} is not a valid mitmproxy flow filter "
                '(e.g. "~m POST & ~u /ilink/bot/sendmessage")',
            ) from None

    def _updates(self, node: yaml.Node | None) -> Updates:
        if node is None:
            return Updates(DEFAULT_UPDATES_FILTER, flowfilter.parse(DEFAULT_UPDATES_FILTER))
        m = self._mapping(node, "updates", ("filter",), ("filter",))
        expr, flt = self._filter(m["filter"], "updates.filter")
        return Updates(expr, flt)

    def _bool(self, node: yaml.Node, where: str) -> bool:
        value = self._scalar(node, where) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, bool):
            raise self._fail(node, where, "expected true or false")
        return value

    def _seconds(self, node: yaml.Node, where: str, hi: float) -> float:
        value = self._scalar(node, where) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= hi:
            raise self._fail(node, where, f"expected seconds, more than 0 and at most {hi:g}")
        return float(value)

    def _outbox(self, node: yaml.Node, where: str) -> Outbox:
        keys = ("max_per_peer", "max_total", "max_age_s", "flush_max", "flush_gap_s", "max_attempts")
        m = self._mapping(node, where, keys)
        d = Outbox()
        return Outbox(
            max_per_peer=self._int(m["max_per_peer"], f"{where}.max_per_peer", 1, 10_000)
            if "max_per_peer" in m
            else d.max_per_peer,
            max_total=self._int(m["max_total"], f"{where}.max_total", 1, 1_000_000)
            if "max_total" in m
            else d.max_total,
            max_age_s=self._seconds(m["max_age_s"], f"{where}.max_age_s", 7 * 86400)
            if "max_age_s" in m
            else d.max_age_s,
            flush_max=self._int(m["flush_max"], f"{where}.flush_max", 1, 100)
            if "flush_max" in m
            else d.flush_max,
            flush_gap_s=self._seconds(m["flush_gap_s"], f"{where}.flush_gap_s", 60)
            if "flush_gap_s" in m
            else d.flush_gap_s,
            max_attempts=self._int(m["max_attempts"], f"{where}.max_attempts", 1, 20)
            if "max_attempts" in m
            else d.max_attempts,
        )

    def _peer_state(self, node: yaml.Node, where: str) -> PeerState:
        if isinstance(node, yaml.ScalarNode) and self._scalar(node, where) is None:
            return PeerState()  # `peer_state:` with nothing after it: all defaults
        keys = (
            "defer_answer",
            "outbox",
            "peer",
            "client_id",
            "substitute_fresh",
            "remember_stale",
            "on_closed",
            "closed_for_s",
            "dedupe_s",
            "max_attempts",
            "cooldown",
            "budget",
            "nudge",
        )
        m = self._mapping(node, where, keys)
        d = PeerState()
        kw: dict[str, Any] = {}
        for key in ("peer", "client_id"):
            if key in m:
                kw[key] = self._json_path(m[key], f"{where}.{key}")
        for key in ("substitute_fresh", "remember_stale"):
            if key in m:
                kw[key] = self._bool(m[key], f"{where}.{key}")
        for key, choices in (("on_closed", ON_CLOSED_CHOICES), ("defer_answer", DEFER_ANSWER_CHOICES)):
            if key in m:
                value = self._string(m[key], f"{where}.{key}")
                if value not in choices:
                    raise self._fail(
                        m[key], f"{where}.{key}", f"{value!r} is not one of: {', '.join(choices)}"
                    )
                kw[key] = value
        if "outbox" in m:
            kw["outbox"] = self._outbox(m["outbox"], f"{where}.outbox")
        for key in ("closed_for_s", "dedupe_s"):
            if key in m:
                kw[key] = self._seconds(m[key], f"{where}.{key}", 7 * 86400)
        if "max_attempts" in m:
            kw["max_attempts"] = self._int(m["max_attempts"], f"{where}.max_attempts", 1, 5)
        if "cooldown" in m:
            c = self._mapping(m["cooldown"], f"{where}.cooldown", ("after", "within_s", "for_s"))
            dc = d.cooldown
            kw["cooldown"] = Cooldown(
                after=self._int(c["after"], f"{where}.cooldown.after", 1, 1000) if "after" in c else dc.after,
                within_s=self._seconds(c["within_s"], f"{where}.cooldown.within_s", 86400)
                if "within_s" in c
                else dc.within_s,
                for_s=self._seconds(c["for_s"], f"{where}.cooldown.for_s", 86400)
                if "for_s" in c
                else dc.for_s,
            )
        if "budget" in m:
            kw["budget"] = self._budget(m["budget"], f"{where}.budget")
        if "nudge" in m:
            kw["nudge"] = self._nudge(m["nudge"], f"{where}.nudge")
        return PeerState(**{**d.__dict__, **kw})

    def _budget(self, node: yaml.Node, where: str) -> Budget:
        m = self._mapping(node, where, ("per_inbound", "reprobe_s"))
        d = Budget()
        per_inbound: str | int = d.per_inbound
        if "per_inbound" in m:
            n = m["per_inbound"]
            value = self._scalar(n, f"{where}.per_inbound") if isinstance(n, yaml.ScalarNode) else None
            if value is False and str(n.value).lower() == "off":
                value = "off"  # YAML 1.1 reads a bare `off` as false
            if isinstance(value, int) and not isinstance(value, bool):
                per_inbound = self._int(n, f"{where}.per_inbound", 1, 1000)
            elif value not in BUDGET_CHOICES:
                raise self._fail(
                    n, f"{where}.per_inbound", "expected auto, off or a whole number from 1 to 1000"
                )
            else:
                per_inbound = value
        reprobe = d.reprobe_s
        if "reprobe_s" in m:
            reprobe = self._seconds(m["reprobe_s"], f"{where}.reprobe_s", 7 * 86400)
        return Budget(per_inbound=per_inbound, reprobe_s=reprobe)

    def _nudge(self, node: yaml.Node, where: str) -> Nudge:
        m = self._mapping(node, where, ("text", "when_left", "after_s"), ("text",))
        text = self._string(m["text"], f"{where}.text")
        if len(text) > NUDGE_MAX_CHARS:
            raise self._fail(m["text"], f"{where}.text", f"at most {NUDGE_MAX_CHARS} characters")
        return Nudge(
            text=text,
            when_left=self._int(m["when_left"], f"{where}.when_left", 0, 1000) if "when_left" in m else 1,
            after_s=self._seconds(m["after_s"], f"{where}.after_s", 7 * 86400) if "after_s" in m else None,
        )

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
            node, where, ("name", "description", "match", "action", "peer_state"), ("name", "match", "action")
        )
        name = self._string(m["name"], f"{where}.name")
        where = f"rule {name!r}"
        description = self._string(m["description"], f"{where}.description") if "description" in m else ""
        action = self._action(m["action"], f"{where}.action")
        match = self._match(m["match"], f"{where}.match", action.remove)
        peer_state = self._peer_state(m["peer_state"], f"{where}.peer_state") if "peer_state" in m else None
        return Rule(
            name=name,
            description=description,
            match=match,
            action=action,
            line=node.start_mark.line + 1,
            peer_state=peer_state,
        )

    def _match(self, node: yaml.Node, where: str, removed: JsonPath) -> Match:
        m = self._mapping(
            node,
            where,
            ("filter", "request_has", "request_match", "response_status", "response_any"),
            ("filter", "response_any"),
        )
        expr, flt = self._filter(m["filter"], f"{where}.filter")

        if "request_has" in m:
            nodes = self._one_or_more(m["request_has"], f"{where}.request_has", "dotted JSON paths")
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
            nodes = self._one_or_more(m["response_status"], f"{where}.response_status", "HTTP status codes")
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
        value = self._scalar(node, where)
        if value is None:
            return Missing()
        if isinstance(value, str | int | float | bool):
            return Equals(value)
        raise self._fail(node, where, expected)

    def _action(self, node: yaml.Node, where: str) -> Action:
        m = self._mapping(node, where, ("remove", "retries", "deadline_s", "unconfirmed"), ("remove",))
        remove = self._json_path(m["remove"], f"{where}.remove")
        retries = self._int(m["retries"], f"{where}.retries", 0, MAX_RETRIES) if "retries" in m else 1
        deadline = 10.0
        if "deadline_s" in m:
            value = (
                self._scalar(m["deadline_s"], f"{where}.deadline_s")
                if isinstance(m["deadline_s"], yaml.ScalarNode)
                else None
            )
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
        unconfirmed = "report"
        if "unconfirmed" in m:
            unconfirmed = self._string(m["unconfirmed"], f"{where}.unconfirmed")
            if unconfirmed not in UNCONFIRMED_CHOICES:
                raise self._fail(
                    m["unconfirmed"],
                    f"{where}.unconfirmed",
                    f"{unconfirmed!r} is not one of: {', '.join(UNCONFIRMED_CHOICES)}",
                )
        return Action(remove=remove, retries=retries, deadline_s=deadline, unconfirmed=unconfirmed)


def _clip(text: str, limit: int = 80) -> str:
    """A value quoted back in an error message, cut short: the message must stay one line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _filter_cost(expr: str) -> int:
    """Roughly how long mitmproxy takes to parse a filter, in units of one top-level word: each
    enclosing parenthesis multiplies a word's cost by 4, each `!` by 2 (measured ratios, rounded
    down). Scans the way mitmproxy's grammar tokenizes: quoted strings and bare words are atoms."""
    total, weight, pending = 0, 1, 0
    opened: list[int] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace() or c in "&|":
            i += 1
        elif c == "!":
            pending += 1
            i += 1
        elif c == "(":
            opened.append(4 * 2 ** min(pending, 32))
            weight *= opened[-1]
            pending = 0
            i += 1
        elif c == ")":
            weight //= opened.pop() if opened else 1
            pending = 0
            i += 1
        else:
            total += weight * 2 ** min(pending, 32)
            if total > MAX_FILTER_COST:
                return total
            pending = 0
            if c in "\"'":
                i += 1
                while i < n and expr[i] != c:
                    i += 2 if expr[i] == "\\" else 1
                i += 1
            else:
                i += 1
                while i < n and not expr[i].isspace() and expr[i] not in "()~'\"":
                    i += 1
    return total


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
        if a.unconfirmed == "fail":
            lines.append(
                "    a send iLink accepts without a message_id (unconfirmed) is answered as a failure "
                '(HTTP 200 {"ret":-1,...}; unconfirmed: fail)'
            )
        else:
            lines.append(
                "    a send iLink accepts without a message_id (unconfirmed) is handed back as it came, "
                "marked X-Ilink-Fixproxy: ...delivery=unconfirmed (unconfirmed: report)"
            )
        if rule.peer_state:
            lines.extend("    " + line for line in _describe_peer_state(rule.peer_state, a))
    if ruleset.updates:
        lines.append("")
        lines.append(f"  fresh tokens are learnt from answers to  {ruleset.updates.filter_expr}")
    return "\n".join(lines)


def _describe_peer_state(ps: PeerState, a: Action) -> list[str]:
    field_name = ".".join(a.remove)
    peer, cid = ".".join(ps.peer), ".".join(ps.client_id)
    out = [f"peer state (peer = {peer}, message = {cid}):"]
    if ps.substitute_fresh:
        out.append(f"  a {field_name} older than the newest one seen for the peer is replaced by it")
    if ps.remember_stale:
        out.append(f"  a {field_name} proven stale is removed before the send goes out")
    if ps.on_closed == "defer":
        o = ps.outbox
        answer = 'HTTP 200 {"ret":0}' if ps.defer_answer == "accepted" else "iLink's refusal"
        out.append(
            f"  sends to a closed window are queued (outbox: {o.max_per_peer} per peer, {o.max_total} "
            f"in all, kept {o.max_age_s:g} s) and answered with {answer}; when the peer writes, "
            f"up to {o.flush_max} are delivered with the fresh token, {o.flush_gap_s:g} s apart"
        )
    elif ps.on_closed == "answer-locally":
        out.append(
            f"  if even the send without {field_name} is refused, the peer's window is closed: later sends "
            f"are answered locally with that refusal until the peer writes (at most {ps.closed_for_s:g} s)"
        )
    else:
        out.append("  closed windows are only recorded; sends still go to iLink (on_closed: pass-through)")
    c = ps.cooldown
    out.append(
        f"  {c.after} genuine rate limits within {c.within_s:g} s cool the bot down for {c.for_s:g} s "
        "(sends answered locally)"
    )
    out.append(
        f"  at most {ps.max_attempts} upstream attempts per {cid}; a retry while it is on its way waits "
        f"for it; one iLink accepted is answered from memory for {ps.dedupe_s:g} s"
    )
    b = ps.budget
    held = "deferred" if ps.on_closed == "defer" else "answered locally"
    if ps.on_closed == "pass-through":
        held = "still sent (on_closed: pass-through)"
    if b.per_inbound == "auto":
        out.append(
            "  sends per inbound message are counted; the budget is learnt from iLink's first refusal of "
            f"the newest token, then further sends are {held} until the peer writes (re-probed after "
            f"{b.reprobe_s:g} s)"
        )
    elif b.given is not None:
        out.append(f"  at most {b.given} sends per inbound message, then sends are {held} until it writes")
    else:
        out.append("  sends per inbound message are not counted (budget: off)")
    if ps.nudge is not None:
        n = ps.nudge
        when = f"leaves {n.when_left} or fewer sends of a known budget"
        if n.after_s is not None:
            when += f", or once the window is {n.after_s:g} s old"
        out.append(f"  the first send of a window that {when} carries the nudge ({len(n.text)} characters)")
    return out


def with_deferral(ruleset: RuleSet) -> RuleSet:
    """The rules with deferred delivery on for every rule (``--defer``): ``on_closed: defer``,
    adding peer state with its defaults where a rule has none."""
    rules = tuple(
        dataclasses.replace(r, peer_state=dataclasses.replace(r.peer_state or PeerState(), on_closed="defer"))
        for r in ruleset.rules
    )
    updates = ruleset.updates or Updates(DEFAULT_UPDATES_FILTER, flowfilter.parse(DEFAULT_UPDATES_FILTER))
    return dataclasses.replace(ruleset, rules=rules, updates=updates)
