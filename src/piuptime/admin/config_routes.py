"""The config store's admin endpoints: create, read, update and delete routes, upstreams,
consumers and global plugins; a route's plugins; export, import and the change history.

Served under ``/api/v1/config/...`` (``create_app`` includes the router through
``App.admin_routers()``, behind the admin token). ``/api/v1/routes`` and ``/api/v1/upstreams``
stay what they are: the *live status* of what runs; ``/api/v1/config/...`` is the *document*
that configures it (see docs/config-store.md).

Every answer carries the document's version (in the body and as ``ETag: "<version>"``). A change
may name the version it is based on (``If-Match: "7"`` or ``?expected_version=7``): if the
document moved on, 409 and nothing changes. A change is validated as a whole document exactly
like the file (422 with every problem, nothing changes), written in one transaction, applied here
with the reload's atomic swap and announced to every other gateway. With the YAML file as the
source every change is 409: edit the file and reload.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, some of
# which are built in the enclosing function (the body's description per section).

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from piuptime.configstore import (
    ConfigService,
    EntityExists,
    EntityNotFound,
    InvalidChange,
    ReadOnlySource,
    StoreUnavailable,
    VersionConflict,
)
from piuptime.configstore.apply import (
    create_entity,
    delete_entity,
    export_text,
    get_entity,
    items,
    put_entity,
)
from piuptime.configstore.base import EntityDocument, Issue

from . import models as m
from .api import AdminError, audit, context, require_token
from .audit import Actor
from .redact import redact

__all__ = ["config_router"]

T = TypeVar("T")

Section = Literal["routes", "upstreams", "consumers", "plugins"]
_SINGULAR = {
    "routes": "route",
    "upstreams": "upstream",
    "consumers": "consumer",
    "plugins": "plugin",
}
_TAG = "config store"
_MAX_NAME = 200

# -- bodies ------------------------------------------------------------------------------------


class NamedConfig(BaseModel):
    name: str
    config: Any = Field(description="the entity as written in the YAML file (without its name)")


class EntityAnswer(BaseModel):
    version: int = Field(description="the document's version after (or at) this answer")
    name: str
    config: Any


class EntityListAnswer(BaseModel):
    version: int
    items: list[NamedConfig]


class Deleted(BaseModel):
    version: int
    name: str


class NewEntity(BaseModel):
    """``POST`` body: a name and the entity's config (as in the YAML file)."""

    name: str = Field(min_length=1, max_length=_MAX_NAME)
    config: dict[str, Any]


class RoutePluginAnswer(BaseModel):
    version: int
    route: str
    plugin: str
    config: Any


class ImportAnswer(BaseModel):
    version: int
    added: dict[str, list[str]]
    removed: dict[str, list[str]]
    changed: dict[str, list[str]]
    ignored_sections: list[str] = Field(
        description="top-level sections of the document that come from the bootstrap file"
    )


class HistoryItem(BaseModel):
    version: int
    time: float = Field(description="unix seconds")
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class HistoryAnswer(BaseModel):
    source: str
    version: int
    entries: list[HistoryItem]


class IssueModel(BaseModel):
    path: str = Field(description="where in the document, like routes[2].match.path")
    line: int = Field(description="line in the YAML rendering of the document (0: unknown)")
    column: int
    message: str


class RejectedDetail(m.ErrorDetail):
    issues: list[IssueModel] = Field(default_factory=list)


class RejectedBody(BaseModel):
    """422 for a change: the document would not validate; nothing changed."""

    error: RejectedDetail


# -- helpers -----------------------------------------------------------------------------------

_ERR: dict[str, Any] = {"model": m.ErrorBody}
_READ: dict[int | str, dict[str, Any]] = {
    503: {**_ERR, "description": "the config database cannot be reached"},
}
_ONE: dict[int | str, dict[str, Any]] = {**_READ, 404: {**_ERR, "description": "no such name"}}
_WRITE: dict[int | str, dict[str, Any]] = {
    **_READ,
    409: {
        **_ERR,
        "description": "the config source is the YAML file, or the version moved on "
        "(If-Match / expected_version), or the name exists (POST)",
    },
    422: {"model": RejectedBody, "description": "the document would not validate; unchanged"},
}
_WRITE_ONE: dict[int | str, dict[str, Any]] = {**_WRITE, 404: _ONE[404]}

