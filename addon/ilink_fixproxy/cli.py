"""The ``ilink-fixproxy`` command: friendly flags mapped onto mitmproxy options, then run it.

Every user mistake (bad flag, missing or invalid rules file, unreadable CA, port in use) ends in
one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import re
import signal
import socket
import ssl
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from . import __version__, cli_capture
from . import rules as rules_mod

PROG = "ilink-fixproxy"
DEFAULT_LISTEN = "127.0.0.1:8765"
DEFAULT_UPSTREAM = "https://ilinkai.weixin.qq.com"
CONFDIR_ENV = "ILINK_FIXPROXY_CONFDIR"
# The container image sets the variable, so `docker exec C ilink-fixproxy state` finds /data's state.
DEFAULT_CONFDIR = os.environ.get(CONFDIR_ENV) or "~/.mitmproxy"
CA_CERT_NAME = "mitmproxy-ca-cert.pem"
UPSTREAM_BUNDLE_NAME = "ilink-fixproxy-upstream-cas.pem"


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other mistake (the usage is one --help away).

    Subcommand parsers are of this class too (``add_subparsers`` uses the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            A proxy between a WeChat bot gateway and Tencent's iLink bot API that repairs sends
            iLink refused because the cached context_token went stale (ret=-2 / errcode -14):
            it re-issues the send without the token and hands the gateway the new answer.

            Without a command it runs the proxy. Point the gateway's iLink base URL at it
            (reverse mode, the default) or set HTTPS_PROXY to it (--mode forward).
            """
        ),
        epilog=textwrap.dedent(
            """\
            commands:
              check [PATH]   validate a rules file and print what each rule does (exit 0/1)
              ca             print where the CA certificate is (forward mode) and how to trust it
              demo           show a repair against a fake iLink on loopback (no account, no network)
              state [list]   what the proxy remembers about peers (hashed ids unless --show-ids)
              state forget PEER   forget one peer (its id, or the hash `state` shows)
              outbox [list]  deferred sends waiting for their peer to write
              outbox flush PEER / outbox drop ID   deliver a peer's deferred sends now / drop one
              capture export --har OUT DIR   a capture directory (--capture DIR) as HAR 1.2
              explain CAPTURE [--rules PATH]   replay a capture through the rules offline

            examples:
              ilink-fixproxy                                  # 127.0.0.1:8765 -> iLink
              ilink-fixproxy --listen 127.0.0.1:9000 --rules my-rules.yaml
              ilink-fixproxy --mode forward                   # for HTTPS_PROXY=http://127.0.0.1:8765
              ilink-fixproxy --set save_stream_file=flows.mitm   # any mitmproxy option
            """
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        default=None,
        help=f"iLink base URL to forward to in reverse mode (default {DEFAULT_UPSTREAM})",
    )
    parser.add_argument(
        "--mode",
        choices=["reverse", "forward"],
        default="reverse",
        help="reverse: gateways use us as their base URL (default); forward: an "
        "HTTP(S) proxy for gateways configured with HTTPS_PROXY",
    )
    parser.add_argument(
        "--rules",
        metavar="PATH",
        default=None,
        help="rules file (default ./rules.yaml if present, else the packaged rules)",
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="PEM",
        default=None,
        help="also trust this CA certificate for upstream TLS (test servers, corporate TLS inspection)",
    )
    parser.add_argument(
        "--ssl-insecure", action="store_true", help="do not verify upstream TLS certificates (debugging only)"
    )
    parser.add_argument(
        "--confdir",
        metavar="DIR",
        default=DEFAULT_CONFDIR,
        help=f"mitmproxy configuration directory, holds the CA (default {DEFAULT_CONFDIR})",
    )
    parser.add_argument(
        "--state",
        metavar="PATH",
        default=None,
        help="peer-state file for rules with peer_state (default: ilink-fixproxy-state.sqlite3 in the "
        "confdir; ':memory:' keeps nothing across restarts), or redis://[:PASSWORD@]HOST:PORT/DB "
        "(rediss:// for TLS) for a store shared by several replicas, which needs "
        "ILINK_FIXPROXY_STATE_KEY (default: ILINK_FIXPROXY_REDIS_URL when set)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=_worker_count,
        default=1,
        help="run N proxy processes sharing the listen port (SO_REUSEPORT) under this one, which "
        "restarts a worker that dies and serves --metrics for all (default 1); rules with peer_state "
        "then need a shared --state redis://...",
    )
    parser.add_argument(
        "--proxy-auth",
        metavar="USER:PASS",
        default=None,
        help="forward mode: require these proxy credentials (Proxy-Authorization) from clients",
    )
    parser.add_argument(
        "--allow-private-destinations",
        action="store_true",
        help="forward mode: let clients reach loopback, private and link-local addresses (refused by "
        "default); the proxy's own listeners (its port, --ui, --metrics) stay refused",
    )
    parser.add_argument(
        "--defer",
        action="store_true",
        help="deferred delivery for every rule: sends to a peer whose window is closed are queued and "
        "delivered when the peer writes again (on_closed: defer)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log every connection (mitmproxy's connection-level messages)",
    )
    parser.add_argument(
        "--set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        dest="setoptions",
        help="set any mitmproxy or ilink_* option; repeatable",
    )
    cli_capture.add_run_flags(parser)

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_check = sub.add_parser("check", help="validate a rules file and explain it")
    p_check.add_argument(
        "path",
        nargs="?",
        default=None,
        help="rules file (default ./rules.yaml if present, else the packaged rules)",
    )
    p_ca = sub.add_parser("ca", help="show the CA certificate to trust in forward mode")
    p_ca.add_argument(
        "--confdir",
        metavar="DIR",
        default=None,
        dest="ca_confdir",
        help=f"mitmproxy configuration directory (default {DEFAULT_CONFDIR})",
    )
    sub.add_parser("demo", help="repair a stale-token send against a fake iLink on loopback")
    p_state = sub.add_parser("state", help="list what the proxy remembers about peers, or forget one")
    p_state.add_argument("action", nargs="?", choices=["list", "forget"], default="list")
    p_state.add_argument("peer", nargs="?", help="with forget: the peer id, or the hash `state` shows")
    _state_file_arguments(p_state)
    p_out = sub.add_parser("outbox", help="list, flush or drop deferred sends")
    p_out.add_argument("action", nargs="?", choices=["list", "flush", "drop"], default="list")
    p_out.add_argument("target", nargs="?", help="flush: the peer (id or hash); drop: the message id")
    _state_file_arguments(p_out)
    cli_capture.add_subcommands(sub)
    return parser


