"""Shared pieces of the capture, metrics and explain tests: a gateway-like client with its own
secrets, and a leak check over every byte the proxy wrote."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import httpx

SEND = "/ilink/bot/sendmessage"
UPDATES = "/ilink/bot/getupdates"
CONFIG = "/ilink/bot/getconfig"


class Gateway:
    """A bot gateway with a unique bot token and peer; remembers every secret and text it sent."""

    def __init__(self, url: str) -> None:
        tag = secrets.token_hex(4)
        self.url = url
        self.bot_token = f"obs-{tag}@im.bot:S3cret-{secrets.token_hex(8)}"
        self.peer = f"wxid_obs_{tag}@im.wechat"
        self.headers = {
            "Content-Type": "application/json",
            "AuthorizationType": "ilink_bot_token",
            "Authorization": f"Bearer {self.bot_token}",
        }
        self.client = httpx.Client(trust_env=False, timeout=30)
        self.tokens: set[str] = set()  # context tokens and typing tickets seen or sent
        self.texts: list[str] = []
        self._n = 0

    def token(self, kind: str) -> str:
        value = f"AARzJWAFAAAB-{kind}-{secrets.token_hex(8)}"
        self.tokens.add(value)
        return value

    def send(self, token: str | None, client_id: str | None = None) -> httpx.Response:
        self._n += 1
        text = f"message text {self._n} {secrets.token_hex(6)}"
        self.texts.append(text)
        msg: dict[str, object] = {
            "from_user_id": "",
            "to_user_id": self.peer,
            "client_id": client_id or f"cid-{self._n}-{secrets.token_hex(3)}",
            "message_type": 2,
            "message_state": 2,
            "item_list": [{"type": 1, "text_item": {"text": text}}],
        }
        if token:
            msg["context_token"] = token
        body = json.dumps({"msg": msg, "base_info": {"channel_version": "2.2.0"}}).encode()
        return self.client.post(self.url + SEND, content=body, headers=self.headers)

    def poll(self) -> httpx.Response:
        r = self.client.post(self.url + UPDATES, content=b'{"get_updates_buf":""}', headers=self.headers)
        for msg in r.json().get("msgs", []):
            self.tokens.add(msg["context_token"])
            self.texts += [i["text_item"]["text"] for i in msg.get("item_list", []) if "text_item" in i]
        return r

    def getconfig(self, token: str) -> httpx.Response:
        body = json.dumps({"ilink_user_id": self.peer, "context_token": token}).encode()
        r = self.client.post(self.url + CONFIG, content=body, headers=self.headers)
        self.tokens.add(r.json()["typing_ticket"])
        return r

    def secrets(self) -> list[str]:
        """Everything that must never be written in clear (the bot token's secret part too)."""
        return [self.bot_token, self.bot_token.split(":", 1)[1], *sorted(self.tokens)]

    def close(self) -> None:
        self.client.close()


def encodings(secret: str) -> list[bytes]:
    """The forms a secret could leak in: as is, JSON-escaped, URL-encoded, base64."""
    raw = secret.encode()
    return sorted(
        {
            raw,
            json.dumps(secret).encode()[1:-1],
            urllib.parse.quote(secret, safe="").encode(),
            base64.b64encode(raw).rstrip(b"="),
        }
    )


def leaks(data: bytes, needles: Iterable[str]) -> list[str]:
    return [n for n in needles if any(form in data for form in encodings(n))]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def journal(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "journal.jsonl").read_text().splitlines() if line]
