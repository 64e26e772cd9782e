"""Google's Gemini API: ``models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``
and ``:batchEmbedContents``, the key in ``x-goog-api-key``.

Canonical → Gemini: system and developer messages become ``systemInstruction``; user and
assistant turns become ``contents`` (roles ``user``/``model``, consecutive turns of one role
merged, as Gemini wants parallel function responses in one turn); ``data:`` image URLs become
``inlineData``, http(s) ones ``fileData``; tools become ``functionDeclarations`` with their JSON
schemas cut down to the OpenAPI subset Gemini takes; assistant tool calls become
``functionCall`` parts and tool messages ``functionResponse`` parts (the function's name found
from the call they answer); sampling parameters go to ``generationConfig``.

Gemini 3 signs its function calls (``thoughtSignature``) and refuses a history that drops the
signature. The canonical shape has no place for it, so it travels inside the tool call id the
client echoes back: ``call_<24 hex>_ts_<signature, URL-safe base64 without padding>``.
"""

from __future__ import annotations

import mimetypes
import time
from typing import Any

import orjson

from piuptime.config.llm import LlmProvider

from ..sse import SSEReader
from .base import (
    AUTH,
    BAD_REQUEST,
    CONTENT_POLICY,
    CONTEXT_LENGTH,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL,
    RATE_LIMITED,
    SERVER,
    Deployment,
    Headers,
    ProviderError,
    WireRequest,
)
from .openai import (
    bad_request,
    base_path,
    body_excerpt,
    content_text,
    extra_headers,
    json_or_none,
    kind_by_status,
    new_id,
    retry_after,
    split_data_url,
    usage_of,
    with_key,
)

__all__ = ["GeminiAdapter", "GeminiStreamDecoder"]

_JSON = b"application/json"

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

