"""The mitmproxy addon: options, validation, and short hooks that delegate to pure code.

Flow of one request:
  requestheaders  - a flow no rule selects is streamed straight through (never buffered);
  response        - for a selected flow, if the answer is a failure the rule repairs, re-issue
                    the request without the rule's field and hand back the new answer.
Whatever goes wrong while repairing, the caller keeps the original upstream answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl
import time
import traceback
import weakref
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import human

from . import overload, trailers
from . import rules as rules_mod
from . import state as state_mod
from .core import policy
from .core.model import Decision, Delivery, StoredAnswer
from .health import REPAIRS, STATE, Health, component_of
from .jsonedit import get_path
from .matching import (
    AnswerSummary,
    condition_holds,
    first_rule,
    parse_json_object,
    request_line_only,
    request_qualifies,
)
from .peers import PeerTracker, attempt_record, drive, mark_unconfirmed
from .redact import known_values, redact_known, token_hash
from .reissue import Reissuer, UpstreamTrust
from .rules import Rule, RuleSet

log = logging.getLogger("ilink_fixproxy")

HEADER = "X-Ilink-Fixproxy"
MARK_REPAIRED = ":wrench:"
MARK_STILL_FAILING = ":warning:"
_MARKS = {
    "repaired": MARK_REPAIRED,
    "substituted": MARK_REPAIRED,
    "stripped": MARK_REPAIRED,
    "replayed": ":leftwards_arrow_with_hook:",
}
INTERCEPT_CHOICES = ("rule-hosts", "all")
HOUSEKEEPING_S = 2.0
_LINE_MEMO_SIZE = 1024  # distinct (method, host, URL) request lines whose rule selection is kept
_MAX_ERROR_CHARS = 300  # of an internal error's message in the log
_TLS_OPTIONS = {"ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir"}


class IlinkFixProxy:
    def __init__(self) -> None:
        self.ruleset: RuleSet = RuleSet(source="<not loaded>", hosts=(), rules=())
        self.buffer_limit = 1024 * 1024
        self.reissuer = Reissuer(max_answer_bytes=self.buffer_limit)
        self._managed_allow_hosts: list[str] = []
        self.tracker: PeerTracker | None = None
        self._state_key: tuple[str, ...] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # write-backs and closes under way
        self._running = False
        self._housekeeping: asyncio.Future[None] | None = None
        self._exhaustion: overload.ExhaustionReport | None = None
        self._in_flight = 0
        self._line_memo_for: RuleSet | None = None
        self._line_memo: dict[tuple[bytes, str, str], tuple[list[Rule], bool]] = {}
        self._line_only = False
        self._selections: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[RuleSet, list[Rule], bool]] = (
            weakref.WeakKeyDictionary()
        )
        self._managed_stream_limit: str | None = None
        self._rules_mtime: int | None = None
        self.health = Health()  # what /healthz reports besides the event loop (metrics.py)

    # ------------------------------------------------------------------ options

    def load(self, loader: Any) -> None:
        loader.add_option(
            "ilink_rules",
            str,
            "",
            "Path of the ilink-fixproxy rules YAML file. Empty: the rules packaged with "
            "ilink-fixproxy (repair stale context_token on sendmessage).",
        )
        loader.add_option(
            "ilink_buffer_limit",
            str,
            "1m",
            "Largest body (k/m/g suffixes) that a flow selected by a rule is buffered for; larger "
            "bodies stream through untouched. Flows no rule selects always stream.",
        )
        loader.add_option(
            "ilink_intercept",
            str,
            "rule-hosts",
            "In forward (regular) and upstream modes: 'rule-hosts' intercepts TLS only for the "
            "hosts listed in the rules file and tunnels every other host untouched (unless "
            "allow_hosts/ignore_hosts are set explicitly); 'all' leaves mitmproxy's default.",
            choices=list(INTERCEPT_CHOICES),
        )
        loader.add_option(
            "ilink_state",
            str,
            "",
            "Peer-state file (SQLite) for rules with peer_state: fresh and stale tokens, closed send "
            "windows, cooldowns, sent client_ids. Empty: ilink-fixproxy-state.sqlite3 in the confdir; "
            "':memory:' keeps nothing across restarts. One running proxy per file. "
            "redis://HOST:PORT/DB or rediss://...: a Redis store shared by several replicas "
            "(needs ILINK_FIXPROXY_STATE_KEY).",
        )
        loader.add_option(
            "ilink_defer",
            bool,
            False,
            "Deferred delivery for every rule (on_closed: defer): sends to a peer whose window is "
            "closed are queued and delivered when the peer writes again, instead of being refused.",
        )
        trailers.install()  # a chunked body with trailers: a clear 400/502 at once, not a hang
        # mitmproxy calls configure() only for options that change later (or, for `-s` scripts,
        # once with all of them), so start from the packaged rules rather than from nothing.
        self.ruleset = rules_mod.load_default()
        # httpx logs every request at INFO, including full URLs; ours say what matters.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)

    def configure(self, updated: set[str]) -> None:
        if updated & {"ilink_rules", "ilink_defer"}:
            path = ctx.options.ilink_rules
            try:
                ruleset = rules_mod.load_file(path) if path else rules_mod.load_default()
            except rules_mod.RulesError as e:
                raise exceptions.OptionsError(f"ilink_rules: {e}") from None
            self.ruleset = rules_mod.with_deferral(ruleset) if ctx.options.ilink_defer else ruleset
            self._rules_mtime = self._rules_file_mtime()
            log.info(f"ilink-fixproxy: {len(self.ruleset.rules)} rule(s) from {self.ruleset.source}")
        if "ilink_buffer_limit" in updated:
            try:
                limit = human.parse_size(ctx.options.ilink_buffer_limit)
            except ValueError:
                limit = None
            if not limit or limit <= 0:
                raise exceptions.OptionsError(
                    f"ilink_buffer_limit: {ctx.options.ilink_buffer_limit!r} is not a size "
                    "(expected e.g. 512k or 1m)"
                )
            self.buffer_limit = limit
            self.reissuer.max_answer_bytes = limit
        if updated & {"ilink_buffer_limit", "stream_large_bodies"}:
            self._sync_stream_large_bodies()
        if updated & _TLS_OPTIONS:
            trust = UpstreamTrust(
                insecure=ctx.options.ssl_insecure,
                ca_file=ctx.options.ssl_verify_upstream_trusted_ca,
                ca_dir=ctx.options.ssl_verify_upstream_trusted_confdir,
            )
            try:
                self.reissuer.configure(trust)
            except (OSError, ssl.SSLError) as e:
                raise exceptions.OptionsError(
                    f"cannot load the upstream CA ({trust.ca_file or trust.ca_dir}): {e}"
                ) from None
        if "ilink_intercept" in updated and ctx.options.ilink_intercept not in INTERCEPT_CHOICES:
            raise exceptions.OptionsError(
                f"ilink_intercept: {ctx.options.ilink_intercept!r} is not one of "
                f"{', '.join(INTERCEPT_CHOICES)}"
            )
        if updated & {"ilink_rules", "ilink_intercept", "mode", "allow_hosts", "ignore_hosts"}:
            self._sync_allow_hosts()
        # The store is opened once mitmproxy runs, not while options are still being applied: a
        # rejected option makes mitmproxy re-apply the previous values, which would otherwise open
        # (and lock) the default state file as a side effect.
        if self._running and updated & {"ilink_rules", "ilink_defer", "ilink_state", "confdir"}:
            self._open_state()

    def running(self) -> None:
        self._running = True
        self._sync_stream_large_bodies()  # configure() may never have seen ilink_buffer_limit
        try:
            self._open_state()
        except exceptions.OptionsError as e:
            log.error(str(e))  # mitmproxy's errorcheck stops a proxy that logged an error at startup
        self._housekeeping = asyncio.ensure_future(self._housekeep())
        # after mitmproxy installed its own handler (in Master.run), which this one wraps
        self._exhaustion = overload.install(asyncio.get_running_loop())

    async def _housekeep(self) -> None:
        """Every few seconds: reload an edited rules file, expire old deferred sends, serve
        `outbox flush` requests."""
        failing: dict[str, str] = {}  # step -> the error it last logged
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            for name, step in (
                ("rules reload", self._reload_rules_if_changed),
                ("peer state", self._tend_state),
            ):
                # Each step on its own, and nothing escapes: an exception ending this task would
                # silently stop reloads, outbox expiry, flush requests and the write-back fallback.
                try:
                    done = step()
                    if inspect.isawaitable(done):
                        await done
                except Exception as e:
                    what = f"{type(e).__name__}: {e}"
                    if failing.get(name) != what:  # once, not every round while it lasts
                        log.warning(f"ilink-fixproxy housekeeping ({name}): {what}")
                    failing[name] = what
                    self.health.failed(component_of(e), e)
                else:
                    failing.pop(name, None)

    async def _tend_state(self) -> None:
        if (tracker := self.tracker) is not None:
            await tracker.write_back()  # (normally done by then: see response and error)
            await tracker.outbox.expire(time.time())
            await tracker.flush_requested()

    def _rules_file_mtime(self) -> int | None:
        path = ctx.options.ilink_rules
        try:
            return os.stat(path).st_mtime_ns if path else None
        except OSError:
            return None

    def _reload_rules_if_changed(self) -> None:
        """A rules file edited on disk is picked up; a broken edit keeps the last good rules."""
        mtime = self._rules_file_mtime()
        if mtime is None or mtime == self._rules_mtime:
            return
        self._rules_mtime = mtime
        path = ctx.options.ilink_rules
        try:
            ruleset = rules_mod.load_file(path)
        except rules_mod.RulesError as e:
            log.warning(f"rules file changed but is not valid, keeping the last good rules: {e}")
            return
        self.ruleset = rules_mod.with_deferral(ruleset) if ctx.options.ilink_defer else ruleset
        log.info(f"rules reloaded: {len(self.ruleset.rules)} rule(s) from {path}")
        self._sync_allow_hosts()
        try:
            self._open_state()
        except exceptions.OptionsError as e:
            log.warning(f"rules reloaded, but peer state is unavailable: {e}")

    def busy(self) -> bool:
        """Repairs or sends still in flight (graceful shutdown waits for them)."""
        return self._in_flight > 0 or bool(self.tracker and self.tracker.busy())

    def _rule_named(self, name: str) -> Rule | None:
        return next((r for r in self.ruleset.rules if r.name == name), None)

    def _open_state(self) -> None:
        """Open the peer-state store when the rules need one (and only then: no stray files)."""
        if not self.ruleset.uses_peer_state:
            self._close_state()
            return
        path = (
            ctx.options.ilink_state
            or os.environ.get("ILINK_FIXPROXY_REDIS_URL")
            or state_mod.default_path(ctx.options.confdir)
        )
        key = (path,)
        if key == self._state_key and self.tracker is not None:
            return
        self._close_state()
        try:
            store = open_store(path)
        except state_mod.StateError as e:
            raise exceptions.OptionsError(str(e)) from None
        self.tracker = PeerTracker(store, self.reissuer, self._rule_named)
        self.tracker.health = self.health
        self.health.state_file_check = getattr(self.tracker.store, "file_problem", None)
        self._state_key = key
        log.info(f"ilink-fixproxy: peer state in {self.tracker.store.path}")

    def _close_state(self) -> None:
        """Let go of the store (its pending writes first); on the loop when one runs."""
        if (tracker := self.tracker) is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(tracker.aclose())
            else:
                task = loop.create_task(tracker.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self.tracker, self._state_key = None, None
        self.health.state_file_check = None

    async def done(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._exhaustion is not None:
            self._exhaustion.cancel()
        tracker, self.tracker, self._state_key = self.tracker, None, None
        self.health.state_file_check = None
        if tracker is not None:
            await tracker.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _sync_stream_large_bodies(self) -> None:
        """Bodies of unknown length (chunked) are only seen growing; mitmproxy's own
        stream_large_bodies switches them to streaming once they pass the limit, so a selected flow
        never holds more than ilink_buffer_limit in memory. An operator's own setting wins."""
        current = ctx.options.stream_large_bodies
        want = ctx.options.ilink_buffer_limit
        if current and current != self._managed_stream_limit:
            return
        if current != want:
            self._managed_stream_limit = want
            ctx.options.update(stream_large_bodies=want)

    def _sync_allow_hosts(self) -> None:
        """Forward mode: intercept only the rules' hosts, so other traffic never needs our CA."""
        want: list[str] = []
        if ctx.options.ilink_intercept == "rule-hosts" and self.ruleset.hosts:
            try:
                modes = [mode_specs.ProxyMode.parse(m) for m in ctx.options.mode]
            except ValueError:
                modes = []  # mitmproxy itself reports a malformed mode
            # In reverse mode every connection goes to the one upstream: restricting hosts there
            # would turn it into a raw TCP tunnel.
            if modes and not any(isinstance(m, mode_specs.ReverseMode) for m in modes):
                want = rules_mod.host_patterns(self.ruleset.hosts)
        current = list(ctx.options.allow_hosts)
        if (current and current != self._managed_allow_hosts) or ctx.options.ignore_hosts:
            return  # the operator chose allow_hosts/ignore_hosts themselves: theirs wins
        if current != want:
            self._managed_allow_hosts = want
            ctx.options.update(allow_hosts=want)

    # ------------------------------------------------------------------ hooks

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not (self._candidates(flow) or self._is_update(flow)) or self._too_large(flow.request.headers):
            flow.request.stream = True

    async def request(self, flow: http.HTTPFlow) -> None:
        if self.tracker is None or flow.response is not None or flow.request.raw_content is None:
            return
        picked = self._peer_state_rule(flow)
        if picked is None:
            return
        rule, doc = picked
        try:
            self._in_flight += 1
            outcome = await self.tracker.handle(flow, rule, doc, write_back_later=True)
        except Exception as e:  # never worse than no proxy: mitmproxy forwards it as usual
            log.warning(
                f"{_endpoint(flow)}: peer-state handling failed, forwarding as is: {type(e).__name__}: {e}"
            )
            self.health.failed(component_of(e), e)
            return
        finally:
            self._in_flight -= 1
        self.health.succeeded(REPAIRS)
        if outcome.response is None:
            return
        flow.response = outcome.response
        flow.metadata.setdefault("ilink_fixproxy", {}).update(
            {
                "decision": outcome.decision,
                "rule": rule.name,
                "handled": True,
                "attempts": list(outcome.trace),
                "delivery": outcome.delivery,
                "budget": outcome.budget,
                "nudged": outcome.nudged,
            }
        )
        if outcome.decision != "passed":
            flow.comment = (
                f"ilink-fixproxy {outcome.decision} (rule {rule.name}): "
                + flow.response.headers.get(HEADER, "")
            )
            flow.marked = _MARKS.get(outcome.decision, MARK_STILL_FAILING)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream or (flow.response and self._too_large(flow.response.headers)):
            flow.response.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        if self.tracker is not None and self._is_update(flow):
            try:
                await self.tracker.observe_updates(flow)
            except Exception as e:  # the poll's answer passes on untouched whatever happens here
                log.warning(f"getupdates: could not record inbound messages: {type(e).__name__}: {e}")
                self.health.failed(component_of(e), e)
            else:
                self.health.succeeded(STATE)
            return
        if flow.metadata.get("ilink_fixproxy", {}).get("handled"):
            if self.tracker is not None:
                # mitmproxy writes the answer to the gateway as soon as this hook returns; store
                # what the send taught us right after that (see PeerTracker.handle)
                task = asyncio.get_running_loop().create_task(self.tracker.write_back(flow.id))
                self._closing.add(task)  # (a reference, so the task is not collected midway)
                task.add_done_callback(self._closing.discard)
            return
        selected = self._selected(flow)
        if selected is not None:
            rule, request_doc = selected
            self._in_flight += 1
            try:
                await self._repair(flow, rule, request_doc)
            except Exception as e:  # never worse than no proxy: the original answer stays
                log.warning(
                    f"{_endpoint(flow)}: repair by rule {rule.name!r} failed, original answer kept: "
                    f"internal error {_internal_error(e, flow, request_doc)}"
                )
                self.health.failed(REPAIRS, e)
            else:
                self.health.succeeded(REPAIRS)
            finally:
                self._in_flight -= 1
        try:
            self._evidence(flow)
        except Exception as e:  # the answer passes on as it is whatever happens here
            doc = selected[1] if selected else parse_json_object(flow.request.get_content(strict=False)) or {}
            log.warning(f"{_endpoint(flow)}: could not classify the answer: {_internal_error(e, flow, doc)}")

    async def error(self, flow: http.HTTPFlow) -> None:
        if self.tracker is not None:
            await self.tracker.write_back(flow.id)  # a send answered but never delivered: still stored
        meta = flow.metadata.get("ilink_fixproxy") or {}
        if flow.response is None and "delivery" not in meta and self._send_rule(flow) is not None:
            # A send mitmproxy forwarded that brought back no answer (reset, timeout)
            flow.metadata.setdefault("ilink_fixproxy", {})["delivery"] = Delivery.FAILED

    def _send_rule(self, flow: http.HTTPFlow) -> Rule | None:
        """The rule whose `unconfirmed` option applies to this send, whatever the answer: the
        first whose filter and request conditions select it, else the first whose filter does
        (a send without the token the rule repairs is still a send whose delivery counts)."""
        candidates = self._candidates(flow)
        if not candidates or flow.request.raw_content is None:
            return None
        doc = parse_json_object(flow.request.raw_content)
        return next((r for r in candidates if request_qualifies(r.match, doc)), candidates[0])

    def _evidence(self, flow: http.HTTPFlow) -> None:
        """Classify the answer mitmproxy forwarded (repaired or not) for a send a rule selects:
        journaled and counted as `delivery`; an unconfirmed one is marked, or made a failure."""
        response = flow.response
        if response is None or response.raw_content is None:
            return  # streamed: the answer already went out unread
        if "delivery" in flow.metadata.get("ilink_fixproxy", {}) or (rule := self._send_rule(flow)) is None:
            return
        meta = flow.metadata.setdefault("ilink_fixproxy", {})
        try:
            content: bytes | None = response.get_content(strict=True)
        except ValueError:
            content = None
        if not content and response.raw_content:
            # Bytes that decode to nothing (a broken gzip stream, which mitmproxy 12 reads as
            # empty instead of failing): not an answer anyone can read, so not "accepted".
            content = None
        evidence = policy.delivery(response.status_code, content, parse_json_object(content))
        meta["delivery"] = evidence
        if evidence is Delivery.UNCONFIRMED:
            replaced = StoredAnswer(200, policy.JSON, policy.UNCONFIRMED_FAILURE)
            mark_unconfirmed(response, rule, replaced if rule.action.unconfirmed == "fail" else None)
            log.info(
                f"unconfirmed: {_endpoint(flow)}: iLink accepted it without a message_id; the gateway gets "
                f"{'a failure' if rule.action.unconfirmed == 'fail' else 'the answer as it came'}"
            )

    # ------------------------------------------------------------------ helpers

    def _selection(self, flow: http.HTTPFlow) -> tuple[list[Rule], bool]:
        """The rules whose filter selects the flow, and whether it is a getupdates poll; worked out
        once per flow (filters read the request line and headers) and per rules version, since
        several hooks ask. Kept off flow.metadata, which ends up in flow files."""
        cached = self._selections.get(flow)
        if cached is not None and cached[0] is self.ruleset:
            return cached[1], cached[2]
        line_key = None
        if self._line_memo_for is not self.ruleset:
            self._line_memo_for, self._line_memo = self.ruleset, {}
            self._line_only = _filters_read_request_line_only(self.ruleset)
        if self._line_only:
            # Evaluating the filters (regexes over the URL, twice per rule) cost more than a
            # whole re-issue's bookkeeping; a proxy sees the same few request lines over and over.
            line_key = (flow.request.data.method, flow.request.host, flow.request.pretty_url)
            if (memo := self._line_memo.get(line_key)) is not None:
                self._selections[flow] = (self.ruleset, memo[0], memo[1])
                return memo
        updates = self.ruleset.updates
        picked = [r for r in self.ruleset.rules if r.match.filter(flow)]
        is_update = updates is not None and bool(updates.filter(flow))
        self._selections[flow] = (self.ruleset, picked, is_update)
        if line_key is not None:
            if len(self._line_memo) >= _LINE_MEMO_SIZE:
                self._line_memo.clear()
            self._line_memo[line_key] = (picked, is_update)
        return picked, is_update

    def _candidates(self, flow: http.HTTPFlow) -> list[Rule]:
        return self._selection(flow)[0]

    def _is_update(self, flow: http.HTTPFlow) -> bool:
        return self._selection(flow)[1]

    def _peer_state_rule(self, flow: http.HTTPFlow) -> tuple[Rule, dict[str, Any]] | None:
        rules = [r for r in self._candidates(flow) if r.peer_state]
        if not rules or flow.request.headers.get("content-encoding", "identity") != "identity":
            return None
        doc = parse_json_object(flow.request.raw_content)
        if doc is None:
            return None
        for rule in rules:
            if all(condition_holds(c, doc) for c in rule.match.request_match):
                return rule, doc
        return None

    def _too_large(self, headers: http.Headers) -> bool:
        try:
            return int(headers.get("content-length", "0")) > self.buffer_limit
        except ValueError:
            return True  # a malformed length: do not try to buffer it

    def _selected(self, flow: http.HTTPFlow) -> tuple[Rule, dict[str, Any]] | None:
        """The rule that repairs this flow's answer, or None. Cheap checks first."""
        response = flow.response
        if response is None or flow.request.raw_content is None or response.raw_content is None:
            return None  # streamed: there is no body to re-send, or the answer already went out
        candidates = self._candidates(flow)
        if not candidates or flow.request.headers.get("content-encoding", "identity") != "identity":
            return None
        request_doc = parse_json_object(flow.request.raw_content)
        try:
            answer_body = response.get_content(strict=True)
        except ValueError:
            return None
        rule = first_rule(candidates, request_doc, response.status_code, parse_json_object(answer_body))
        return (rule, request_doc) if rule and request_doc is not None else None

    async def _repair(self, flow: http.HTTPFlow, rule: Rule, request_doc: dict[str, Any]) -> None:
        """mitmproxy forwarded the first attempt and iLink refused it: re-issue it as the core
        says (without the rule's field, while it is refused, up to `retries` times, never after an
        attempt whose fate is unknown) and hand back the last answer the core finds usable."""
        action = rule.action
        original = flow.response
        assert original is not None
        content = original.get_content(strict=True)  # (decodable: see _selected)
        first = AnswerSummary.of(original.status_code, content)
        present, token = get_path(request_doc, action.remove)
        upstream_s = (original.timestamp_end or time.time()) - (
            flow.request.timestamp_end or flow.request.timestamp_start
        )
        trace = [attempt_record(original.status_code, content, upstream_s * 1000, "original")]
        flow.metadata["ilink_fixproxy"] = {"token": token_hash(token), "attempts": trace}
        field = ".".join(action.remove)
        what = f"{_endpoint(flow)} with {field} {token_hash(token)}: iLink answered {first.short()}"
        x = policy.Exchange.forwarded(
            rule,
            policy.gateway_token(present, token),
            flow.request.raw_content or b"",
            flow.request.timestamp_start + action.deadline_s,
            original.status_code,
            (),
            content,
            parse_json_object(content),
        )

        def reissue(step: policy.Step) -> Awaitable[http.Response]:
            assert step.timeout is not None  # (a re-issue always has the rest of the deadline)
            return self.reissuer.send(flow.request, step.body, flow.server_conn.via, step.timeout)

        started = time.monotonic()
        answers = await drive(x, x.next(time.time()), reissue, trace, time.time)
        ms = round((time.monotonic() - started) * 1000)
        decision = x.conclude(time.time()).decision

        if decision is Decision.MATCHED:
            why = "retries: 0" if action.retries == 0 else "its body cannot be edited without it"
            self._annotate(flow, rule, decision, f"{what}; not re-issued ({why})", None)
            log.info(f"{what}; rule {rule.name!r} matched, not re-issued")
            return
        if decision is Decision.REISSUE_FAILED:
            note = f"{what}; re-issue without {field} failed ({'; '.join(x.errors)}), original answer kept"
            self._annotate(flow, rule, decision, note, None)
            log.warning(f"{note} [{ms} ms]")
            return

        answer, answer_body = answers[-1]
        now = AnswerSummary.of(answer.status_code, answer_body)
        answer.headers[HEADER] = (
            f"{decision}; rule={rule.name}; removed={field}; first={first.short()}; "
            f"reissues={x.reissues}; now={now.short()}"
        )
        flow.response = answer
        note = f"{what}; re-issued without {field} ({x.reissues}x, {ms} ms): {now.short()}"
        self._annotate(flow, rule, decision, note, now)
        log.info(f"{decision}: {note}")

    @staticmethod
    def _annotate(
        flow: http.HTTPFlow, rule: Rule, decision: Decision, note: str, now: AnswerSummary | None
    ) -> None:
        flow.comment = f"ilink-fixproxy {decision} (rule {rule.name}): {note}"
        flow.marked = MARK_REPAIRED if decision == "repaired" else MARK_STILL_FAILING
        flow.metadata.setdefault("ilink_fixproxy", {}).update(
            {"decision": decision, "rule": rule.name, "answer": now.short() if now else None}
        )


