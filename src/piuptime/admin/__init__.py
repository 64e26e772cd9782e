"""The admin listener: live state for operators (``GET /status``, ``GET /healthz``).

A deliberately small handler on piuptime's own HTTP/1.1 server; the FastAPI admin API of issue 5
replaces it. ``piuptime status`` (:mod:`piuptime.admin.client`) reads ``/status``.
"""

from .server import AdminServer, StatusSource, status_document

__all__ = ["AdminServer", "StatusSource", "status_document"]