def _state_file_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the subcommands that read the state file (`state`, `outbox`)."""
    parser.add_argument(
        "--state",
        metavar="PATH",
        default=None,
        dest="state_path",
        help="state file or redis:// URL (default: ILINK_FIXPROXY_REDIS_URL when set, else the file "
        "in --confdir)",
    )
    parser.add_argument(
        "--confdir",
        metavar="DIR",
        default=None,
        dest="state_confdir",
        help=f"mitmproxy configuration directory (default {DEFAULT_CONFDIR})",
    )
    parser.add_argument("--show-ids", action="store_true", help="show peer ids in clear")


def _worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"expected a number of processes from 1 to 64, got {text!r}")
    return int(text)


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT``, ``[IPv6]:PORT``; the host as given (see resolve_listen_host)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8765 ([::1]:8765 for IPv6)")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        if not _is_ipv6(inner):
            raise UsageError(f"--listen {text!r}: expected an IPv6 address in brackets, e.g. [::1]:8765")
        host = inner
    elif ":" in host:
        # "::1:8765" is itself a valid IPv6 address: which part is the port cannot be known.
        example = f"[{host}]:{port_text}" if _is_ipv6(host) and port_text.isdigit() else "[::1]:8765"
        raise UsageError(f"--listen {text!r}: put an IPv6 address in brackets, e.g. --listen {example}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def resolve_listen_host(host: str, port: int) -> str:
    """The IP address to listen on: `host` if it is one, else the name's first IPv4 address (its
    first IPv6 one if it has none).

    Why one literal address: in reverse mode to an https upstream mitmproxy also opens a UDP
    (HTTP/3) listener in Rust, which takes only an IP address; a name such as ``localhost`` made it
    fail with a Rust backtrace. The start line then shows the address really used."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        raise UsageError(f"--listen {host}:{port}: cannot resolve {host!r} ({reason})") from None
    addrs = [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addrs:
        raise UsageError(f"--listen {host}:{port}: {host!r} has no IPv4 or IPv6 address")
    return next((a for a in addrs if ":" not in a), addrs[0])


def redact_userinfo(url: str) -> str:
    """`url` with anything between ``scheme://`` and the last ``@`` replaced: a password given in
    a URL is never echoed, even when the URL is too broken to parse."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def redact_urls(text: str) -> str:
    """`text` with the user and password of every ``scheme://user:pw@`` in it replaced."""
    return _URL_USERINFO.sub(r"\1***@", text)


_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/@]*@")


def parse_upstream(text: str) -> str:
    shown = redact_userinfo(text)
    if shown != text:  # checked first: urlsplit's errors could quote part of a password
        raise UsageError(
            f"--upstream {shown!r}: no user or password in the URL (iLink authenticates each request "
            "with the gateway's bot token); give only scheme, host and port"
        )
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:  # e.g. "https://[::1": an unclosed IPv6 bracket
        raise UsageError(f"--upstream {text!r}: not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--upstream {text!r}: expected an http:// or https:// URL, e.g. {DEFAULT_UPSTREAM}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--upstream {text!r}: give only scheme, host and port (no path)")
    if port == 0:
        raise UsageError(f"--upstream {text!r}: invalid port")
    from mitmproxy.net import server_spec

    try:  # mitmproxy's own check of the reverse-mode target (host name syntax, IPv6 literal)
        server_spec.parse(f"{parts.scheme}://{parts.netloc}", default_scheme="https")
    except ValueError as e:
        raise UsageError(f"--upstream {text!r}: {e}") from None
    return f"{parts.scheme}://{parts.netloc}"


