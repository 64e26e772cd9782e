"""Schemas of the transform plugins: request id, CORS, IP restriction, body size, header and
path rewriting."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from ..types import Duration, Int, Regex, Size, _is_token, _model


def _names(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value


def _check_header_names(names: list[str]) -> list[str]:
    for name in names:
        if not _is_token(name):
            raise ValueError(f"not an HTTP header name: {name!r}")
    return names


def _check_header_map(value: dict[str, str]) -> dict[str, str]:
    _check_header_names(list(value))
    for name, text in value.items():
        if any((ord(ch) < 0x20 and ch != "\t") or ch == "\x7f" for ch in text):
            raise ValueError(f"header {name}: control characters are not allowed in a value")
    return value


HeaderNames = Annotated[list[str], BeforeValidator(_names)]


class RequestId(BaseModel):
    """Give every request an id: keep a sane incoming one (``trust_incoming``) or make one, send
    it upstream and (``echo``) back to the client, and put it in the access log."""

    model_config = _model()

    header: str = "X-Request-ID"
    trust_incoming: bool = True
    echo: bool = True

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        _check_header_names([value])
        return value


_ORIGIN = re.compile(r"(\*|https?://(\*\.)?[A-Za-z0-9.\-\[\]:]+)\Z")


class Cors(BaseModel):
    """Cross-origin resource sharing: preflight requests (OPTIONS with
    Access-Control-Request-Method) are answered at the gateway; other answers get the
    Access-Control-* headers when their Origin is allowed."""

    model_config = _model()

    allow_origins: HeaderNames = Field(default_factory=lambda: ["*"])
    allow_methods: HeaderNames = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    )
    allow_headers: HeaderNames = Field(default_factory=list)  # empty: echo what is asked
    expose_headers: HeaderNames = Field(default_factory=list)
    allow_credentials: bool = False
    max_age: Duration = 600.0

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('list at least one origin, or "*" for any')
        for origin in value:
            if not _ORIGIN.match(origin):
                raise ValueError(
                    f'expected "*" or an origin like "https://app.example.com" or '
                    f'"https://*.example.com", got {origin!r}'
                )
        return value

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = [m.upper() for m in value]
        _check_header_names(out)
        return out

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        return _check_header_names(value)


def _networks(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return value
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise ValueError(
                f"expected an IP address or a CIDR block like 10.0.0.0/8 or fd00::/8, got {item!r}"
            ) from None
    return out


Networks = Annotated[list[str], BeforeValidator(_networks)]


class IpRestriction(BaseModel):
    """Allow or deny clients by address (after ``gateway.trusted_proxies``): a client in
    ``deny`` is refused; with ``allow`` set, a client outside it is refused too."""

    model_config = _model()

    allow: Networks = Field(default_factory=list)
    deny: Networks = Field(default_factory=list)
    status: Int = Field(default=403, ge=400, le=499)
    message: str = "your address is not allowed to use this route"


class RequestSize(BaseModel):
    """The largest request body this route accepts (413 beyond it)."""

    model_config = _model()

    max_bytes: Size


class HeaderEdits(BaseModel):
    """``add`` appends a header, ``set`` replaces every header of that name, ``remove`` drops
    them; applied in the order remove, set, add."""

    model_config = _model()

    add: dict[str, str] = Field(default_factory=dict)
    set: dict[str, str] = Field(default_factory=dict)
    remove: HeaderNames = Field(default_factory=list)

    @field_validator("add", "set")
    @classmethod
    def _maps(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_header_map(value)

    @field_validator("remove")
    @classmethod
    def _remove(cls, value: list[str]) -> list[str]:
        return _check_header_names(value)


class RequestTransformer(HeaderEdits):
    """Edit the headers of the request sent upstream."""


class ResponseTransformer(HeaderEdits):
    """Edit the headers of the response sent to the client."""


class ProxyRewrite(BaseModel):
    """Rewrite the upstream path with a regular expression (captures as ``$1`` or ``$name``)
    and/or send another Host."""

    model_config = _model()

    regex: Regex | None = None
    replace: str = ""
    host: str | None = None
