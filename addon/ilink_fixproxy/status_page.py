"""``/status`` as HTML: a pure function of a status.Snapshot (no I/O, no clock, no network).

One self-contained page for an operator who is not a developer: is the proxy healthy, can the bot
reach each person right now, and if not what happens to the messages. It loads nothing from
anywhere (inline CSS, server-drawn SVG charts, no script) and reloads itself with a meta refresh.
Every value is HTML-escaped where it is written (`_e`); CSS classes come from fixed tables only.
"""

from __future__ import annotations

import datetime as dt
import html
from collections import Counter
from collections.abc import Iterable

from .status import Minute, PeerRow, Recent, Snapshot

REFRESH_S = 10
NONE = "\u2013"  # an en dash: nothing to show
# iLink usually lets a bot write to a person within about 24 h of their last message
# (ilink-protocol.md §8): past this age the page warns that the window may end soon.
WINDOW_AGING_S = 20 * 3600

# Decisions grouped as the operator cares about them: (group, colour, label).
_GROUPS = {
    "sent": ("#2e7d32", "sent"),
    "held": ("#1565c0", "held for later"),
    "not-sent": ("#ef8f00", "not sent"),
    "failed": ("#c62828", "failed"),
}
_DECISION_GROUP = {
    "passed": "sent",
    "repaired": "sent",
    "substituted": "sent",
    "stripped": "sent",
    "replayed": "sent",
    "deferred": "held",
    "answered-locally": "not-sent",
    "window-closed": "not-sent",
    "rate-limited": "not-sent",
    "cooldown-started": "not-sent",
    "matched": "not-sent",
}
_DELIVERY = {
    "confirmed": ("#2e7d32", "confirmed"),
    "unconfirmed": ("#ef8f00", "unconfirmed"),
    "refused": ("#c62828", "refused"),
    "failed": ("#6a1b9a", "no answer"),
}

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;margin:0;
 background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:16px;align-items:baseline;
 flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header span{color:#b8c0cf;font-size:13px}
main{padding:16px 24px;max-width:1400px}
section{background:#fff;border-radius:8px;padding:14px 18px;margin:0 0 16px;
 box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:16px;margin:0 0 8px}
p.hint{color:#556;margin:4px 0 10px;font-size:13px}
.banner{display:flex;gap:14px;align-items:center;font-size:17px}
.banner .big{font-size:30px;line-height:1}
.banner.ok{border-left:8px solid #2e7d32}
.banner.bad{border-left:8px solid #c62828}
.banner.wait{border-left:8px solid #ef8f00}
.banner ul{margin:4px 0 0;padding-left:18px;font-size:14px}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th{text-align:left;color:#556;font-weight:600;border-bottom:2px solid #e3e6eb;padding:5px 8px}
td{border-bottom:1px solid #eef0f3;padding:5px 8px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.nowrap{white-space:nowrap}
code,.id{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:12.5px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12.5px;font-weight:600;
 white-space:nowrap}
.b-yes{background:#e3f3e4;color:#1b5e20}.b-no{background:#fde7e7;color:#a31515}
.b-warn{background:#fff1d6;color:#8a5300}.b-unknown{background:#eceff3;color:#556}
.d-sent{color:#1b5e20}.d-held{color:#0d47a1}.d-not-sent{color:#8a5300}.d-failed{color:#a31515}
.charts{display:flex;gap:24px;flex-wrap:wrap}
.chart{flex:1 1 520px}
.legend{display:flex;gap:14px;flex-wrap:wrap;font-size:12.5px;margin-top:4px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;
 vertical-align:-1px}
.muted{color:#778}
footer{color:#778;font-size:12px;padding:0 24px 20px}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def duration(seconds: float | None) -> str:
    """12 s, 4 min, 2 h 5 min, 3 days 4 h: what an operator reads at a glance."""
    if seconds is None:
        return NONE
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    days = "1 day" if d == 1 else f"{d} days"
    return f"{days} {h} h" if h else days


def clock(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S")


def render(snap: Snapshot) -> str:
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        '<link rel="icon" href="data:,">',  # else browsers fetch /favicon.ico
        "<title>ilink-fixproxy status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>ilink-fixproxy status</h1>",
        f"<span>replica <b>{_e(snap.replica)}</b></span>",
        f"<span>updated {_e(clock(snap.now))} UTC, refreshes every {REFRESH_S} s</span>",
        f"<span>version {_e(snap.version)}</span></header><main>",
        _health(snap),
        _peers(snap),
        _charts(snap),
        _recent(snap),
        "</main><footer>Nothing secret is shown: no bot token, no context token, no message text. "
        + (
            "People are shown by their WeChat id (<code>--capture-ids</code> is on)."
            if snap.ids_in_clear
            else "People are shown as <code>#…</code>, the same short hashes as in the proxy's log lines and "
            "in <code>ilink-fixproxy state</code>; bots by their hash as <code>state</code> lists them."
        )
        + " Also: <code>/status.json</code> (this page's data), <code>/metrics</code>, <code>/healthz</code>."
        "</footer></body></html>",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- health


def _health(snap: Snapshot) -> str:
    if snap.starting:
        cls, mark, title = "wait", "…", "Starting: the proxy is not serving yet."
    elif snap.problems:
        cls, mark, title = "bad", "✗", "Not healthy: the proxy cannot do its job fully."
    else:
        cls, mark, title = "ok", "✓", "Healthy: the proxy is working."
    items = list(snap.problems)
    if snap.store_error:
        items.append(snap.store_error)
    for b in snap.bots:
        if b.cooldown_left_s is not None:
            items.append(
                f"bot {b.bot} is cooling down after repeated iLink rate limits: its sends are answered "
                f"at once, without reaching iLink, for {duration(b.cooldown_left_s)} more"
            )
    reasons = "".join(f"<li>{_e(p)}</li>" for p in items)
    return (
        f'<section class="banner {cls}" id="health"><div class="big" aria-hidden="true">{mark}</div>'
        f"<div><b>{_e(title)}</b>{f'<ul>{reasons}</ul>' if reasons else ''}</div></section>"
    )


# --------------------------------------------------------------------------- peers


def _fate(snap: Snapshot, p: PeerRow) -> tuple[str, str, str]:
    """(badge class, badge text, what happens to a message sent now) for one person."""
    # A spent budget holds sends unless the rules pass them through (then they are only counted)
    # or the next one re-checks a learnt budget at iLink.
    spent = p.budget_left is not None and p.budget_left <= 0 and snap.on_closed != "pass-through"
    if p.closed_left_s is None and spent and p.budget_probe:
        return (
            "b-warn",
            "once: budget re-check",
            "Sent to WeChat as one re-check of the send budget learnt for your bot (learnt a while "
            "ago: iLink may allow more now). If iLink refuses it, the next messages are held as "
            "for a used-up budget until they write to your bot.",
        )
    if p.closed_left_s is None and not spent:
        if p.inbound_age_s is not None and p.inbound_age_s > WINDOW_AGING_S:
            return (
                "b-warn",
                "yes, for now",
                f"Sent to WeChat now. They last wrote {duration(p.inbound_age_s)} ago: iLink usually stops "
                "accepting messages about 24 h after a person's last message.",
            )
        return "b-yes", "yes", "Sent to WeChat now."
    why = "send budget used up" if spent and p.closed_left_s is None else "window closed"
    if snap.on_closed == "defer":
        keep = f" (dropped if they do not write within {duration(snap.max_age_s)})" if snap.max_age_s else ""
        fate = f"Held in the outbox and delivered as soon as they write to your bot{keep}."
    elif why == "send budget used up":
        fate = (
            "Not sent (iLink would refuse it): your bot is told at once that the send failed, "
            "until they write to your bot again."
        )
    else:
        fate = (
            "Not sent: your bot is told at once that the send failed (iLink's own refusal), "
            "until they write to your bot again."
        )
    if p.closed_left_s is not None:
        fate += f" The proxy tries iLink again in {duration(p.closed_left_s)} even if they do not write."
    return "b-no", f"no: {why}", fate


def _ago(seconds: float | None) -> str:
    return f"{duration(seconds)} ago" if seconds is not None else "never seen"


def _peers(snap: Snapshot) -> str:
    head = '<section id="peers"><h2>Can your bot reach each person right now?</h2>'
    if not snap.peer_state:
        return (
            head + '<p class="hint">Peer state is off (no rule has <code>peer_state</code>): the proxy '
            "repairs each send on its own and keeps no per-person state, so it cannot tell.</p></section>"
        )
    hint = (
        '<p class="hint">iLink lets a bot write to a person only for a while after that person last wrote '
        "(their <i>window</i>), and only so many times. When a send is refused because the window is closed, "
        "the proxy remembers it and stops bothering iLink until the person writes again. "
        + (
            "This proxy <b>holds</b> such messages and delivers them when the person writes."
            if snap.on_closed == "defer"
            else "This proxy answers such sends at once with iLink's refusal (start it with "
            "<code>--defer</code> to hold them until the person writes instead)."
        )
        + " A person is listed once they have written to the bot or a send to them was refused.</p>"
    )
    if snap.store_error:
        return head + hint + f'<p class="b-no badge">{_e(snap.store_error)}</p></section>'
    outbox = ""
    if snap.outbox_depth is not None:
        totals = ", ".join(f"{_e(k.replace('_', ' '))} {v}" for k, v in snap.outbox_totals)
        outbox = (
            f'<p id="outbox"><b>{snap.outbox_depth}</b> message(s) waiting in the outbox'
            + (f", the oldest for {_e(duration(snap.outbox_oldest_age_s))}" if snap.outbox_depth else "")
            + (f"; dropped after {_e(duration(snap.max_age_s))} without delivery" if snap.max_age_s else "")
            + (f' <span class="muted">(so far: {totals})</span>' if totals else "")
            + "</p>"
        )
    if not snap.peers:
        return head + hint + outbox + '<p class="muted">No person seen yet.</p></section>'
    rows = []
    for p in snap.peers:
        badge, reach, fate = _fate(snap, p)
        budget = (
            f'<td class="num">{p.budget_left}</td>'
            if p.budget_left is not None
            else '<td><span class="badge b-unknown">unknown</span></td>'
        )
        rows.append(
            "<tr>"
            f'<td class="id">{_e(p.peer)}</td><td class="id">{_e(p.bot)}</td>'
            f'<td><span class="badge {badge}">{_e(reach)}</span></td>'
            f'<td class="nowrap">{_e(_ago(p.inbound_age_s))}</td>'
            f"{budget}"
            f'<td class="num">{p.stale_tokens}</td><td class="num">{p.queued}</td>'
            f"<td>{_e(fate)}</td></tr>"
        )
    more = (
        f'<p class="muted">{snap.peers_total - len(snap.peers)} more not shown (the least recently '
        "active).</p>"
        if snap.peers_total > len(snap.peers)
        else ""
    )
    return (
        head
        + hint
        + outbox
        + "<table><thead><tr><th>Person</th><th>Bot</th><th>Reachable now?</th><th>Last wrote</th>"
        "<th>Sends left</th><th>Stale tokens remembered</th><th>Messages waiting</th>"
        "<th>What happens to a message sent now</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + more
        + "</section>"
    )


# --------------------------------------------------------------------------- charts


def _bars(
    minutes: tuple[Minute, ...],
    series: Iterable[tuple[str, str]],
    count_of: dict[str, Counter[str]],
    title: str,
) -> str:
    """A stacked bar per minute (inline SVG): `series` are (key, colour), `count_of[key]` maps a
    minute's start (as text) to its count."""
    series = list(series)
    width, height, left, bottom = 560, 150, 34, 20
    n = max(len(minutes), 1)
    slot = (width - left) / n
    totals = [sum(count_of[k][str(m.start)] for k, _ in series) for m in minutes]
    top = max(max(totals, default=0), 1)
    plot = height - bottom - 6
    out = [
        f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{_e(title)}" >',
        f'<line x1="{left}" y1="{6 + plot}" x2="{width}" y2="{6 + plot}" stroke="#ccd"/>',
        f'<text x="{left - 4}" y="14" font-size="11" text-anchor="end" fill="#667">{top}</text>',
        f'<text x="{left - 4}" y="{6 + plot}" font-size="11" text-anchor="end" fill="#667">0</text>',
        f'<text x="{left}" y="{height - 4}" font-size="11" fill="#667">-{n} min</text>',
        f'<text x="{left + (width - left) / 2}" y="{height - 4}" font-size="11" text-anchor="middle" '
        f'fill="#667">-{n // 2} min</text>',
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end" fill="#667">now</text>',
    ]
    for i, m in enumerate(minutes):
        y = 6 + plot
        for key, colour in series:
            c = count_of[key][str(m.start)]
            if not c:
                continue
            h = plot * c / top
            y -= h
            out.append(
                f'<rect x="{left + i * slot + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{_e(clock(m.start))} UTC: {c} {_e(key)}'
                "</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def _charts(snap: Snapshot) -> str:
    by_group: dict[str, Counter[str]] = {g: Counter() for g in _GROUPS}
    by_delivery: dict[str, Counter[str]] = {d: Counter() for d in _DELIVERY}
    decisions: Counter[str] = Counter()
    deliveries: Counter[str] = Counter()
    for m in snap.minutes:
        for decision, c in m.decisions:
            by_group[_DECISION_GROUP.get(decision, "failed")][str(m.start)] += c
            decisions[decision] += c
        for delivery, c in m.deliveries:
            if delivery in by_delivery:
                by_delivery[delivery][str(m.start)] += c
            deliveries[delivery] += c

    def legend(table: dict[str, tuple[str, str]], totals: Counter[str]) -> str:
        return (
            '<div class="legend">'
            + "".join(
                f'<span><i style="background:{colour}"></i>{_e(label)}: <b>{totals[key]}</b></span>'
                for key, (colour, label) in table.items()
            )
            + "</div>"
        )

    group_totals: Counter[str] = Counter()
    for decision, c in decisions.items():
        group_totals[_DECISION_GROUP.get(decision, "failed")] += c
    detail = ", ".join(
        f'<span class="d-{_DECISION_GROUP.get(d, "failed")}">{_e(d)}</span> {c}'
        for d, c in sorted(decisions.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    hour = len(snap.minutes)
    return (
        f'<section id="charts"><h2>The last {hour} minutes on this replica</h2><div class="charts">'
        f'<div class="chart"><b>What the proxy did with each send</b> (per minute)'
        + _bars(snap.minutes, [(g, c) for g, (c, _) in _GROUPS.items()], by_group, "decisions per minute")
        + legend(_GROUPS, group_totals)
        + f'<p class="hint">By decision: {detail or "nothing yet"}. <i>Sent</i> includes repairs; '
        "<i>not sent</i>: refused for a closed window or a rate limit.</p></div>"
        '<div class="chart"><b>What iLink said about delivery</b> (sends that reached iLink, per minute)'
        + _bars(
            snap.minutes,
            [(d, c) for d, (c, _) in _DELIVERY.items()],
            by_delivery,
            "delivery outcomes per minute",
        )
        + legend(_DELIVERY, deliveries)
        + '<p class="hint"><i>Confirmed</i>: iLink gave a message id, the only evidence of delivery. '
        "<i>Unconfirmed</i>: iLink said ok without a message id, as it also does for messages it then "
        "drops. <i>Refused</i>: iLink said no. <i>No answer</i>: the connection failed.</p>"
        "</div></div></section>"
    )


# --------------------------------------------------------------------------- recent


def _recent_row(r: Recent) -> str:
    group = _DECISION_GROUP.get(r.decision, "failed")
    delivery = r.delivery or NONE
    return (
        f"<tr><td>{_e(clock(r.ts))}</td><td>{_e(r.endpoint)}</td>"
        f'<td class="id">{_e(r.peer or NONE)}</td><td class="id">{_e(r.bot or NONE)}</td>'
        f'<td class="d-{group}"><b>{_e(r.decision)}</b></td>'
        f'<td class="num">{r.attempts}</td><td><code>{_e(r.tokens or NONE)}</code></td>'
        f"<td><code>{_e(r.answers or NONE)}</code></td><td>{_e(delivery)}</td>"
        f'<td class="num">{_e(r.status if r.status is not None else "none")}</td></tr>'
    )


def _recent(snap: Snapshot) -> str:
    head = (
        f'<section id="recent"><h2>Recent requests on this replica</h2><p class="hint">The last '
        f"{len(snap.recent)} iLink API exchanges this replica handled, newest first (getupdates polls "
        "are not listed). <i>Tokens</i> says which context token each attempt carried: the gateway's "
        "(original), the newest one the person sent (fresh) or none.</p>"
    )
    if not snap.recent:
        return head + '<p class="muted">None yet.</p></section>'
    return (
        head + "<table><thead><tr><th>Time (UTC)</th><th>Endpoint</th><th>Person</th><th>Bot</th>"
        "<th>Decision</th><th>Attempts</th><th>Tokens</th><th>iLink answered</th><th>Delivery</th>"
        "<th>Gateway got</th></tr></thead><tbody>"
        + "".join(_recent_row(r) for r in snap.recent)
        + "</tbody></table></section>"
    )