def resolve_rules_path(explicit: str | None) -> Path | None:
    """The rules file to use: the explicit one, ./rules.yaml, or None for the packaged rules."""
    if explicit is not None:
        return Path(explicit)
    local = Path("rules.yaml")
    return local if local.is_file() else None


def load_rules(path: Path | None) -> rules_mod.RuleSet:
    return rules_mod.load_file(path) if path is not None else rules_mod.load_default()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- running the proxy


@dataclass
class Settings:
    listen_host: str
    listen_port: int
    mode: str
    upstream: str
    rules_path: Path | None
    ruleset: rules_mod.RuleSet
    confdir: Path
    ssl_insecure: bool
    upstream_bundle: Path | None
    state: str | None = None
    verbose: bool = False
    defer: bool = False
    proxy_auth: str | None = None
    allow_private_destinations: bool = False
    setoptions: list[str] = field(default_factory=list)
    ui: bool = False
    workers: int = 1
    observability: dict[str, object] = field(default_factory=dict)  # capture, metrics, logs


def settings_from_args(args: argparse.Namespace) -> Settings:
    host, port = parse_listen(args.listen)
    host = resolve_listen_host(host, port)
    if args.mode == "forward" and args.upstream is not None:
        raise UsageError(
            "--upstream only applies to --mode reverse; in forward mode the gateway "
            "chooses the host (use --set mode=upstream:URL for an upstream proxy)"
        )
    upstream = parse_upstream(args.upstream or DEFAULT_UPSTREAM)
    if args.proxy_auth is not None:
        if args.mode != "forward":
            raise UsageError(
                "--proxy-auth only applies to --mode forward: in reverse mode the gateway's Authorization "
                "header carries its iLink bot token; protect a reverse proxy by where it listens instead"
            )
        if ":" not in args.proxy_auth or args.proxy_auth.startswith(":"):
            raise UsageError("--proxy-auth: expected USER:PASS")
    if args.allow_private_destinations and args.mode != "forward":
        raise UsageError(
            "--allow-private-destinations only applies to --mode forward, where clients choose "
            "the destination; in reverse mode --upstream may be any address"
        )
    rules_path = resolve_rules_path(args.rules)
    ruleset = load_rules(rules_path)
    confdir = Path(os.path.expanduser(args.confdir))
    bundle = None
    if args.upstream_ca:
        bundle = write_upstream_bundle(Path(args.upstream_ca), confdir)
    for item in args.setoptions:
        name, sep, _ = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
    return Settings(
        listen_host=host,
        listen_port=port,
        mode=args.mode,
        upstream=upstream,
        rules_path=rules_path,
        ruleset=ruleset,
        confdir=confdir,
        ssl_insecure=args.ssl_insecure,
        upstream_bundle=bundle,
        state=args.state,
        defer=args.defer,
        proxy_auth=args.proxy_auth,
        allow_private_destinations=args.allow_private_destinations,
        verbose=args.verbose,
        setoptions=list(args.setoptions),
        ui=args.ui,
        workers=args.workers,
        observability=cli_capture.run_options(args),
    )


def write_upstream_bundle(ca: Path, confdir: Path) -> Path:
    """certifi's CAs plus the extra one, because mitmproxy's option replaces rather than adds."""
    import certifi

    try:
        extra = ca.read_text("ascii")
        ssl.create_default_context(cafile=str(ca))
    except FileNotFoundError:
        raise UsageError(f"--upstream-ca {ca}: file not found") from None
    except (OSError, UnicodeDecodeError, ssl.SSLError, ValueError) as e:
        raise UsageError(f"--upstream-ca {ca}: not a readable PEM certificate ({e})") from None
    if "BEGIN CERTIFICATE" not in extra:
        raise UsageError(f"--upstream-ca {ca}: no PEM certificate in it")
    make_private_dir(confdir)
    bundle = confdir / UPSTREAM_BUNDLE_NAME
    text = Path(certifi.where()).read_text("ascii") + "\n" + extra
    # Written aside and renamed over: with --workers every process writes it at start, and one
    # truncating the file must never be what another's mitmproxy reads.
    temp = confdir / f".{UPSTREAM_BUNDLE_NAME}.{os.getpid()}"
    try:
        # owner-only whatever the umask: a CA bundle others can write lets them intercept iLink
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            os.fchmod(fd, 0o600)
            fh.write(text)
        os.replace(temp, bundle)
    except OSError as e:  # the confdir is not writable
        with contextlib.suppress(OSError):
            temp.unlink()
        raise UsageError(
            f"--confdir {confdir}: cannot write {UPSTREAM_BUNDLE_NAME} there ({e.strerror or e})"
        ) from None
    return bundle


