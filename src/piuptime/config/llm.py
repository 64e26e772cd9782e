"""Schema of the ``llm:`` section: providers, model groups, prices and the routes that serve the
OpenAI- and Anthropic-compatible API (see docs/llm.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from .plugins import PluginsConfig
from .types import (
    Int,
    Loc,
    PositiveDuration,
    SchemaValueError,
    _Items,
    _model,
    _Section,
    _suggest,
)

__all__ = [
    "DEFAULT_BASE_URLS",
    "LLM_ROUTE_PLUGINS_REFUSED",
    "LlmBreaker",
    "LlmConfig",
    "LlmDeployment",
    "LlmModel",
    "LlmProvider",
    "LlmRoute",
    "LlmTimeouts",
    "Price",
]

#: plugins that act on an upstream request or answer: meaningless on the LLM API, refused on
#: an llm route and skipped there when configured globally
LLM_ROUTE_PLUGINS_REFUSED = frozenset(
    ("cache", "traffic_split", "mirror", "proxy_rewrite", "request_transformer")
)

ProviderKind = Literal["openai", "ollama", "anthropic", "gemini"]

#: Where a provider is when its ``base_url`` is not given.
DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://127.0.0.1:11434",
}


def _check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a base_url has no query or fragment, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    return url.rstrip("/")


class LlmTimeouts(BaseModel):
    """Per attempt, except ``total``.

    ``connect``: TCP and TLS. ``first_byte``: request sent → response head (a non-streamed
    answer arrives whole, so this bounds the whole generation). ``first_token``: a streamed
    answer's first content, measured from the request; past it the attempt fails over before
    the client saw anything. ``idle``: the longest silence between stream chunks. ``total``:
    every attempt, backoff and wait of one request, up to the first byte sent to the client.
    """

    model_config = _model()

    connect: PositiveDuration = 2.0
    first_byte: PositiveDuration = 60.0
    first_token: PositiveDuration = 20.0
    idle: PositiveDuration = 30.0
    total: PositiveDuration = 120.0


class LlmProvider(BaseModel):
    """One provider account. ``keys`` are used as a pool (each request takes the next usable
    one; a key answered 401/403 or 429 is set aside on its own)."""

    model_config = _model()

    kind: ProviderKind
    base_url: str | None = None
    keys: Annotated[list[str], _Items] = Field(default_factory=list)
    headers: Annotated[dict[str, str], _Section] = Field(default_factory=dict)
    # Anthropic's API version header
    anthropic_version: str = "2023-06-01"
    tls_verify: bool = True
    ca_file: str | None = None
    max_connections: Int = Field(default=256, ge=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_base_url(value)

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if not key or key != key.strip():
                raise ValueError("an API key is non-empty, without surrounding spaces")
        return value

    @property
    def url(self) -> str:
        return self.base_url or DEFAULT_BASE_URLS[self.kind]


class Price(BaseModel):
    """US dollars per million tokens."""

    model_config = _model()

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class LlmDeployment(BaseModel):
    """One model at one provider. ``params`` are merged into each request (for example
    ``{temperature: 0.2}`` or Ollama's ``options``); the client's own values win.
    ``rpm``/``tpm``: this deployment's limits, respected before sending."""

    model_config = _model()

    provider: str
    model: str
    weight: Int = Field(default=1, ge=1, le=1000)
    params: Annotated[dict[str, Any], _Section] = Field(default_factory=dict)
    rpm: Int | None = Field(default=None, ge=1)
    tpm: Int | None = Field(default=None, ge=1)
    price: Price | None = None


class LlmBreaker(BaseModel):
    """A deployment failing ``failures`` times in a row is taken out for ``open_for``, then
    probed by one request; success brings it back, failure doubles the wait up to
    ``max_open_for``."""

    model_config = _model()

    failures: Int = Field(default=5, ge=1)
    open_for: PositiveDuration = 30.0
    max_open_for: PositiveDuration = 300.0


class LlmModel(BaseModel):
    """A client-visible model name and the deployments behind it."""

    model_config = _model()

    strategy: Literal["priority", "weighted", "least_latency", "least_busy"] = "priority"
    deployments: list[LlmDeployment] = Field(min_length=1)
    # other groups tried, in order, once every deployment here failed
    fallbacks: Annotated[list[str], _Items] = Field(default_factory=list)
    # the group to use when the prompt is too long for this one
    context_fallback: str | None = None
    timeouts: LlmTimeouts | None = None  # default: llm.timeouts
    # same-deployment retries after a 5xx or a broken connection, before failing over
    retries: Int = Field(default=1, ge=0, le=5)
    # embeddings group (for /v1/embeddings) or chat (the default)
    mode: Literal["chat", "embeddings"] = "chat"
    # a stream that breaks after the client got part of the answer is carried on by another
    # deployment that continues a prefilled assistant turn (kind anthropic), instead of ending
    # with an error event; only for plain-text answers
    continue_streams: bool = False


class LlmRoute(BaseModel):
    """Where the API is served: ``path`` is a prefix (``/v1/`` serves ``/v1/chat/completions``,
    ``/v1/embeddings``, ``/v1/models`` and ``/v1/messages``)."""

    model_config = _model()

    name: str | None = None
    path: str = "/v1/"
    host: str | list[str] | None = None
    priority: Int | None = None
    max_body_bytes: Annotated[int, Field(ge=1)] | None = None
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or not value.endswith("/"):
            raise ValueError(f"an llm route path is a prefix: /.../, got {value!r}")
        return value


class LlmConfig(BaseModel):
    model_config = _model()

    providers: Annotated[dict[str, LlmProvider], _Section] = Field(default_factory=dict)
    models: Annotated[dict[str, LlmModel], _Section] = Field(default_factory=dict)
    routes: Annotated[list[LlmRoute], _Items] = Field(default_factory=lambda: [LlmRoute()])
    timeouts: Annotated[LlmTimeouts, _Section] = Field(default_factory=LlmTimeouts)
    breaker: Annotated[LlmBreaker, _Section] = Field(default_factory=LlmBreaker)
    # US dollars per million tokens, by provider model name or "provider/model"
    prices: Annotated[dict[str, Price], _Section] = Field(default_factory=dict)
    # largest request body read (JSON with images can be large)
    max_body_bytes: Annotated[int, Field(ge=1)] = 20 * 1024 * 1024
    # load the offline tokenizer (about 0.3 s and 64 MB, once) at start instead of on the
    # first answer without usage, which would hold the event loop for that long
    preload_tokenizer: bool = False

    @model_validator(mode="after")
    def _references(self) -> LlmConfig:
        problems = llm_problems(self)
        if problems:
            raise SchemaValueError(problems[0][1], problems[0][0])
        return self


def llm_problems(cfg: LlmConfig) -> list[tuple[Loc, str]]:
    """Names that point nowhere: unknown providers or groups, a group falling back to itself."""
    problems: list[tuple[Loc, str]] = []
    providers = list(cfg.providers)
    groups = list(cfg.models)

    def group_ref(loc: Loc, ref: str, own: str) -> None:
        if ref not in cfg.models:
            problems.append((loc, f"unknown model group {ref!r}{_suggest(ref, groups)}"))
        elif ref == own:
            problems.append((loc, "a group cannot fall back to itself"))

    for name, group in cfg.models.items():
        for i, dep in enumerate(group.deployments):
            loc: Loc = ("models", name, "deployments", i, "provider")
            if dep.provider not in cfg.providers:
                known = ", ".join(providers) or "none"
                hint = _suggest(dep.provider, providers)
                problems.append((loc, f"unknown provider {dep.provider!r}{hint}; known: {known}"))
            elif group.mode == "embeddings" and cfg.providers[dep.provider].kind == "anthropic":
                problems.append(
                    (loc, "Anthropic has no embeddings API; use openai, ollama or gemini")
                )
        for i, fb in enumerate(group.fallbacks):
            group_ref(("models", name, "fallbacks", i), fb, name)
        if group.context_fallback is not None:
            group_ref(("models", name, "context_fallback"), group.context_fallback, name)
    seen: set[str] = set()
    for i, route in enumerate(cfg.routes):
        rname = route.name or f"llm:{route.path}"
        if rname in seen:
            problems.append((("routes", i, "name"), f"two llm routes are called {rname!r}"))
        seen.add(rname)
    return problems


def llm_route_problems(
    routes: list[LlmRoute], proxy_route_names: list[str]
) -> list[tuple[Loc, str]]:
    """Plugins an llm route cannot run, and names shared with proxy routes."""
    problems: list[tuple[Loc, str]] = []
    taken = set(proxy_route_names)
    for i, route in enumerate(routes):
        for name in route.plugins.enabled():
            if name in LLM_ROUTE_PLUGINS_REFUSED:
                problems.append(
                    (
                        ("llm", "routes", i, "plugins", name),
                        f"{name} acts on a proxied upstream and is not available on llm routes",
                    )
                )
        rname = route.name or f"llm:{route.path}"
        if rname in taken:
            problems.append((("llm", "routes", i, "name"), f"a route is already called {rname!r}"))
    return problems
