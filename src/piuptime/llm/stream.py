"""One streamed chat completion: attempts until a first token, then the pump to the client,
and what happens when the stream breaks (docs/llm.md, "Failure semantics")."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from piuptime.http1.client import Response, UpstreamError
from piuptime.http1.errors import ClientDisconnected
from piuptime.llm import anthropic_api
from piuptime.llm.accounting import tokens_of
from piuptime.llm.exchange import MAX_ERROR_BODY, SHAPE_ERRORS, read_all, send, translated
from piuptime.llm.groups import DeploymentState, Group
from piuptime.llm.plan import Outcome, Plan
from piuptime.llm.providers.base import CONNECT, PROTOCOL, TIMEOUT, ProviderError
from piuptime.llm.sse import StreamTooLarge

if TYPE_CHECKING:
    from piuptime.gateway.plugins import Ctx
    from piuptime.http1.server import Request, Responder
    from piuptime.llm.handler import LlmApi

__all__ = ["Stream", "has_content"]

log = logging.getLogger("piuptime.llm")

_SSE_HEADERS = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
_DONE = b"data: [DONE]\n\n"
#: provider kinds whose API continues a trailing (prefilled) assistant message
_CONTINUES = frozenset(("anthropic",))
_perf = time.perf_counter


class Stream:
    """One streamed chat completion: attempts until a first token, then pumps to the client."""

    def __init__(
        self,
        api: LlmApi,
        req: Request,
        resp: Responder,
        ctx: Ctx | None,
        body: dict[str, Any],
        group: Group,
        outcome: Outcome,
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
        self.plan: Plan
        self.current: DeploymentState

    async def run(self) -> None:
        outcome = self.outcome
        start = self.req.start_time
        plan = Plan(self.api, self.group, outcome, self.estimate, start)
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
        wire = translated(
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
            up = await send(
                dep.provider, wire, min(timeouts.first_byte, budget, timeouts.first_token)
            )
        finally:
            outcome.upstream_time += _perf() - t0
        if up.status >= 300:
            t1 = _perf()
            try:
                data = await read_all(up, MAX_ERROR_BODY, timeouts.idle)
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
                except SHAPE_ERRORS as exc:
                    raise ProviderError(PROTOCOL, f"unreadable stream: {exc!r}") from None
                if chunks:
                    pending += chunks
                    if any(has_content(c) for c in chunks):
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
        headers = [*_SSE_HEADERS, *self.api.answer_headers(outcome, overhead)]
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
                except SHAPE_ERRORS as exc:
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
                pending = [c for c in pending if has_content(c)]
                return up, decoder, pending, dep
        return None

    def _settle(self, decoder: Any, dep: DeploymentState) -> dict[str, int]:
        """Tokens of this answer: the provider's usage, else counted here."""
        outcome = self.outcome
        prompt, completion, outcome.usage_source = tokens_of(
            decoder.usage, self.body, decoder.text_out
        )
        self.api.account(outcome, dep, prompt, completion)
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


def has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("finish_reason") is not None:
            return True
        delta = choice.get("delta")
        if delta and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")):
            return True
    return False
