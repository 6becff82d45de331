"""The peer-state store shared by several proxy replicas: Redis, through redis-py's asyncio client.

Everything `state.SqliteStore` keeps, under the same `ports.Store` methods, shared: message
records and the single-flight lease on a message under way, stale tokens, send windows,
cooldowns and the rate-limit counter, the outbox (each queued send claimed by the one replica
delivering it), flush requests and counters. The newest context_token of each peer, which the
SQLite store keeps only in the memory of the proxy that saw it, is kept here too, so a send
through replica B can use the token that a getupdates through replica A brought.

Nothing in clear: bots, peers, client_ids and tokens appear in keys only as keyed hashes
(HMAC-SHA256), and every value that could carry a token, an id or message text (the fresh token,
the peer's id, queued sends, stored answers, refusal bodies) is AES-GCM-encrypted, bound to its
key. Both keys are derived (HKDF) from ILINK_FIXPROXY_STATE_KEY, the same on every replica.
Every key expires (TTL) or is capped, so nothing grows without bound.

Redis unavailable (down, slow, partitioned): each call fails fast (short socket timeouts; after a
failure, calls fail at once for BACKOFF_S without touching the network), raises one of `errors`,
and the engine decides without the store, as with no proxy. Each failed operation is counted
(`unavailable`, exported as ilink_fixproxy_store_unavailable_total{operation}) and logged once
per LOG_INTERVAL_S; `up` says whether the last call succeeded (ilink_fixproxy_store_up).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .state import Cooldown, Message, Peer, Queued, Reads, StateError

log = logging.getLogger("ilink_fixproxy")

KEY_ENV = "ILINK_FIXPROXY_STATE_KEY"
URL_ENV = "ILINK_FIXPROXY_REDIS_URL"
MIN_KEY_CHARS = 32
PREFIX = "ilfp:"
SOCKET_TIMEOUT_S = 0.5  # a slow Redis costs a send at most this per call, then BACKOFF_S of none
BACKOFF_S = 1.0
LOG_INTERVAL_S = 60.0
PEER_TTL_S = 30 * 86400  # peers, bots, stale tokens: forgotten a month after last use
OUTBOX_TTL_S = 30 * 86400  # a queued send's own bound (its rule's max_age_s expires it sooner)
FLUSH_TTL_S = 86400
MESSAGE_MARGIN_S = 60.0  # a message record outlives its dedupe window by this much
LIMITED_MAX = 1000  # rate-limit answers remembered per bot, as the SQLite store
IDLE_MAX = 64  # connections kept open for the send's own calls (as many as sends at once)

STORE_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class StoreDown(redis.exceptions.ConnectionError):
    """Redis failed moments ago: not asked again until BACKOFF_S has passed."""


def state_key_from_env(environ: Any = os.environ) -> bytes:
    value = environ.get(KEY_ENV, "")
    if not value:
        raise StateError(
            f"a Redis store needs {KEY_ENV}: the same secret of at least {MIN_KEY_CHARS} characters on "
            "every replica (e.g. `openssl rand -hex 32`)"
        )
    if len(value) < MIN_KEY_CHARS or not value.isascii() or not value.isprintable() or " " in value:
        raise StateError(
            f"{KEY_ENV} is malformed: it must be at least {MIN_KEY_CHARS} printable ASCII characters "
            "without spaces (e.g. `openssl rand -hex 32`)"
        )
    return value.encode("ascii")


def shown_url(url: str) -> str:
    """The URL without its password (never printed)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "redis://(malformed URL)"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _check_url(url: str) -> None:
    shown = shown_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise StateError(
            f"--state {shown}: not a valid Redis URL (redis://[:PASSWORD@]HOST:PORT/DB)"
        ) from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise StateError(f"--state {shown}: no host (redis://[:PASSWORD@]HOST:PORT/DB)")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise StateError(f"--state {shown}: the database must be a number (redis://HOST:PORT/DB)")
    del port


_T = TypeVar("_T")


