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

The walk is ``plan.Plan``, a streamed answer ``stream.Stream``, one exchange with a provider
``exchange``; this module reads requests, dispatches them and writes whole answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from piuptime.http1.errors import BodyTooLarge, ClientDisconnected
from piuptime.llm import anthropic_api, tokens
from piuptime.llm.accounting import tokens_of
from piuptime.llm.errors import ApiError, openai_error_body
from piuptime.llm.exchange import MAX_ANSWER, parsed, read_all, send, translated
from piuptime.llm.groups import DeploymentState, Group, ProviderRuntime
from piuptime.llm.plan import Outcome, Plan
from piuptime.llm.providers.base import WireRequest
from piuptime.llm.stream import Stream

if TYPE_CHECKING:
    from piuptime.gateway.plugins import Ctx
    from piuptime.gateway.runtime import LogFn
    from piuptime.http1.server import Request, Responder
    from piuptime.llm.metrics import LlmMetrics

log = logging.getLogger("piuptime.llm")


_JSON = b"application/json"
_perf = time.perf_counter


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
        outcome: Outcome | None = None
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
            outcome = Outcome(group.name)
            stream = body.get("stream") is True
            if stream:
                await Stream(self, req, resp, ctx, body, group, outcome, front, size // 4).run()
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
        self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn, outcome: Outcome | None
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
        outcome: Outcome,
        front: str,
        estimate: int,
    ) -> None:
        """A non-streamed chat completion: the first deployment that answers, whole."""

        async def attempt(dep: DeploymentState, key: str | None, budget: float) -> Any:
            adapter = dep.provider.adapter
            wire = translated(adapter.chat_request, dep, body, dep.deployment, False, key)
            data = await self._exchange(dep, wire, min(budget, group_timeouts.first_byte), outcome)
            t_first = _perf()
            result = parsed(adapter.chat_response, dep, data, dep.deployment)
            return result, t_first

        group_timeouts = group.timeouts
        start = req.start_time
        result, t_first, dep = await Plan(self, group, outcome, estimate, start).run(attempt)
        outcome.ttft = t_first - start
        prompt, completion, outcome.usage_source = tokens_of(
            result.get("usage"), body, lambda: _response_text(result)
        )
        if outcome.usage_source == "counted":
            result["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        self.account(outcome, dep, prompt, completion)
        if front == "anthropic":
            payload = orjson.dumps(anthropic_api.chat_to_message(result))
        else:
            payload = orjson.dumps(result)
        overhead = (_perf() - start) - outcome.upstream_time
        self._send_json(resp, ctx, 200, payload, self.answer_headers(outcome, overhead))

    def account(self, outcome: Outcome, dep: DeploymentState, prompt: int, completion: int) -> None:
        # added up: a stream continued on another deployment was billed by both
        outcome.prompt_tokens += prompt
        outcome.completion_tokens += completion
        outcome.deployment = dep
        dep.tokens_used(prompt + completion)
        prices = self.prices
        if prices is not None:
            cost = prices.cost(
                dep.config.provider, dep.config.model, dep.config.price, prompt, completion
            )
            if cost is not None:
                outcome.cost = cost if outcome.cost is None else round(outcome.cost + cost, 9)

    @staticmethod
    def answer_headers(outcome: Outcome, overhead: float) -> list[tuple[bytes, bytes]]:
        dep = outcome.deployment
        headers = [(b"x-piuptime-overhead-ms", b"%.3f" % (max(0.0, overhead) * 1000))]
        if dep is not None:
            headers.append((b"x-piuptime-deployment", dep.label.encode()))
        headers.append((b"x-piuptime-attempts", b"%d" % outcome.attempts))
        return headers

    async def _exchange(
        self, dep: DeploymentState, wire: WireRequest, first_byte: float, outcome: Outcome
    ) -> bytes:
        """Send and read the whole answer, head and body, within ``first_byte`` (a
        non-streamed answer arrives whole, so this bounds the generation). A non-2xx answer
        raises its ProviderError."""
        t0 = _perf()
        try:
            up = await send(dep.provider, wire, first_byte)
            try:
                data = await read_all(up, MAX_ANSWER, max(first_byte - (_perf() - t0), 0.001))
            finally:
                up.release()
        finally:
            outcome.upstream_time += _perf() - t0
        if up.status >= 300:
            raise dep.provider.adapter.classify(up.status, up.headers, data)
        return data

    # -- embeddings ------------------------------------------------------------------------

    async def _embeddings(self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn) -> None:
        outcome: Outcome | None = None
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
            outcome = Outcome(group.name)

            async def attempt(dep: DeploymentState, key: str | None, budget: float) -> Any:
                adapter = dep.provider.adapter
                wire = translated(adapter.embeddings_request, dep, body, dep.deployment, key)
                assert outcome is not None
                data = await self._exchange(
                    dep, wire, min(budget, group.timeouts.first_byte), outcome
                )
                return parsed(adapter.embeddings_response, dep, data, dep.deployment), _perf()

            start = req.start_time
            result, _, dep = await Plan(self, group, outcome, size // 4, start).run(attempt)
            usage = result.get("usage")
            prompt = int(usage.get("prompt_tokens") or 0) if isinstance(usage, dict) else 0
            if not prompt:
                prompt = tokens.count_embedding_input(body["input"])
                result["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
                outcome.usage_source = "counted"
            else:
                outcome.usage_source = "provider"
            self.account(outcome, dep, prompt, 0)
            overhead = (_perf() - start) - outcome.upstream_time
            self._send_json(
                resp, ctx, 200, orjson.dumps(result), self.answer_headers(outcome, overhead)
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
