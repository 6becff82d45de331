"""Where a client may make the proxy connect: the destination policy for client-chosen hosts.

In forward mode (and mitmproxy's other modes where the client names the destination: SOCKS,
transparent, upstream) a client can ask the proxy for any host. Without a policy that includes
the proxy's own listeners (the web UI, whose ``PUT /options`` can load a script; ``/metrics``)
and whatever listens on the machine's loopback or private network, reached from wherever the
proxy is reachable. So, for client-chosen destinations only (a reverse-mode upstream is the
operator's choice and is never checked):

- the proxy's own listeners (proxy ports, ``--ui``'s web port, ``--metrics``) on any address of
  this machine are always refused;
- loopback, private, link-local, unspecified (``0.0.0.0``, ``::``), multicast and reserved
  addresses, IPv4 ones embedded in IPv6 included (``::ffff:127.0.0.1``, 6to4, NAT64), are
  refused unless ``ilink_allow_private_destinations`` (``--allow-private-destinations``) is on.

The decision that counts is taken on the resolved address at ``server_connect``, and the
connection is then made to exactly that address (the name is put back once it is connected,
for TLS server names and connection reuse): a name that resolves to a public address when
checked and to 127.0.0.1 a moment later (DNS rebinding) cannot slip through. Earlier checks at
``http_connect`` (CONNECT) and ``requestheaders`` (plain HTTP) only exist to answer the client
with a clear 403 instead of a failed connection. In upstream-proxy mode the upstream proxy
resolves names, so only the early, name-based checks apply there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.proxy import mode_specs, server_hooks

log = logging.getLogger("ilink_fixproxy")

OPTION = "ilink_allow_private_destinations"
HEADER = "X-Ilink-Fixproxy"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public_kind(ip: IPAddress) -> str | None:
    """What makes `ip` a non-public destination ("loopback", "private", ...), or None."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return non_public_kind(inner)
    if ip.is_unspecified:
        return "unspecified (this machine)"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "non-public"
    return None


def is_this_machine(ip: IPAddress) -> bool:
    """Whether `ip` is one of this machine's addresses: binding to it succeeds only then."""
    ip = embedded_ipv4(ip) or ip
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((str(ip), 0))
        return True
    return False


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None


def own_listeners() -> dict[int, str]:
    """Ports this process listens on, each with what it is."""
    ports: dict[int, str] = {}
    master = ctx.master
    proxyserver = master.addons.get("proxyserver")
    if proxyserver is not None:
        for addr in proxyserver.listen_addrs():
            ports[addr[1]] = "proxy"
    if "web_port" in ctx.options and hasattr(master, "app"):  # mitmweb's master (--ui)
        ports[ctx.options.web_port] = "web UI"
    metrics = master.addons.get("metrics")
    server = getattr(metrics, "server", None)
    if server is not None:
        ports[server.server_port] = "metrics"
    from .workers import worker_role

    if (role := worker_role()) is not None and role.parent_metrics_port:  # --workers: the parent's
        ports[role.parent_metrics_port] = "metrics"
    return ports


def refusal(ip: IPAddress, port: int, allow_private: bool, listeners: dict[int, str]) -> str | None:
    """Why connecting to ip:port is refused, or None when it is allowed."""
    what = listeners.get(port)
    if what is not None and is_this_machine(ip):
        return f"it is this proxy's own {what} listener"
    if allow_private:
        return None
    kind = non_public_kind(ip)
    if kind is not None:
        return f"{ip} is a {kind} address (--allow-private-destinations allows it)"
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses `host` resolves to, in the order a connection would try them ([] if none)."""
    ip = _parse_ip(host)
    if ip is not None:
        return [ip]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []  # mitmproxy's own connection attempt reports it
    found: list[IPAddress] = []
    for info in infos:
        ip = _parse_ip(str(info[4][0]))
        if ip is not None and ip not in found:
            found.append(ip)
    return found


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EgressPolicy:
    """The destination policy as a mitmproxy addon (see the module docstring)."""

    name = "ilink_egress"

    def __init__(self) -> None:
        # server connection id -> the address it was asked for, while it is pinned to an IP
        self._pinned: dict[str, tuple[str, int]] = {}

    def load(self, loader: Any) -> None:
        loader.add_option(
            OPTION,
            bool,
            False,
            "Let clients of a forward (or SOCKS, transparent, upstream) mode proxy reach loopback, "
            "private and link-local addresses. The proxy's own listeners stay refused.",
        )

    # ------------------------------------------------------------------ early, clear answers

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # proxyauth may have answered 407 already
            await self._precheck(flow, "CONNECT")

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        # Not a coroutine function: mitmproxy awaits what a hook returns only when it is
        # awaitable, and in reverse mode (every request) there is nothing to wait for.
        if flow.response is not None or not _client_chooses(flow.client_conn):
            return None
        server = flow.server_conn
        target = (flow.request.host, flow.request.port)
        if server.address == target or (server.address and self._pinned.get(server.id) == target):
            return None  # the tunnel or connection it goes over was checked already
        return self._precheck(flow, flow.request.method)

    async def _precheck(self, flow: http.HTTPFlow, what: str) -> None:
        if not _client_chooses(flow.client_conn):
            return
        host, port = flow.request.host, flow.request.port
        if host == ctx.options.onboarding_host and ctx.options.onboarding and what != "CONNECT":
            return  # mitm.it: answered by mitmproxy itself, never connected to
        why = self._why(await resolve(host, port), port)
        if why is None:
            return
        log.warning(f"ilink-fixproxy: refused {what} to {_shown(host, port)}: {why}")
        flow.response = http.Response.make(
            403,
            f"ilink-fixproxy: destination {_shown(host, port)} refused: {why}\n",
            {"Content-Type": "text/plain; charset=utf-8", HEADER: "refused-destination"},
        )
        flow.request.stream = False  # an answer instead of a forwarded body (addon.py streams)

    # ------------------------------------------------------------------ the decision that counts

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or not server.address or not _client_chooses(data.client, connecting=True):
            return
        host, port = server.address
        addresses = await resolve(host, port)
        why = self._why(addresses, port)
        if why is not None:
            log.warning(f"ilink-fixproxy: refused a connection to {_shown(host, port)}: {why}")
            server.error = f"ilink-fixproxy refused {_shown(host, port)}: {why}"
        elif addresses and _parse_ip(host) is None:
            # Connect to the address just checked, not to a second resolution of the name.
            self._pinned[server.id] = server.address
            server.address = (str(addresses[0]), port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unpin(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unpin(data.server)

    def _unpin(self, server: Any) -> None:
        asked = self._pinned.pop(server.id, None)
        if asked is not None:
            server.address = asked  # TLS (SNI, certificate checks) and reuse go by the name

    def _why(self, addresses: list[IPAddress], port: int) -> str | None:
        """Why one of `addresses` is refused (a name must not mix public and private ones)."""
        allow_private = bool(getattr(ctx.options, OPTION, False))
        listeners = own_listeners()
        for ip in addresses:
            why = refusal(ip, port, allow_private, listeners)
            if why is not None:
                return why
        return None


def _client_chooses(client: Any, connecting: bool = False) -> bool:
    """Whether the client names the destination. At connect time, upstream-proxy mode connects
    only to its configured proxy (the operator's choice); names are checked before that."""
    mode = getattr(client, "proxy_mode", None)
    if isinstance(mode, mode_specs.ReverseMode | mode_specs.DnsMode):
        return False
    return not (connecting and isinstance(mode, mode_specs.UpstreamMode))
