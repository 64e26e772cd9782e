"""Model groups: which deployment an attempt goes to, and what each deployment's record says.

A ``Group`` is a client-visible model name with its deployments. Each ``DeploymentState``
keeps what the handler learnt about one deployment: when it may be asked again (Retry-After,
back-off after a 429 without one), its circuit breaker, requests in flight, the moving average
of its time to first token, and its requests/tokens in the last minute (its ``rpm``/``tpm``
limits are checked before sending). A ``ProviderRuntime`` owns a provider's connection pool
and its pool of API keys; a key refused (401/403) or rate-limited is set aside on its own.

State survives a reload when the provider's or deployment's configuration is unchanged.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from piuptime.config.llm import LlmBreaker, LlmConfig, LlmDeployment, LlmModel, LlmProvider
from piuptime.config.llm import LlmTimeouts as Timeouts
from piuptime.http1.client import Pool, PoolOptions
from piuptime.llm.providers import Adapter, Deployment, make_adapter

__all__ = ["DeploymentState", "Group", "KeyPool", "ProviderRuntime", "build_groups"]

Clock = Callable[[], float]
_CLOCK: Clock = time.monotonic

#: back-off after a 429 that named no time: base doubling per consecutive 429, capped, with
#: full jitter (never hammer a provider that said "too many")
_BACKOFF_BASE = 1.0
_BACKOFF_MAX = 60.0
#: a key refused with 401/403 is set aside this long (a rotated key comes back on its own)
_BAD_KEY_HOLD = 300.0
#: weight of the newest sample in the time-to-first-token moving average
_EWMA_ALPHA = 0.3
_MINUTE = 60.0


class KeyPool:
    """A provider's API keys, used in turn; each can be set aside until a time."""

    __slots__ = ("_clock", "_next", "keys", "not_before")

    def __init__(self, keys: list[str], clock: Clock = _CLOCK) -> None:
        self.keys = keys
        self.not_before = [0.0] * len(keys)
        self._next = 0
        self._clock = clock

    def pick(self) -> tuple[int, str | None]:
        """``(index, key)`` of the next usable key; ``(-1, None)`` when the provider has no
        keys; ``(-2, None)`` when every key is set aside."""
        n = len(self.keys)
        if n == 0:
            return -1, None
        now = self._clock()
        for step in range(n):
            i = (self._next + step) % n
            if self.not_before[i] <= now:
                self._next = (i + 1) % n
                return i, self.keys[i]
        return -2, None

    def hold(self, index: int, seconds: float) -> None:
        if 0 <= index < len(self.keys):
            self.not_before[index] = max(self.not_before[index], self._clock() + seconds)

    def usable_in(self) -> float:
        """Seconds until some key is usable (0 when one is now, or there are none)."""
        if not self.keys:
            return 0.0
        return max(0.0, min(self.not_before) - self._clock())