# generationConfig fields from canonical request keys
_GENERATION = (
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("top_k", "topK"),
    ("seed", "seed"),
    ("n", "candidateCount"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
    ("max_tokens", "maxOutputTokens"),
    ("max_completion_tokens", "maxOutputTokens"),  # after max_tokens: the newer name wins
)
# top-level GenerateContentRequest fields a deployment's params (or the client) may set
_PASSTHROUGH = ("safetySettings", "cachedContent", "labels")

# the OpenAPI-subset Schema fields Gemini accepts; everything else is dropped
_SCHEMA_KEYS = frozenset(
    (
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    )
)
_SIGNATURE_MARK = "_ts_"
_ID_HEX = 24


_KEY_HEADER = b"x-goog-api-key"


class GeminiAdapter:
    kind = "gemini"
    supports_embeddings = True

    def __init__(self, cfg: LlmProvider) -> None:
        self.cfg = cfg
        base = base_path(cfg.url)
        # the default base URL is the bare host; one that names the version already is kept
        if not (base.endswith("/v1beta") or base.endswith("/v1")):
            base += "/v1beta"
        self._base = base
        extra = extra_headers(cfg)
        self._json_headers: Headers = [(b"content-type", _JSON), (b"accept", _JSON), *extra]
        self._sse_headers: Headers = [
            (b"content-type", _JSON),
            (b"accept", b"text/event-stream"),
            *extra,
        ]

    def _path(self, model: str, method: str) -> bytes:
        if model.startswith("models/"):
            model = model[7:]
        return f"{self._base}/models/{model}:{method}".encode()

    # chat

    def chat_request(
        self, body: dict[str, Any], deployment: Deployment, stream: bool, key: str | None
    ) -> WireRequest:
        params = deployment.params
        merged = {**params, **body} if params else body
        contents, system = _contents(merged.get("messages"))
        out: dict[str, Any] = {"contents": contents}
        if system:
            out["systemInstruction"] = {"parts": [{"text": t} for t in system]}
        tools = merged.get("tools")
        if isinstance(tools, list) and tools:
            out["tools"] = [{"functionDeclarations": [_declaration(t) for t in tools]}]
            config = _tool_config(merged.get("tool_choice"))
            if config is not None:
                out["toolConfig"] = config
        generation: dict[str, Any] = {}
        for source in (params.get("generationConfig"), body.get("generationConfig")):
            if isinstance(source, dict):
                generation.update(source)
        for canonical, native in _GENERATION:
            value = merged.get(canonical)
            if value is not None:
                generation[native] = value
        stop = merged.get("stop")
        if stop is not None:
            generation["stopSequences"] = [stop] if isinstance(stop, str) else stop
        fmt = merged.get("response_format")
        if isinstance(fmt, dict):
            if fmt.get("type") == "json_object":
                generation["responseMimeType"] = "application/json"
            elif fmt.get("type") == "json_schema":
                generation["responseMimeType"] = "application/json"
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if isinstance(schema, dict):
                    generation["responseSchema"] = gemini_schema(schema)
        if generation:
            out["generationConfig"] = generation
        for name in _PASSTHROUGH:
            if name in merged:
                out[name] = merged[name]
        if stream:
            path = self._path(deployment.model, "streamGenerateContent?alt=sse")
            headers = with_key(self._sse_headers, key, _KEY_HEADER, b"")
        else:
            path = self._path(deployment.model, "generateContent")
            headers = with_key(self._json_headers, key, _KEY_HEADER, b"")
        return WireRequest(b"POST", path, headers, orjson.dumps(out))

    def chat_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        obj = json_or_none(data)
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        if not isinstance(obj, dict):
            raise ProviderError(PROTOCOL, "Gemini's answer is not a JSON object", status=200)
        if "error" in obj:
            raise _error(obj, 200)
        candidates = obj.get("candidates")
        if not candidates:
            raise _blocked(obj)
        choices = []
        for i, cand in enumerate(candidates):
            if not isinstance(cand, dict):
                continue
            text, calls, _thought = _parts(cand)
            reason = cand.get("finishReason")
            finish = (
                "tool_calls"
                if calls
                else (_FINISH.get(reason, "stop") if isinstance(reason, str) else "stop")
            )
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if text or not calls else None,
                "refusal": None,
            }
            if calls:
                message["tool_calls"] = calls
            index = cand.get("index")
            choices.append(
                {
                    "index": index if isinstance(index, int) else i,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            )
        out: dict[str, Any] = {
            "id": _response_id(obj),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": obj.get("modelVersion") or deployment.model,
            "choices": choices,
        }
        usage = _usage(obj.get("usageMetadata"))
        if usage is not None:
            out["usage"] = usage
        return out

    def stream_decoder(self, deployment: Deployment) -> GeminiStreamDecoder:
        return GeminiStreamDecoder(deployment.model)

    # embeddings

    def embeddings_request(
        self, body: dict[str, Any], deployment: Deployment, key: str | None
    ) -> WireRequest:
        params = deployment.params
        merged = {**params, **body} if params else body
        text = merged.get("input")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise bad_request("Gemini embeds text only: 'input' is a string or a list of strings")
        model = deployment.model
        name = model if model.startswith("models/") else "models/" + model
        extra: dict[str, Any] = {}
        dimensions = merged.get("dimensions")
        if dimensions is not None:
            extra["outputDimensionality"] = dimensions
        for field in ("taskType", "title", "outputDimensionality"):
            if field in merged:
                extra[field] = merged[field]
        requests = [{"model": name, "content": {"parts": [{"text": t}]}, **extra} for t in texts]
        headers = with_key(self._json_headers, key, _KEY_HEADER, b"")
        return WireRequest(
            b"POST",
            self._path(model, "batchEmbedContents"),
            headers,
            orjson.dumps({"requests": requests}),
        )

    def embeddings_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        obj = json_or_none(data)
        if not isinstance(obj, dict):
            raise ProviderError(PROTOCOL, "Gemini's answer is not a JSON object", status=200)
        if "error" in obj:
            raise _error(obj, 200)
        vectors = obj.get("embeddings")
        if not isinstance(vectors, list):
            raise ProviderError(PROTOCOL, "Gemini's answer has no embeddings", status=200)
        return {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": v.get("values", []) if isinstance(v, dict) else [],
                }
                for i, v in enumerate(vectors)
            ],
            "model": deployment.model,
            # Gemini reports no token counts for embeddings: the handler counts them
        }

    # errors

    def classify(self, status: int, headers: Headers, body: bytes) -> ProviderError:
        obj = json_or_none(body)
        if isinstance(obj, list) and obj:
            obj = obj[0]  # the JSON-array framing of streamGenerateContent wraps errors too
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            err = _error(obj, status)
        else:
            err = ProviderError(kind_by_status(status), body_excerpt(body, status), status=status)
        if err.retry_after is None and err.kind in (RATE_LIMITED, OVERLOADED, SERVER):
            err.retry_after = retry_after(headers)
        return err


# --------------------------------------------------------------------------- errors


