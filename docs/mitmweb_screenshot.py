"""Re-take docs/mitmweb.png: `ilink-fixproxy --ui` in front of the fake iLink, a few sends that
are repaired, replayed and answered locally, then headless Chromium on mitmweb's flow list.

    apt-get install -y chromium fonts-noto-color-emoji
    .venv/bin/python docs/mitmweb_screenshot.py docs/mitmweb.png
"""

from __future__ import annotations

import json
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: str) -> int:
    work = Path(tempfile.mkdtemp())
    pki = make_pki(work / "pki")
    web_port = free_port()
    with FakeILink(pki) as fake:
        argv = ilink_fixproxy_argv(
            "--listen", "127.0.0.1:0", "--upstream", fake.url, "--upstream-ca", str(pki.ca_cert),
            "--confdir", str(work / "conf"), "--rules", str(ROOT / "rules.yaml"), "--state", ":memory:",
            "--ui", "--set", f"web_port={web_port}",
        )  # fmt: skip
        with ProxyProcess(argv) as proxy, httpx.Client(trust_env=False, timeout=30) as client:

            def send(token: str, client_id: str) -> None:
                msg = {
                    "to_user_id": "wxid_alice@im.wechat",
                    "client_id": client_id,
                    "message_type": 2,
                    "message_state": 2,
                    "item_list": [{"type": 1, "text_item": {"text": "cron: daily report"}}],
                    "context_token": token,
                }
                client.post(proxy.url + SEND, content=json.dumps({"msg": msg}).encode(), headers=HEADERS)

            poll = b'{"get_updates_buf":""}'
            client.post(proxy.url + "/ilink/bot/getupdates", content=poll, headers=HEADERS)
            send("AARzJWAFAAAB-stale-1", "cron-0901")  # repaired
            send("AARzJWAFAAAB-stale-1", "cron-0901")  # the gateway's retry: replayed
            fake.tokenless_delivers = False
            send("AARzJWAFAAAB-stale-2", "cron-0902")  # refused even without the token: window closed
            send("AARzJWAFAAAB-stale-2", "cron-0903")  # answered locally
            send("AARzJWAFAAAB-stale-2", "cron-0904")  # answered locally
            client.post(proxy.url + "/ilink/bot/getconfig", content=b'{"ilink_user_id":"x"}', headers=HEADERS)
            time.sleep(0.5)
            flows = client.get(f"http://127.0.0.1:{web_port}/flows").json()
            repaired = next(f for f in flows if "repaired" in (f.get("comment") or ""))
            url = f"http://127.0.0.1:{web_port}/#/flows/{repaired['id']}/comment"
            chromium = [
                *("chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
                *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
                *("--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=4000"),
                *(f"--user-data-dir={work / 'chromium'}", f"--screenshot={out}", url),
            ]
            subprocess.run(chromium, check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "mitmweb.png")))