Who = Annotated[Actor, Depends(require_token)]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        max_length=100,
        description='the version the change is based on: "7" (as the ETag gave it)',
    ),
]
Expected = Annotated[
    int | None,
    Query(ge=0, le=2**62, description="the version the change is based on (as If-Match)"),
]


def _service(request: Request) -> ConfigService:
    service = getattr(context(request).source, "config_service", None)
    if not isinstance(service, ConfigService):
        raise AdminError(503, "no_config_store", "this gateway has no config store")
    return service


Service = Annotated[ConfigService, Depends(_service)]


def _expected(if_match: str | None, expected: int | None) -> int | None:
    version = None
    if if_match is not None:
        text = if_match.strip().removeprefix("W/").strip().strip('"')
        if text != "*":
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                raise AdminError(
                    422,
                    "invalid_if_match",
                    f'If-Match must be a version like "7", got {if_match!r}',
                )
            version = int(text)
    if expected is not None:
        if version is not None and version != expected:
            raise AdminError(
                422,
                "invalid_request",
                f"If-Match ({version}) and expected_version ({expected}) differ",
            )
        version = expected
    return version


def _answer(model: BaseModel, version: int, status: int = 200) -> Response:
    return Response(
        model.model_dump_json(),
        status,
        headers={"etag": f'"{version}"', "cache-control": "no-store"},
        media_type="application/json",
    )


def _rejected(issues: list[Issue]) -> Response:
    count = len(issues)
    message = (
        f"the change would make the configuration invalid ({count} "
        f"problem{'s' if count != 1 else ''}); nothing changed"
    )
    body = {
        "error": {
            "status": 422,
            "code": "invalid_config",
            "message": message,
            "errors": [str(i) for i in issues],
            "issues": [i.as_dict() for i in issues],
        }
    }
    return Response(orjson.dumps(body), 422, media_type="application/json")


def _hidden(value: Any, request: Request, where: tuple[str, ...]) -> Any:
    return redact(value, context(request).env_names, path=where)


async def _read(service: ConfigService) -> tuple[int, EntityDocument]:
    try:
        snapshot = await service.snapshot()
    except StoreUnavailable as exc:
        raise AdminError(503, "config_store_unavailable", str(exc)) from None
    return snapshot.version, snapshot.document


async def _change(
    request: Request,
    service: ConfigService,
    who: Actor,
    mutate: Callable[[EntityDocument], T],
    *,
    action: str,
    target: str,
    expected: int | None,
    audit_detail: Callable[[T], dict[str, Any]],
) -> tuple[int, T] | Response:
    """Run one change; errors become answers (and refused changes are audited)."""
    try:
        version, result = await service.change(
            mutate, actor=str(who), action=action, target=target, expected_version=expected
        )
    except InvalidChange as exc:
        await audit(request, action, target, {"errors": [str(i) for i in exc.issues]}, "invalid")
        return _rejected(exc.issues)
    except ReadOnlySource as exc:
        raise AdminError(409, "config_is_file", str(exc)) from None
    except VersionConflict as exc:
        await audit(
            request, action, target, {"expected": exc.expected, "current": exc.current}, "conflict"
        )
        raise AdminError(
            409, "version_conflict", str(exc), headers={"etag": f'"{exc.current}"'}
        ) from None
    except EntityExists as exc:
        raise AdminError(409, "already_exists", str(exc)) from None
    except EntityNotFound as exc:
        raise AdminError(404, "not_found", str(exc)) from None
    except StoreUnavailable as exc:
        await audit(request, action, target, {"error": str(exc)}, "unavailable")
        raise AdminError(503, "config_store_unavailable", str(exc)) from None
    await audit(request, action, target, {"version": version, **audit_detail(result)})
    return version, result


# -- the router --------------------------------------------------------------------------------