class ProviderRuntime:
    """One configured provider: adapter, connection pool, keys."""

    def __init__(self, name: str, config: LlmProvider, clock: Clock = _CLOCK) -> None:
        self.name = name
        self.config = config
        self.kind = config.kind
        self.adapter: Adapter = make_adapter(config)
        parts = urlsplit(config.url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        default = 443 if scheme == "https" else 80
        host_part = f"[{host}]" if ":" in host else host
        self.authority = (host_part if port == default else f"{host_part}:{port}").encode()
        options = PoolOptions(
            max_connections=config.max_connections,
            max_idle=min(64, config.max_connections),
            # the handler keeps its own per-request timers (first byte, first token, idle);
            # the pool's are only a backstop
            connect_timeout=10.0,
            read_timeout=3600.0,
            tls_verify=config.tls_verify,
            ca_file=config.ca_file,
        )
        self.pool = Pool(scheme, host, port, options)
        self.keys = KeyPool(list(config.keys), clock)

    async def aclose(self) -> None:
        await self.pool.aclose()


class DeploymentState:
    """What the handler knows about one deployment of one group."""

    __slots__ = (
        "_clock",
        "_req_times",
        "_tok_times",
        "_tokens_in_window",
        "backoff_level",
        "breaker_failures",
        "breaker_open_for",
        "breaker_until",
        "config",
        "deployment",
        "failures_total",
        "in_flight",
        "label",
        "not_before",
        "probing",
        "provider",
        "requests_total",
        "ttft_ewma",
    )

    def __init__(
        self, config: LlmDeployment, provider: ProviderRuntime, clock: Clock = _CLOCK
    ) -> None:
        self.config = config
        self.provider = provider
        self.deployment = Deployment(config.provider, config.model, dict(config.params))
        self.label = f"{config.provider}/{config.model}"
        self._clock = clock
        self.not_before = 0.0  # Retry-After or back-off: not asked before this time
        self.backoff_level = 0  # consecutive 429s without a Retry-After
        self.breaker_failures = 0  # consecutive failures
        self.breaker_until = 0.0  # open until this time (0: closed)
        self.breaker_open_for = 0.0  # the current open period (doubles while probes fail)
        self.probing = False  # a half-open probe is out
        self.in_flight = 0
        self.ttft_ewma: float | None = None
        self._req_times: deque[float] = deque()
        self._tok_times: deque[tuple[float, int]] = deque()
        self._tokens_in_window = 0
        self.requests_total = 0
        self.failures_total = 0

    # -- may it be asked now?

    def wait(self, estimated_tokens: int = 0) -> float:
        """0 when an attempt may go now; otherwise seconds until it may (Retry-After,
        back-off, an open breaker, or its rpm/tpm limit); ``inf`` while a probe is out."""
        now = self._clock()
        wait = self.not_before - now
        if self.breaker_until:
            if self.probing:
                return float("inf")
            wait = max(wait, self.breaker_until - now)
        cfg = self.config
        if cfg.rpm is not None or cfg.tpm is not None:
            wait = max(wait, self._limit_wait(now, estimated_tokens))
        return max(0.0, wait)

    def _limit_wait(self, now: float, estimated_tokens: int) -> float:
        start = now - _MINUTE
        req = self._req_times
        while req and req[0] <= start:
            req.popleft()
        tok = self._tok_times
        while tok and tok[0][0] <= start:
            self._tokens_in_window -= tok.popleft()[1]
        wait = 0.0
        rpm, tpm = self.config.rpm, self.config.tpm
        if rpm is not None and len(req) >= rpm:
            wait = req[len(req) - rpm] + _MINUTE - now
        if tpm is not None and tok and self._tokens_in_window + estimated_tokens > tpm:
            # wait until enough of the minute's tokens have aged out
            need = self._tokens_in_window + estimated_tokens - tpm
            freed = 0
            for t, n in tok:
                freed += n
                if freed >= need:
                    wait = max(wait, t + _MINUTE - now)
                    break
            else:
                wait = max(wait, tok[-1][0] + _MINUTE - now)
        return wait

    # -- an attempt's life

    def begin(self) -> None:
        self.in_flight += 1
        self.requests_total += 1
        if self.breaker_until and self._clock() >= self.breaker_until:
            self.probing = True  # half open: this attempt is the probe
        if self.config.rpm is not None:
            self._req_times.append(self._clock())

    def end(self) -> None:
        self.in_flight -= 1

    def tokens_used(self, tokens: int) -> None:
        if self.config.tpm is not None and tokens > 0:
            self._tok_times.append((self._clock(), tokens))
            self._tokens_in_window += tokens

    def succeeded(self, ttft: float | None) -> None:
        self.backoff_level = 0
        self.breaker_failures = 0
        self.breaker_until = 0.0
        self.breaker_open_for = 0.0
        self.probing = False
        if ttft is not None:
            e = self.ttft_ewma
            self.ttft_ewma = ttft if e is None else e + _EWMA_ALPHA * (ttft - e)

    def failed(self, breaker: LlmBreaker) -> bool:
        """Count a failure that says the deployment is unwell (5xx, timeouts, broken
        streams); True when this opened (or re-opened) the breaker."""
        self.failures_total += 1
        self.breaker_failures += 1
        if self.probing or self.breaker_failures >= breaker.failures:
            if self.probing and self.breaker_open_for:
                self.breaker_open_for = min(self.breaker_open_for * 2, breaker.max_open_for)
            else:
                self.breaker_open_for = breaker.open_for
            self.breaker_until = self._clock() + self.breaker_open_for
            self.probing = False
            return True
        return False

    def released_probe(self) -> None:
        """An attempt that ended without a verdict on health (the client left, a 4xx)."""
        self.probing = False

    def hold_off(self, retry_after: float | None) -> float:
        """After a 429/overload: not asked again before ``retry_after``, or, when the
        provider named no time, an exponential back-off with full jitter. Returns the hold."""
        if retry_after is not None:
            hold = retry_after
            self.backoff_level = 0
        else:
            ceiling = min(_BACKOFF_MAX, _BACKOFF_BASE * (2**self.backoff_level))
            self.backoff_level = min(self.backoff_level + 1, 16)
            hold = ceiling / 2 + random.random() * ceiling / 2
        self.not_before = max(self.not_before, self._clock() + hold)
        return hold

    @property
    def breaker_state(self) -> str:
        if not self.breaker_until:
            return "closed"
        if self.probing or self._clock() >= self.breaker_until:
            return "half_open"
        return "open"


class Group:
    """A client-visible model name: deployments, strategy, fallbacks, timeouts."""

    def __init__(
        self,
        name: str,
        config: LlmModel,
        deployments: list[DeploymentState],
        timeouts: Timeouts,
        breaker: LlmBreaker,
    ) -> None:
        self.name = name
        self.config = config
        self.deployments = deployments
        self.strategy = config.strategy
        self.fallbacks = tuple(config.fallbacks)
        self.context_fallback = config.context_fallback
        self.timeouts = timeouts
        self.breaker = breaker
        self.retries = config.retries
        self.mode = config.mode
        self._weights = [d.config.weight for d in deployments]

    def order(self) -> list[DeploymentState]:
        """The deployments in the order this request tries them (the strategy's choice)."""
        deps = self.deployments
        if len(deps) == 1:
            return list(deps)
        strategy = self.strategy
        if strategy == "priority":
            return list(deps)
        if strategy == "weighted":
            return _weighted_order(deps, self._weights)
        if strategy == "least_busy":
            # ties keep the config order, shuffled a little so equal ones share the load
            return sorted(deps, key=lambda d: (d.in_flight, random.random()))
        # least_latency: unknown latency first (so each is measured), then the fastest
        return sorted(
            deps,
            key=lambda d: (-1.0, random.random()) if d.ttft_ewma is None else (d.ttft_ewma, 0.0),
        )


def _weighted_order(deps: list[DeploymentState], weights: list[int]) -> list[DeploymentState]:
    """A weighted random order without replacement (the first pick follows the weights)."""
    pool = list(zip(deps, weights, strict=True))
    out: list[DeploymentState] = []
    while pool:
        total = sum(w for _, w in pool)
        r = random.random() * total
        for i, (d, w) in enumerate(pool):
            r -= w
            if r < 0:
                out.append(d)
                del pool[i]
                break
        else:
            out.append(pool.pop()[0])
    return out


def build_groups(
    config: LlmConfig,
    previous_providers: dict[str, ProviderRuntime] | None = None,
    previous_groups: dict[str, Group] | None = None,
    clock: Clock = _CLOCK,
) -> tuple[dict[str, ProviderRuntime], dict[str, Group]]:
    """Providers and groups for ``config``; unchanged providers and deployments are carried
    over from the previous ones (pools, keys, breakers, latency)."""
    old_p = previous_providers or {}
    providers: dict[str, ProviderRuntime] = {}
    for name, pcfg in config.providers.items():
        prior = old_p.get(name)
        providers[name] = (
            prior if prior is not None and prior.config == pcfg else ProviderRuntime(name, pcfg)
        )
    old_states: dict[tuple[str, str], DeploymentState] = {}
    for gname, group in (previous_groups or {}).items():
        for d in group.deployments:
            old_states[(gname, d.config.model_dump_json())] = d
    groups: dict[str, Group] = {}
    for gname, gcfg in config.models.items():
        states: list[DeploymentState] = []
        for dcfg in gcfg.deployments:
            provider = providers[dcfg.provider]
            prior_state = old_states.get((gname, dcfg.model_dump_json()))
            if prior_state is not None and prior_state.provider is provider:
                states.append(prior_state)
            else:
                states.append(DeploymentState(dcfg, provider, clock))
        groups[gname] = Group(gname, gcfg, states, gcfg.timeouts or config.timeouts, config.breaker)
    return providers, groups


def retired(
    old: Iterable[ProviderRuntime], new: dict[str, ProviderRuntime]
) -> list[ProviderRuntime]:
    kept = {id(p) for p in new.values()}
    return [p for p in old if id(p) not in kept]
