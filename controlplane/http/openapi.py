"""The OpenAPI document (served at ``/schema``): its config, the bodies handlers read
themselves, and the adjustments made once the app is built."""

from __future__ import annotations

import dataclasses

import msgspec
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)

from controlplane import __version__
from controlplane.events import MAX_TS_MS


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Control plane",
        version=__version__,
        path="/schema",
        description="Metering and billing control plane: ingest, ledger, flags, cutover.",
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}
        ),
    )


_TEXT = Schema(type=OpenAPIType.STRING, min_length=1, max_length=256)
_NULL = Schema(type=OpenAPIType.NULL)
EVENT_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="Event",
    description="A usage event (CloudEvents-compatible); give `time` or `ts`, not both. "
    "Other CloudEvents attributes are accepted and not stored.",
    required=["id", "type", "subject"],
    properties={
        "id": _TEXT,
        "type": _TEXT,
        "subject": Schema(
            type=OpenAPIType.STRING, min_length=1, max_length=256, description="the org id"
        ),
        # null is taken as absent
        "source": Schema(
            one_of=[Schema(type=OpenAPIType.STRING, min_length=1, max_length=256), _NULL]
        ),
        "time": Schema(
            one_of=[Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.DATE_TIME), _NULL]
        ),
        "ts": Schema(
            one_of=[
                Schema(
                    type=OpenAPIType.INTEGER,
                    minimum=0,
                    maximum=MAX_TS_MS,
                    description="unix milliseconds",
                ),
                _NULL,
            ]
        ),
        "data": Schema(type=OpenAPIType.OBJECT, additional_properties=Schema()),
    },
)


@dataclasses.dataclass
class IngestOperation(Operation):
    """`POST /v1/events` reads its body itself; this documents what it accepts."""

    def __post_init__(self) -> None:
        batch = Schema(type=OpenAPIType.ARRAY, items=EVENT_SCHEMA)
        self.request_body = RequestBody(
            required=True,
            description="One event, a JSON array of events, NDJSON (one event per line) or a "
            "CloudEvents batch. Validated whole and stored in one transaction.",
            content={
                "application/json": OpenAPIMediaType(schema=Schema(one_of=[EVENT_SCHEMA, batch])),
                "application/cloudevents-batch+json": OpenAPIMediaType(schema=batch),
                "application/x-ndjson": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, description="one event per line")
                ),
            },
        )


@dataclasses.dataclass
class OfrepOperation(Operation):
    """The OFREP endpoints read their (optional) body themselves."""

    def __post_init__(self) -> None:
        context = Schema(  # null is taken as no context
            one_of=[Schema(type=OpenAPIType.OBJECT, additional_properties=Schema()), _NULL]
        )
        self.request_body = RequestBody(
            required=False,
            description="The evaluation context (not used: every flag has one value).",
            content={
                "application/json": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.OBJECT, properties={"context": context})
                )
            },
        )


def document_bodies(openapi: OpenAPI, bodies: tuple[type[msgspec.Struct], ...]) -> None:
    """Describe the JSON bodies with msgspec's own schemas, exactly what `strict_body`
    enforces: unknown fields refused, bounds of optional fields (which litestar's schema
    drops), patterns."""
    _, components = msgspec.json.schema_components(
        bodies, ref_template="#/components/schemas/{name}"
    )
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    for name, schema in components.items():
        # a plain JSON Schema dict: serialized as it is
        openapi.components.schemas[name] = schema


def document_plans(openapi: OpenAPI, plans: list[str]) -> None:
    """An org's plan is one of this config's plans (an unknown one is refused)."""
    body = (openapi.components.schemas or {}).get("OrgPut")
    if isinstance(body, dict):  # msgspec's plain JSON Schema (see document_bodies)
        body["properties"]["plan"] = {"anyOf": [{"enum": plans}, {"type": "null"}]}


def document_window(openapi: OpenAPI, bucket_seconds: int) -> None:
    """The parity window's bounds are bucket boundaries of this config."""
    item = (openapi.paths or {}).get("/internal/usage-parity")
    for parameter in (item.get.parameters or []) if item and item.get else []:
        schema = getattr(parameter, "schema", None)
        if getattr(parameter, "name", None) in ("from", "to") and isinstance(schema, Schema):
            schema.multiple_of = bucket_seconds
