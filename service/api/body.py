"""Reading request bodies with a size limit (413) and JSON errors that say what is wrong.

The routes read their bodies themselves (to refuse a large one before holding it
all), so FastAPI does not see them: each route declares its body for the OpenAPI
document with :func:`json_body_openapi` or :func:`raw_body_openapi`.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import HTTPException, Request, status
from pydantic import BaseModel, ValidationError

from core.spec import spec_error_from_validation
from service.errors import Invalid

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE, f"request body is larger than {limit} bytes"
    )


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    raw = await read_limited(request, limit)
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": ["body"], "msg": "the body must be a JSON object", "type": "type_error"}],
        )
    return value


async def read_model(request: Request, limit: int, model: type[ModelT]) -> ModelT:
    """The body as ``model``; a bad one is refused as a job spec is (413, 400, or a
    422 naming the field)."""
    body = await read_json_object(request, limit)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise Invalid.in_body(spec_error_from_validation(exc)) from None


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring a route's JSON body as ``model``."""
    return _request_body("application/json", inline_json_schema(model))


def raw_body_openapi(media_type: str, description: str) -> dict[str, Any]:
    """``openapi_extra`` declaring a route's body as a file sent as it is."""
    body = _request_body(media_type, {"type": "string", "format": "binary"})
    body["requestBody"]["description"] = description
    return body


def _request_body(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with each ``$ref`` replaced by the definition it names.

    A schema given in ``openapi_extra`` cannot bring its ``$defs`` into the
    document's ``components``, and a ``#/$defs/...`` reference inside it would be
    read from the document's root; inlined, it stands alone. A discriminator keeps
    its ``propertyName`` but loses its ``mapping`` (references too); each variant
    names its own tag with ``const``.
    """
    schema = model.model_json_schema()
    definitions: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any, expanding: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(item, expanding) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in expanding:
                raise ValueError(f"{model.__name__} is recursive through {name}; cannot inline")
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            return inline(definitions[name] | siblings, (*expanding, name))
        inlined = {key: inline(value, expanding) for key, value in node.items()}
        discriminator = inlined.get("discriminator")
        if isinstance(discriminator, dict) and "propertyName" in discriminator:
            inlined["discriminator"] = {"propertyName": discriminator["propertyName"]}
        return inlined

    return dict(inline(schema, ()))
