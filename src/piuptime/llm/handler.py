"""The LLM API route handler: parse, pick a deployment, translate, stream back, fail over.

One ``LlmApi`` per compiled configuration; each ``llm.routes`` entry gets it as its handler.
Paths below the route's prefix:

- ``POST chat/completions`` (OpenAI; streamed or not), ``POST embeddings``, ``GET models``
- ``POST messages`` (Anthropic's Messages API, translated to and from the canonical shape)

A request walks a *plan*: its model group's deployments in the strategy's order, then each
fallback group's, with a context-length error jumping to the group's ``context_fallback``.
What each failure does is in docs/llm.md ("Failure semantics"); in short: 429 and overload
hold the deployment off (Retry-After, else jittered back-off) and move on; 5xx and broken
connections retry once on the same deployment, then move on; timeouts move on without a
retry; context length, content policy and bad requests are never retried. Nothing reaches the
client until a deployment produced its first token, so every failure before that is
invisible; after it, a failure ends the stream with an explicit error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from piuptime.http1.client import (
    ConnectError,
    ConnectTimeout,
    PoolTimeout,
    ReadTimeout,
    Response,
    UpstreamError,
)
from piuptime.http1.errors import BodyTooLarge, ClientDisconnected
from piuptime.llm import anthropic_api, tokens
from piuptime.llm.errors import ApiError, from_provider, openai_error_body
from piuptime.llm.groups import DeploymentState, Group, ProviderRuntime
from piuptime.llm.providers.base import (
    AUTH,
    BAD_REQUEST,
    CONNECT,
    CONTENT_POLICY,
    CONTEXT_LENGTH,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL,
    RATE_LIMITED,
    SERVER,
    TIMEOUT,
    ProviderError,
    WireRequest,
)
from piuptime.llm.sse import StreamTooLarge

if TYPE_CHECKING:
    from piuptime.gateway.plugins import Ctx
    from piuptime.gateway.runtime import LogFn
    from piuptime.http1.server import Request, Responder
    from piuptime.llm.metrics import LlmMetrics

log = logging.getLogger("piuptime.llm")


_JSON = b"application/json"
_SSE_HEADERS = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
_DONE = b"data: [DONE]\n\n"
#: largest provider answer read whole (a non-streamed completion, an error body)
_MAX_ANSWER = 64 * 1024 * 1024
_MAX_ERROR_BODY = 1024 * 1024
#: failures that retry on the same deployment (once by default) before moving on
_RETRY_SAME = frozenset((SERVER, CONNECT, PROTOCOL))
#: failures that say the deployment is unwell (count towards its breaker)
_UNWELL = frozenset((SERVER, CONNECT, PROTOCOL, TIMEOUT))
#: never retried anywhere: the answer goes to the client
_FINAL = frozenset((CONTENT_POLICY, BAD_REQUEST))
#: provider kinds whose API continues a trailing (prefilled) assistant message
_CONTINUES = frozenset(("anthropic",))
_perf = time.perf_counter


class _Outcome:
    """What one request's walk through its plan learnt, for the log and the metrics."""

    __slots__ = (
        "attempts",
        "completion_tokens",
        "continued",
        "cost",
        "deployment",
        "error_kind",
        "fallbacks",
        "group",
        "prompt_tokens",
        "provider",
        "tried",
        "ttft",
        "upstream_time",
        "usage_source",
    )

    def __init__(self, group: str) -> None:
        self.group = group
        self.attempts = 0
        self.fallbacks = 0  # groups moved to after the first
        self.tried: list[str] = []
        self.deployment: DeploymentState | None = None
        self.provider: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost: float | None = None
        self.ttft: float | None = None
        self.error_kind: str | None = None
        self.upstream_time = 0.0
        self.usage_source: str | None = None  # "provider" or "counted"
        self.continued = False  # a broken stream was carried on by another deployment

    def log_fields(self) -> dict[str, Any]:
        dep = self.deployment
        return {
            "llm_model": self.group,
            "llm_deployment": dep.label if dep is not None else None,
            "llm_attempts": self.attempts,
            "llm_tried": self.tried,
            "llm_fallbacks": self.fallbacks,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_source": self.usage_source,
            "cost_usd": self.cost,
            "ttft_ms": round(self.ttft * 1000, 3) if self.ttft is not None else None,
            "llm_error": self.error_kind,
            "llm_continued": self.continued,
        }


