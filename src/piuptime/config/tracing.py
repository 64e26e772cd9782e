"""Schema of the ``tracing:`` section: sampling of new traces and the OTLP/HTTP span export.

W3C trace context is propagated with or without this section; the section sets the share of
new traces marked sampled and, with ``otlp_endpoint``, exports the spans of sampled requests
(which needs the optional extra: ``pip install 'piuptime[otel]'``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from .types import Int, Percent, PositiveDuration, SchemaValueError, _is_hostname, _model, _Section

__all__ = ["INSTALL_HINT", "TracingBatch", "TracingConfig", "otel_import_error", "traces_url"]

INSTALL_HINT = "exporting spans needs the OpenTelemetry SDK: pip install 'piuptime[otel]'"

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")


def otel_import_error() -> str | None:
    """None when the OpenTelemetry SDK and its OTLP/HTTP exporter import, else why not."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: ``endpoint`` as given when its path already ends with
    ``/v1/traces``, otherwise ``/v1/traces`` appended to it (an OTLP base URL, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if path.endswith("/v1/traces"):
        return endpoint
    return parts._replace(path=path + "/v1/traces").geturl()


class TracingBatch(BaseModel):
    """How spans are batched for export (on a thread, never on the event loop)."""

    model_config = _model()

    schedule_delay: PositiveDuration = 5.0  # the longest a finished span waits to be sent
    max_queue: Int = Field(default=2048, ge=1)  # requests whose spans wait; more are dropped
    max_batch: Int = Field(default=512, ge=1)  # spans per export request


class TracingConfig(BaseModel):
    """``tracing:`` — sampling and, with ``otlp_endpoint``, span export over OTLP/HTTP."""

    model_config = _model()

    # share of NEW traces marked sampled; an incoming traceparent's sampled flag is followed
    sample: Percent = 0.1
    otlp_endpoint: str | None = None  # http(s)://collector:4318 (/v1/traces is appended)
    service_name: str = "piuptime"
    headers: Annotated[dict[str, str], _Section] = Field(default_factory=dict)
    timeout: PositiveDuration = 10.0  # one export request, its retries included
    compression: Literal["none", "gzip"] = "none"
    # extra resource attributes (deployment.environment, host.name, ...)
    resource: Annotated[dict[str, str], _Section] = Field(default_factory=dict)
    batch: Annotated[TracingBatch, _Section] = Field(default_factory=TracingBatch)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "expected an http:// or https:// URL of an OTLP/HTTP collector, like "
                f"http://127.0.0.1:4318, got {value!r}"
            )
        if not _is_hostname(parts.hostname):
            raise ValueError(f"not a host name or IP address: {parts.hostname!r} in {value!r}")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise ValueError(f"the port must be a number from 0 to 65535, got {value!r}") from None
        if parts.query or parts.fragment:
            raise ValueError(f"an OTLP endpoint has no query or fragment, got {value!r}")
        problem = otel_import_error()
        if problem is not None:
            raise ValueError(f"{INSTALL_HINT} ({problem})")
        return value.strip()

    @field_validator("service_name")
    @classmethod
    def _service_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (it names the gateway in traces)")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise SchemaValueError(
                    f"not a valid HTTP header name: {name!r}", (name,), on_key=True
                )
            if not _HEADER_VALUE.match(text):
                raise SchemaValueError(
                    f"header {name} has a control character (a line break?) in its value",
                    (name,),
                )
        return value

    @model_validator(mode="after")
    def _export_settings_need_an_endpoint(self) -> TracingConfig:
        if self.otlp_endpoint is None and self.headers:
            raise SchemaValueError(
                "headers are sent to the OTLP collector: set otlp_endpoint too", ("headers",)
            )
        return self
