"""``python -m bench.budget``: attempts that reach iLink per 100 sends when peers have a send budget.

The fake iLink (sandbox.py) gives each peer a budget of ``--budget`` sends per inbound message and
refuses every further send, with or without a token, until the peer writes again. A gateway that
retries a failed send like hermes-agent does (the same client_id, up to 4 more times) sends
``--sends`` messages to ``--peers`` peers, each with the peer's newest token; each peer writes
again after a random number of sends to it (``--write-every`` LO-HI, seeded). The same scenario
runs twice in one process, against the same fake: straight to the fake, and through the real
proxy process (the shipped rules: ``budget: auto``, held sends answered locally). Printed: per 100
sends, the attempts that reached iLink, how many of those it refused, and the messages delivered.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from ilink_fixproxy.launcher import ProxyProcess, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, make_pki

SEND = "/ilink/bot/sendmessage"
UPDATES = "/ilink/bot/getupdates"
RETRIES = 4  # hermes-agent: the first try and 4 more with the same client_id


@dataclass
class Result:
    sends: int
    attempts: int
    refused: int
    delivered: int

    def per_100(self, n: int) -> float:
        return round(100 * n / self.sends, 1)


def run(base: str, fake: FakeILink, verify: ssl.SSLContext, args: argparse.Namespace) -> Result:
    fake.reset()
    rng = random.Random(args.seed)
    lo, hi = args.write_every
    peers = [f"wxid_bench_{i}@im.wechat" for i in range(args.peers)]
    for peer in peers:
        fake.budget_peers[peer] = args.budget
    headers = {
        "Content-Type": "application/json",
        "AuthorizationType": "ilink_bot_token",
        "Authorization": f"Bearer bench-{secrets.token_hex(4)}@im.bot:secret",
    }
    tokens: dict[str, str] = {}
    until_write = {p: 0 for p in peers}
    with httpx.Client(trust_env=False, timeout=30, verify=verify) as client:

        def poll() -> None:
            r = client.post(base + UPDATES, content=b'{"get_updates_buf":""}', headers=headers)
            for msg in r.json().get("msgs", []):
                tokens[msg["from_user_id"]] = msg["context_token"]

        for n in range(args.sends):
            peer = peers[rng.randrange(len(peers))]
            if until_write[peer] <= 0:  # the peer writes: a new window
                fake.push_inbound(peer, "hi")
                poll()
                until_write[peer] = rng.randint(lo, hi)
            until_write[peer] -= 1
            msg = {
                "to_user_id": peer,
                "client_id": f"bench-{n}",
                "message_type": 2,
                "message_state": 2,
                "item_list": [{"type": 1, "text_item": {"text": f"push {n}"}}],
                "context_token": tokens[peer],
            }
            body = json.dumps({"msg": msg}).encode()
            for _ in range(1 + RETRIES):
                r = client.post(base + SEND, content=body, headers=headers)
                if r.status_code == 200 and r.json().get("ret", 0) == 0:
                    break
    sends = fake.sends()
    return Result(
        sends=args.sends,
        attempts=len(sends),
        refused=sum(1 for s in sends if s.answered.startswith("refused")),
        delivered=len({d.client_id for d in fake.deliveries}),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.split("\n")[0])
    parser.add_argument("--sends", type=int, default=400)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--budget", type=int, default=10, help="the fake's sends per inbound message")
    parser.add_argument("--write-every", type=int, nargs=2, default=(5, 30), metavar=("LO", "HI"))
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        verify = ssl.create_default_context(cafile=str(pki.ca_cert))
        with FakeILink(pki) as fake:
            direct = run(fake.url, fake, verify, args)
            argv_ = ilink_fixproxy_argv(
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                fake.url,
                "--upstream-ca",
                str(pki.ca_cert),
                "--confdir",
                str(Path(tmp) / "conf"),
            )
            with ProxyProcess(argv_) as proxy:
                through = run(proxy.url, fake, verify, args)
    lo, hi = args.write_every
    print(
        f"{args.sends} sends to {args.peers} peers, budget {args.budget} per inbound message, each peer "
        f"writing after {lo}-{hi} sends to it, a gateway retrying failures {RETRIES} times (seed {args.seed})"
    )
    print(f"{'per 100 sends':<16}{'attempts at iLink':>18}{'refused by iLink':>18}{'delivered':>11}")
    for name, r in (("without proxy", direct), ("through proxy", through)):
        print(f"{name:<16}{r.per_100(r.attempts):>18}{r.per_100(r.refused):>18}{r.per_100(r.delivered):>11}")
    saved = direct.per_100(direct.attempts) - through.per_100(through.attempts)
    print(f"attempts saved per 100 sends: {saved:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
