"""Schemas of the auth plugins (key_auth, jwt_auth, basic_auth, acl) and of consumers'
credentials, plus what both the config and the gateway need to read them: the password-hash
format written by ``piuptime hash-password`` and JWT key loading.

Nothing here stores a secret in the clear longer than validation needs it: API keys are
reduced to SHA-256 digests by the gateway, passwords only ever appear as hashes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from ..types import Duration, Int, Loc, PositiveDuration, _is_token, _model

__all__ = [
    "ALGORITHMS",
    "Acl",
    "BasicAuth",
    "BasicCredential",
    "JwtAuth",
    "JwtCredential",
    "JwtKey",
    "KeyAuth",
    "PasswordHash",
    "consumer_problems",
    "hash_password",
    "have_crypto",
    "is_prehashed_key",
    "key_digest",
    "load_jwt_key",
    "valid_name",
]

ALGORITHMS = ("HS256", "RS256", "ES256")
Algorithm = Literal["HS256", "RS256", "ES256"]
_ASYMMETRIC = frozenset({"RS256", "ES256"})
_HS256_MIN_BYTES = 32  # RFC 7518 3.2: a key of at least the hash's size
_INSTALL_HINT = 'needs the "cryptography" package: install piuptime[jwt]'


# --------------------------------------------------------------------------------------------
# names


_NAME = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?\Z")


def valid_name(text: str, *, commas: bool = True) -> bool:
    """A consumer or group name: 1-128 printable ASCII characters, no leading or trailing
    space (it goes into an HTTP header); groups may not contain commas (they are joined by
    them in ``X-Consumer-Groups``)."""
    return bool(_NAME.match(text)) and (commas or "," not in text)


_NAME_RULE = "1-128 printable ASCII characters, no leading or trailing space"


# --------------------------------------------------------------------------------------------
# API keys


_SHA256_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})\Z")


def is_prehashed_key(key: str) -> bool:
    """``sha256:`` followed by 64 hex digits (a key given as its digest)."""
    return bool(_SHA256_KEY.match(key))


def key_digest(key: str) -> bytes:
    """The SHA-256 digest an API key is kept as: ``sha256:<hex>`` is taken as already hashed,
    anything else is the key itself (UTF-8)."""
    m = _SHA256_KEY.match(key)
    if m:
        return bytes.fromhex(m.group(1))
    return hashlib.sha256(key.encode()).digest()


# --------------------------------------------------------------------------------------------
# password hashes


SCRYPT_N = 2**14  # 16 MiB of memory with r=8: a few tens of ms on a Raspberry Pi 4
SCRYPT_R = 8
SCRYPT_P = 1
PBKDF2_ITERATIONS = 600_000  # OWASP's figure for PBKDF2-HMAC-SHA256
_MAX_SCRYPT_MEM = 256 * 1024 * 1024
_MAX_PBKDF2 = 10_000_000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed, self-describing password hash: ``scrypt$N$r$p$salt$hash`` or
    ``pbkdf2_sha256$iterations$salt$hash`` (salt and hash in unpadded base64)."""

    scheme: str
    params: tuple[int, ...]
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        parts = text.split("$")
        try:
            if parts[0] == "scrypt" and len(parts) == 6:
                n, r, p = (int(x) for x in parts[1:4])
                if n < 2 or n & (n - 1) or r < 1 or p < 1:
                    raise ValueError("N must be a power of two, r and p at least 1")
                if 128 * n * r * p > _MAX_SCRYPT_MEM:
                    raise ValueError("scrypt parameters need more than 256 MiB of memory")
                return cls("scrypt", (n, r, p), _unb64(parts[4]), _unb64(parts[5]))
            if parts[0] == "pbkdf2_sha256" and len(parts) == 4:
                iterations = int(parts[1])
                if not 1000 <= iterations <= _MAX_PBKDF2:
                    raise ValueError(f"iterations must be from 1000 to {_MAX_PBKDF2}")
                return cls("pbkdf2_sha256", (iterations,), _unb64(parts[2]), _unb64(parts[3]))
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"malformed password hash ({exc})") from None
        raise ValueError(
            "expected a hash made by `piuptime hash-password` (scrypt$N$r$p$salt$hash or "
            "pbkdf2_sha256$iterations$salt$hash)"
        )

    def _derive(self, password: bytes) -> bytes:
        if self.scheme == "scrypt":
            n, r, p = self.params
            return hashlib.scrypt(
                password,
                salt=self.salt,
                n=n,
                r=r,
                p=p,
                maxmem=128 * n * r * (p + 1) + 1024 * 1024,
                dklen=len(self.digest),
            )
        return hashlib.pbkdf2_hmac(
            "sha256", password, self.salt, self.params[0], dklen=len(self.digest)
        )

    def verify(self, password: bytes) -> bool:
        """Slow on purpose: call it off the event loop."""
        return hmac.compare_digest(self._derive(password), self.digest)

    def __str__(self) -> str:
        params = "$".join(str(x) for x in self.params)
        return f"{self.scheme}${params}${_b64(self.salt)}${_b64(self.digest)}"


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """A new self-describing hash of ``password`` (what ``piuptime hash-password`` prints)."""
    salt = os.urandom(16)
    if scheme == "scrypt":
        params: tuple[int, ...] = (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    elif scheme in ("pbkdf2", "pbkdf2_sha256"):
        scheme, params = "pbkdf2_sha256", (PBKDF2_ITERATIONS,)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    empty = PasswordHash(scheme, params, salt, b"\0" * 32)
    return str(PasswordHash(scheme, params, salt, empty._derive(password.encode())))


# --------------------------------------------------------------------------------------------
# JWT keys


def have_crypto() -> bool:
    """Whether RS256/ES256 can be used (the ``cryptography`` package is installed)."""
    from jwt.algorithms import has_crypto

    return bool(has_crypto)


@lru_cache(maxsize=256)
def load_jwt_key(material: str, algorithm: str) -> Any:
    """The key object PyJWT verifies ``algorithm`` signatures with: the secret's bytes for
    HS256, a public key for RS256/ES256 (from a PEM public key, certificate-free; a private
    key's public half is taken). Raises ``ValueError`` with a readable reason."""
    if algorithm == "HS256":
        secret = material.encode()
        if len(secret) < _HS256_MIN_BYTES:
            raise ValueError(
                f"an HS256 secret must be at least {_HS256_MIN_BYTES} bytes (RFC 7518), "
                f"got {len(secret)}"
            )
        return secret
    if algorithm not in _ASYMMETRIC:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if not have_crypto():
        raise ValueError(f"{algorithm} {_INSTALL_HINT}")
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key,
        load_pem_public_key,
    )

    data = material.strip().encode()
    if b"-----BEGIN" not in data:
        raise ValueError(f"{algorithm} needs a PEM public key (-----BEGIN PUBLIC KEY-----)")
    key: Any
    try:
        if b"PRIVATE KEY" in data:
            key = load_pem_private_key(data, password=None).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a readable PEM key: {exc}") from None
    if algorithm == "RS256":
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("RS256 needs an RSA key")
        if key.key_size < 2048:
            raise ValueError(f"an RS256 key must have at least 2048 bits, got {key.key_size}")
    elif not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("ES256 needs an EC key on the P-256 curve")
    return key