def _error(obj: dict[str, Any], status: int) -> ProviderError:
    """``{"error": {"code", "message", "status", "details": [...]}}`` (google.rpc.Status)."""
    err = obj.get("error")
    if not isinstance(err, dict):
        err = {"message": str(err)}
    message = err.get("message")
    message = message if isinstance(message, str) and message else f"Gemini error ({status})"
    rpc = err.get("status")
    rpc = rpc if isinstance(rpc, str) else None
    code = err.get("code")
    if status in (0, 200) and isinstance(code, int):
        status = code
    reasons: list[str] = []
    delay: float | None = None
    details = err.get("details")
    if isinstance(details, list):
        for detail in details:
            if not isinstance(detail, dict):
                continue
            reason = detail.get("reason")
            if isinstance(reason, str):
                reasons.append(reason)
            wait = detail.get("retryDelay")
            if isinstance(wait, str):
                delay = _seconds(wait)
    low = message.lower()
    if rpc == "RESOURCE_EXHAUSTED" or status == 429:
        kind = RATE_LIMITED
    elif rpc in ("PERMISSION_DENIED", "UNAUTHENTICATED") or status in (401, 403):
        kind = AUTH
    elif any(r.startswith("API_KEY_") for r in reasons) or "api key not valid" in low:
        kind = AUTH  # Gemini answers a bad key 400 INVALID_ARGUMENT, reason API_KEY_INVALID
    elif rpc == "NOT_FOUND" or status == 404:
        kind = NOT_FOUND
    elif (rpc == "INVALID_ARGUMENT" or status == 400) and _token_limit(low):
        kind = CONTEXT_LENGTH
    elif rpc == "UNAVAILABLE" and "overloaded" in low:
        kind = OVERLOADED
    elif rpc in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"):
        kind = BAD_REQUEST
    elif status in (0, 200):
        kind = SERVER
    else:
        kind = kind_by_status(status)
    if kind == CONTEXT_LENGTH:
        code_name: str | None = "context_length_exceeded"
    else:
        code_name = rpc.lower() if rpc else None
    return ProviderError(kind, message, status=status, retry_after=delay, code=code_name, type=rpc)


def _token_limit(low: str) -> bool:
    return ("token" in low and ("exceed" in low or "too long" in low or "limit" in low)) or (
        "context" in low and "exceed" in low
    )


def _seconds(text: str) -> float | None:
    """A protobuf Duration in JSON: ``"30s"``, ``"1.5s"``."""
    if not text.endswith("s"):
        return None
    try:
        value = float(text[:-1])
    except ValueError:
        return None
    return value if value >= 0 else None


def _blocked(obj: dict[str, Any]) -> ProviderError:
    """No candidates: the prompt was blocked (``promptFeedback.blockReason``)."""
    feedback = obj.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if isinstance(reason, str) and reason:
        message = feedback.get("blockReasonMessage") if isinstance(feedback, dict) else None
        text = f"Gemini blocked the prompt: {reason}"
        if isinstance(message, str) and message:
            text += f" ({message})"
        return ProviderError(CONTENT_POLICY, text, status=200, code="content_filter", type=reason)
    return ProviderError(PROTOCOL, "Gemini's answer has no candidates", status=200)


# --------------------------------------------------------------------------- request pieces