def config_router() -> APIRouter:
    router = APIRouter(prefix="/config", tags=[_TAG])
    for section in ("routes", "upstreams", "consumers", "plugins"):
        _entity_endpoints(router, section)
    _route_plugin_endpoints(router)
    _document_endpoints(router)
    return router


def _entity_endpoints(router: APIRouter, section: Section) -> None:
    one = _SINGULAR[section]
    what = "global plugin" if section == "plugins" else one
    body_doc = (
        "the plugin's config (as under plugins: in the file)"
        if section == "plugins"
        else f"the {what} as written in the file, without its name"
    )

    def detail_of(request: Request, name: str) -> Callable[[tuple[Any, Any]], dict[str, Any]]:
        def detail(result: tuple[Any, Any]) -> dict[str, Any]:
            before, after = result
            where = (section, name)
            return {
                "before": _hidden(before, request, where),
                "after": _hidden(after, request, where),
            }

        return detail

    async def list_all(service: Service) -> Response:
        version, document = await _read(service)
        listed = [NamedConfig(name=n, config=c) for n, c in items(document, section)]
        return _answer(EntityListAnswer(version=version, items=listed), version)

    async def get_one(service: Service, name: str) -> Response:
        version, document = await _read(service)
        try:
            config = get_entity(document, section, name)
        except EntityNotFound as exc:
            raise AdminError(404, "not_found", str(exc)) from None
        return _answer(EntityAnswer(version=version, name=name, config=config), version)

    async def create(
        request: Request,
        service: Service,
        who: Who,
        body: NewEntity,
        if_match: IfMatch = None,
        expected_version: Expected = None,
    ) -> Response:
        expected = _expected(if_match, expected_version)
        name = body.name

        def mutate(document: EntityDocument) -> tuple[Any, Any]:
            create_entity(document, section, name, body.config)
            return None, body.config

        done = await _change(
            request,
            service,
            who,
            mutate,
            action=f"{one}.create",
            target=f"{section}/{name}",
            expected=expected,
            audit_detail=detail_of(request, name),
        )
        if isinstance(done, Response):
            return done
        version = done[0]
        return _answer(EntityAnswer(version=version, name=name, config=body.config), version, 201)

    async def put(
        request: Request,
        service: Service,
        who: Who,
        name: str,
        body: Annotated[dict[str, Any], Body(description=body_doc)],
        if_match: IfMatch = None,
        expected_version: Expected = None,
    ) -> Response:
        expected = _expected(if_match, expected_version)
        if section == "routes" and "name" in body and str(body["name"]) != name:
            raise AdminError(
                422,
                "name_mismatch",
                f"the body names the route {body['name']!r} but the path {name!r}; "
                "leave name out of the body (renaming is a DELETE and a POST)",
            )
        created = False

        def mutate(document: EntityDocument) -> tuple[Any, Any]:
            nonlocal created
            try:
                before = get_entity(document, section, name)
            except EntityNotFound:
                before = None
            created = put_entity(document, section, name, body)
            return before, get_entity(document, section, name)

        done = await _change(
            request,
            service,
            who,
            mutate,
            action=f"{one}.update",
            target=f"{section}/{name}",
            expected=expected,
            audit_detail=detail_of(request, name),
        )
        if isinstance(done, Response):
            return done
        version, (_, after) = done
        answer = EntityAnswer(version=version, name=name, config=after)
        return _answer(answer, version, 201 if created else 200)

    async def delete(
        request: Request,
        service: Service,
        who: Who,
        name: str,
        if_match: IfMatch = None,
        expected_version: Expected = None,
    ) -> Response:
        expected = _expected(if_match, expected_version)

        def mutate(document: EntityDocument) -> tuple[Any, Any]:
            return delete_entity(document, section, name), None

        done = await _change(
            request,
            service,
            who,
            mutate,
            action=f"{one}.delete",
            target=f"{section}/{name}",
            expected=expected,
            audit_detail=detail_of(request, name),
        )
        if isinstance(done, Response):
            return done
        return _answer(Deleted(version=done[0], name=name), done[0])

    base = f"/{section}"
    router.add_api_route(
        base,
        list_all,
        methods=["GET"],
        response_model=EntityListAnswer,
        summary=f"Every {what} in the config document",
        responses=_READ,
    )
    router.add_api_route(
        base,
        create,
        methods=["POST"],
        status_code=201,
        response_model=EntityAnswer,
        summary=f"Create a {what} (409 if the name exists)",
        responses=_WRITE,
    )
    router.add_api_route(
        base + "/{name}",
        get_one,
        methods=["GET"],
        response_model=EntityAnswer,
        summary=f"One {what}",
        responses=_ONE,
    )
    router.add_api_route(
        base + "/{name}",
        put,
        methods=["PUT"],
        response_model=EntityAnswer,
        summary=f"Create or replace a {what} (201 when created)",
        responses={**_WRITE, 201: {"model": EntityAnswer, "description": "created"}},
    )
    router.add_api_route(
        base + "/{name}",
        delete,
        methods=["DELETE"],
        response_model=Deleted,
        summary=f"Delete a {what}",
        responses=_WRITE_ONE,
    )