def _check_key(material: str, algorithm: str) -> None:
    try:
        load_jwt_key(material, algorithm)
    except ValueError as exc:
        from ..types import SchemaValueError

        raise SchemaValueError(str(exc), ("key",)) from None


# --------------------------------------------------------------------------------------------
# consumer credentials (used by ``piuptime.config.schema.Consumer``)


class BasicCredential(BaseModel):
    """HTTP Basic credentials of a consumer: a user name and a password hash."""

    model_config = _model()

    username: str
    password_hash: str

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, value: Any) -> Any:
        if isinstance(value, dict) and "password" in value:
            from ..types import SchemaValueError

            raise SchemaValueError(
                "passwords are never stored in the clear: run `piuptime hash-password` and "
                "write its output as password_hash",
                ("password",),
                on_key=True,
            )
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if not value or ":" in value or any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
            raise ValueError(
                "a Basic user name is not empty and has no colon or control characters"
            )
        return value

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        PasswordHash.parse(value)
        return value


class JwtCredential(BaseModel):
    """How a consumer's JSON Web Tokens are recognised: tokens signed with its own ``key``
    (found by ``kid``, by ``issuer`` or by the consumer claim), and/or tokens verified by the
    plugin's keys whose consumer claim equals ``subject`` (default: the consumer's name)."""

    model_config = _model()

    key: str | None = None
    algorithm: Algorithm = "HS256"
    issuer: str | None = None
    kid: str | None = None
    subject: str | None = None

    @model_validator(mode="after")
    def _material(self) -> JwtCredential:
        if self.key is None:
            if self.kid is not None or self.issuer is not None:
                from ..types import SchemaValueError

                raise SchemaValueError(
                    "kid and issuer select this consumer's own key: add key (a secret for "
                    "HS256, a PEM public key for RS256/ES256)",
                    ("kid" if self.kid is not None else "issuer",),
                )
            if "algorithm" in self.model_fields_set:
                from ..types import SchemaValueError

                raise SchemaValueError(
                    f"algorithm {self.algorithm} is set but there is no key material: add key "
                    "(a secret for HS256, a PEM public key for RS256/ES256, or ${ENV_VAR})",
                    ("algorithm",),
                )
        else:
            _check_key(self.key, self.algorithm)
        return self