def _internal_error(e: BaseException, flow: http.HTTPFlow, request_doc: dict[str, Any]) -> str:
    """An unexpected exception in one line an operator can act on and report: its type, its
    message, and where it was raised (file:line of the innermost frame), e.g. ``AssertionError:
    (no message) at asyncio/staggered.py:101``. Anything of the request the message might quote
    (tokens, ids, message text) is replaced by its hash; the log formatter's redaction applies
    on top."""
    message = redact_known(str(e), known_values(request_doc, flow.request.headers.items(multi=True)))
    message = " ".join(message.split())  # one line, whatever the message holds
    if len(message) > _MAX_ERROR_CHARS:  # (cut after the redaction: no half secret survives it)
        message = message[:_MAX_ERROR_CHARS] + "..."
    frames = traceback.extract_tb(e.__traceback__)
    where = ""
    if frames:
        path = Path(frames[-1].filename)
        where = f" at {path.parent.name}/{path.name}:{frames[-1].lineno}"
    return f"{type(e).__name__}: {message or '(no message)'}{where}"


def _endpoint(flow: http.HTTPFlow) -> str:
    return flow.request.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "/"


def _filters_read_request_line_only(ruleset: RuleSet) -> bool:
    filters = [r.match.filter for r in ruleset.rules]
    if ruleset.updates is not None:
        filters.append(ruleset.updates.filter)
    return all(request_line_only(f) for f in filters)


def open_store(path: str) -> Any:  # -> ports.Store
    """The store `--state` names: a Redis URL (shared by replicas) or a SQLite file. StateError,
    saying what to do, when it cannot be used."""
    if is_redis_url(path):
        from . import store_redis

        return store_redis.RedisStore.from_url(path)
    return state_mod.SqliteStore(state_mod.StateStore(path))


def is_redis_url(path: str) -> bool:
    return path.startswith(("redis://", "rediss://"))