def _route_plugin_endpoints(router: APIRouter) -> None:
    base = "/routes/{name}/plugins/{plugin}"

    def plugins_of(document: EntityDocument, name: str) -> dict[str, Any]:
        route = get_entity(document, "routes", name)
        plugins = route.get("plugins")
        return plugins if isinstance(plugins, dict) else {}

    @router.get(
        base,
        response_model=RoutePluginAnswer,
        summary="One plugin of a route (false: a global plugin turned off here)",
        responses=_ONE,
    )
    async def get_route_plugin(service: Service, name: str, plugin: str) -> Response:
        version, document = await _read(service)
        try:
            plugins = plugins_of(document, name)
        except EntityNotFound as exc:
            raise AdminError(404, "not_found", str(exc)) from None
        if plugin not in plugins:
            raise AdminError(404, "not_found", f"route {name!r} has no plugin {plugin!r}")
        answer = RoutePluginAnswer(
            version=version, route=name, plugin=plugin, config=plugins[plugin]
        )
        return _answer(answer, version)

    @router.put(
        base,
        response_model=RoutePluginAnswer,
        summary="Set a route's plugin (false turns a global plugin off for the route)",
        responses=_WRITE_ONE,
    )
    async def put_route_plugin(
        request: Request,
        service: Service,
        who: Who,
        name: str,
        plugin: str,
        body: Annotated[dict[str, Any] | bool, Body(description="the plugin's config")],
        if_match: IfMatch = None,
        expected_version: Expected = None,
    ) -> Response:
        expected = _expected(if_match, expected_version)

        def mutate(document: EntityDocument) -> tuple[Any, Any]:
            route = dict(get_entity(document, "routes", name))
            plugins = dict(plugins_of(document, name))
            before = plugins.get(plugin)
            plugins[plugin] = body
            route["plugins"] = plugins
            put_entity(document, "routes", name, route)
            return before, body

        done = await _change(
            request,
            service,
            who,
            mutate,
            action="route.update",
            target=f"routes/{name}/plugins/{plugin}",
            expected=expected,
            audit_detail=lambda r: {
                "before": _hidden(r[0], request, ("routes", name, "plugins", plugin)),
                "after": _hidden(r[1], request, ("routes", name, "plugins", plugin)),
            },
        )
        if isinstance(done, Response):
            return done
        answer = RoutePluginAnswer(version=done[0], route=name, plugin=plugin, config=body)
        return _answer(answer, done[0])

    @router.delete(
        base,
        response_model=Deleted,
        summary="Remove a plugin from a route",
        responses=_WRITE_ONE,
    )
    async def delete_route_plugin(
        request: Request,
        service: Service,
        who: Who,
        name: str,
        plugin: str,
        if_match: IfMatch = None,
        expected_version: Expected = None,
    ) -> Response:
        expected = _expected(if_match, expected_version)

        def mutate(document: EntityDocument) -> tuple[Any, Any]:
            route = dict(get_entity(document, "routes", name))
            plugins = dict(plugins_of(document, name))
            if plugin not in plugins:
                raise EntityNotFound("route plugins", plugin)
            before = plugins.pop(plugin)
            route["plugins"] = plugins
            put_entity(document, "routes", name, route)
            return before, None

        done = await _change(
            request,
            service,
            who,
            mutate,
            action="route.update",
            target=f"routes/{name}/plugins/{plugin}",
            expected=expected,
            audit_detail=lambda r: {
                "before": _hidden(r[0], request, ("routes", name, "plugins", plugin)),
                "after": None,
            },
        )
        if isinstance(done, Response):
            return done
        return _answer(Deleted(version=done[0], name=plugin), done[0])