class LlmApi:
    """The handler of every ``llm.routes`` route of one compiled configuration."""

    def __init__(
        self,
        providers: dict[str, ProviderRuntime],
        groups: dict[str, Group],
        prices: Any,
        metrics: LlmMetrics | None,
        max_body_bytes: int,
    ) -> None:
        self.providers = providers
        self.groups = groups
        self.prices = prices
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "piuptime"}
                    for name in groups
                ],
            }
        )

    def route_handler(self, prefix: str) -> Callable[..., Awaitable[None]]:
        """The ``RouteHandler`` of one route serving the API below ``prefix`` (``/v1/``)."""
        cut = len(prefix.encode())
        api = self

        def handle(req: Request, resp: Responder, ctx: Ctx | None, log: LogFn) -> Awaitable[None]:
            return api.handle(req, resp, ctx, log, req.path[cut:])

        return handle

    # -- dispatch --------------------------------------------------------------------------

    async def handle(
        self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn, sub: bytes
    ) -> None:
        method = req.method
        if sub == b"chat/completions" or sub == b"messages":
            if method != b"POST":
                return self._refuse(
                    req, resp, ctx, log, ApiError(405, "use POST", "method_not_allowed")
                )
            front = "anthropic" if sub == b"messages" else "openai"
            await self._chat(req, resp, ctx, log, front)
        elif sub == b"embeddings":
            if method != b"POST":
                return self._refuse(
                    req, resp, ctx, log, ApiError(405, "use POST", "method_not_allowed")
                )
            await self._embeddings(req, resp, ctx, log)
        elif sub == b"models" or sub == b"models/":
            if method != b"GET" and method != b"HEAD":
                return self._refuse(
                    req, resp, ctx, log, ApiError(405, "use GET", "method_not_allowed")
                )
            self._send_json(resp, ctx, 200, self._models_body, ())
            log(None, 0.0)
        elif sub.startswith(b"models/"):
            name = sub[7:].decode("utf-8", "replace")
            if name in self.groups:
                body = orjson.dumps(
                    {"id": name, "object": "model", "created": 0, "owned_by": "piuptime"}
                )
                self._send_json(resp, ctx, 200, body, ())
                log(None, 0.0)
            else:
                self._refuse(req, resp, ctx, log, self._unknown_model(name))
        else:
            path = req.path.decode("latin-1")
            self._refuse(
                req,
                resp,
                ctx,
                log,
                ApiError(404, f"no such endpoint: {path}", "unknown_url"),
            )
        return None

    def _unknown_model(self, name: object) -> ApiError:
        known = ", ".join(self.groups) or "none configured"
        return ApiError(
            404,
            f"The model {name!r} does not exist here; models: {known}",
            "model_not_found",
            param="model",
        )

    # -- chat --------------------------------------------------------------------------------

    async def _read_json(self, req: Request) -> tuple[dict[str, Any], int]:
        limit = min(req.max_body_bytes, self.max_body_bytes)
        req.max_body_bytes = limit
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await req.read()
            except BodyTooLarge:
                raise ApiError(
                    413, f"request body is over {limit} bytes", "request_too_large"
                ) from None
            if not chunk:
                break
            size += len(chunk)
            parts.append(chunk)
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                400, f"the request body is not valid JSON: {exc}", "invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_request")
        return body, size

    async def _chat(
        self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn, front: str
    ) -> None:
        outcome: _Outcome | None = None
        try:
            body, size = await self._read_json(req)
            if front == "anthropic":
                try:
                    body = anthropic_api.messages_to_chat(body)
                except ValueError as exc:
                    raise ApiError(400, str(exc), "invalid_request") from None
            model = body.get("model")
            group = self.groups.get(model) if isinstance(model, str) else None
            if group is None or group.mode != "chat":
                if isinstance(model, str) and group is not None:
                    raise ApiError(400, f"{model!r} is an embeddings model", "wrong_model_mode")
                if model is None:
                    raise ApiError(400, "'model' is required", "missing_model", param="model")
                raise self._unknown_model(model)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
            outcome = _Outcome(group.name)
            stream = body.get("stream") is True
            if stream:
                await _Stream(self, req, resp, ctx, body, group, outcome, front, size // 4).run()
            else:
                await self._complete(req, resp, ctx, body, group, outcome, front, size // 4)
        except ApiError as err:
            if outcome is not None:
                outcome.error_kind = err.kind
            self._error(resp, ctx, err, front)
        except ClientDisconnected:
            if outcome is not None:
                outcome.error_kind = "client_disconnected"
        finally:
            self._done(req, resp, ctx, log, outcome)

    def _done(
        self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn, outcome: _Outcome | None
    ) -> None:
        if outcome is None:
            log(None, 0.0)
            return
        metrics = self.metrics
        consumer = ctx.consumer.name if ctx is not None and ctx.consumer is not None else ""
        if metrics is not None:
            metrics.record(outcome, consumer)
        log(outcome.log_fields(), outcome.upstream_time)

    async def _complete(
        self,
        req: Request,
        resp: Responder,
        ctx: Ctx | None,
        body: dict[str, Any],
        group: Group,
        outcome: _Outcome,
        front: str,
        estimate: int,
    ) -> None:
        """A non-streamed chat completion: the first deployment that answers, whole."""

        async def attempt(dep: DeploymentState, key: str | None, budget: float) -> Any:
            adapter = dep.provider.adapter
            wire = _translated(adapter.chat_request, dep, body, dep.deployment, False, key)
            data = await self._exchange(dep, wire, min(budget, group_timeouts.first_byte), outcome)
            t_first = _perf()
            result = _parsed(adapter.chat_response, dep, data, dep.deployment)
            return result, t_first

        group_timeouts = group.timeouts
        start = req.start_time
        result, t_first, dep = await _Plan(self, group, outcome, estimate, start).run(attempt)
        outcome.ttft = t_first - start
        usage = result.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            outcome.usage_source = "provider"
        else:
            prompt = tokens.count_chat_prompt(body)
            completion = tokens.count_completion(_response_text(result))
            result["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            outcome.usage_source = "counted"
        self._account(outcome, dep, prompt, completion)
        if front == "anthropic":
            payload = orjson.dumps(anthropic_api.chat_to_message(result))
        else:
            payload = orjson.dumps(result)
        overhead = (_perf() - start) - outcome.upstream_time
        self._send_json(resp, ctx, 200, payload, self._answer_headers(outcome, overhead))

    def _account(
        self, outcome: _Outcome, dep: DeploymentState, prompt: int, completion: int
    ) -> None:
        # added up: a stream continued on another deployment was billed by both
        outcome.prompt_tokens += prompt
        outcome.completion_tokens += completion
        outcome.deployment = dep
        outcome.provider = dep.config.provider
        dep.tokens_used(prompt + completion)
        prices = self.prices
        if prices is not None:
            cost = prices.cost(
                dep.config.provider, dep.config.model, dep.config.price, prompt, completion
            )
            if cost is not None:
                outcome.cost = cost if outcome.cost is None else round(outcome.cost + cost, 9)

    @staticmethod
    def _answer_headers(outcome: _Outcome, overhead: float) -> list[tuple[bytes, bytes]]:
        dep = outcome.deployment
        headers = [(b"x-piuptime-overhead-ms", b"%.3f" % (max(0.0, overhead) * 1000))]
        if dep is not None:
            headers.append((b"x-piuptime-deployment", dep.label.encode()))
        headers.append((b"x-piuptime-attempts", b"%d" % outcome.attempts))
        return headers

    async def _exchange(
        self, dep: DeploymentState, wire: WireRequest, first_byte: float, outcome: _Outcome
    ) -> bytes:
        """Send, wait for the head within ``first_byte``, read the whole body (each gap
        within the group's idle timeout is not needed here: the whole answer must arrive
        within ``first_byte`` plus reading). A non-2xx answer raises its ProviderError."""
        t0 = _perf()
        try:
            up = await self._send(dep.provider, wire, first_byte)
            try:
                data = await _read_all(up, _MAX_ANSWER, max(first_byte - (_perf() - t0), 0.001))
            finally:
                up.release()
        finally:
            outcome.upstream_time += _perf() - t0
        if up.status >= 300:
            raise dep.provider.adapter.classify(up.status, up.headers, data)
        return data

    async def _send(self, provider: ProviderRuntime, wire: WireRequest, timeout: float) -> Response:
        """The request on the provider's pool; the response head within ``timeout``."""
        headers = [(b"host", provider.authority), *wire.headers]
        try:
            async with asyncio.timeout(timeout):
                return await provider.pool.request(
                    wire.method, wire.path, headers, wire.body, idempotent=True
                )
        except TimeoutError:
            raise ProviderError(
                TIMEOUT, f"no response within {timeout:.3g}s (first byte)"
            ) from None
        except (ConnectError, ConnectTimeout, PoolTimeout) as exc:
            raise ProviderError(CONNECT, f"cannot connect: {exc}") from None
        except ReadTimeout:
            raise ProviderError(TIMEOUT, "no response (read timeout)") from None
        except UpstreamError as exc:
            raise ProviderError(CONNECT, f"connection failed: {exc}") from None

    # -- embeddings ------------------------------------------------------------------------

    async def _embeddings(self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn) -> None:
        outcome: _Outcome | None = None
        try:
            body, size = await self._read_json(req)
            model = body.get("model")
            group = self.groups.get(model) if isinstance(model, str) else None
            if group is None:
                if model is None:
                    raise ApiError(400, "'model' is required", "missing_model", param="model")
                raise self._unknown_model(model)
            if group.mode != "embeddings":
                raise ApiError(
                    400, f"{model!r} is a chat model, not an embeddings one", "wrong_model_mode"
                )
            if "input" not in body:
                raise ApiError(400, "'input' is required", "missing_input", param="input")
            outcome = _Outcome(group.name)

            async def attempt(dep: DeploymentState, key: str | None, budget: float) -> Any:
                adapter = dep.provider.adapter
                wire = _translated(adapter.embeddings_request, dep, body, dep.deployment, key)
                assert outcome is not None
                data = await self._exchange(
                    dep, wire, min(budget, group.timeouts.first_byte), outcome
                )
                return _parsed(adapter.embeddings_response, dep, data, dep.deployment), _perf()

            start = req.start_time
            result, _, dep = await _Plan(self, group, outcome, size // 4, start).run(attempt)
            usage = result.get("usage") if isinstance(result, dict) else None
            prompt = int(usage.get("prompt_tokens") or 0) if isinstance(usage, dict) else 0
            if not prompt:
                inputs = body["input"]
                texts = [inputs] if isinstance(inputs, str) else inputs
                prompt = sum(tokens.count_text(t) for t in texts if isinstance(t, str))
                result["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
                outcome.usage_source = "counted"
            else:
                outcome.usage_source = "provider"
            self._account(outcome, dep, prompt, 0)
            overhead = (_perf() - start) - outcome.upstream_time
            self._send_json(
                resp, ctx, 200, orjson.dumps(result), self._answer_headers(outcome, overhead)
            )
        except ApiError as err:
            if outcome is not None:
                outcome.error_kind = err.kind
            self._error(resp, ctx, err, "openai")
        except ClientDisconnected:
            if outcome is not None:
                outcome.error_kind = "client_disconnected"
        finally:
            self._done(req, resp, ctx, log, outcome)

    # -- writing answers ---------------------------------------------------------------------

    def _send_json(
        self,
        resp: Responder,
        ctx: Ctx | None,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | tuple[()],
    ) -> None:
        out = list(headers)
        if ctx is not None and ctx.route.pipeline is not None:
            ctx.route.pipeline.on_response(ctx, status, out)
        resp.send(status, body, out, _JSON)

    def _error(self, resp: Responder, ctx: Ctx | None, err: ApiError, front: str) -> None:
        if resp.started:
            return
        headers: list[tuple[bytes, bytes]] = []
        if err.retry_after is not None:
            headers.append((b"retry-after", b"%d" % max(1, int(err.retry_after + 0.999))))
        if front == "anthropic":
            body = anthropic_api.anthropic_error_body(
                anthropic_api.error_type(err.status), err.message
            )
        else:
            body = openai_error_body(err)
        self._send_json(resp, ctx, err.status, body, headers)

    def _refuse(
        self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn, err: ApiError
    ) -> None:
        front = "anthropic" if any(n == b"anthropic-version" for n, _ in req.headers) else "openai"
        self._error(resp, ctx, err, front)
        log({"llm_error": err.kind}, 0.0)


#: what a translation of malformed input can raise (a list where a dict belongs, ...)
_SHAPE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def _translated(fn: Callable[..., WireRequest], dep: DeploymentState, *args: Any) -> WireRequest:
    """An adapter's request translation; a request it cannot read is the client's error."""
    try:
        return fn(*args)
    except ProviderError:
        raise
    except _SHAPE_ERRORS as exc:
        raise ProviderError(
            BAD_REQUEST, f"the request cannot be sent to {dep.provider.kind}: {exc}"
        ) from None


def _parsed(fn: Callable[..., dict[str, Any]], dep: DeploymentState, *args: Any) -> dict[str, Any]:
    """An adapter's reading of a 2xx answer; one it cannot read is the provider's fault."""
    try:
        return fn(*args)
    except ProviderError:
        raise
    except _SHAPE_ERRORS as exc:
        raise ProviderError(PROTOCOL, f"unreadable answer: {exc!r}") from None


def _response_text(result: dict[str, Any]) -> str:
    """The generated text of a canonical chat.completion (content and tool-call arguments)."""
    out: list[str] = []
    for choice in result.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                out.append(str(fn.get("name") or ""))
                out.append(str(fn.get("arguments") or ""))
    return "".join(out)


async def _read_all(up: Response, limit: int, timeout: float) -> bytes:
    """The whole body of ``up`` within ``timeout``; a body over ``limit`` is a protocol error."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await up.read()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ProviderError(PROTOCOL, f"answer over {limit} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise ProviderError(TIMEOUT, f"the answer did not complete within {timeout:.3g}s") from None
    except UpstreamError as exc:
        raise ProviderError(CONNECT, f"the answer broke off: {exc}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


# -- the plan: which deployment next --------------------------------------------------------


class _Plan:
    """Walks the deployments of a group and its fallbacks until an attempt succeeds.

    ``attempt(dep, key, budget)`` raises ProviderError to go on; whatever it returns ends the
    walk. Raises ApiError when nothing answered (the first real failure is what the client
    sees, never a fallback's own rejection)."""

    def __init__(
        self, api: LlmApi, group: Group, outcome: _Outcome, estimate: int, start: float
    ) -> None:
        self.api = api
        self.group = group
        self.outcome = outcome
        self.estimate = estimate
        self.deadline = start + group.timeouts.total
        self.first_error: ProviderError | None = None
        self.first_where = ""
        self.rate_limited: list[float] = []  # retry-after of deployments that said 429
        self.timed_out = False
        # a stream keeps its deployment busy until it ends (``_Stream`` calls ``end``)
        self.keep_busy = False

    def groups(self) -> list[Group]:
        seen = {self.group.name}
        order = [self.group]
        for g in order:  # grows while iterating: fallbacks of fallbacks
            for name in g.fallbacks:
                if name not in seen and name in self.api.groups:
                    seen.add(name)
                    order.append(self.api.groups[name])
        return order

    async def run(
        self, attempt: Callable[[DeploymentState, str | None, float], Awaitable[Any]]
    ) -> tuple[Any, Any, DeploymentState]:
        outcome = self.outcome
        api = self.api
        visited: set[str] = set()
        queue = self.groups()
        held: list[tuple[float, DeploymentState, Group]] = []
        i = 0
        while i < len(queue):
            group = queue[i]
            i += 1
            if group.name in visited:
                continue
            visited.add(group.name)
            if group is not self.group:
                outcome.fallbacks += 1
            too_long: tuple[ProviderError, str] | None = None
            for dep in group.order():
                wait = dep.wait(self.estimate)
                if wait > 0:
                    held.append((wait, dep, group))
                    continue
                try:
                    return await self._on(dep, group, attempt)
                except ProviderError as exc:
                    if exc.kind == CONTEXT_LENGTH:
                        too_long = (exc, dep.label)
                        break
            if too_long is not None:
                # never retried in this group: the larger-context group, or a clear 400
                jump = group.context_fallback
                if jump and jump not in visited and jump in api.groups:
                    queue.insert(i, api.groups[jump])
                    continue
                raise from_provider(*too_long)
        # everything was tried or held: when a deployment is only held off (Retry-After,
        # back-off, rpm/tpm) and the deadline allows, wait for the soonest and ask it again
        soonest = self._soonest(visited)
        if soonest is not None and soonest[0] < self.deadline - _perf():
            wait, dep, group = soonest
            await asyncio.sleep(wait)
            try:
                return await self._on(dep, group, attempt)
            except ProviderError as exc:
                if exc.kind == CONTEXT_LENGTH:
                    raise from_provider(exc, dep.label) from None
        raise self._exhausted(held)

    def _soonest(self, visited: set[str]) -> tuple[float, DeploymentState, Group] | None:
        """The held-off deployment (of the groups tried) that may be asked again first: held
        by Retry-After, back-off or its rpm/tpm limit, not by an open breaker."""
        best: tuple[float, DeploymentState, Group] | None = None
        for name in visited:
            group = self.api.groups[name]
            for dep in group.deployments:
                if dep.breaker_state != "closed":
                    continue  # taken out for failing: not worth waiting for
                wait = dep.wait(self.estimate)
                if 0 < wait != float("inf") and (best is None or wait < best[0]):
                    best = (wait, dep, group)
        return best

    async def _on(
        self,
        dep: DeploymentState,
        group: Group,
        attempt: Callable[[DeploymentState, str | None, float], Awaitable[Any]],
    ) -> tuple[Any, Any, DeploymentState]:
        """Attempts on one deployment: the first, and same-deployment retries. Returns the
        attempt's result, or raises the ProviderError that moves the plan on."""
        outcome = self.outcome
        keys = dep.provider.keys
        tries = 0
        while True:
            budget = self.deadline - _perf()
            if budget <= 0:
                self.timed_out = True
                raise ProviderError(TIMEOUT, "the request's total deadline passed")
            index, key = keys.pick()
            if index == -2:
                raise ProviderError(AUTH, "every API key of this provider is set aside")
            outcome.attempts += 1
            outcome.tried.append(dep.label)
            dep.begin()
            t0 = _perf()
            try:
                result = await attempt(dep, key, budget)
            except ProviderError as exc:
                dep.end()
                self._failed(dep, group, exc, index)
                if exc.kind in _FINAL:
                    dep.released_probe()
                    raise from_provider(exc, dep.label) from None
                if exc.kind in _RETRY_SAME and tries < group.retries:
                    tries += 1
                    continue
                if (
                    exc.kind in (AUTH, RATE_LIMITED)
                    and index >= 0
                    and len(keys.keys) > 1
                    and tries < len(keys.keys)
                ):
                    tries += 1
                    continue  # the same deployment with the next key (this one is set aside)
                raise
            except BaseException:
                dep.end()
                dep.released_probe()
                raise
            if not self.keep_busy:
                dep.end()
            value, t_first = result
            dep.succeeded(t_first - t0)
            return value, t_first, dep

    def _remember(self, exc: ProviderError, dep: DeploymentState) -> None:
        if self.first_error is None or (
            # a real failure wins over a later fallback's refusal or a timeout
            self.first_error.kind in (AUTH, NOT_FOUND) and exc.kind not in (AUTH, NOT_FOUND)
        ):
            self.first_error = exc
            self.first_where = dep.label

    def _failed(
        self, dep: DeploymentState, group: Group, exc: ProviderError, key_index: int
    ) -> None:
        kind = exc.kind
        self._remember(exc, dep)
        api = self.api
        if api.metrics is not None:
            api.metrics.error(group.name, dep.label, kind)
        if kind in (RATE_LIMITED, OVERLOADED):
            hold = dep.hold_off(exc.retry_after)
            if kind == RATE_LIMITED:
                self.rate_limited.append(hold)
                if key_index >= 0 and len(dep.provider.keys.keys) > 1:
                    dep.provider.keys.hold(key_index, hold)
                    dep.not_before = 0.0  # another key may serve this deployment
            dep.released_probe()
        elif kind == AUTH:
            dep.provider.keys.hold(key_index, 300.0)
            dep.released_probe()
        elif kind in _UNWELL:
            if kind == TIMEOUT:
                self.timed_out = True
            if dep.failed(group.breaker) and api.metrics is not None:
                api.metrics.breaker_opened(dep.label)
        else:
            dep.released_probe()

    def _exhausted(self, held: list[tuple[float, DeploymentState, Group]]) -> ApiError:
        first = self.first_error
        if first is not None and first.kind not in (RATE_LIMITED, OVERLOADED):
            err = from_provider(first, self.first_where)
            if self.timed_out and first.kind == TIMEOUT:
                return err
            err.message = f"no deployment could answer; first failure: {err.message}"
            return err
        waits = [w for w, _, _ in held if w != float("inf")] + self.rate_limited
        retry_after = min(waits) if waits else None
        if first is not None:
            err = from_provider(first, self.first_where)
            err.message = f"every deployment is rate-limited or overloaded; {err.message}"
            err.retry_after = retry_after
            return err
        return ApiError(
            429 if self.rate_limited or held else 503,
            "every deployment of this model is busy, rate-limited or taken out by its breaker",
            "no_deployment_available",
            retry_after=retry_after,
            kind="unavailable",
        )


# -- streaming --------------------------------------------------------------------------------


class _Stream:
    """One streamed chat completion: attempts until a first token, then pumps to the client."""

    def __init__(
        self,
        api: LlmApi,
        req: Request,
        resp: Responder,
        ctx: Ctx | None,
        body: dict[str, Any],
        group: Group,
        outcome: _Outcome,
        front: str,
        estimate: int,
    ) -> None:
        self.api = api
        self.req = req
        self.resp = resp
        self.ctx = ctx
        self.body = body
        self.group = group
        self.outcome = outcome
        self.front = front
        self.estimate = estimate
        options = body.get("stream_options")
        self.include_usage = (
            front == "openai" and isinstance(options, dict) and options.get("include_usage") is True
        )
        self.writer = anthropic_api.MessagesStreamWriter() if front == "anthropic" else None
        # what the client got so far, kept only when a broken stream may be continued
        self.track = group.config.continue_streams
        self.sent_text: list[str] = []
        self.sent_tools = False
        self.plan: _Plan
        self.current: DeploymentState

    async def run(self) -> None:
        outcome = self.outcome
        start = self.req.start_time
        plan = _Plan(self.api, self.group, outcome, self.estimate, start)
        plan.keep_busy = True
        self.plan = plan
        (up, decoder, pending), t_first, dep = await plan.run(self._attempt)
        # the first token is here: the client gets the head and what arrived so far
        outcome.ttft = t_first - start
        outcome.deployment = dep
        self.current = dep
        try:
            await self._pump(up, decoder, pending, dep)
        finally:
            self.current.end()

    async def _attempt(
        self,
        dep: DeploymentState,
        key: str | None,
        budget: float,
        body: dict[str, Any] | None = None,
    ) -> Any:
        """Send, then read until the first content (or the end): returns (response, decoder,
        chunks so far, time); every failure before that raises ProviderError."""
        adapter = dep.provider.adapter
        timeouts = self.group.timeouts
        wire = _translated(
            adapter.chat_request,
            dep,
            self.body if body is None else body,
            dep.deployment,
            True,
            key,
        )
        outcome = self.outcome
        t0 = _perf()
        first_token_by = t0 + min(timeouts.first_token, budget)
        try:
            up = await self.api._send(
                dep.provider, wire, min(timeouts.first_byte, budget, timeouts.first_token)
            )
        finally:
            outcome.upstream_time += _perf() - t0
        if up.status >= 300:
            t1 = _perf()
            try:
                data = await _read_all(up, _MAX_ERROR_BODY, timeouts.idle)
            finally:
                up.release()
                outcome.upstream_time += _perf() - t1
            raise adapter.classify(up.status, up.headers, data)
        decoder = adapter.stream_decoder(dep.deployment)
        pending: list[dict[str, Any]] = []
        try:
            while True:
                left = first_token_by - _perf()
                if left <= 0:
                    raise ProviderError(
                        TIMEOUT, f"no first token within {timeouts.first_token:.3g}s"
                    )
                t1 = _perf()
                try:
                    async with asyncio.timeout(left):
                        data = await up.read()
                except TimeoutError:
                    raise ProviderError(
                        TIMEOUT, f"no first token within {timeouts.first_token:.3g}s"
                    ) from None
                except UpstreamError as exc:
                    raise ProviderError(
                        CONNECT, f"the stream broke off before a token: {exc}"
                    ) from None
                finally:
                    outcome.upstream_time += _perf() - t1
                if not data:
                    pending += decoder.close()
                    if pending and (decoder.done or decoder.finish_reason):
                        return (up, decoder, pending), _perf()
                    raise ProviderError(PROTOCOL, "the stream ended before any token")
                try:
                    chunks = decoder.feed(data)
                except StreamTooLarge as exc:
                    raise ProviderError(PROTOCOL, str(exc)) from None
                except _SHAPE_ERRORS as exc:
                    raise ProviderError(PROTOCOL, f"unreadable stream: {exc!r}") from None
                if chunks:
                    pending += chunks
                    if any(_has_content(c) for c in chunks):
                        return (up, decoder, pending), _perf()
        except BaseException:
            up.release()
            raise

    async def _pump(
        self, up: Response, decoder: Any, pending: list[dict[str, Any]], dep: DeploymentState
    ) -> None:
        resp = self.resp
        outcome = self.outcome
        ctx = self.ctx
        overhead = (_perf() - self.req.start_time) - outcome.upstream_time
        headers = [*_SSE_HEADERS, *self.api._answer_headers(outcome, overhead)]
        if ctx is not None and ctx.route.pipeline is not None:
            ctx.route.pipeline.on_response(ctx, 200, headers)
        resp.start(200, headers)
        first = pending
        while True:
            failure = await self._relay(up, decoder, pending, dep)
            complete = decoder.done or decoder.finish_reason is not None
            usage = self._settle(decoder, dep)
            if failure is None and not complete:
                failure = f"{dep.label}: the stream ended without a finish (truncated answer)"
            if failure is None:
                break
            self._interrupted(dep, failure)
            resumed = await self._continuation(dep)
            if resumed is None:
                outcome.error_kind = "stream_interrupted"
                resp.write(self._error_event(failure))
                resp.end()
                return
            up, decoder, pending, dep = resumed
        if self.writer is not None:
            resp.end(self.writer.finish(decoder.finish_reason, usage))
            return
        tail = b""
        if self.include_usage:
            chunk = {
                "id": self._last_id(first),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self._last_model(pending, dep),
                "choices": [],
                "usage": usage,
            }
            tail = b"data: " + orjson.dumps(chunk) + b"\n\n"
        resp.end(tail + _DONE)

    async def _relay(
        self, up: Response, decoder: Any, pending: list[dict[str, Any]], dep: DeploymentState
    ) -> str | None:
        """Write ``pending``, then every chunk of ``up`` as it comes, to the end of its body;
        returns None, or what broke the stream."""
        resp = self.resp
        outcome = self.outcome
        encode = self._encode
        idle = self.group.timeouts.idle
        try:
            out = b"".join(encode(c) for c in pending)
            if out:
                resp.write(out)
            if resp.write_paused:
                await resp.drain()
            while True:
                t1 = _perf()
                try:
                    async with asyncio.timeout(idle):
                        data = await up.read()
                except TimeoutError:
                    return f"{dep.label}: the stream stalled (nothing for {idle:.3g}s)"
                except UpstreamError as exc:
                    return f"{dep.label}: the stream broke off: {exc}"
                finally:
                    outcome.upstream_time += _perf() - t1
                if not data:
                    chunks = decoder.close()
                    if chunks:
                        resp.write(b"".join(encode(c) for c in chunks))
                    return None
                try:
                    chunks = decoder.feed(data)
                except ProviderError as exc:
                    return f"{dep.label}: {exc.message}"
                except StreamTooLarge as exc:
                    return f"{dep.label}: {exc}"
                except _SHAPE_ERRORS as exc:
                    return f"{dep.label}: unreadable stream: {exc!r}"
                if chunks:
                    resp.write(b"".join(encode(c) for c in chunks))
                    if resp.write_paused:
                        await resp.drain()
                    elif resp.client_gone:  # stop the generation nobody reads any more
                        raise ClientDisconnected("client connection closed")
        except ClientDisconnected:
            self._settle(decoder, dep)
            raise
        finally:
            up.release()

    def _interrupted(self, dep: DeploymentState, failure: str) -> None:
        metrics = self.api.metrics
        if dep.failed(self.group.breaker) and metrics is not None:
            metrics.breaker_opened(dep.label)
        if metrics is not None:
            metrics.error(self.group.name, dep.label, "stream_interrupted")
        log.warning("stream interrupted: %s", failure)

    async def _continuation(
        self, failed: DeploymentState
    ) -> tuple[Response, Any, list[dict[str, Any]], DeploymentState] | None:
        """A deployment that carries on the answer the client already holds part of, by
        continuing a prefilled assistant turn, when the group allows it (``continue_streams``)
        and the answer so far is plain text. Only kinds whose API continues a trailing
        assistant message are asked (Anthropic). None when there is none to ask."""
        if not self.group.config.continue_streams or self.sent_tools or not self.sent_text:
            return None
        partial = "".join(self.sent_text).rstrip()  # Anthropic refuses trailing whitespace
        if not partial:
            return None
        body = dict(self.body)
        body["messages"] = [*self.body["messages"], {"role": "assistant", "content": partial}]
        outcome = self.outcome
        for group in self.plan.groups():
            for dep in group.order():
                if dep is failed or dep.provider.kind not in _CONTINUES or dep.wait() > 0:
                    continue
                index, key = dep.provider.keys.pick()
                if index == -2:
                    continue
                outcome.attempts += 1
                outcome.tried.append(dep.label)
                dep.begin()
                try:
                    (up, decoder, pending), _ = await self._attempt(
                        dep, key, self.group.timeouts.first_token, body
                    )
                except ProviderError as exc:
                    dep.end()
                    self.plan._failed(dep, group, exc, index)
                    continue
                except BaseException:
                    dep.end()
                    raise
                self.current.end()  # the broken one
                self.current = dep
                outcome.deployment = dep
                outcome.continued = True
                # the continuation's own opening (its role chunk) is not news to the client
                pending = [c for c in pending if _has_content(c)]
                return up, decoder, pending, dep
        return None

    def _settle(self, decoder: Any, dep: DeploymentState) -> dict[str, int]:
        """Tokens of this answer: the provider's usage, else counted here."""
        outcome = self.outcome
        usage = decoder.usage
        if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            outcome.usage_source = "provider"
        else:
            prompt = tokens.count_chat_prompt(self.body)
            completion = tokens.count_completion(decoder.text_out())
            outcome.usage_source = "counted"
        self.api._account(outcome, dep, prompt, completion)
        prompt, completion = outcome.prompt_tokens, outcome.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _encode(self, chunk: dict[str, Any]) -> bytes:
        if self.track:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    self.sent_text.append(delta["content"])
                if delta.get("tool_calls"):
                    self.sent_tools = True
        writer = self.writer
        if writer is not None:
            return writer.chunk(chunk)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _error_event(self, message: str) -> bytes:
        writer = self.writer
        if writer is not None:
            return writer.error("api_error", message)
        return (
            b"data: "
            + orjson.dumps(
                {
                    "error": {
                        "message": message,
                        "type": "server_error",
                        "param": None,
                        "code": "stream_interrupted",
                    }
                }
            )
            + b"\n\n"
        )

    @staticmethod
    def _last_id(pending: list[dict[str, Any]]) -> str:
        for c in pending:
            if isinstance(c.get("id"), str):
                return str(c["id"])
        return "chatcmpl-piuptime"

    @staticmethod
    def _last_model(pending: list[dict[str, Any]], dep: DeploymentState) -> str:
        for c in pending:
            if isinstance(c.get("model"), str):
                return str(c["model"])
        return dep.config.model


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason") is not None:
            return True
        delta = choice.get("delta")
        if delta and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")):
            return True
    return False