def _op(name: str) -> Callable[[Callable[..., Awaitable[_T]]], Callable[..., Awaitable[_T]]]:
    """A store call that fails fast while Redis is down, and is counted when it fails."""

    def wrap(fn: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
        @functools.wraps(fn)
        async def call(self: RedisStore, *args: Any, **kwargs: Any) -> _T:
            if self._down_until and time.monotonic() < self._down_until:
                self._failed(name, self._last_error or StoreDown("Redis unavailable"))
                raise StoreDown(f"Redis unavailable ({self._last_error_text})")
            try:
                result = await fn(self, *args, **kwargs)
            except STORE_ERRORS as e:
                self._down_until = time.monotonic() + BACKOFF_S
                self._last_error = e
                self._failed(name, e)
                if not isinstance(e, redis.exceptions.ResponseError):
                    await self._forget_connections()
                raise
            self._succeeded()
            return result

        return call

    return wrap


# --------------------------------------------------------------------------- scripts

# KEYS[1] message; ARGV now, since, ttl_ms
_BEGIN = """
local u = tonumber(redis.call('HGET', KEYS[1], 'u') or '-1')
local a = 0
if u >= tonumber(ARGV[2]) then
  a = tonumber(redis.call('HGET', KEYS[1], 'a') or '0')
else
  redis.call('HDEL', KEYS[1], 'ans')
end
redis.call('HSET', KEYS[1], 'a', a + 1, 'acc', 0, 's', 'in-flight', 'u', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return a + 1
"""
# KEYS[1] message; ARGV now, since, ttl_ms, state, attempts, accepted, answer ('' for none)
_SETTLE = """
local u = tonumber(redis.call('HGET', KEYS[1], 'u') or '-1')
local a = 0
if u >= tonumber(ARGV[2]) then a = tonumber(redis.call('HGET', KEYS[1], 'a') or '0') end
if tonumber(ARGV[5]) > a then a = tonumber(ARGV[5]) end
redis.call('HSET', KEYS[1], 'a', a, 'acc', ARGV[6], 's', ARGV[4], 'u', ARGV[1])
if ARGV[7] == '' then redis.call('HDEL', KEYS[1], 'ans') else redis.call('HSET', KEYS[1], 'ans', ARGV[7]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[8] ~= '' then
  if redis.call('GET', KEYS[2]) == ARGV[8] then redis.call('DEL', KEYS[2]) end
  redis.call('PUBLISH', KEYS[2] .. ':done', '1')
end
"""
# KEYS[1] message; ARGV now, since, ttl_ms, attempts, accepted, answer
_RECORD = """
local u = tonumber(redis.call('HGET', KEYS[1], 'u') or '-1')
local a, acc = 0, 0
if u >= tonumber(ARGV[2]) then
  a = tonumber(redis.call('HGET', KEYS[1], 'a') or '0')
  acc = tonumber(redis.call('HGET', KEYS[1], 'acc') or '0')
end
if acc == 0 then redis.call('HSET', KEYS[1], 'ans', ARGV[6]) end
if tonumber(ARGV[5]) > acc then acc = tonumber(ARGV[5]) end
redis.call('HSET', KEYS[1], 'a', a + tonumber(ARGV[4]), 'acc', acc, 'u', ARGV[1])
if acc == 1 then redis.call('HSET', KEYS[1], 's', 'accepted') end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""
# KEYS[1] lease; ARGV owner, ttl_ms. Taken, or extended when already ours.
_LEASE = """
local v = redis.call('GET', KEYS[1])
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
# KEYS[1] lease, KEYS[2] its outcome channel, KEYS[3] the message whose first attempt the
# snapshot stored and nothing sent ('' for none); ARGV owner. That attempt is taken back only while
# the lease is still ours (nobody else can have written the record since) and the record is still
# the one the snapshot wrote.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if KEYS[3] ~= '' then
    local m = redis.call('HMGET', KEYS[3], 'a', 's')
    if m[1] == '1' and m[2] == 'in-flight' then redis.call('DEL', KEYS[3]) end
  end
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', KEYS[2], '1')
"""
# KEYS[1] rate-limit zset; ARGV now, window_s, member, ttl_ms, max
_LIMITED = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n > tonumber(ARGV[5]) then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - tonumber(ARGV[5]) - 1) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"""
# KEYS: item, per-peer zset, all zset, by-client_id key ('' when none), counters, rules set
# ARGV: id, max_per_peer, max_total, created, ttl_ms, rule, then the item's fields (name, value)
_ENQUEUE = """
if KEYS[4] ~= '' then
  local id = redis.call('GET', KEYS[4])
  if id then return {'duplicate', id} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) or redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then
  return {'full', ''}
end
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[5]) end
redis.call('HINCRBY', KEYS[5], 'deferred', 1)
redis.call('SADD', KEYS[6], ARGV[6])
redis.call('PEXPIRE', KEYS[6], ARGV[5])
return {'queued', ARGV[1]}
"""
# KEYS[1] item, KEYS[2] all zset; ARGV id, prefix. 1 if it was there (and is now gone).
_DEQUEUE = """
local f = redis.call('HMGET', KEYS[1], 'bot', 'hp', 'hc')
redis.call('ZREM', KEYS[2], ARGV[1])
if not f[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2] .. 'qp:' .. f[1] .. ':' .. f[2], ARGV[1])
if f[3] and f[3] ~= '' then
  local c = ARGV[2] .. 'qc:' .. f[1] .. ':' .. f[3]
  if redis.call('GET', c) == ARGV[1] then redis.call('DEL', c) end
end
return 1
"""
# KEYS[1] item, KEYS[2] claim; ARGV owner, ttl_ms
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SET', KEYS[1] .. ':claim', ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
# KEYS: by-client_id outbox key, message, bot, peer, the token's stale key, the message's lease
# ('' for each: not asked). ARGV: the stale-key prefix of this bot, the lease's owner and TTL,
# then begin ('1' or ''), now, since, the message's TTL in ms.
# One round trip for everything a send reads, and its lease taken first (no reads without it).
# With begin, a message with no record (none, or older than since) and not queued gets its first
# attempt stored as in flight, as _BEGIN would, under the lease just taken: the attempt a new
# message nearly always makes next, counted before it is sent without a round trip of its own
# (the engine takes it back with the lease, _RELEASE, if the gate sends nothing).
_SNAPSHOT = """
if KEYS[6] ~= '' then
  local v = redis.call('GET', KEYS[6])
  if not v then redis.call('SET', KEYS[6], ARGV[2], 'PX', ARGV[3])
  elseif v == ARGV[2] then redis.call('PEXPIRE', KEYS[6], ARGV[3])
  else return {0} end
end
local queued, message, bot, peer, token_stale, newest_stale = false, false, false, false, 0, 0
if KEYS[1] ~= '' then queued = redis.call('GET', KEYS[1]) end
if KEYS[2] ~= '' then message = redis.call('HMGET', KEYS[2], 'a', 'acc', 's', 'ans', 'u') end
bot = redis.call('HMGET', KEYS[3], 'cu', 'cs', 'cb', 'bg', 'ba')
if KEYS[4] ~= '' then
  peer = redis.call('HMGET', KEYS[4], 'nt', 'ns', 'ia', 'cu', 'cs', 'cb', 'ft', 'sn', 'rf', 'nd', 'bl')
  if peer[1] and peer[7] then newest_stale = redis.call('EXISTS', ARGV[1] .. peer[1]) end
end
if KEYS[5] ~= '' then token_stale = redis.call('EXISTS', KEYS[5]) end
local begun = 0
if ARGV[4] ~= '' and KEYS[6] ~= '' and KEYS[2] ~= '' and not queued
    and (not message[5] or tonumber(message[5]) < tonumber(ARGV[6])) then
  redis.call('HDEL', KEYS[2], 'ans')
  redis.call('HSET', KEYS[2], 'a', 1, 'acc', 0, 's', 'in-flight', 'u', ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  begun = 1
end
return {1, queued, message, bot, peer, token_stale, newest_stale, begun}
"""
# KEYS[1] peer; ARGV window (its inbound_at as stored, '' for any), field, value, ttl_s, then
# what else to set (name, value). `field` is 'sn' (counted: +1) or 'rf' (set to value). Nothing
# when the peer wrote since the window the send was made in (a late write leaves the new one be).
_BUDGET = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'ia') ~= ARGV[1] then return 0 end
if ARGV[2] == 'sn' then redis.call('HINCRBY', KEYS[1], 'sn', 1)
else redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# KEYS[1] flush requests
_TAKE_FLUSH = """
local v = redis.call('HKEYS', KEYS[1])
redis.call('DEL', KEYS[1])
return v
"""