def gemini_schema(schema: Any, defs: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A JSON schema cut down to the OpenAPI subset Gemini's ``Schema`` takes: local ``$ref``s
    inlined, ``type: [T, "null"]`` → ``type: T, nullable: true``, ``const`` → ``enum``, every
    key it rejects (``additionalProperties``, ``$schema``, ``$defs``, ``strict``...) dropped."""
    if not isinstance(schema, dict):
        return schema
    if defs is None:
        defs = {}
        for key in ("$defs", "definitions"):
            found = schema.get(key)
            if isinstance(found, dict):
                defs.update(found)
    if depth > 32:
        return {"type": "object"}  # a recursive schema: Gemini has no references
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        if isinstance(target, dict):
            merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            return gemini_schema(merged, defs, depth + 1)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            if len(types) < len(value):
                out["nullable"] = True
            if types:
                out["type"] = types[0]
        elif key == "const":
            out["enum"] = [value]
        elif key in ("anyOf", "oneOf") and isinstance(value, list):
            options = [s for s in value if not (isinstance(s, dict) and s.get("type") == "null")]
            if len(options) < len(value):
                out["nullable"] = True
            if len(options) == 1:
                out.update(gemini_schema(options[0], defs, depth + 1))
            else:
                out["anyOf"] = [gemini_schema(s, defs, depth + 1) for s in options]
        elif key not in _SCHEMA_KEYS:
            continue
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: gemini_schema(s, defs, depth + 1) for name, s in value.items()}
        elif key == "items":
            out[key] = gemini_schema(value, defs, depth + 1)
        else:
            out[key] = value
    return out


def _declaration(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request("each tool must be {type: function, function: {name, ...}}")
    out: dict[str, Any] = {"name": fn["name"]}
    description = fn.get("description")
    if description:
        out["description"] = description
    parameters = fn.get("parameters")
    # Gemini refuses an OBJECT without properties: a function without arguments has none
    if isinstance(parameters, dict) and parameters.get("properties"):
        out["parameters"] = gemini_schema(parameters)
    return out


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice == "auto":
        return {"functionCallingConfig": {"mode": "AUTO"}}
    if choice == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}
    if choice == "required":
        return {"functionCallingConfig": {"mode": "ANY"}}
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str):
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    return None


def _media_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        return {"text": part.get("text") or ""}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request("an image_url part needs a url")
        inline = split_data_url(url)
        if inline is not None:
            return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
        if url.startswith("data:"):
            raise bad_request("an image data: URL must be base64")
        mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if isinstance(audio, dict) and isinstance(audio.get("data"), str):
            fmt = audio.get("format") or "wav"
            return {"inlineData": {"mimeType": f"audio/{fmt}", "data": audio["data"]}}
        raise bad_request("an input_audio part needs data and format")
    if kind == "file":
        file = part.get("file")
        data = file.get("file_data") if isinstance(file, dict) else None
        inline = split_data_url(data) if isinstance(data, str) else None
        if inline is None:
            raise bad_request("a file part needs file_data as a base64 data: URL")
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    raise bad_request(f"Gemini does not take {kind!r} content parts")


def _response_object(content: Any) -> dict[str, Any]:
    """A tool's result as the JSON object functionResponse.response must be."""
    text = content_text(content)
    if text[:1] == "{":
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(value, dict):
                return value
    return {"output": text}


def _contents(messages: Any) -> tuple[list[dict[str, Any]], list[str]]:
    if not isinstance(messages, list):
        raise bad_request("'messages' must be a list")
    contents: list[dict[str, Any]] = []
    system: list[str] = []
    names: dict[str, str] = {}  # tool call id → function name
    for msg in messages:
        if not isinstance(msg, dict):
            raise bad_request("each message must be an object")
        role = msg.get("role")
        content = msg.get("content")
        parts: list[dict[str, Any]]
        if role in ("system", "developer"):
            text = content_text(content)
            if text:
                system.append(text)
            continue
        if role == "user":
            gemini_role = "user"
            if isinstance(content, list):
                parts = [
                    _media_part(p) if isinstance(p, dict) else {"text": str(p)} for p in content
                ]
            else:
                parts = [{"text": content if isinstance(content, str) else ""}]
        elif role == "assistant":
            gemini_role = "model"
            text = content_text(content)
            parts = [{"text": text}] if text else []
            calls = msg.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    parts.append(_function_call(call, names))
            if not parts:
                continue  # an empty assistant turn: Gemini refuses a content without parts
        elif role == "tool":
            gemini_role = "user"
            tid = msg.get("tool_call_id")
            name = names.get(tid) if isinstance(tid, str) else None
            name = name or msg.get("name")
            if not isinstance(name, str) or not name:
                raise bad_request(f"tool message {tid!r} answers no earlier assistant tool call")
            parts = [{"functionResponse": {"name": name, "response": _response_object(content)}}]
        else:
            raise bad_request(f"unknown message role {role!r}")
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    return contents, system


def _function_call(call: Any, names: dict[str, str]) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request("an assistant tool call needs function.name")
    name = fn["name"]
    raw = fn.get("arguments")
    args: Any = {}
    if isinstance(raw, dict):
        args = raw
    elif isinstance(raw, str) and raw:
        try:
            args = orjson.loads(raw)
        except orjson.JSONDecodeError:
            args = {}
        if not isinstance(args, dict):
            args = {}
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    cid = call.get("id")
    if isinstance(cid, str):
        names[cid] = name
        signature = _signature_of(cid)
        if signature is not None:
            part["thoughtSignature"] = signature
    return part


def _call_id(signature: Any) -> str:
    cid = new_id("call_")
    if isinstance(signature, str) and signature:
        safe = signature.replace("+", "-").replace("/", "_").rstrip("=")
        cid += _SIGNATURE_MARK + safe
    return cid


def _signature_of(cid: str) -> str | None:
    start = 5 + _ID_HEX
    if not cid.startswith("call_") or cid[start : start + 4] != _SIGNATURE_MARK:
        return None
    safe = cid[start + 4 :]
    if not safe:
        return None
    std = safe.replace("-", "+").replace("_", "/")
    return std + "=" * (-len(std) % 4)


# --------------------------------------------------------------------------- response pieces


def _parts(cand: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str]:
    """A candidate's answer text, its function calls (canonical) and its thought text."""
    content = cand.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return "", [], ""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        text = part.get("text")
        if isinstance(text, str):
            (thoughts if part.get("thought") else texts).append(text)
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            fid = fc.get("id")
            signature = part.get("thoughtSignature")
            cid = fid if isinstance(fid, str) and fid and not signature else _call_id(signature)
            calls.append(
                {
                    "id": cid,
                    "type": "function",
                    "function": {
                        "name": fc.get("name") or "",
                        "arguments": orjson.dumps(fc.get("args") or {}).decode(),
                    },
                }
            )
    return "".join(texts), calls, "".join(thoughts)


def _usage(meta: Any) -> dict[str, int] | None:
    if not isinstance(meta, dict):
        return None
    prompt = meta.get("promptTokenCount")
    out = meta.get("candidatesTokenCount")
    thoughts = meta.get("thoughtsTokenCount")
    completion = (out if isinstance(out, int) else 0) + (
        thoughts if isinstance(thoughts, int) else 0
    )
    return usage_of(prompt, completion, meta.get("totalTokenCount"))


def _response_id(obj: dict[str, Any]) -> str:
    rid = obj.get("responseId")
    return "chatcmpl-" + rid if isinstance(rid, str) and rid else new_id("chatcmpl-")


class GeminiStreamDecoder:
    """``data: {GenerateContentResponse}`` events (no ``[DONE]``): each carries a piece of the
    candidates' parts; the one with a ``finishReason`` is the last (``done``); usage metadata
    comes with every event, the last one counts."""

    __slots__ = (
        "_created",
        "_id",
        "_model",
        "_reader",
        "_role_sent",
        "_text",
        "_tools",
        "done",
        "finish_reason",
        "malformed",
        "usage",
    )

    def __init__(self, model: str) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.malformed = 0
        self._model = model
        self._reader = SSEReader()
        self._text: list[str] = []
        self._id: str | None = None
        self._created = int(time.time())
        self._role_sent: set[int] = set()
        self._tools: dict[int, int] = {}  # candidate index → tool calls so far

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._events(self._reader.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._events(self._reader.close())

    def text_out(self) -> str:
        return "".join(self._text)

    def _events(self, events: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _event, payload in events:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.malformed += 1
                continue
            if not isinstance(obj, dict):
                self.malformed += 1
                continue
            if "error" in obj:
                raise _error(obj, 0)
            usage = _usage(obj.get("usageMetadata"))
            if usage is not None:
                self.usage = usage
            candidates = obj.get("candidates")
            if not candidates:
                feedback = obj.get("promptFeedback")
                if isinstance(feedback, dict) and feedback.get("blockReason"):
                    raise _blocked(obj)  # the prompt was refused
                continue
            if self._id is None:
                self._id = _response_id(obj)
            model = obj.get("modelVersion") or self._model
            choices = []
            for i, cand in enumerate(candidates):
                if not isinstance(cand, dict):
                    continue
                index = cand.get("index")
                index = index if isinstance(index, int) else i
                text, calls, thought = _parts(cand)
                delta: dict[str, Any] = {}
                if index not in self._role_sent:
                    self._role_sent.add(index)
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                    self._text.append(text)
                if thought:
                    self._text.append(thought)
                if calls:
                    first = self._tools.get(index, 0)
                    self._tools[index] = first + len(calls)
                    delta["tool_calls"] = [
                        {"index": first + n, **call} for n, call in enumerate(calls)
                    ]
                    for call in calls:
                        self._text.append(call["function"]["name"])
                        self._text.append(call["function"]["arguments"])
                finish = None
                reason = cand.get("finishReason")
                if isinstance(reason, str) and reason:
                    calls_seen = self._tools.get(index)
                    finish = "tool_calls" if calls_seen else _FINISH.get(reason, "stop")
                    self.finish_reason = finish
                    self.done = True
                elif not delta:
                    continue
                choices.append(
                    {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
                )
            if choices:
                out.append(
                    {
                        "id": self._id,
                        "object": "chat.completion.chunk",
                        "created": self._created,
                        "model": model,
                        "choices": choices,
                    }
                )
        return out
