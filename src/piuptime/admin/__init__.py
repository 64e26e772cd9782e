"""The admin listener: the FastAPI admin API (``/api/v1``), ``/status``, ``/metrics``,
``/healthz`` and ``/readyz`` on ``admin.listen`` (see docs/admin-api.md).

- :mod:`piuptime.admin.server`: :class:`AdminServer`, uvicorn on the gateway's event loop.
- :mod:`piuptime.admin.api`: ``create_app``, the ``require_token`` dependency, ``audit``.
- :mod:`piuptime.admin.audit`: the audit log (who changed what, when).
- :mod:`piuptime.admin.redact`: secrets out of a config.
- :mod:`piuptime.admin.client`: ``piuptime status`` (standard library only).

Nothing heavy is imported here: FastAPI and uvicorn load only when a gateway starts an admin
listener, so ``piuptime status`` and a gateway without an ``admin:`` section start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import AdminServer

__all__ = ["AdminServer"]


def __getattr__(name: str) -> Any:
    if name == "AdminServer":
        from .server import AdminServer

        return AdminServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