# --------------------------------------------------------------------------------------------
# plugin schemas


def _names(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(_names)]
OneOrMany = Annotated[list[str], BeforeValidator(_one_or_many)]


def _check_header_names(names: list[str]) -> list[str]:
    for name in names:
        if not _is_token(name):
            raise ValueError(f"not an HTTP header name: {name!r}")
    return names


def _check_params(names: list[str]) -> list[str]:
    for name in names:
        if not name or any(ch in "&=#? " or ord(ch) < 0x21 for ch in name):
            raise ValueError(f"not a usable query parameter or cookie name: {name!r}")
    return names


class _AuthCommon(BaseModel):
    model_config = _model()

    # a consumer name used when the request carries no credential (Kong's "anonymous")
    anonymous: str | None = None
    realm: str = "piuptime"

    @field_validator("realm")
    @classmethod
    def _realm(cls, value: str) -> str:
        if not value or any(ch in '"\\' or ord(ch) < 0x20 or ord(ch) > 0x7E for ch in value):
            raise ValueError("a realm is printable ASCII without quotes or backslashes")
        return value


class KeyAuth(_AuthCommon):
    """API keys: looked for in ``header_names``, then ``Authorization: Bearer`` (``bearer``),
    then ``query_names``; matched against consumers' ``keys``."""

    header_names: Names = Field(default_factory=lambda: ["apikey"])
    bearer: bool = True
    query_names: Names = Field(default_factory=lambda: ["apikey"])
    hide_credentials: bool = True

    @field_validator("header_names")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        return _check_header_names(value)

    @field_validator("query_names")
    @classmethod
    def _query(cls, value: list[str]) -> list[str]:
        return _check_params(value)


class BasicAuth(_AuthCommon):
    """HTTP Basic against consumers' ``basic`` credentials (hashed passwords)."""

    hide_credentials: bool = True
    # successful credentials remembered (by a keyed digest) so a steady client skips the hash
    cache_size: Int = Field(default=1024, ge=0, le=1_000_000)
    # at most this many password checks run at once (each in a thread)
    max_concurrent_checks: Int = Field(default=4, ge=1, le=64)


class JwtKey(BaseModel):
    """A key of the plugin itself (not a consumer's)."""

    model_config = _model()

    key: str
    algorithm: Algorithm = "HS256"
    kid: str | None = None

    @model_validator(mode="after")
    def _material(self) -> JwtKey:
        _check_key(self.key, self.algorithm)
        return self


def _all_algorithms() -> list[Algorithm]:
    return ["HS256", "RS256", "ES256"]


class JwtAuth(_AuthCommon):
    """JSON Web Tokens (HS256, RS256, ES256) verified with the plugin's ``keys``, keys from
    ``jwks_url``, or consumers' own ``jwt.key``; the consumer comes from the key or from
    ``consumer_claim``."""

    keys: list[JwtKey] = Field(default_factory=list)
    jwks_url: str | None = None
    jwks_ttl: PositiveDuration = 300.0
    # an unknown kid triggers a JWKS refresh at most this often
    jwks_refresh_interval: PositiveDuration = 10.0
    jwks_timeout: PositiveDuration = 2.0
    algorithms: list[Algorithm] = Field(default_factory=_all_algorithms)
    issuer: OneOrMany | None = None
    audience: OneOrMany | None = None
    leeway: Duration = 0.0
    require: Names = Field(default_factory=lambda: ["exp"])
    consumer_claim: str = "sub"
    # a valid token whose claim names no consumer: "reject" (401) or "allow" (the claim's
    # value becomes an ad-hoc consumer name, groups from groups_claim)
    unknown_consumer: Literal["reject", "allow"] = "reject"
    groups_claim: str | None = None
    header_names: Names = Field(default_factory=lambda: ["authorization"])
    cookie_names: Names = Field(default_factory=list)
    query_names: Names = Field(default_factory=list)
    hide_credentials: bool = False
    cache_size: Int = Field(default=4096, ge=0, le=1_000_000)
    cache_ttl: Duration = 60.0

    @field_validator("header_names")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        return _check_header_names(value)

    @field_validator("cookie_names", "query_names")
    @classmethod
    def _params(cls, value: list[str]) -> list[str]:
        return _check_params(value)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: list[Algorithm]) -> list[Algorithm]:
        if not value:
            raise ValueError(f"list at least one of {', '.join(ALGORITHMS)}")
        return value

    @field_validator("require")
    @classmethod
    def _require(cls, value: list[str]) -> list[str]:
        for claim in value:
            if not claim:
                raise ValueError("a required claim name cannot be empty")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"bad port in {value!r}") from None
        if not have_crypto():
            raise ValueError(f"jwks_url (RS256/ES256 keys) {_INSTALL_HINT}")
        return value


