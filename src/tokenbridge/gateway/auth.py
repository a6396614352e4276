"""Auth: API keys for publishing and admin, session-scoped subscribe tokens for reading.

* **API keys** (``Authorization: Bearer tbk_…``) start and cancel generations and read admin
  endpoints. They come from ``TOKENBRIDGE_API_KEYS`` or are stored in Redis as SHA-256 digests
  (``<prefix>:auth:keys``, created/listed/revoked with ``tokenbridge keys``); a presented key is
  hashed and compared in constant time, so neither Redis nor a timing channel ever sees a key.
* **Subscribe tokens** are short-lived JWTs (HS256, ``pyjwt``) scoped to one session, returned by
  ``POST /v1/generations``; the SSE and WebSocket endpoints take them as ``?token=`` (an
  ``EventSource`` cannot send headers) or as a Bearer header. A token for session A cannot read
  session B (403); an expired or tampered one is refused (401).
* **The signing secret** is ``TOKENBRIDGE_AUTH_SECRET`` or, when unset, generated once and kept
  in Redis (``SET NX``), so every gateway sharing the Redis accepts every other's tokens.
  ``TOKENBRIDGE_AUTH_PREVIOUS_SECRETS`` are still accepted for verifying, for a rotation window.
* **The console cookie**: ``/?login=<one-time code>`` (the link ``tokenbridge serve`` prints) or
  ``POST /v1/auth/login`` with a key sets an HttpOnly, SameSite=Strict cookie holding a JWT that
  stands for that key, so the page at ``/`` works without handling keys. Requests that change
  state with only the cookie must come from the same origin.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from tokenbridge.exceptions import AuthError
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import Keys

__all__ = ["COOKIE_NAME", "Auth", "Principal", "digest", "key_principal", "reader_principal"]

log = logging.getLogger(__name__)

COOKIE_NAME = "tb_console"
_ALGORITHM = "HS256"
_KEY_PREFIX = "tbk_"


def digest(api_key: str) -> str:
    """SHA-256 hex digest of a key: what is stored, compared and logged (as its first 12)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key (by id, never the key) or a session's subscriber."""

    kind: str  # "key" | "subscriber" | "anonymous"
    key_id: str = ""
    session_id: str = ""

    @property
    def identity(self) -> str:
        """What rate limits count against."""
        return f"key:{self.key_id}" if self.kind == "key" else f"{self.kind}:{self.session_id}"