def make_private_dir(path: Path) -> None:
    """Create the confdir owner-only (0700) whatever the umask: left to mitmproxy, its makedirs
    made it 0777 under umask 000, with the CA's private key inside. An existing directory is left
    as the operator made it."""
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"--confdir {path}: not a directory")
    if blocker := next((a for a in path.parents if a.exists() and not a.is_dir()), None):
        raise UsageError(f"--confdir {path}: cannot create it (Not a directory: {blocker})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:  # e.g. under a file: "Not a directory"
        raise UsageError(f"--confdir {path}: cannot create it ({e.strerror or e})") from None


def check_port_free(
    host: str, port: int, *, udp: bool = False, flag: str = "--listen", what: str = "", hint: str = ""
) -> None:
    """Refuse in one line when `host:port` cannot be bound (TCP, or UDP with `udp`)."""
    if port == 0:
        return
    socktype = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(host, port, type=socktype, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        raise UsageError(f"{flag} {host}:{port}: cannot resolve {host!r} ({reason})") from None
    family, socktype, proto, _, addr = infos[0]
    with socket.socket(family, socktype, proto) as s:
        if not udp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
        try:
            s.bind(addr)
        except OSError as e:
            reason = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
            shown = f"[{host}]" if ":" in host else host
            raise UsageError(f"cannot listen on {shown}:{port}{what}: {reason}{hint}") from None


def has_udp_listener(s: Settings) -> bool:
    """mitmproxy's reverse mode to an https upstream also listens on UDP (HTTP/3), same port."""
    return s.mode == "reverse" and s.upstream.startswith("https://")


def udp_listener_takes_bare_ipv6() -> bool:
    """mitmproxy_rs before 0.12 (mitmproxy 11) parses the UDP listener's host as Rust's
    ``SocketAddr``, which wants IPv6 in brackets, while the TCP listener (asyncio) wants it bare:
    no IPv6 address works for both. From 0.12 (mitmproxy 12) it takes the bare address."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        numbers = version("mitmproxy_rs").split(".")[:2]
        return tuple(int(n) for n in numbers) >= (0, 12)
    except (PackageNotFoundError, ValueError):
        return True  # unknown: let mitmproxy try


def set_option_value(setoptions: list[str], name: str) -> str | None:
    """The value `--set NAME=VALUE` gives option `name` (the last one wins, as in mitmproxy)."""
    value = None
    for item in setoptions:
        key, _, v = item.partition("=")
        if key.strip() == name:
            value = v
    return value


def check_listen(s: Settings) -> None:
    """Everything mitmproxy needs to listen where asked, checked before it starts: it reports
    these failures with a traceback or a Rust backtrace."""
    check_port_free(s.listen_host, s.listen_port)
    if not has_udp_listener(s):
        return
    if ":" in s.listen_host and not udp_listener_takes_bare_ipv6():
        raise UsageError(
            f"--listen [{s.listen_host}]:{s.listen_port}: mitmproxy 11 cannot listen on an IPv6 address "
            "in reverse mode to an https upstream (its HTTP/3 listener rejects it): listen on an IPv4 "
            "address such as 127.0.0.1, or install mitmproxy 12"
        )
    check_port_free(s.listen_host, s.listen_port, udp=True, what=" (UDP, mitmproxy's HTTP/3 listener)")


def check_ui_port_free(s: Settings) -> None:
    """With --ui, the web UI's port (mitmweb's web_host/web_port options, 127.0.0.1:8081 unless set)."""
    if not s.ui:
        return
    cli_capture.require_web_auth()
    host = set_option_value(s.setoptions, "web_host") or "127.0.0.1"
    port_text = (set_option_value(s.setoptions, "web_port") or "8081").strip()
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--set web_port={port_text}: expected a port number from 0 to 65535")
    check_port_free(
        host,
        int(port_text),
        flag="--ui: web UI address",
        what=" for the web UI (--ui)",
        hint="; choose another port with --set web_port=PORT",
    )


def load_ca(confdir: Path, passphrase: str | None = None) -> None:
    """Create the CA in `confdir` if there is none, and check it can be read, as mitmproxy will at
    start; UsageError in one line otherwise (mitmproxy reports it as an "Addon error" traceback)."""
    from mitmproxy import certs
    from mitmproxy.options import KEY_SIZE

    if confdir.exists() and not confdir.is_dir():
        raise UsageError(f"--confdir {confdir}: not a directory")
    key_file = confdir / "mitmproxy-ca.pem"
    try:
        certs.CertStore.from_store(
            confdir, "mitmproxy", KEY_SIZE, passphrase.encode() if passphrase else None
        )
    except OSError as e:
        raise UsageError(f"cannot create or read the CA in {confdir}: {e.strerror or e}") from None
    except TypeError as e:  # cryptography: a key encrypted without a passphrase given, or the reverse
        hint = "" if passphrase else " (give its passphrase with --set cert_passphrase=...)"
        raise UsageError(f"the CA key {key_file} cannot be read: {e}{hint}") from None
    except (ValueError, IndexError, RuntimeError) as e:
        # cryptography's reason is several lines of OpenSSL detail; the file is what matters.
        reason = (
            "wrong passphrase"
            if passphrase and "password" in str(e).lower()
            else "not a PEM key and certificate"
        )
        raise UsageError(
            f"the CA in {key_file} is unreadable ({reason}): restore it, or move the confdir's "
            "mitmproxy-ca* files away to have a new CA created (forward-mode gateways then need "
            "to trust the new one)"
        ) from None


def check_ca(s: Settings) -> None:
    """The CA mitmproxy loads at start (in every mode), in the confdir it will use."""
    confdir = set_option_value(s.setoptions, "confdir")
    load_ca(
        Path(os.path.expanduser(confdir)) if confdir else s.confdir,
        set_option_value(s.setoptions, "cert_passphrase"),
    )


def mitmproxy_options(s: Settings) -> dict[str, object]:
    opts: dict[str, object] = {
        "listen_host": s.listen_host,
        "listen_port": s.listen_port,
        "confdir": str(s.confdir),
        "ilink_rules": str(s.rules_path) if s.rules_path else "",
        "ssl_insecure": s.ssl_insecure,
        "flow_detail": 0,  # one line per decision comes from the addon; bodies hold secrets
        "mode": [f"reverse:{s.upstream}"] if s.mode == "reverse" else ["regular"],
    }
    if s.mode == "reverse":
        # Negotiate with the client before connecting upstream, so an HTTP/2 client works even
        # when the upstream only speaks HTTP/1.1 (eager mode would mirror the upstream's ALPN).
        opts["connection_strategy"] = "lazy"
    if s.state:
        opts["ilink_state"] = s.state
    if s.defer:
        opts["ilink_defer"] = True
    if s.proxy_auth:
        opts["proxyauth"] = s.proxy_auth
    if s.allow_private_destinations:
        opts["ilink_allow_private_destinations"] = True
    if s.upstream_bundle:
        opts["ssl_verify_upstream_trusted_ca"] = str(s.upstream_bundle)
    opts.update(s.observability)
    return opts


def gateway_url(url: str) -> tuple[str, str]:
    """The URL to give gateways for the one the proxy listens on, and a note when they differ.

    0.0.0.0 / [::] are where to listen, not where to connect: a gateway on this machine uses
    loopback, anything else this machine's address (in a container: the host port published
    with -p), which the proxy cannot know.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        return url, ""
    local = f"http://{'[::1]' if ':' in host else '127.0.0.1'}:{parts.port}"
    note = (
        f" (listening on every interface: {local} is for gateways on this machine; from elsewhere use "
        "this machine's address, and from outside a container the host address and port published "
        "with docker run -p)"
    )
    return local, note


