"""Consumers: the people and programs that use the gateway, compiled from ``consumers:``.

The auth plugins find a consumer from a credential and put it on the request context; ACLs,
rate limits keyed by consumer and the access log read it from there.

Credentials are indexed here once per config load. API keys are kept only as SHA-256 digests:
a presented key is hashed and looked up by its digest, and the digests are compared with
``hmac.compare_digest``, so neither the keys nor their comparison time are in memory to leak.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any

from piuptime.config.plugins.auth import PasswordHash, key_digest, load_jwt_key

if TYPE_CHECKING:
    from piuptime.config.schema import Config


class Consumer:
    __slots__ = ("anonymous", "groups", "groups_bytes", "name", "name_bytes")

    def __init__(self, name: str, groups: frozenset[str], *, ordered: tuple[str, ...] = ()):
        self.name = name
        self.name_bytes = name.encode()
        self.groups = groups
        # X-Consumer-Groups, in the order the config lists them
        self.groups_bytes = ", ".join(ordered or sorted(groups)).encode()
        self.anonymous = False  # set on the copy used for ``anonymous``

    def as_anonymous(self) -> Consumer:
        """The same consumer, marked as standing in for a request without credentials."""
        c = Consumer(self.name, self.groups)
        c.groups_bytes = self.groups_bytes
        c.anonymous = True
        return c

    def __repr__(self) -> str:
        return f"<Consumer {self.name}>"


class JwtConsumerKey:
    """A consumer's own JWT verification key."""

    __slots__ = ("algorithm", "consumer", "issuer", "key", "kid")

    def __init__(
        self, consumer: Consumer, key: Any, algorithm: str, issuer: str | None, kid: str | None
    ) -> None:
        self.consumer = consumer
        self.key = key
        self.algorithm = algorithm
        self.issuer = issuer
        self.kid = kid


class Consumers:
    """Every consumer by name, and its credentials indexed for the auth plugins."""

    def __init__(self, consumers: dict[str, Consumer]) -> None:
        self.by_name = consumers
        # SHA-256 digest → (digest, consumer, credential identifier)
        self.keys: dict[bytes, tuple[bytes, Consumer, bytes]] = {}
        self.basic: dict[str, tuple[Consumer, PasswordHash]] = {}
        self.jwt_by_kid: dict[str, JwtConsumerKey] = {}
        self.jwt_by_issuer: dict[str, list[JwtConsumerKey]] = {}
        self.jwt_by_subject: dict[str, Consumer] = {}
        self.jwt_keys: dict[str, JwtConsumerKey] = {}  # consumer name → its own key
        self.has_jwt_keys = False

    @classmethod
    def from_config(cls, config: Config) -> Consumers:
        out = cls({})
        for name, c in config.consumers.items():
            consumer = Consumer(name, frozenset(c.groups), ordered=tuple(dict.fromkeys(c.groups)))
            out.by_name[name] = consumer
            for i, key in enumerate(c.keys):
                out.add_key(key, consumer, b"keys[%d]" % i)
            if c.basic is not None:
                out.basic[c.basic.username] = (consumer, PasswordHash.parse(c.basic.password_hash))
            jwt = c.jwt
            subject = jwt.subject if jwt is not None and jwt.subject is not None else name
            out.jwt_by_subject.setdefault(subject, consumer)
            if jwt is not None and jwt.key is not None:
                entry = JwtConsumerKey(
                    consumer,
                    load_jwt_key(jwt.key, jwt.algorithm),
                    jwt.algorithm,
                    jwt.issuer,
                    jwt.kid,
                )
                out.jwt_keys[name] = entry
                out.has_jwt_keys = True
                if jwt.kid is not None:
                    out.jwt_by_kid[jwt.kid] = entry
                if jwt.issuer is not None:
                    out.jwt_by_issuer.setdefault(jwt.issuer, []).append(entry)
        return out

    def add_key(self, key: str, consumer: Consumer, ident: bytes) -> None:
        digest = key_digest(key)
        self.keys[digest] = (digest, consumer, ident)

    def get(self, name: str) -> Consumer | None:
        return self.by_name.get(name)

    def by_key(self, key: bytes) -> tuple[Consumer, bytes] | None:
        """The consumer holding API key ``key`` and the key's identifier, or None. Only the
        key's digest is looked up; the stored digest is compared in constant time."""
        digest = hashlib.sha256(key).digest()
        entry = self.keys.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            return None
        return entry[1], entry[2]