class Auth:
    """Checks credentials; ``disabled`` (development only) lets everything through."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.disabled = settings.auth_disabled
        self.token_ttl_s = settings.auth_token_ttl_s
        self._configured = {digest(k.get_secret_value()) for k in settings.api_keys}
        self._secret = b""
        self._verify_secrets: list[bytes] = [
            s.get_secret_value().encode() for s in settings.auth_previous_secrets
        ]

    @property
    def _store(self) -> str:
        return self.keys.auth_keys

    async def start(self) -> None:
        """Load the signing secret: configured, or shared through Redis (created once)."""
        if self.settings.auth_secret is not None:
            self._secret = self.settings.auth_secret.get_secret_value().encode()
        else:
            key = self.keys.auth_secret
            await self.redis.set(key, secrets.token_urlsafe(48), nx=True)
            stored: Any = await self.redis.get(key)
            self._secret = stored if isinstance(stored, bytes) else str(stored).encode()
        self._verify_secrets = [self._secret, *self._verify_secrets]

    # -- API keys ----------------------------------------------------------------------------

    async def has_keys(self) -> bool:
        return bool(self._configured) or bool(await self.redis.hlen(self._store))

    async def create_key(self, name: str) -> tuple[str, str]:
        """A new key, stored as its digest; returns (key id, key). The key is shown once."""
        key = _KEY_PREFIX + secrets.token_urlsafe(32)
        key_digest = digest(key)
        record = {"id": key_digest[:12], "name": name[:64], "created_ms": int(time.time() * 1000)}
        await self.redis.hset(self._store, key_digest, json.dumps(record))
        log.info("api key created id=%s name=%s", record["id"], record["name"])
        return str(record["id"]), key

    async def list_keys(self) -> list[dict[str, Any]]:
        raw: Any = await self.redis.hgetall(self._store)
        stored = [json.loads(v) for v in raw.values()]
        configured = [{"id": d[:12], "name": "(TOKENBRIDGE_API_KEYS)"} for d in self._configured]
        return sorted(stored, key=lambda r: r.get("created_ms", 0)) + configured

    async def revoke_key(self, key_id: str) -> bool:
        raw: Any = await self.redis.hgetall(self._store)
        for field, value in raw.items():
            if json.loads(value)["id"] == key_id:
                await self.redis.hdel(self._store, field)
                log.info("api key revoked id=%s", key_id)
                return True
        return False

    async def check_key(self, presented: str) -> Principal:
        """The principal of an API key; AuthError (401) if it is not a valid key."""
        presented_digest = digest(presented)
        for known in self._configured:
            if hmac.compare_digest(known, presented_digest):
                return Principal("key", key_id=known[:12])
        record: Any = await self.redis.hget(self._store, presented_digest)
        if record is None:
            raise AuthError("invalid_api_key", "the API key is not valid (or was revoked)", 401)
        return Principal("key", key_id=json.loads(record)["id"])

    # -- tokens --------------------------------------------------------------------------

    def _sign(self, claims: dict[str, Any], ttl_s: int) -> str:
        now = int(time.time())
        return jwt.encode({**claims, "iat": now, "exp": now + ttl_s}, self._secret, _ALGORITHM)

    def _decode(self, token: str, scope: str) -> dict[str, Any]:
        expired = False
        for secret in self._verify_secrets:
            try:
                claims: dict[str, Any] = jwt.decode(token, secret, algorithms=[_ALGORITHM])
            except jwt.ExpiredSignatureError:
                expired = True
                continue
            except jwt.InvalidTokenError:
                continue
            if claims.get("scope") != scope:
                raise AuthError("invalid_token", f"not a {scope} token", 401)
            return claims
        if expired:
            raise AuthError("token_expired", "the token has expired; ask for a new one", 401)
        raise AuthError("invalid_token", "the token is not valid", 401)

    def subscribe_token(self, session_id: str) -> str:
        """A token that lets its holder read ``session_id`` (and cancel its generations)."""
        return self._sign({"scope": "subscribe", "sub": session_id}, self.token_ttl_s)

    def check_subscribe_token(self, token: str, session_id: str) -> Principal:
        claims = self._decode(token, "subscribe")
        if claims.get("sub") != session_id:
            raise AuthError("forbidden_session", "this token is for another session", 403)
        return Principal("subscriber", session_id=session_id)

    def console_cookie(self, principal: Principal) -> str:
        return self._sign({"scope": "console", "sub": principal.key_id}, 12 * 3600)

    def check_console_cookie(self, token: str) -> Principal:
        claims = self._decode(token, "console")
        return Principal("key", key_id=str(claims.get("sub", "")))

    # -- one-time login codes --------------------------------------------------------------

    async def login_code(self, ttl_s: int = 600) -> str:
        """A single-use code for ``/?login=``: the link ``tokenbridge serve`` prints."""
        code = secrets.token_urlsafe(24)
        await self.redis.set(self.keys.auth_login(digest(code)), 1, ex=ttl_s)
        return code

    async def use_login_code(self, code: str) -> Principal:
        used: Any = await self.redis.getdel(self.keys.auth_login(digest(code)))
        if used is None:
            raise AuthError("invalid_login", "this login link was used or has expired", 401)
        return Principal("key", key_id="console")


def _bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _same_origin(conn: HTTPConnection) -> bool:
    origin = conn.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request (browsers send Origin on those)
    return origin.partition("://")[2] == conn.headers.get("host", "")


async def key_principal(auth: Auth, conn: HTTPConnection, unsafe: bool = False) -> Principal:
    """An API key from the Bearer header, or the console cookie; AuthError otherwise."""
    if auth.disabled:
        return Principal("anonymous")
    presented = _bearer(conn)
    if presented is not None:
        return await auth.check_key(presented)
    cookie = conn.cookies.get(COOKIE_NAME)
    if cookie:
        if unsafe and not _same_origin(conn):
            raise AuthError("cross_origin", "cookie credentials are for this origin only", 403)
        return auth.check_console_cookie(cookie)
    raise AuthError("missing_credentials", "send an API key: Authorization: Bearer <key>", 401)


async def reader_principal(auth: Auth, conn: HTTPConnection, session_id: str) -> Principal:
    """A subscribe token for ``session_id`` (``?token=`` or Bearer), an API key, or the cookie."""
    if auth.disabled:
        return Principal("anonymous", session_id=session_id)
    presented = conn.query_params.get("token") or _bearer(conn)
    if presented is not None:
        if presented.startswith(_KEY_PREFIX):
            return await auth.check_key(presented)
        return auth.check_subscribe_token(presented, session_id)
    cookie = conn.cookies.get(COOKIE_NAME)
    if cookie:
        return auth.check_console_cookie(cookie)
    raise AuthError(
        "missing_credentials", "send the subscribe token: ?token=<token> or a Bearer header", 401
    )