def startup_line(s: Settings, url: str, rule_count: int) -> str:
    rules_src = str(s.rules_path) if s.rules_path else "packaged default rules"
    counted = f"{rule_count} rule{'s' if rule_count != 1 else ''}"
    use, note = gateway_url(url)
    if s.mode == "reverse":
        return (
            f"{PROG} listening on {url} (reverse mode -> {s.upstream}); rules: {rules_src} ({counted}). "
            f"hermes-agent: set WEIXIN_BASE_URL={use} and WEIXIN_TOKEN (without WEIXIN_TOKEN the "
            f'saved account\'s base_url wins); openclaw-weixin: set "baseUrl": "{use}" in '
            f"<stateDir>/openclaw-weixin/accounts/<accountId>.json{note}."
        )
    hosts = ", ".join(s.ruleset.hosts) or "every host"
    return (
        f"{PROG} listening on {url} (forward mode, TLS intercepted only for {hosts}); rules: "
        f"{rules_src} ({counted}). Gateways: set HTTPS_PROXY={use} and trust "
        f"{s.confdir / CA_CERT_NAME} (see `{PROG} ca`){note}."
    )


def exposure_warning(s: Settings, authenticated: bool) -> str | None:
    """What to say when the proxy is reachable from other machines."""
    if is_loopback(s.listen_host):
        return None
    if s.mode == "forward" and not authenticated:
        return (
            f"listening on {s.listen_host}, reachable from other machines, without authentication: "
            "anyone who reaches it can use it as a proxy (add --proxy-auth USER:PASS)"
        )
    if s.mode == "reverse":
        return (
            f"listening on {s.listen_host} in reverse mode: anyone who reaches it talks to iLink "
            "through it; keep it behind a firewall or on a private network (in a container, publish "
            "the port on the host's 127.0.0.1 only)"
        )
    return None


class StartupReport:
    """Prints the one human start line once mitmproxy really listens (the port may be 0)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def running(self) -> None:
        from mitmproxy import ctx

        addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        host, port = addrs[0][:2] if addrs else (self.settings.listen_host, self.settings.listen_port)
        shown = f"[{host}]" if ":" in host else host
        ours = ctx.master.addons.get("ilinkfixproxy")
        count = len(ours.ruleset.rules) if ours else len(self.settings.ruleset.rules)
        print(startup_line(self.settings, f"http://{shown}:{port}", count), flush=True)
        warning = exposure_warning(self.settings, bool(ctx.options.proxyauth))
        if warning:
            print(f"{PROG}: WARNING: {warning}", file=sys.stderr, flush=True)


class FreezeStartupHeap:
    """Once the proxy listens, moves everything loaded so far out of the garbage collector's sight.

    Why: mitmproxy, httpx and the rest leave ~100,000 long-lived objects behind at start-up, and
    every full collection walked them all: about 55 ms each, several times a minute under load.
    That was the proxy's worst latency (p99 at 16 concurrent sends) and ~5% of its CPU time.
    The objects frozen here live as long as the process anyway (``gc.freeze``, Python >= 3.7).
    """

    def running(self) -> None:
        gc.collect()
        gc.freeze()


def _quiet_about_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop one known false alarm, pass everything else to asyncio's default handler.

    On Python 3.11 a connection handler of ``asyncio.start_server`` that is cancelled (mitmproxy's
    handlers of keep-alive connections still open when the proxy stops) makes asyncio's own done
    callback call ``task.exception()``, which raises CancelledError and prints a traceback after
    an otherwise clean shutdown (Python 3.12 checks ``task.cancelled()`` first).
    """
    if isinstance(context.get("exception"), asyncio.CancelledError) and str(
        context.get("message", "")
    ).startswith("Exception in callback"):
        return
    loop.default_exception_handler(context)


