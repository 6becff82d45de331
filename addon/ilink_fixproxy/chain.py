"""Which mitmproxy addons the ``ilink-fixproxy`` command runs, and in what order.

``mitmdump -s`` stays the full-featured path (every default addon, always in the chain). The
command runs the same addons, in the same relative order, with our addon exactly where ``-s``
scripts sit (after the script loader, before the save/HAR addons, which therefore record the
repaired answer); but it keeps out of the event chain the addons that have nothing to do.

Why: mitmproxy dispatches every event (about ten per request, each twice with the ``update``
event) to every addon in the chain, through a context manager, a coroutine and two generators
per addon, whether or not the addon has a hook for it. With mitmdump's 35 addons that dispatch
is a large part of bare mitmdump's per-request CPU time: the lean chain below saves about a third
of it (docs/performance.md). Most of those addons are
features an operator turns on with an option (``map_remote``, ``save_stream_file``,
``proxyauth``, ``flow_detail`` ...) and do nothing while it keeps its default value.

So the command's chain is (steady state: 4 entries besides mitmproxy's own TermLog, not 35):

- ``LeanChain`` and ``LeanTail``: chain entries that carry, as sub-addons, the always-needed
  default addons (core option checks, ``block_global``, the h2c guard, ``mitm.it`` onboarding,
  the proxy server, DNS; and next_layer, TLS, the reverse-mode Alt-Svc rewrite). Sub-addons get
  every event like chain entries do, for the cost of an attribute lookup instead of a dispatch.
  Each bundle sits where its order-sensitive member sits in mitmdump (``LeanChain`` at the h2c
  guard, ahead of scripts and ours; ``LeanTail`` at the Alt-Svc rewrite, after scripts, ours
  and modify_headers), and no two addons whose relative order changes share a hook;
- our addon and any default addon this module does not know (a newer mitmproxy's), each in its
  default position, and the ``extra`` addons (the command's capture/metrics bundle and start-up
  report) as one entry at the end;
- the option-driven addons are registered from the start (their options, commands and names
  exist, so ``--set map_remote=...`` is accepted and validated) but join the chain, in their
  default position, only once one of their options leaves its inert value: before the proxy
  serves when the option is given on the command line. Loading a script (``scripts``) brings
  them all in, since a script may call any addon's commands.

Nothing an operator can configure is lost; an addon that joined stays (turning an option back
off later does not remove it). ``mitmdump -s addon/ilink_fixproxy_addon.py`` is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from mitmproxy import addons, hooks
from mitmproxy.addons import (
    anticache,
    anticomp,
    block,
    blocklist,
    browser,
    clientplayback,
    command_history,
    comment,
    core,
    cut,
    disable_h2c,
    dns_resolver,
    dumper,
    errorcheck,
    export,
    maplocal,
    mapremote,
    modifybody,
    modifyheaders,
    next_layer,
    onboarding,
    proxyauth,
    proxyserver,
    save,
    savehar,
    script,
    serverplayback,
    stickyauth,
    stickycookie,
    strip_dns_https_records,
    tlsconfig,
    update_alt_svc,
    upstream_auth,
)
from mitmproxy.proxy import mode_specs

log = logging.getLogger("ilink_fixproxy")

# Always-needed addons carried by LeanChain, which sits at DisableH2C's place: the members before
# it (core, block, DNS-record stripping) and after it (onboarding, proxyserver, dns_resolver)
# share no hook with any addon that can end up between them and their default place.
_HEAD: tuple[type, ...] = (
    core.Core,
    block.Block,
    strip_dns_https_records.StripDnsHttpsRecords,
    disable_h2c.DisableH2C,
    onboarding.Onboarding,
    proxyserver.Proxyserver,
    dns_resolver.DnsResolver,
    errorcheck.ErrorCheck,
)
_HEAD_AT = disable_h2c.DisableH2C
# ... and by LeanTail, at UpdateAltSvc's place (its responseheaders must follow modify_headers'):
# next_layer and TLS only need to come after scripts (which may pre-empt them), as in mitmdump.
_TAIL: tuple[type, ...] = (next_layer.NextLayer, tlsconfig.TlsConfig, update_alt_svc.UpdateAltSvc)
_TAIL_AT = update_alt_svc.UpdateAltSvc

# Addons that do nothing while their options keep these values (default: the option's default).
# flow_detail is special: mitmproxy's default is 1, the command's 0, and only 0 is silent.
_ON_DEMAND: dict[type, Mapping[str, Any]] = {
    anticache.AntiCache: {},
    anticomp.AntiComp: {},
    blocklist.BlockList: {},
    browser.Browser: {},
    clientplayback.ClientPlayback: {},
    command_history.CommandHistory: {},  # interactive tools only
    comment.Comment: {},
    cut.Cut: {},
    export.Export: {},
    proxyauth.ProxyAuth: {},
    script.ScriptLoader: {},
    serverplayback.ServerPlayback: {},
    mapremote.MapRemote: {},
    maplocal.MapLocal: {},
    modifybody.ModifyBody: {},
    modifyheaders.ModifyHeaders: {},
    stickyauth.StickyAuth: {},
    stickycookie.StickyCookie: {},
    save.Save: {},
    savehar.SaveHar: {},
    upstream_auth.UpstreamAuth: {},
    dumper.Dumper: {"flow_detail": 0},
}


def full_chain(ours: Any, *extra: Any) -> list[Any]:
    """mitmproxy's default addons with `ours` right after the script loader, then the dumper,
    the error check and `extra`: what ``mitmdump -s`` runs, and the order LeanChain keeps."""
    chain = addons.default_addons()
    at = next(i for i, a in enumerate(chain) if isinstance(a, script.ScriptLoader)) + 1
    chain.insert(at, ours)
    return [*chain, dumper.Dumper(), errorcheck.ErrorCheck(), *extra]


def proxy_addons(ours: Any, *extra: Any) -> list[Any]:
    """The chain the ``ilink-fixproxy`` command adds to its master (see the module docstring)."""
    template = full_chain(ours, *extra)
    rank = {id(a): i for i, a in enumerate(template)}
    tail = _Bundle("ilink_leantail", [a for a in template if type(a) in _TAIL])
    head = LeanChain(
        [a for a in template if type(a) in _HEAD],
        [a for a in template if type(a) in _ON_DEMAND],
        rank,
    )
    # A bundle ranks (for placing the addons that join later) where its order-sensitive member is.
    rank[id(head)] = next(rank[id(a)] for a in template if type(a) is _HEAD_AT)
    rank[id(tail)] = next(rank[id(a)] for a in template if type(a) is _TAIL_AT)
    bundled = (*_HEAD, *_TAIL, *_ON_DEMAND)
    extras = {id(a) for a in extra}
    entries = sorted(
        [head, tail, *(a for a in template if type(a) not in bundled and id(a) not in extras)],
        key=lambda a: rank[id(a)],
    )
    if extra:  # last in mitmdump's order (full_chain), one entry for all of them
        entries.append(extra[0] if len(extra) == 1 else _Bundle("ilink_extra", list(extra)))
        rank[id(entries[-1])] = rank[id(extra[0])]
    head.entries = entries
    return entries


class _Bundle:
    """A chain entry whose sub-addons mitmproxy dispatches to (addonmanager.traverse)."""

    def __init__(self, name: str, members: list[Any]) -> None:
        self.name = name
        self.addons = members


class _OptionNames:
    """A stand-in loader that only records which options an addon declares."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_option(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.names.add(name)

    def add_command(self, *args: Any, **kwargs: Any) -> None:
        pass


