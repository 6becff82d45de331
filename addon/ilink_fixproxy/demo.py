"""``ilink-fixproxy demo``: watch one stale-token send fail directly and succeed through the proxy.

No WeChat account and no network: a fake iLink (``sandbox.py``) runs on loopback with its own
test CA, and the real proxy runs as a child process in front of it, exactly as an operator
would run it.
"""

from __future__ import annotations

import json
import ssl
import tempfile
from importlib import resources
from pathlib import Path

import httpx

from .launcher import ProxyProcess, ilink_fixproxy_argv
from .redact import token_hash
from .rules import DEFAULT_RULES_NAME
from .sandbox import FakeILink, make_pki

PEER = "wxid_demo_friend@im.wechat"
STALE_TOKEN = "AARzJWAFAAABAAAAAAAstaleDemoToken0000000000"
SEND_PATH = "/ilink/bot/sendmessage"


def _send_body(text: str) -> bytes:
    msg = {
        "msg": {
            "from_user_id": "",
            "to_user_id": PEER,
            "client_id": "demo-cron-0001",
            "message_type": 2,
            "message_state": 2,
            "item_list": [{"type": 1, "text_item": {"text": text}}],
            "context_token": STALE_TOKEN,
        },
        "base_info": {"channel_version": "2.2.0"},
    }
    return json.dumps(msg, ensure_ascii=False).encode()


def _headers() -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "AuthorizationType": "ilink_bot_token",
        "Authorization": "Bearer demo-bot@im.bot:not-a-real-secret",
        "iLink-App-Id": "bot",
    }


def run_demo() -> int:
    out = print
    text = "Good morning! Your daily report is ready."
    with tempfile.TemporaryDirectory(prefix="ilink-fixproxy-demo-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        verify = ssl.create_default_context(cafile=str(pki.ca_cert))
        with (
            FakeILink(pki) as fake,
            resources.as_file(resources.files(__package__).joinpath(DEFAULT_RULES_NAME)) as rules_path,
        ):
            out(f"A fake iLink is answering at {fake.url} (loopback only, its own test CA).")
            out(f"The gateway's cached context_token for {PEER} ({token_hash(STALE_TOKEN)}) went stale:")
            out("nobody wrote to the bot for a day, and a cron job now sends a proactive message.\n")

            with httpx.Client(verify=verify, trust_env=False, timeout=15) as client:
                direct = client.post(fake.url + SEND_PATH, content=_send_body(text), headers=_headers())
            out("1) Straight to iLink, as an unpatched gateway sends it:")
            out(f"   <- HTTP {direct.status_code} {direct.text}")
            out(
                f"   delivered: {'yes' if fake.deliveries else 'no'} (hermes-agent 0.19.0 would read this "
                "as a rate limit, give up on the message and refuse every send for 30 s)\n"
            )

            argv = ilink_fixproxy_argv(
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                fake.url,
                "--upstream-ca",
                str(pki.ca_cert),
                "--confdir",
                str(Path(tmp) / "conf"),
                "--rules",
                str(rules_path),
            )
            before = len(fake.sends())
            with ProxyProcess(argv) as proxy, httpx.Client(trust_env=False, timeout=15) as client:
                repaired = client.post(proxy.url + SEND_PATH, content=_send_body(text), headers=_headers())
            attempts = len(fake.sends()) - before
            delivered = [d for d in fake.deliveries if d.text == text]
            out(f"2) The same send through ilink-fixproxy ({proxy.url}):")
            out(f"   <- HTTP {repaired.status_code} {repaired.text or '(empty body)'}")
            out(f"   X-Ilink-Fixproxy: {repaired.headers.get('x-ilink-fixproxy', '(none)')}")
            out(
                f"   delivered: {'yes' if delivered else 'no'}"
                + (f' -> "{delivered[0].text}" to {delivered[0].to_user_id}' if delivered else "")
            )
            out("")
            out(f"What happened: iLink refused the send ({direct.text}). The proxy recognised that answer")
            out("as a stale context_token, re-issued the identical request without msg.context_token")
            out(f"({attempts} upstream attempts in all), and handed the gateway iLink's new answer.")
            if delivered:
                out("Result: delivered.")
                return 0
            out("Result: NOT delivered - something is wrong with this installation; proxy output:")
            out(proxy.output)
            return 1