class Acl(BaseModel):
    """Let a consumer through by its groups: ``allow`` (any one of them) or ``deny``."""

    model_config = _model()

    allow: Names | None = None
    deny: Names | None = None

    @model_validator(mode="after")
    def _one(self) -> Acl:
        from ..types import SchemaValueError

        if self.allow is not None and self.deny is not None:
            raise SchemaValueError("use allow or deny, not both", ("deny",), on_key=True)
        groups = self.allow if self.allow is not None else self.deny
        if groups is None:
            raise ValueError("acl needs allow: [groups] or deny: [groups]")
        if not groups:
            which = "allow" if self.allow is not None else "deny"
            raise SchemaValueError("list at least one group", (which,))
        return self


# --------------------------------------------------------------------------------------------
# checks across consumers and routes (called by Config's validator)


_AUTH_PLUGINS = ("key_auth", "jwt_auth", "basic_auth")


def consumer_problems(
    consumers: Mapping[str, Any], plugin_sets: Iterable[tuple[Loc, Any]]
) -> list[tuple[Loc, str]]:
    """Problems no single model can see: names, a key/user/kid/subject claimed twice,
    ``anonymous`` naming no consumer, a jwt_auth with no key anywhere. ``consumers`` are the
    validated ``Consumer`` models by name; ``plugin_sets`` the (location, PluginsConfig) of
    the global section and each route."""
    out: list[tuple[Loc, str]] = []
    keys: dict[bytes, str] = {}
    users: dict[str, str] = {}
    kids: dict[str, str] = {}
    subjects: dict[str, str] = {}
    consumer_jwt_key = False
    for name, c in consumers.items():
        at: Loc = ("consumers", name)
        if not valid_name(name):
            out.append((at, f"a consumer name is {_NAME_RULE}, got {name!r}"))
        for i, key in enumerate(c.keys):
            digest = key_digest(key)
            other = keys.get(digest)
            if other is not None:
                where = "another key of this consumer" if other == name else f"consumer {other!r}"
                out.append(((*at, "keys", i), f"this API key is also a key of {where}"))
            keys[digest] = name
        if c.basic is not None:
            other = users.get(c.basic.username)
            if other is not None:
                out.append(
                    (
                        (*at, "basic", "username"),
                        f"user name {c.basic.username!r} is also consumer {other!r}'s",
                    )
                )
            users[c.basic.username] = name
        jwt = c.jwt
        subject = jwt.subject if jwt is not None and jwt.subject is not None else name
        other = subjects.get(subject)
        if other is not None:
            out.append(
                (
                    (*at, "jwt", "subject") if jwt is not None and jwt.subject else at,
                    f"tokens with claim {subject!r} would match consumer {other!r} too",
                )
            )
        subjects.setdefault(subject, name)
        if jwt is not None:
            if jwt.key is not None:
                consumer_jwt_key = True
            if jwt.kid is not None:
                other = kids.get(jwt.kid)
                if other is not None:
                    out.append(((*at, "jwt", "kid"), f"kid {jwt.kid!r} is also {other!r}'s"))
                kids[jwt.kid] = name
    for loc, plugins in plugin_sets:
        if plugins is None:
            continue
        for pname in _AUTH_PLUGINS:
            cfg = getattr(plugins, pname, None)
            if cfg is None:
                continue
            if cfg.anonymous is not None and cfg.anonymous not in consumers:
                out.append(
                    (
                        (*loc, pname, "anonymous"),
                        f"no consumer is called {cfg.anonymous!r}; anonymous names the "
                        "consumer used for requests without credentials",
                    )
                )
            if (
                pname == "jwt_auth"
                and not cfg.keys
                and cfg.jwks_url is None
                and not consumer_jwt_key
            ):
                out.append(
                    (
                        (*loc, pname),
                        "jwt_auth has no key material to verify tokens with: set keys or "
                        "jwks_url here, or jwt.key on a consumer",
                    )
                )
    return out