async def serve(s: Settings) -> int:
    from mitmproxy import exceptions, options

    from .addon import IlinkFixProxy

    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("asyncio", "hpack", "passlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not s.verbose:
        # Per-connection chatter (connect/disconnect/streaming) drowns the one line per decision
        # the addon logs; --verbose brings it back.
        logging.getLogger("mitmproxy.proxy").setLevel(logging.WARNING)

    # The confdir from the start: when an option update fails (e.g. the --metrics port is taken)
    # mitmproxy rolls the options back and re-configures the addons with the previous values, and
    # TlsConfig then created a CA in the default ~/.mitmproxy.
    from . import workers

    role = workers.worker_role()
    opts = options.Options(confdir=str(s.confdir))
    # + capture, metrics, --ui; a worker of --workers N reports to its parent instead of printing
    report = workers.WorkerReady(role) if role else StartupReport(s)
    m = cli_capture.make_master(opts, s, IlinkFixProxy(), report, FreezeStartupHeap())
    try:
        opts.update(**mitmproxy_options(s))
        if s.setoptions:
            opts.set(*s.setoptions)
    except KeyError as e:  # opts.update/set: names no addon declared
        raise UsageError(f"invalid option: {e.args[0] if e.args else e}") from None
    except (exceptions.OptionsError, ValueError, NotImplementedError) as e:
        raise UsageError(redact_urls(str(e))) from None  # e.g. --set mode=reverse:https://u:pw@h
    if role:
        workers.tcp_only(opts.mode)

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_about_cancelled_connections)  # mitmproxy's own is set in run()
    stopping: list[asyncio.Task[None]] = []
    native: list[Any] = []  # mitmproxy_rs servers, taken before graceful_shutdown stops them

    def stop(escalate: bool) -> None:
        if stopping:  # a second signal: stop now
            if escalate:
                m.shutdown()
            return
        native.extend(native_servers(m))
        stopping.append(asyncio.ensure_future(graceful_shutdown(m)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        # A worker of --workers N gets SIGTERM from its parent and, under systemd (which signals
        # every process of the service), from systemd too: for it only SIGINT, which the parent
        # sends on a second signal, means "stop now".
        loop.add_signal_handler(sig, stop, not (role and sig == signal.SIGTERM))
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await m.run()
    await wait_native_servers_closed([*native, *native_servers(m)])
    return 0


def native_servers(m: Any) -> list[Any]:
    """The proxy's servers that run in mitmproxy_rs (Rust, on tokio threads), not in asyncio.

    In reverse mode to an https:// upstream mitmproxy listens on UDP too (HTTP/3), with
    ``mitmproxy_rs.udp.UdpServer``. mitmproxy keeps them in its server instances' ``_servers``
    (11.x and 12.x); there is no public accessor.
    """
    proxyserver = m.addons.get("proxyserver")
    found = []
    for instance in getattr(proxyserver, "servers", ()):
        for server in getattr(instance, "_servers", ()):
            if not isinstance(server, asyncio.AbstractServer) and hasattr(server, "wait_closed"):
                found.append(server)
    return found


async def wait_native_servers_closed(servers: list[Any], timeout_s: float = 5.0) -> None:
    """Close mitmproxy_rs servers and wait until their tokio tasks have ended.

    Why: mitmproxy only calls ``close()``, which asks the server's tasks to stop and returns at
    once (the ``wait_closed`` is commented out in mitmproxy's ``_stop``). Those tasks then log
    "... shutting down." through pyo3-log, which takes the GIL on a tokio thread. When that
    happens after the interpreter has begun to finalize, CPython ends the thread with
    ``pthread_exit``, whose forced unwind through Rust frames crashes the process (SIGSEGV at
    exit, issue 12). After ``wait_closed`` those tasks are done and no Rust thread calls Python.
    """
    unique = list({id(s): s for s in servers}.values())
    if not unique:
        return
    for server in unique:
        server.close()  # idempotent; mitmproxy may have closed it already
    try:
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in unique)), timeout_s)
    except TimeoutError:
        logging.getLogger("ilink_fixproxy").warning(
            "the UDP listener did not finish closing within %.0f s", timeout_s
        )
    except Exception as e:  # a stop ends in one line, never a traceback
        logging.getLogger("ilink_fixproxy").warning("closing the UDP listener failed: %r", e)