def _document_endpoints(router: APIRouter) -> None:
    @router.get(
        "/export",
        response_class=Response,
        summary="The whole config document as YAML (secrets redacted unless secrets=keep)",
        responses={
            200: {
                "description": "the document (a YAML mapping)",
                "content": {"application/yaml": {"schema": {"type": "object"}}},
            },
            **_READ,
        },
    )
    async def export(
        request: Request,
        service: Service,
        secrets: Annotated[
            Literal["redact", "keep"],
            Query(description="redact (default) or keep credentials; ${VAR} references stay"),
        ] = "redact",
    ) -> Response:
        try:
            version, document = await service.export()
        except StoreUnavailable as exc:
            raise AdminError(503, "config_store_unavailable", str(exc)) from None
        if secrets == "redact":
            document = redact(document, context(request).env_names)
        else:
            await audit(request, "config.export", "config", {"version": version, "secrets": True})
        text = export_text(version, document, service.store.describe())
        return Response(
            text,
            headers={"etag": f'"{version}"', "cache-control": "no-store"},
            media_type="application/yaml",
        )

    @router.post(
        "/import",
        response_model=ImportAnswer,
        summary="Replace the stored routes, upstreams, consumers and plugins with a YAML "
        "document's (one version; other sections are ignored)",
        responses=_WRITE,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/yaml": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            }
        },
    )
    async def import_(
        request: Request,
        service: Service,
        who: Who,
        if_match: IfMatch = None,
        expected_version: Expected = None,
    ) -> Response:
        expected = _expected(if_match, expected_version)
        raw = await request.body()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return _rejected([Issue("", "the body is not UTF-8 text")])
        try:
            result = await service.import_document(text, actor=str(who), expected_version=expected)
        except InvalidChange as exc:
            await audit(
                request,
                "config.import",
                "config",
                {"errors": [str(i) for i in exc.issues]},
                "invalid",
            )
            return _rejected(exc.issues)
        except ReadOnlySource as exc:
            raise AdminError(409, "config_is_file", str(exc)) from None
        except VersionConflict as exc:
            await audit(
                request,
                "config.import",
                "config",
                {"expected": exc.expected, "current": exc.current},
                "conflict",
            )
            raise AdminError(
                409, "version_conflict", str(exc), headers={"etag": f'"{exc.current}"'}
            ) from None
        except StoreUnavailable as exc:
            raise AdminError(503, "config_store_unavailable", str(exc)) from None
        answer = ImportAnswer(
            version=result.version,
            added=result.added,
            removed=result.removed,
            changed=result.changed,
            ignored_sections=result.ignored_sections,
        )
        await audit(request, "config.import", "config", answer.model_dump())
        return _answer(answer, result.version)

    @router.get(
        "/history",
        response_model=HistoryAnswer,
        summary="The latest versions of the config document: who changed what, newest first",
        responses=_READ,
    )
    async def history(
        service: Service, limit: Annotated[int, Query(ge=1, le=1000)] = 50
    ) -> Response:
        try:
            entries = await service.history(limit)
        except StoreUnavailable as exc:
            raise AdminError(503, "config_store_unavailable", str(exc)) from None
        answer = HistoryAnswer(
            source=service.kind,
            version=service.version,
            entries=[HistoryItem(**e.as_dict()) for e in entries],
        )
        return _answer(answer, service.version)
