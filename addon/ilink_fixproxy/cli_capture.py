"""The command-line side of capture and observability, kept apart from cli.py.

cli.py calls: ``add_run_flags`` and ``add_subcommands`` while building its parser,
``run_options`` for the mitmproxy options the flags map to (kept in ``Settings.observability``),
``make_master`` to build the master (mitmweb's with ``--ui``, see ``ui_master``) with Capture and
Metrics after our addon, and ``dispatch`` for the ``capture`` and ``explain`` commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

# Only the standard library at import time: cli.py imports this for every command.
LOG_FORMATS = ("text", "json")  # logfmt.LOG_FORMATS

# mitmweb's default flow-list columns plus the comment, which says what the proxy did.
WEB_COLUMNS = ("tls", "icon", "path", "method", "status", "size", "time", "comment")

__all__ = [
    "add_run_flags",
    "add_subcommands",
    "configure_logging",
    "dispatch",
    "make_master",
    "observability_addons",
    "run_options",
    "ui_master",
]


def configure_logging(fmt: str) -> None:
    """Make mitmproxy's terminal log print text or JSON lines (the Capture addon's
    ``ilink_log_format`` option does this; exposed for embedders)."""
    from .logfmt import configure_logging as configure

    configure(fmt)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("capture and observability")
    group.add_argument(
        "--capture",
        metavar="DIR",
        default=None,
        help="append one redacted JSON line per iLink API exchange to DIR/journal.jsonl (owner-only)",
    )
    group.add_argument(
        "--capture-ids", action="store_true", help="with --capture: peer and bot ids in clear, not hashed"
    )
    group.add_argument(
        "--capture-bodies",
        action="store_true",
        help="with --capture: keep message text and media fields (secrets are still hashed)",
    )
    group.add_argument(
        "--capture-flows",
        action="store_true",
        help="with --capture: also write redacted mitmproxy flows to DIR/flows.mitm (mitmweb -r)",
    )
    group.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus metrics at /metrics and a health check at /healthz (e.g. 127.0.0.1:9464)",
    )
    group.add_argument(
        "--log-format",
        choices=list(LOG_FORMATS),
        default="text",
        help="log lines as text (default) or one JSON object per line",
    )
    group.add_argument(
        "--ui",
        action="store_true",
        help="run with mitmproxy's web UI (mitmweb, http://127.0.0.1:8081 unless --set web_port=...)",
    )


def run_options(args: argparse.Namespace) -> dict[str, object]:
    """The mitmproxy / addon options the run flags map to (UsageError for inconsistent flags)."""
    from .cli import UsageError
    from .metrics import parse_hostport

    opts: dict[str, object] = {}
    capture = getattr(args, "capture", None)
    extras = [
        flag
        for flag, on in (
            ("--capture-ids", getattr(args, "capture_ids", False)),
            ("--capture-bodies", getattr(args, "capture_bodies", False)),
            ("--capture-flows", getattr(args, "capture_flows", False)),
        )
        if on
    ]
    if extras and not capture:
        verb = "apply" if len(extras) > 1 else "applies"
        raise UsageError(f"{', '.join(extras)} only {verb} with --capture DIR")
    if capture:
        opts.update(
            ilink_capture=capture,
            ilink_capture_ids=bool(getattr(args, "capture_ids", False)),
            ilink_capture_bodies=bool(getattr(args, "capture_bodies", False)),
            ilink_capture_flows=bool(getattr(args, "capture_flows", False)),
        )
    if metrics := getattr(args, "metrics", None):
        try:
            parse_hostport(metrics)
        except ValueError as e:
            raise UsageError(f"--metrics {e}") from None
        opts["ilink_metrics"] = metrics
    fmt = getattr(args, "log_format", "text") or "text"
    if fmt != "text":
        opts["ilink_log_format"] = fmt
    if getattr(args, "ui", False):
        opts["web_open_browser"] = False  # a proxy is usually started where no browser runs
        opts["web_columns"] = [*WEB_COLUMNS]
    return opts


def make_master(opts: Any, settings: Any, ours: Any, *extra: Any) -> Any:
    """The master `ilink-fixproxy` runs: mitmweb's with ``--ui``, else a plain one with the lean
    chain (chain.py); `ours` (IlinkFixProxy), then Capture and Metrics, then `extra`. The log
    format is set before any option is applied, so even the first lines come out in it."""
    from mitmproxy import master

    from .chain import proxy_addons
    from .egress import EgressPolicy

    chain = [ours, *observability_addons()]
    # Last, so that its refusals (answers set in requestheaders) come after every addon that
    # may have asked for the request to be streamed (see EgressPolicy._precheck).
    extra = (*extra, EgressPolicy())
    if getattr(settings, "ui", False):
        m = ui_master(opts, chain, *extra, confdir=getattr(settings, "confdir", None))
    else:
        m = master.Master(opts, with_termlog=True)
        m.addons.add(*proxy_addons(*chain, *extra))
    configure_logging(str(getattr(settings, "observability", {}).get("ilink_log_format", "text")))
    return m


class Observability:
    """Capture and Metrics as one chain entry: mitmproxy hands every event to an entry's
    sub-addons (``addons``) for the cost of one dispatch, which matters per request (chain.py)."""

    name = "ilink_observability"

    def __init__(self) -> None:
        from .capture import Capture
        from .metrics import Metrics

        self.addons = [Capture(), Metrics()]


def observability_addons() -> list[Any]:
    """The addons that go right after IlinkFixProxy in the chain."""
    return [Observability()]


UI_PASSWORD_ENV = "ILINK_FIXPROXY_UI_PASSWORD"
UI_PASSWORD_FILE = "ilink-fixproxy-ui-password"


def require_web_auth() -> None:
    """Refuse --ui where mitmweb cannot require a password (mitmproxy before 11.1.2: 11.0.x is
    the newest on Python 3.11). Its API serves every flow, bot tokens included, to whoever
    reaches the port, and ``PUT /options`` changes any option (``scripts`` runs code)."""
    from mitmproxy.tools.web import webaddons
    from mitmproxy.version import VERSION

    from .cli import UsageError

    if not hasattr(webaddons, "WebAuth"):
        raise UsageError(
            f"--ui: the web UI of mitmproxy {VERSION} has no authentication (anyone who reaches its "
            "port could read every flow, bot tokens included, and change options); --ui needs "
            "mitmproxy >= 12 (Python >= 3.12)"
        )


def ui_password(confdir: Path) -> tuple[str, str]:
    """The web UI's password and where the operator finds it.

    From ``$ILINK_FIXPROXY_UI_PASSWORD`` when set; otherwise from ``<confdir>/ilink-fixproxy-ui-
    password`` (owner-only, created with a random one on first use, kept across restarts so a
    bookmark or script keeps working). Never printed: logs travel further than the confdir
    (``docker logs``, journald), and the password opens every flow, bot tokens included. Not a
    flag either: command lines are visible to every user on the machine (``ps``)."""
    import os
    import secrets

    from .cli import UsageError

    if secret := os.environ.get(UI_PASSWORD_ENV, ""):
        return secret, f"${UI_PASSWORD_ENV}"
    path = confdir / UI_PASSWORD_FILE
    try:
        confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if path.stat().st_mode & 0o077:
                raise UsageError(
                    f"--ui: {path} is readable by other users; `chmod 600` it, or delete it for a new one"
                ) from None
            secret = path.read_text("utf-8").strip()
        else:
            secret = secrets.token_urlsafe(24)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secret + "\n")
    except OSError as e:
        raise UsageError(f"--ui: cannot keep the web UI password in {path}: {e.strerror or e}") from None
    if not secret:
        raise UsageError(f"--ui: {path} is empty; delete it for a new password or write one into it")
    return secret, f"the file {path} (owner-only)"


class _DropPlaintextWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using a plaintext password")


class UiNotice:
    """Says, once the web UI listens, where its password is (never the password itself)."""

    def __init__(self, password: str, where: str) -> None:
        self.password = password
        self.where = where

    def running(self) -> None:
        from mitmproxy import ctx

        host, port = ctx.options.web_host, ctx.options.web_port
        shown = f"[{host}]" if ":" in host else host
        where = self.where if ctx.options.web_password == self.password else "the web_password option"
        logging.getLogger("ilink_fixproxy").info(
            f"ilink-fixproxy: web UI on http://{shown}:{port}/ needs a password: {where}"
        )


def ui_master(opts: Any, ours: list[Any], *extra: Any, confdir: Path | None = None) -> Any:
    """mitmweb's master with our addons where ``mitmweb -s`` puts scripts (right after the script
    loader, so Save/SaveHar and the web view record the repaired answers), then `extra`; its
    password from ``ui_password`` (an operator's own ``web_password`` option wins).

    WebMaster adds mitmproxy's default addons itself, so the command's lean chain (chain.py) is
    not used here: the UI wants every default addon anyway."""
    from mitmproxy.addons import dumper, script
    from mitmproxy.tools.web.master import WebMaster

    require_web_auth()
    secret, where = ui_password(confdir or Path("~/.mitmproxy").expanduser())
    m = WebMaster(opts, with_termlog=True)
    # The password itself, not an argon2 hash of it: mitmweb checks a hash on its event loop
    # (the proxy's) for each request without a session cookie, ~0.25 s each, so wrong guesses
    # would stall the traffic. It stays in memory; the UI's options page shows it only to
    # someone who already knows it. mitmweb's warning about plaintext is for passwords typed on
    # a command line, which this one never is.
    quiet = _DropPlaintextWarning()
    web_log = logging.getLogger("mitmproxy.tools.web.webaddons")
    web_log.addFilter(quiet)
    try:
        opts.update(web_password=secret)
    finally:
        web_log.removeFilter(quiet)
    extra = (*extra, UiNotice(secret, where))
    manager = m.addons
    at = next(i for i, a in enumerate(manager.chain) if isinstance(a, script.ScriptLoader)) + 1
    for offset, addon in enumerate(ours):
        manager.register(addon)
        manager.chain.insert(at + offset, addon)
    # mitmweb has no terminal dumper; the command sets its flow_detail option (0: silent) either way.
    manager.add(dumper.Dumper(), *extra)
    return m


# --------------------------------------------------------------------------- subcommands


def add_subcommands(sub: Any) -> None:
    p_capture = sub.add_parser("capture", help="work with a capture directory (--capture DIR)")
    capture_sub = p_capture.add_subparsers(dest="capture_command", metavar="ACTION")
    capture_sub.required = True
    p_export = capture_sub.add_parser("export", help="write a capture as HAR 1.2 (redacted)")
    p_export.add_argument("--har", metavar="OUT", required=True, help="HAR file to write ('-': stdout)")
    p_export.add_argument("capture_dir", metavar="DIR", help="the capture directory")

    p_explain = sub.add_parser(
        "explain", help="replay a capture through the rules offline and show what the proxy would do"
    )
    p_explain.add_argument(
        "capture_path", metavar="CAPTURE", help="capture directory, journal, HAR or flow file"
    )
    p_explain.add_argument(
        "--rules",
        metavar="PATH",
        default=None,
        dest="explain_rules",
        help="rules file (default ./rules.yaml if present, else the packaged rules)",
    )
    p_explain.add_argument(
        "--json", action="store_true", dest="explain_json", help="one JSON object per line"
    )


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the `capture` and `explain` commands; None for any other command."""
    command = getattr(args, "command", None)
    if command == "capture":
        return cmd_export(args.har, Path(args.capture_dir))
    if command == "explain":
        # `explain CAPTURE --rules X`, or the run flag before the command: `--rules X explain ...`
        rules = args.explain_rules or getattr(args, "rules", None)
        return cmd_explain(Path(args.capture_path), rules, args.explain_json)
    return None


def cmd_export(out: str, directory: Path) -> int:
    from .cli import UsageError
    from .har import CaptureError, export_har, write_private

    try:
        doc = export_har(directory)
    except CaptureError as e:
        raise UsageError(str(e)) from None
    data = json.dumps(doc, indent=1, ensure_ascii=False).encode()
    if out == "-":
        sys.stdout.buffer.write(data + b"\n")
        return 0
    try:
        write_private(Path(out), data)
    except OSError as e:
        raise UsageError(f"--har {out}: {e.strerror or e}") from None
    print(f"{len(doc['log']['entries'])} exchange(s) written to {out}", file=sys.stderr)
    return 0


def cmd_explain(path: Path, rules_path: str | None, as_json: bool) -> int:
    from .cli import UsageError, load_rules, resolve_rules_path
    from .explain import as_dict, explain, load_capture, render
    from .har import CaptureError

    ruleset = load_rules(resolve_rules_path(rules_path))  # RulesError: main() prints it, exit 1
    try:
        kind, records = load_capture(path)
    except CaptureError as e:
        raise UsageError(str(e)) from None
    results = explain(records, ruleset)
    if as_json:
        for e in results:
            print(json.dumps(as_dict(e), ensure_ascii=False, default=str))
    else:
        print(render(kind, path, ruleset, results))
    return 0
