"""Re-take docs/status.png: `ilink-fixproxy --defer --metrics` in front of the fake iLink, a few
people in different situations (a repaired stale send, a token substituted, a send iLink accepts
without a message id, a closed window with sends held in the outbox, a send budget learnt and
spent), then headless Chromium on the proxy's `/status` page.

    apt-get install -y chromium fonts-noto-color-emoji
    .venv/bin/python docs/status_screenshot.py docs/status.png
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from ilink_fixproxy.launcher import ProxyProcess, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, make_pki

ROOT = Path(__file__).resolve().parent.parent
SEND = "/ilink/bot/sendmessage"
HEADERS = {
    "Content-Type": "application/json",
    "AuthorizationType": "ilink_bot_token",
    "Authorization": "Bearer demo-bot@im.bot:not-a-real-secret",
}


def traffic(proxy_url: str, fake: FakeILink, client: httpx.Client) -> None:
    def send(peer: str, token: str, client_id: str) -> None:
        msg = {
            "to_user_id": peer,
            "client_id": client_id,
            "message_type": 2,
            "message_state": 2,
            "item_list": [{"type": 1, "text_item": {"text": "cron: daily report"}}],
            "context_token": token,
        }
        client.post(proxy_url + SEND, content=json.dumps({"msg": msg}).encode(), headers=HEADERS)

    fake.push_inbound("wxid_alice@im.wechat")
    client.post(proxy_url + "/ilink/bot/getupdates", content=b'{"get_updates_buf":""}', headers=HEADERS)
    send("wxid_alice@im.wechat", "AARzJWAFAAAB-stale-1", "cron-0900")  # fresh token substituted
    send("wxid_bob@im.wechat", "AARzJWAFAAAB-stale-2", "cron-0901")  # repaired
    send("wxid_bob@im.wechat", "AARzJWAFAAAB-stale-2", "cron-0901")  # the gateway's retry: replayed
    fake.dropping_peers.add("wxid_dave@im.wechat")
    send("wxid_dave@im.wechat", "AARzJWAFAAAB-stale-3", "cron-0902")  # accepted without a message_id
    fake.budget_peers["wxid_erin@im.wechat"] = 2  # two sends per message erin writes
    token = fake.push_inbound("wxid_erin@im.wechat")
    client.post(proxy_url + "/ilink/bot/getupdates", content=b'{"get_updates_buf":""}', headers=HEADERS)
    for i in range(4):  # 2 delivered, the 3rd refused (the budget learnt), the 4th held
        send("wxid_erin@im.wechat", token, f"note-{i}")
    fake.tokenless_delivers = False
    send("wxid_carol@im.wechat", "AARzJWAFAAAB-stale-4", "cron-0903")  # window closed: deferred
    send("wxid_carol@im.wechat", "AARzJWAFAAAB-stale-4", "cron-0904")  # held in the outbox
    client.post(proxy_url + "/ilink/bot/getconfig", content=b'{"ilink_user_id":"x"}', headers=HEADERS)


def main(out: str) -> int:
    work = Path(tempfile.mkdtemp())
    pki = make_pki(work / "pki")
    with FakeILink(pki) as fake:
        argv = ilink_fixproxy_argv(
            "--listen", "127.0.0.1:0", "--upstream", fake.url, "--upstream-ca", str(pki.ca_cert),
            "--confdir", str(work / "conf"), "--rules", str(ROOT / "rules.yaml"),
            "--state", str(work / "state.sqlite3"), "--defer", "--metrics", "127.0.0.1:0",
        )  # fmt: skip
        with ProxyProcess(argv) as proxy, httpx.Client(trust_env=False, timeout=30) as client:
            proxy.wait_output("metrics on http")
            m = re.search(r"metrics on (http://\S+)/metrics", proxy.output)
            assert m, proxy.output
            traffic(proxy.url, fake, client)
            time.sleep(0.3)
            chromium = [
                *("chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
                *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
                *("--hide-scrollbars", "--window-size=1280,1100", "--force-device-scale-factor=1"),
                *(f"--user-data-dir={work / 'chromium'}", f"--screenshot={out}", m.group(1) + "/status"),
            ]
            subprocess.run(chromium, check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "status.png")))