def check_state_free(s: Settings) -> None:
    """Refuse early, in one line, when another proxy holds the state file."""
    from . import state as state_mod

    if not (s.ruleset.uses_peer_state or s.defer):
        return
    path = (
        set_option_value(s.setoptions, "ilink_state")
        or s.state
        or os.environ.get("ILINK_FIXPROXY_REDIS_URL")
        or state_mod.default_path(str(s.confdir))
    )
    from .addon import is_redis_url, open_store

    try:
        if is_redis_url(path):  # the URL and ILINK_FIXPROXY_STATE_KEY (Redis may be down: fine)
            asyncio.run(open_store(path).aclose())
        else:
            state_mod.StateStore(path).close()
    except state_mod.StateError as e:
        raise UsageError(str(e)) from None


async def graceful_shutdown(m: object, grace_s: float = 12.0) -> None:
    """Stop accepting connections, let in-flight repairs and sends finish (each is bounded by its
    rule's deadline), then shut down; mitmproxy's `done` closes the state file cleanly."""
    from mitmproxy import exceptions

    ours = m.addons.get("ilinkfixproxy")  # type: ignore[attr-defined]
    with contextlib.suppress(exceptions.OptionsError):
        m.options.update(server=False)  # type: ignore[attr-defined]
    end = asyncio.get_running_loop().time() + grace_s
    while ours is not None and ours.busy() and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.05)
    m.shutdown()  # type: ignore[attr-defined]


class StoppedBeforeServing(BaseException):
    """SIGTERM arrived before the proxy listened: nothing was in flight, so stopping is a clean exit.
    A BaseException (like KeyboardInterrupt), so no `except Exception` on the way swallows it."""


def _stop_before_serving(signum: int, frame: object) -> None:
    raise StoppedBeforeServing


def run_proxy(args: argparse.Namespace, argv: list[str]) -> int:
    # As PID 1 (the Docker image) a signal without a handler is ignored, so a `docker stop` during
    # start-up would wait for its timeout and SIGKILL: handle SIGTERM from the start. serve()
    # replaces this with the graceful stop once the event loop runs.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    # Whatever the umask the proxy is started with (000 in some containers and service managers),
    # what it creates (confdir, mitmproxy's CA key, certificate and dhparam files, state, captures)
    # is owner-only: nothing it writes is for other users.
    os.umask(os.umask(0o077) | 0o077)
    from . import workers

    s = settings_from_args(args)
    role = workers.worker_role()
    if s.workers > 1:
        state = (
            set_option_value(s.setoptions, "ilink_state")
            or s.state
            or os.environ.get("ILINK_FIXPROXY_REDIS_URL")
        )
        if why := workers.refusal(s, state):
            raise UsageError(why)
    elif role is None:
        # (a worker's port is shared with the others by design, and its parent checked it)
        check_listen(s)
    check_ui_port_free(s)
    make_private_dir(s.confdir)  # (only once the arguments are known to be right: a mistake creates nothing)
    check_ca(s)
    check_state_free(s)
    if s.workers > 1:
        rule_count = len(s.ruleset.rules)

        def announce(hostport: str) -> None:
            print(startup_line(s, f"http://{hostport}", rule_count), flush=True)
            if warning := exposure_warning(s, bool(s.proxy_auth)):
                print(f"{PROG}: WARNING: {warning}", file=sys.stderr, flush=True)

        return workers.supervise(s, [sys.executable, "-m", "ilink_fixproxy", *argv], announce)
    if role is None:
        return asyncio.run(serve(s))
    workers.die_with_parent(role)
    with asyncio.Runner(loop_factory=workers.reuse_port_loop_factory(s.listen_host, s.listen_port)) as runner:
        return runner.run(serve(s))


# --------------------------------------------------------------------------- other commands


def cmd_check(path_arg: str | None) -> int:
    path = resolve_rules_path(path_arg)
    ruleset = load_rules(path)
    print(rules_mod.describe(ruleset))
    return 0


def cmd_ca(confdir_arg: str | None, passphrase: str | None = None) -> int:
    confdir = Path(os.path.expanduser(confdir_arg or DEFAULT_CONFDIR))
    make_private_dir(confdir)
    load_ca(confdir, passphrase)
    cert = confdir / CA_CERT_NAME
    print(
        textwrap.dedent(f"""\
        CA certificate: {cert}
        Only forward mode (--mode forward, gateways using HTTPS_PROXY) needs it; reverse mode does not.
        Its private key ({confdir / "mitmproxy-ca.pem"}) never leaves this machine: keep it owner-only.

        Trust it in the gateway's process:
          hermes-agent (aiohttp + certifi): append it to the bundle certifi returns in hermes' own
            Python:  cat {cert} >> "$(python -c 'import certifi; print(certifi.where())')"
            (SSL_CERT_FILE is ignored while certifi is installed; re-do this after certifi upgrades)
          openclaw-weixin (Node):  NODE_EXTRA_CA_CERTS={cert}
            (Node's fetch ignores HTTPS_PROXY: also load deploy/node/env-proxy-preload.mjs, see README)
          system-wide (Debian/Ubuntu):  cp {cert} /usr/local/share/ca-certificates/ilink-fixproxy.crt
            && update-ca-certificates
        Only the hosts listed in the rules file are intercepted; other HTTPS traffic is tunnelled.""")
    )
    return 0