class RedisStore:
    """`ports.Store` on Redis. Construct with from_url (checks the URL and the state key)."""

    errors = STORE_ERRORS
    shared = True

    def __init__(self, client: aioredis.Redis, shown: str, secret: bytes) -> None:
        self._r = client
        self.path = shown
        self._hmac_key = _derive(secret, b"ilink-fixproxy hmac v1")
        self._aead = AESGCM(_derive(secret, b"ilink-fixproxy aes-gcm v1"))
        self._owner = secrets.token_hex(8)  # this process, on the outbox claims it holds
        self._down_until = 0.0
        self._last_error: BaseException | None = None
        # What /metrics and /healthz read (from the scrape threads: plain values only)
        self.up: bool | None = None  # None until the first call
        self.unavailable: Counter[str] = Counter()
        self._logged: dict[str, float] = {}
        self.log_failures = True  # the `state`/`outbox` commands say it in their own one line
        self._scripts = {
            name: client.register_script(src)
            for name, src in (
                ("begin", _BEGIN),
                ("settle", _SETTLE),
                ("record", _RECORD),
                ("lease", _LEASE),
                ("release", _RELEASE),
                ("limited", _LIMITED),
                ("enqueue", _ENQUEUE),
                ("dequeue", _DEQUEUE),
                ("claim", _CLAIM),
                ("take_flush", _TAKE_FLUSH),
                ("snapshot", _SNAPSHOT),
                ("budget", _BUDGET),
            )
        }
        # The send's own calls (snapshot, begin, settle, lease) go through _eval: connections of
        # their own, each used by one call at a time (see _eval).
        self._idle: list[Any] = []

    @classmethod
    def from_url(cls, url: str, environ: Any = os.environ) -> RedisStore:
        _check_url(url)
        secret = state_key_from_env(environ)
        try:
            client = aioredis.Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                retry_on_timeout=False,
                retry=None,
                decode_responses=False,
            )
        except ValueError as e:
            raise StateError(f"--state {shown_url(url)}: not a usable Redis URL ({e})") from None
        return cls(client, shown_url(url), secret)

    # ------------------------------------------------------------------ health and counting

    @property
    def _last_error_text(self) -> str:
        e = self._last_error
        return f"{type(e).__name__}: {e}" if e is not None else "unknown"

    def _failed(self, operation: str, e: BaseException) -> None:
        self.up = False
        self.unavailable[operation] += 1
        now = time.monotonic()
        if self.log_failures and now - self._logged.get(operation, -LOG_INTERVAL_S) >= LOG_INTERVAL_S:
            self._logged[operation] = now
            log.warning(
                f"peer state: Redis {self.path} unavailable for {operation} ({type(e).__name__}: {e}); "
                "deciding without it (as with no proxy: sends go upstream, stale tokens are repaired "
                f"by the plain re-issue); logged once per {LOG_INTERVAL_S:.0f} s, counted in "
                "ilink_fixproxy_store_unavailable_total"
            )

    def _succeeded(self) -> None:
        if self.up is False:
            log.warning(f"peer state: Redis {self.path} answers again; shared state resumes")
        self.up = True
        self._down_until = 0.0

    # ------------------------------------------------------------------ keys and sealing

    def keyed_hash(self, secret: str) -> str:
        """The stored form of a token, a bot credential or an id: HMAC-SHA256, 32 hex characters,
        the same on every replica (the key comes from the shared state key)."""
        return hmac.new(self._hmac_key, secret.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]

    def _seal(self, data: bytes, bound_to: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data, bound_to.encode())

    def _open(self, sealed: bytes | None, bound_to: str) -> bytes | None:
        if not sealed or len(sealed) < 13:
            return None
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], bound_to.encode())
        except InvalidTag:
            return None  # another state key, or tampered with: as if absent

    def _message_key(self, bot: str, client_id: str) -> str:
        return f"{PREFIX}m:{bot}:{self.keyed_hash(client_id)}"

    def _peer_key(self, bot: str, peer: str) -> str:
        return f"{PREFIX}p:{bot}:{self.keyed_hash(peer)}"

    def batch(self, *, write: bool) -> _NoBatch:
        return _NO_BATCH  # each call is atomic on its own (a script or MULTI where it must be)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(STORE_ERRORS):
                await conn.disconnect()
        with contextlib.suppress(STORE_ERRORS):
            await self._r.aclose()

    async def _forget_connections(self) -> None:
        """After a connection-level failure (Redis down, restarted, slow): every idle connection,
        ours and the client pool's, is closed, so the calls after the outage start on new ones.
        (The client pool's check before reuse is skipped in redis-py 8.1, whose
        `maint_notifications_enabled()` answers "auto", a true value: after a restart of Redis a
        housekeeping call failed on a connection Redis had closed, and the back-off that followed
        made the next send decide without the store; test_redis_killed_and_restarted_mid_traffic.)"""
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        with contextlib.suppress(Exception):
            await self._r.connection_pool.disconnect(inuse_connections=False)

    async def _eval(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        """`EVALSHA` of one of our scripts, on a connection taken from our own idle list (made
        by the client's pool, so with its URL, timeouts, TLS and password): one command, then
        its answer, nothing else on that connection meanwhile. The same as calling the script
        through the client, without the pool's lock, retry wrapper and per-call bookkeeping,
        which cost about as much as the round trip itself (docs/performance.md)."""
        script = self._scripts[name]
        conn = self._idle.pop() if self._idle else self._r.connection_pool.make_connection()
        try:
            if conn.is_connected and await _dirty(conn):
                # Closed by Redis while idle (a restart, a timeout) or holding stray data: as the
                # client's pool does, a new connection (send_command connects).
                await conn.disconnect()
            await conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return await conn.read_response()
        except redis.exceptions.NoScriptError:
            # Redis restarted (its script cache is empty): the client loads it and runs it.
            return await script(keys=keys, args=args)
        except redis.exceptions.ResponseError:
            raise  # an error reply: the connection is still in step
        except BaseException:
            # Not in step any more (redis-py disconnects on most of these already): reconnected
            # on its next use.
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        finally:
            if len(self._idle) < IDLE_MAX:
                self._idle.append(conn)
            else:
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    # ------------------------------------------------------------------ messages

    @_op("snapshot")
    async def snapshot(
        self,
        bot: str,
        client_id: str | None,
        peer: str | None,
        token_hash: str | None,
        since: float,
        now: float,
        *,
        with_peer: bool,
        with_fresh: bool,
        with_budget: bool = False,
        lease: tuple[str, float] | None = None,
        begin_new: bool = False,
    ) -> Reads:
        hc = self.keyed_hash(client_id) if client_id else ""
        pk = self._peer_key(bot, peer) if peer and (with_peer or with_fresh or with_budget) else ""
        keys = [
            f"{PREFIX}qc:{bot}:{hc}" if hc and peer else "",
            f"{PREFIX}m:{bot}:{hc}" if hc else "",
            f"{PREFIX}b:{bot}",
            pk,
            f"{PREFIX}s:{bot}:{token_hash}" if token_hash else "",
            self._lease_key(bot, client_id) if lease and client_id else "",
        ]
        owner, ttl_s = lease or ("", 0.0)
        args = [
            f"{PREFIX}s:{bot}:",
            owner,
            int(ttl_s * 1000),
            "1" if begin_new else "",
            repr(now),
            repr(since),
            self._ttl_ms(now, since),
        ]
        got = await self._eval("snapshot", keys, args)
        if not got[0]:
            return Reads(None, None, None, None, None, False, False, leased=False)
        queued, m, b, p, token_stale, newest_stale, begun = got[1:]
        fresh = self._open(p[6], pk + ":ft") if p and with_fresh else None
        return Reads(
            queued_id=int(queued) if queued is not None else None,
            message=self._decode_message(keys[1], m, since) if m else None,
            cooldown=self._decode_cooldown(keys[2], b[:3], now),
            peer=self._decode_peer(bot, peer or "", pk, [*p[:6], *p[7:]]) if p else None,
            fresh=fresh.decode("utf-8", "replace") if fresh is not None else None,
            token_stale=bool(token_stale),
            newest_stale=bool(newest_stale),
            bot_budget=self._decode_budget(b[3:]) if with_budget else None,
            begun=bool(begun),
        )

    @_op("message")
    async def message(self, bot: str, client_id: str, since: float) -> Message | None:
        key = self._message_key(bot, client_id)
        return self._decode_message(key, await self._r.hmget(key, "a", "acc", "s", "ans", "u"), since)

    def _decode_message(self, key: str, fields: list[bytes | None], since: float) -> Message | None:
        a, acc, state, ans, u = fields
        if u is None or float(u) < since:
            return None
        status, headers, body = None, [], None
        if (answer := self._open(ans, key)) is not None:
            doc = json.loads(answer)
            status, headers, body = doc["st"], [tuple(h) for h in doc["h"]], base64.b64decode(doc["b"])
        return Message(
            int(a or 0), acc == b"1", status, headers, body, float(u), state.decode() if state else None
        )

    def _answer(self, key: str, status: int, headers: list[tuple[str, str]] | None, body: bytes) -> bytes:
        doc = {"st": status, "h": headers or [], "b": base64.b64encode(body).decode()}
        return self._seal(json.dumps(doc).encode(), key)

    @staticmethod
    def _ttl_ms(now: float, since: float) -> int:
        return int((max(now - since, 0.0) + MESSAGE_MARGIN_S) * 1000)

    @_op("begin_attempt")
    async def begin_attempt(self, bot: str, client_id: str, now: float, since: float) -> None:
        key = self._message_key(bot, client_id)
        await self._eval("begin", [key], [repr(now), repr(since), self._ttl_ms(now, since)])

    @_op("settle_message")
    async def settle_message(
        self,
        bot: str,
        client_id: str,
        state: str,
        attempts: int,
        answer: tuple[int, list[tuple[str, str]], bytes] | None,
        now: float,
        since: float,
        release: str | None = None,
    ) -> None:
        key = self._message_key(bot, client_id)
        sealed = self._answer(key, *answer) if answer is not None else b""
        args = [
            repr(now),
            repr(since),
            self._ttl_ms(now, since),
            state,
            attempts,
            int(state == "accepted"),
            sealed,
            release or "",
        ]
        await self._eval("settle", [key, self._lease_key(bot, client_id)], args)

    @_op("record_attempts")
    async def record_attempts(
        self,
        bot: str,
        client_id: str,
        attempts: int,
        accepted: bool,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        now: float,
        since: float,
    ) -> None:
        key = self._message_key(bot, client_id)
        sealed = self._answer(key, status, headers, body)
        args = [repr(now), repr(since), self._ttl_ms(now, since), attempts, int(accepted), sealed]
        await self._scripts["record"](keys=[key], args=args)

    # ------------------------------------------------------------------ single flight

    def _lease_key(self, bot: str, client_id: str) -> str:
        return f"{PREFIX}l:{bot}:{self.keyed_hash(client_id)}"

    @_op("take_lease")
    async def take_lease(self, bot: str, client_id: str, owner: str, ttl_s: float) -> bool:
        key = self._lease_key(bot, client_id)
        return bool(await self._eval("lease", [key], [owner, int(ttl_s * 1000)]))

    @_op("release_lease")
    async def release_lease(self, bot: str, client_id: str, owner: str, *, unbegin: bool = False) -> None:
        key = self._lease_key(bot, client_id)
        message = self._message_key(bot, client_id) if unbegin else ""
        await self._eval("release", [key, key + ":done", message], [owner])

    @_op("wait_lease")
    async def wait_lease(self, bot: str, client_id: str, timeout_s: float) -> None:
        """Until the lease's holder publishes its outcome (release_lease), or the lease expires
        (its holder died), at most timeout_s. Subscribed before looking, so no release is missed."""
        key = self._lease_key(bot, client_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pubsub = self._r.pubsub()
        try:
            await pubsub.subscribe(key + ":done")
            while (left := deadline - loop.time()) > 0:
                ttl_ms = await self._r.pttl(key)
                if ttl_ms < 0:  # -2: gone (released or expired); -1: cannot happen (always PX)
                    return
                wait = min(left, ttl_ms / 1000 + 0.01)
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if msg is not None and msg.get("type") in (b"message", "message"):
                    return
        finally:
            with contextlib.suppress(STORE_ERRORS):
                await pubsub.aclose()

    # ------------------------------------------------------------------ peers

    _PEER_FIELDS = ("nt", "ns", "ia", "cu", "cs", "cb", "sn", "rf", "nd", "bl")

    @_op("peer")
    async def peer(self, bot: str, peer: str) -> Peer | None:
        key = self._peer_key(bot, peer)
        return self._decode_peer(bot, peer, key, await self._r.hmget(key, *self._PEER_FIELDS))

    def _decode_peer(
        self, bot: str, peer: str, key: str, fields: list[bytes | None], stale: int | None = None
    ) -> Peer | None:
        """The peer's record; None if there is none (`stale` given: listed by `peers`, always)."""
        nt, ns, ia, cu, cs, cb, sn, rf, nd, bl = fields
        if stale is None and nt is None and ia is None and cu is None and sn is None and rf is None:
            return None
        return Peer(
            bot,
            peer,
            nt.decode() if nt else None,
            float(ns) if ns else None,
            float(ia) if ia else None,
            float(cu) if cu else None,
            int(cs) if cs else None,
            self._open(cb, key + ":cb") if cb else None,
            stale or 0,
            sent=int(sn or 0),
            refused_at=float(rf) if rf else None,
            nudged_at=float(nd) if nd else None,
            budget_limit=int(bl) if bl else None,
        )

    @_op("fresh")
    async def fresh(self, bot: str, peer: str) -> str | None:
        key = self._peer_key(bot, peer)
        token = self._open(await self._r.hget(key, "ft"), key + ":ft")
        return token.decode("utf-8", "replace") if token is not None else None

    @_op("saw_inbound")
    async def saw_inbound(self, bot: str, peer: str, token_hash: str | None, now: float) -> None:
        key = self._peer_key(bot, peer)
        fields: dict[str, Any] = {
            "ia": repr(now),
            "u": repr(now),
            "pid": self._seal(peer.encode(), key + ":pid"),
        }
        if token_hash:
            fields.update(nt=token_hash, ns=repr(now))
        async with self._r.pipeline(transaction=True) as p:
            p.hset(key, mapping=fields)
            # The window reopens, and a new send budget with it (the bot's learnt limit stays).
            p.hdel(key, "cu", "cs", "cb", "sn", "rf", "nd")
            p.expire(key, PEER_TTL_S)
            await p.execute()

    # ------------------------------------------------------------------ send budgets

    @_op("count_send")
    async def count_send(
        self, bot: str, peer: str, limit: int | None, nudged: bool, now: float, window: float | None = None
    ) -> None:
        """One more send accepted in the peer's window: HINCRBY in one script, so sends through
        every replica add up (none lost to a read-modify-write race), and only while the window
        it was sent in is still the peer's (see ports.Store)."""
        key = self._peer_key(bot, peer)
        extra = ["u", repr(now), "pid", self._seal(peer.encode(), key + ":pid")]
        extra += ["bl", str(limit) if limit is not None else ""]
        if nudged:
            extra += ["nd", repr(now)]
        await self._budget_write(key, window, "sn", "1", extra)

    @_op("spend_budget")
    async def spend_budget(self, bot: str, peer: str, now: float, window: float | None = None) -> None:
        key = self._peer_key(bot, peer)
        extra = ["u", repr(now), "pid", self._seal(peer.encode(), key + ":pid")]
        await self._budget_write(key, window, "rf", repr(now), extra)

    async def _budget_write(
        self, key: str, window: float | None, field: str, value: str, extra: list[Any]
    ) -> None:
        # (the window as saw_inbound stored it: repr of the same float, so equal strings)
        args = [repr(window) if window is not None else "", field, value, PEER_TTL_S, *extra]
        await self._scripts["budget"](keys=[key], args=args)

    @_op("learn_budget")
    async def learn_budget(self, bot: str, limit: int, now: float) -> None:
        """The bot's budget per inbound message, for every replica (on the bot's hash, next to
        its cooldown, which this leaves alone)."""
        key = f"{PREFIX}b:{bot}"
        async with self._r.pipeline(transaction=True) as p:
            p.hset(key, mapping={"bg": limit, "ba": repr(now), "u": repr(now)})
            p.expire(key, PEER_TTL_S)
            await p.execute()

    @_op("bot_budget")
    async def bot_budget(self, bot: str) -> tuple[int, float] | None:
        return self._decode_budget(await self._r.hmget(f"{PREFIX}b:{bot}", "bg", "ba"))

    @staticmethod
    def _decode_budget(fields: list[bytes | None]) -> tuple[int, float] | None:
        bg, ba = fields
        return (int(bg), float(ba or 0)) if bg else None

    @_op("budget_spent_peers")
    async def budget_spent_peers(self) -> int:
        keys = await self._scan("p")
        if not keys:
            return 0
        async with self._r.pipeline(transaction=False) as p:
            for key in keys:
                p.hmget(key, "sn", "rf", "bl")
            rows = await p.execute()
        return sum(1 for sn, rf, bl in rows if rf or (bl and int(sn or 0) >= int(bl)))

    @_op("remember_fresh")
    async def remember_fresh(self, bot: str, peer: str, token: str) -> None:
        key = self._peer_key(bot, peer)
        await self._r.hset(key, "ft", self._seal(token.encode(), key + ":ft"))

    @_op("open_window")
    async def open_window(self, bot: str, peer: str, now: float) -> None:
        key = self._peer_key(bot, peer)
        await self._r.hdel(key, "cu", "cs", "cb")

    @_op("close_window")
    async def close_window(
        self, bot: str, peer: str, until: float, status: int, body: bytes, now: float
    ) -> None:
        key = self._peer_key(bot, peer)
        fields = {
            "cu": repr(until),
            "cs": status,
            "cb": self._seal(body, key + ":cb"),
            "u": repr(now),
            "pid": self._seal(peer.encode(), key + ":pid"),
        }
        async with self._r.pipeline(transaction=True) as p:
            p.hset(key, mapping=fields)
            p.expire(key, PEER_TTL_S)
            await p.execute()

    # ------------------------------------------------------------------ stale tokens

    @_op("mark_stale")
    async def mark_stale(self, bot: str, token_hash: str, peer: str, now: float) -> None:
        hp = self.keyed_hash(peer)
        async with self._r.pipeline(transaction=False) as p:
            p.set(f"{PREFIX}s:{bot}:{token_hash}", hp, ex=PEER_TTL_S)
            p.incr(f"{PREFIX}sc:{bot}:{hp}")
            p.expire(f"{PREFIX}sc:{bot}:{hp}", PEER_TTL_S)
            await p.execute()

    @_op("is_stale")
    async def is_stale(self, bot: str, token_hash: str) -> bool:
        return bool(await self._r.exists(f"{PREFIX}s:{bot}:{token_hash}"))

    # ------------------------------------------------------------------ bots

    @_op("count_limited")
    async def count_limited(self, bot: str, now: float, window_s: float) -> int:
        member = f"{now!r}:{secrets.token_hex(4)}"
        ttl_ms = int(window_s * 1000) + 60_000
        args = [repr(now), repr(window_s), member, ttl_ms, LIMITED_MAX]
        return int(await self._scripts["limited"](keys=[f"{PREFIX}rl:{bot}"], args=args))

    @_op("start_cooldown")
    async def start_cooldown(self, bot: str, until: float, status: int, body: bytes, now: float) -> None:
        key = f"{PREFIX}b:{bot}"
        async with self._r.pipeline(transaction=True) as p:
            p.hset(
                key, mapping={"cu": repr(until), "cs": status, "cb": self._seal(body, key), "u": repr(now)}
            )
            p.expire(key, PEER_TTL_S)
            p.delete(f"{PREFIX}rl:{bot}")
            await p.execute()

    @_op("cooldown")
    async def cooldown(self, bot: str, now: float) -> Cooldown | None:
        key = f"{PREFIX}b:{bot}"
        return self._decode_cooldown(key, await self._r.hmget(key, "cu", "cs", "cb"), now)

    def _decode_cooldown(self, key: str, fields: list[bytes | None], now: float) -> Cooldown | None:
        cu, cs, cb = fields
        if cu is None or float(cu) <= now:
            return None
        return Cooldown(float(cu), int(cs or 0), self._open(cb, key) or b"")

    # ------------------------------------------------------------------ the outbox

    def _queued(self, qid: int, f: dict[bytes, bytes]) -> Queued | None:
        key = f"{PREFIX}q:{qid}"
        blob = self._open(f.get(b"blob"), key)
        if blob is None:
            return None
        d = json.loads(blob)
        error = self._open(f.get(b"err"), key + ":err")
        return Queued(
            id=qid,
            bot=f[b"bot"].decode(),
            peer=d["peer"],
            client_id=d["client_id"],
            created=float(f[b"created"]),
            rule=f[b"rule"].decode(),
            method=d["method"],
            url=d["url"],
            headers=[(k, v) for k, v in d["headers"]],
            body=base64.b64decode(d["body"]),
            via=(d["via"][0], (d["via"][1][0], d["via"][1][1])) if d["via"] else None,
            attempts=int(f.get(b"attempts", b"0")),
            last_error=error.decode("utf-8", "replace") if error is not None else None,
        )

    @_op("enqueue")
    async def enqueue(
        self,
        *,
        bot: str,
        peer: str,
        client_id: str | None,
        rule: str,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        via: tuple[str, tuple[str, int]] | None,
        now: float,
        max_per_peer: int,
        max_total: int,
    ) -> tuple[str, int | None]:
        hp = self.keyed_hash(peer)
        hc = self.keyed_hash(client_id) if client_id else ""
        # The id first (a duplicate or a full outbox leaves a gap in the ids: harmless), so the
        # item's blob is sealed to its own key and the item is written whole, in one script.
        qid = int(await self._r.incr(f"{PREFIX}q:seq"))
        item = f"{PREFIX}q:{qid}"
        doc = {
            "peer": peer,
            "client_id": client_id,
            "method": method,
            "url": url,
            "headers": headers,
            "body": base64.b64encode(body).decode(),
            "via": via,
        }
        blob = self._seal(json.dumps(doc).encode(), item)
        fields = [
            "bot",
            bot,
            "hp",
            hp,
            "hc",
            hc,
            "created",
            repr(now),
            "rule",
            rule,
            "attempts",
            0,
            "blob",
            blob,
        ]
        keys = [
            item,
            f"{PREFIX}qp:{bot}:{hp}",
            f"{PREFIX}qa",
            f"{PREFIX}qc:{bot}:{hc}" if hc else "",
            f"{PREFIX}c",
            f"{PREFIX}qrules",
        ]
        args = [qid, max_per_peer, max_total, repr(now), OUTBOX_TTL_S * 1000, rule, *fields]
        result, found = await self._scripts["enqueue"](keys=keys, args=args)
        if result == b"full":
            return "full", None
        return result.decode(), int(found)

    @_op("queued_id")
    async def queued_id(self, bot: str, client_id: str) -> int | None:
        qid = await self._r.get(f"{PREFIX}qc:{bot}:{self.keyed_hash(client_id)}")
        return int(qid) if qid is not None else None

    async def _items(self, ids: list[bytes]) -> list[Queued]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(f"{PREFIX}q:{int(i)}")
            rows = await p.execute()
        return [q for i, f in zip(ids, rows, strict=True) if f and (q := self._queued(int(i), f)) is not None]

    @_op("outbox")
    async def outbox(self, bot: str | None = None, peer: str | None = None, limit: int = -1) -> list[Queued]:
        if bot is None:
            ids = await self._r.zrange(f"{PREFIX}qa", 0, limit - 1 if limit > 0 else -1)
            items = await self._items(ids)
            return sorted(items, key=lambda q: q.id)
        ids = await self._r.zrange(
            f"{PREFIX}qp:{bot}:{self.keyed_hash(peer or '')}", 0, limit - 1 if limit > 0 else -1
        )
        return await self._items(ids)

    @_op("outbox_count")
    async def outbox_count(self, bot: str, peer: str) -> int:
        return int(await self._r.zcard(f"{PREFIX}qp:{bot}:{self.keyed_hash(peer)}"))

    @_op("outbox_rules")
    async def outbox_rules(self) -> list[str]:
        return sorted(r.decode() for r in await self._r.smembers(f"{PREFIX}qrules"))

    @_op("claim")
    async def claim(self, queued_id: int, ttl_s: float) -> bool:
        key = f"{PREFIX}q:{queued_id}"
        return bool(await self._scripts["claim"](keys=[key], args=[self._owner, int(ttl_s * 1000)]))

    @_op("unclaim")
    async def unclaim(self, queued_id: int) -> None:
        await self._r.delete(f"{PREFIX}q:{queued_id}:claim")

    @_op("dequeue")
    async def dequeue(self, queued_id: int) -> bool:
        keys = [f"{PREFIX}q:{queued_id}", f"{PREFIX}qa"]
        return bool(await self._scripts["dequeue"](keys=keys, args=[queued_id, PREFIX]))

    @_op("note_failure")
    async def note_failure(self, queued_id: int, error: str) -> int:
        key = f"{PREFIX}q:{queued_id}"
        if not await self._r.exists(key):
            return 0
        async with self._r.pipeline(transaction=True) as p:
            p.hincrby(key, "attempts", 1)
            p.hset(key, "err", self._seal(error[:200].encode(), key + ":err"))
            attempts, _ = await p.execute()
        return int(attempts)

    @_op("expire")
    async def expire(self, now: float, max_age_s: float, rule: str | None = None) -> list[Queued]:
        """Remove and return the sends (of one rule, or all) queued longer than max_age_s; with
        several replicas, each expired send is returned by the one that removed it."""
        ids = await self._r.zrangebyscore(f"{PREFIX}qa", "-inf", f"({now - max_age_s!r}")
        expired = []
        for q in await self._items(ids):
            if rule is not None and q.rule != rule:
                continue
            if await self._scripts["dequeue"](keys=[f"{PREFIX}q:{q.id}", f"{PREFIX}qa"], args=[q.id, PREFIX]):
                expired.append(q)
        known = {int(i) for i in ids}
        for gone in known - {q.id for q in await self._items(ids)} - {q.id for q in expired}:
            await self._r.zrem(f"{PREFIX}qa", gone)  # its item expired (TTL): drop the index entry
        if expired:
            await self._r.hincrby(f"{PREFIX}c", "expired", len(expired))
        return expired

    @_op("outbox_stats")
    async def outbox_stats(self, now: float) -> dict[str, float]:
        async with self._r.pipeline(transaction=False) as p:
            p.zcard(f"{PREFIX}qa")
            p.zrange(f"{PREFIX}qa", 0, 0, withscores=True)
            p.hgetall(f"{PREFIX}c")
            depth, oldest, counters = await p.execute()
        c = {k.decode(): int(v) for k, v in counters.items()}
        return {
            "depth": depth,
            "oldest_age_s": (now - oldest[0][1]) if oldest else 0.0,
            "deferred": c.get("deferred", 0),
            "delivered_late": c.get("delivered_late", 0),
            "expired": c.get("expired", 0),
            "dropped": c.get("dropped", 0),
        }

    @_op("request_flush")
    async def request_flush(self, peer: str, now: float) -> None:
        key = f"{PREFIX}flush"
        async with self._r.pipeline(transaction=True) as p:
            p.hset(key, self._seal(peer.encode(), key), repr(now))
            p.expire(key, FLUSH_TTL_S)
            await p.execute()

    @_op("take_flush_requests")
    async def take_flush_requests(self) -> list[str]:
        key = f"{PREFIX}flush"
        sealed = await self._scripts["take_flush"](keys=[key], args=[])
        return [p.decode("utf-8", "replace") for s in sealed if (p := self._open(s, key)) is not None]

    @_op("bump")
    async def bump(self, name: str, by: int = 1) -> None:
        await self._r.hincrby(f"{PREFIX}c", name, by)

    # ------------------------------------------------------------------ the `state` command, /metrics

    async def _scan(self, kind: str) -> list[bytes]:
        return [k async for k in self._r.scan_iter(match=f"{PREFIX}{kind}:*", count=1000)]

    @_op("peers")
    async def peers(self) -> list[Peer]:
        found = []
        for key in await self._scan("p"):
            f = await self._r.hgetall(key)
            k = key.decode()
            pid = self._open(f.get(b"pid"), k + ":pid")
            if pid is None:
                continue
            bot, hp = k.split(":")[2:4]
            stale = await self._r.get(f"{PREFIX}sc:{bot}:{hp}")
            fields = [f.get(name.encode()) for name in self._PEER_FIELDS]
            peer = self._decode_peer(bot, pid.decode("utf-8", "replace"), k, fields, int(stale or 0))
            assert peer is not None
            found.append((float(f.get(b"u", b"0")), peer))
        return [p for _, p in sorted(found, key=lambda t: -t[0])]

    @_op("bots")
    async def bots(self) -> list[tuple[str, float | None, int]]:
        rows = []
        for key in await self._scan("b"):
            bot = key.decode().split(":")[2]
            cu = await self._r.hget(key, "cu")
            rows.append((bot, float(cu) if cu else None, int(await self._r.zcard(f"{PREFIX}rl:{bot}"))))
        return rows

    @_op("counts")
    async def counts(self) -> dict[str, int]:
        return {
            "peers": len(await self._scan("p")),
            "stale_tokens": len(await self._scan("s")),
            "bots": len(await self._scan("b")),
            "messages": len(await self._scan("m")),
            "outbox": int(await self._r.zcard(f"{PREFIX}qa")),
        }

    @_op("forget_peer")
    async def forget_peer(self, peer_or_hash: str, hasher: Any = None) -> int:
        count = 0
        for p in await self.peers():
            if p.peer == peer_or_hash or (hasher and hasher(p.peer) == peer_or_hash):
                hp = self.keyed_hash(p.peer)
                count += int(await self._r.delete(f"{PREFIX}p:{p.bot}:{hp}"))
                await self._r.delete(f"{PREFIX}sc:{p.bot}:{hp}")
                for key in await self._scan(f"s:{p.bot}"):
                    if await self._r.get(key) == hp.encode():
                        count += int(await self._r.delete(key))
        return count

    async def running_proxy_started(self) -> float | None:
        return None  # replicas come and go: the fresh tokens are kept in Redis, not in a process


async def _dirty(conn: Any) -> bool:
    """The connection has data nobody asked for, or its peer closed it (no system call: what the
    event loop already read). redis-py 8 calls it can_read; before, can_read_destructive."""
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    return bool(await check())


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"ilink-fixproxy state", info=info).derive(secret)


class _NoBatch:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_BATCH = _NoBatch()