def _declared_options(addon: Any) -> set[str]:
    """The options `addon` declares, learned from a throw-away instance so that the real one is
    loaded exactly once, the normal way."""
    load = getattr(type(addon)(), "load", None)
    recorder = _OptionNames()
    if load is not None:
        load(recorder)
    return recorder.names


# Options that decide whether mitm.it onboarding can ever be asked for (see LeanChain).
_ONBOARDING_OPTIONS = frozenset({"onboarding", "mode", "keep_host_header"})


def _is_reverse(spec: str) -> bool:
    try:
        return mode_specs.ProxyMode.parse(spec).type_name == "reverse"
    except ValueError:
        return False  # mitmproxy rejects it with a message of its own


class LeanChain(_Bundle):
    """The head bundle; it also brings the on-demand addons into the chain when they are needed.

    It also keeps mitm.it onboarding (the CA download page) out of the dispatch where no request
    can ask for it: in reverse mode mitmproxy rewrites the Host header to the upstream's before
    any hook sees the request (unless keep_host_header), so there onboarding can never serve and
    only cost a dispatch per request. It comes back, configured, as soon as that changes.
    """

    def __init__(self, members: list[Any], on_demand: list[Any], rank: dict[int, int]) -> None:
        super().__init__("ilink_leanchain", members)
        self._members = list(members)
        self._onboarding = next((a for a in members if isinstance(a, onboarding.Onboarding)), None)
        self._rank = rank  # position in mitmdump's order, by id() (bundles: see proxy_addons)
        self._waiting = list(on_demand)  # registered, not yet in the chain; in template order
        self._options: dict[int, set[str]] = {}
        self._watched: set[str] = set()  # every option of a waiting addon
        self.entries: list[Any] = []  # what proxy_addons() put in the chain, self included
        self._master: Any = None
        self._running = False
        self._pending: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ events

    def load(self, loader: Any) -> None:
        self._master = loader.master
        for addon in self._waiting:
            # Registered like any addon (options, commands, addons.get(name)), just not chained.
            self._master.addons.register(addon)
            self._options[id(addon)] = _declared_options(addon)
            self._watched |= self._options[id(addon)]

    def configure(self, updated: set[str]) -> None:
        if updated & _ONBOARDING_OPTIONS and self._onboarding is not None:
            self._place_onboarding()
        # Only changes to a waiting addon's options matter. That also keeps us from touching the
        # chain while mitmproxy is still adding addons (their loads declare other options).
        if updated & self._watched and self._assembled():
            self._bring_in(self._wanted())

    def running(self) -> None:
        self._running = True
        self._bring_in(self._wanted())  # e.g. flow_detail left at mitmproxy's default by an embedder

    # ------------------------------------------------------------------ internals

    def _place_onboarding(self) -> None:
        options = self._master.options
        needed = options.onboarding and (
            options.keep_host_header or not all(_is_reverse(m) for m in options.mode)
        )
        present = any(a is self._onboarding for a in self.addons)
        if needed and not present:
            self.addons = [a for a in self._members if a is self._onboarding or a in self.addons]
            # it missed the option changes meanwhile
            everything = set(options.keys())
            self._master.addons.invoke_addon_sync(self._onboarding, hooks.ConfigureHook(everything))
        elif present and not needed:
            self.addons = [a for a in self.addons if a is not self._onboarding]

    def _assembled(self) -> bool:
        """True once every addon proxy_addons() returned is in the chain."""
        chained = {id(a) for a in self._master.addons.chain}
        return all(id(a) in chained for a in self.entries)

    def _is_inert(self, addon: Any) -> bool:
        options = self._master.options
        inert = _ON_DEMAND[type(addon)]
        for name in self._options[id(addon)]:
            if name in inert:
                if getattr(options, name) != inert[name]:
                    return False
            elif options.has_changed(name):
                return False
        return True

    def _wanted(self) -> list[Any]:
        if not self._waiting or self._master is None:
            return []
        if any(isinstance(a, script.ScriptLoader) and not self._is_inert(a) for a in self._waiting):
            return list(self._waiting)
        return [a for a in self._waiting if not self._is_inert(a)]

    def _bring_in(self, wanted: list[Any]) -> None:
        if not wanted:
            return
        manager = self._master.addons
        # Configure first, with every option (as mitmproxy does for a newly loaded script): an
        # invalid value raises OptionsError here, mitmproxy rolls the option back, and the addon
        # keeps waiting instead of joining half-configured.
        everything = set(self._master.options.keys())
        for addon in wanted:
            manager.invoke_addon_sync(addon, hooks.ConfigureHook(everything))
        chain = list(manager.chain)
        for addon in wanted:
            log.debug(f"ilink-fixproxy: enabling mitmproxy addon {type(addon).__name__}")
            self._waiting.remove(addon)
            chain.insert(self._position(chain, addon), addon)
        # A new list rather than inserts into the old one: a trigger() iterating the old list
        # (this very configure event) neither skips an addon nor configures a newcomer twice.
        manager.chain = chain
        self._watched = set().union(*(self._options[id(a)] for a in self._waiting))
        if self._running:
            for addon in wanted:
                self._spawn(manager.invoke_addon(addon, hooks.RunningHook()))

    def _position(self, chain: list[Any], addon: Any) -> int:
        """Where `addon` goes: after the chained entries that precede it in mitmdump's order and
        before those that follow it (entries of unknown rank, like TermLog, are stepped over)."""
        rank = self._rank[id(addon)]
        pos: int | None = None
        for i, other in enumerate(chain):
            r = self._rank.get(id(other))
            if r is None:
                continue
            if r < rank:
                pos = i + 1
            elif pos is None:
                pos = i
        return len(chain) if pos is None else pos

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