def open_state_for_command(path: str | None, confdir: str | None):  # -> ports.Store
    import os

    from . import state as state_mod
    from .addon import is_redis_url, open_store

    file = (
        path
        or os.environ.get("ILINK_FIXPROXY_REDIS_URL")
        or state_mod.default_path(confdir or DEFAULT_CONFDIR)
    )
    if is_redis_url(file):
        try:
            store = open_store(file)
        except state_mod.StateError as e:
            raise UsageError(str(e)) from None
        store.log_failures = False  # (a failure ends the command in one line: _run_store_command)
        return store
    if file != state_mod.MEMORY and not Path(file).exists():
        raise UsageError(f"no state file at {file} (the proxy creates it on start; see --state)")
    try:
        return state_mod.SqliteStore(state_mod.StateStore(file, lock=False))  # readable while the proxy runs
    except state_mod.StateError as e:
        raise UsageError(str(e)) from None


def _run_store_command(path: str | None, confdir: str | None, body) -> int:
    """Run `body(store)` (a coroutine function) against the store; a store that cannot be
    reached (Redis down) is one line, not a traceback."""
    import asyncio

    store = open_state_for_command(path, confdir)

    async def run() -> int:
        try:
            return await body(store)
        except store.errors as e:
            raise UsageError(
                f"cannot read the peer-state store {store.path}: {type(e).__name__}: {e}"
            ) from None
        finally:
            await store.aclose()

    return asyncio.run(run())


def cmd_state(action: str, peer: str | None, path: str | None, confdir: str | None, show_ids: bool) -> int:
    from .peers import describe_state
    from .redact import token_hash

    if action == "list" and peer:
        raise UsageError(f"state list takes no argument (got {peer!r}); to forget a peer: state forget PEER")

    async def body(store) -> int:
        if action == "forget":
            if not peer:
                raise UsageError("state forget needs a PEER (its id, or the hash `state` shows)")
            removed = await store.forget_peer(peer, token_hash)
            if not removed:
                raise UsageError(f"no peer {peer!r} in {store.path}")
            print(f"forgot {peer}: {removed} record(s) removed")
            return 0
        print(await describe_state(store, show_ids=show_ids))
        return 0

    return _run_store_command(path, confdir, body)


def cmd_outbox(action: str, target: str | None, path: str | None, confdir: str | None, show_ids: bool) -> int:
    import time

    from .redact import token_hash

    if action == "list" and target:
        raise UsageError(
            f"outbox list takes no argument (got {target!r}); see outbox flush PEER, outbox drop ID"
        )

    async def body(store) -> int:
        now = time.time()
        if action == "list":
            queued = await store.outbox()
            stats = await store.outbox_stats(now)
            print(
                f"{store.path}: {len(queued)} deferred send(s); delivered late {stats['delivered_late']}, "
                f"expired {stats['expired']}, dropped {stats['dropped']}"
            )
            for q in queued:
                who = q.peer if show_ids else token_hash(q.peer)
                error = f"; last error: {q.last_error}" if q.last_error else ""
                print(
                    f"  id {q.id}  peer {who}  client_id {q.client_id or '-'}  "
                    f"queued {now - q.created:.0f}s ago  "
                    f"{len(q.body)} bytes  {q.attempts} failed deliveries{error}"
                )
            return 0
        if not target:
            raise UsageError(f"outbox {action} needs a {'PEER' if action == 'flush' else 'message ID'}")
        if action == "drop":
            if not target.isdigit() or not await store.dequeue(int(target)):
                raise UsageError(f"no deferred send with id {target!r} (see `ilink-fixproxy outbox list`)")
            await store.bump("dropped")
            print(f"dropped deferred send {target}")
            return 0
        matching = [q for q in await store.outbox() if target in (q.peer, token_hash(q.peer))]
        if not matching:
            raise UsageError(f"no deferred sends for peer {target!r}")
        await store.request_flush(target, now)
        print(
            f"asked the running proxy to deliver {len(matching)} deferred send(s) to {target} now "
            "(with the freshest token it knows); `ilink-fixproxy outbox list` shows what is left"
        )
        return 0

    return _run_store_command(path, confdir, body)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return cmd_check(args.path)
        if args.command == "ca":
            return cmd_ca(
                args.ca_confdir or (args.confdir if args.confdir != DEFAULT_CONFDIR else None),
                set_option_value(args.setoptions, "cert_passphrase"),
            )
        # `--confdir` may come before the subcommand (global) or after it (the subcommand's own).
        confdir = getattr(args, "state_confdir", None) or (
            args.confdir if args.confdir != DEFAULT_CONFDIR else None
        )
        if args.command == "state":
            return cmd_state(args.action, args.peer, args.state_path, confdir, args.show_ids)
        if args.command == "outbox":
            return cmd_outbox(args.action, args.target, args.state_path, confdir, args.show_ids)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
        if (code := cli_capture.dispatch(args)) is not None:
            return code
        return run_proxy(args, argv)
    except rules_mod.RulesError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except StoppedBeforeServing:
        return 0


if __name__ == "__main__":
    sys.exit(main())
