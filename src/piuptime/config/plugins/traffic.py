"""Schemas of the traffic plugins: fault injection (traffic split and mirroring join here)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..types import Int, Percent, PositiveDuration, _model


class FaultAbort(BaseModel):
    model_config = _model()

    status: Int = Field(default=503, ge=200, le=599)
    percent: Percent = 0.0


class FaultDelay(BaseModel):
    model_config = _model()

    duration: PositiveDuration = 1.0
    percent: Percent = 0.0


class FaultInjection(BaseModel):
    """For drills: answer ``abort.status`` to ``abort.percent`` of requests, hold
    ``delay.percent`` of them for ``delay.duration`` before they go upstream."""

    model_config = _model()

    abort: FaultAbort | None = None
    delay: FaultDelay | None = None
