"""/api/v1/webhooks: admins register endpoints, rotate secrets, inspect and redeliver deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from flask import current_app
from pydantic import BaseModel, ConfigDict, Field

from broker.api import bp
from broker.api.spec import endpoint, example, field_error, not_found
from broker.audit import log as audit
from broker.platform import wakeup
from broker.platform.db import db, utcnow
from broker.platform.errors import ApiError
from broker.webhooks import endpoints, ssrf
from broker.webhooks.models import WebhookDelivery, WebhookEndpoint, WebhookEvent

EventType = Literal[
    "upload.completed",
    "upload.expired",
    "upload.rejected",
    "upload.deleted",
    "upload.replaced",
    "user.erased",
    "*",
]
NO_ENDPOINT = not_found("webhook endpoint")
NO_DELIVERY = not_found("delivery")
URL_NOT_ALLOWED = field_error(
    422,
    "url_not_allowed",
    "hooks.example.internal resolves to a non-public address (10.0.0.7)",
    "url",
    "url_not_allowed",
)
# The API's own statement of DeliveryStatus (a test keeps the two equal): the document states
# the values, so a member added to the enum is a decision about the API too.
Status = Literal["pending", "succeeded", "failed"]

_ENDPOINT_EXAMPLE = {
    "id": "we_5d41402abc4b2a76b9719d91",
    "url": "https://api.example.com/hooks/images",
    "events": ["upload.completed", "upload.expired"],
    "description": "Main backend",
    "active": True,
    "disabled_reason": None,
    "previous_secret_until": None,
    "created_at": "2026-05-04T09:00:00Z",
    "updated_at": "2026-05-04T09:00:00Z",
}
_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 (the document's example)
_DELIVERY_EXAMPLE = {
    "id": 42,
    "endpoint": "we_5d41402abc4b2a76b9719d91",
    "event_type": "upload.completed",
    "webhook_id": "msg_2KWPBgLlAfxdpx2AI54pPJ85",
    "status": "succeeded",
    "attempts": 1,
    "next_attempt_at": None,
    "last_status_code": 204,
    "last_error": None,
    "created_at": "2026-05-04T09:31:12Z",
    "completed_at": "2026-05-04T09:31:13Z",
    "attempt_log": None,
}


class EndpointIn(BaseModel):
    """A new webhook endpoint."""

    model_config = example(
        {"url": "https://api.example.com/hooks/images", "events": ["upload.completed"]},
        forbid_extra=True,
    )

    url: str = Field(max_length=2048, description="https URL receiving the events.")
    events: list[EventType] = Field(min_length=1, description="Event types, or `*` for all.")
    description: str = Field(default="", max_length=255)


class EndpointPatch(BaseModel):
    """Changes to an endpoint; omitted fields stay as they are."""

    model_config = example({"events": ["*"], "active": True}, forbid_extra=True)

    url: str | None = Field(default=None, max_length=2048)
    events: list[EventType] | None = Field(default=None, min_length=1)
    description: str | None = Field(default=None, max_length=255)
    active: bool | None = None


class EndpointOut(BaseModel):
    """A webhook endpoint (its secret is shown only when created or rotated)."""

    model_config = example(_ENDPOINT_EXAMPLE)

    id: str
    url: str
    events: list[str]
    description: str
    active: bool
    disabled_reason: str | None = None
    previous_secret_until: datetime | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, e: WebhookEndpoint) -> EndpointOut:
        """Render an endpoint row."""
        return cls(
            id=e.public_id,
            url=e.url,
            events=e.events.split(),
            description=e.description,
            active=e.active,
            disabled_reason=e.disabled_reason,
            previous_secret_until=e.previous_secret_until,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )


class EndpointCreated(EndpointOut):
    """A new endpoint and its signing secret: store it now, it is not shown again."""

    model_config = example({**_ENDPOINT_EXAMPLE, "secret": _SECRET})

    secret: str


class EndpointList(BaseModel):
    """Every registered endpoint."""

    model_config = example({"items": [_ENDPOINT_EXAMPLE]})

    items: list[EndpointOut]


class RotateIn(BaseModel):
    """How long the old secret keeps signing next to the new one."""

    model_config = example({"window_seconds": 3600}, forbid_extra=True)

    window_seconds: int = Field(default=86400, ge=0, le=7 * 86400)


class SecretOut(BaseModel):
    """A rotated secret (shown once) and until when the previous one still signs."""

    model_config = example(
        {
            "id": "we_5d41402abc4b2a76b9719d91",
            "secret": _SECRET,
            "previous_secret_until": "2026-05-05T09:00:00Z",
        }
    )

    id: str
    secret: str
    previous_secret_until: datetime | None


class AttemptOut(BaseModel):
    """One logged delivery attempt."""

    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    """One event on its way to one endpoint."""

    model_config = example(
        {
            **_DELIVERY_EXAMPLE,
            "attempt_log": [
                {
                    "number": 1,
                    "started_at": "2026-05-04T09:31:12Z",
                    "duration_ms": 84,
                    "status_code": 204,
                    "error": None,
                }
            ],
        }
    )

    id: int
    endpoint: str
    event_type: str
    webhook_id: str
    status: Status
    attempts: int = Field(description="Attempts made, all of them (a redelivery adds to them).")
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    completed_at: datetime | None
    attempt_log: list[AttemptOut] | None = None


class DeliveryList(BaseModel):
    """Deliveries, newest first."""

    model_config = example({"items": [_DELIVERY_EXAMPLE]})

    items: list[DeliveryOut]


class DeliveryQuery(BaseModel):
    """Filters for the delivery list."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(default=None, description="Only this endpoint's deliveries.")
    status: Status | None = Field(default=None, description="Only deliveries in this state.")
    limit: int = Field(default=50, ge=1, le=500, description="Deliveries to list.")


def _endpoint(public_id: str) -> WebhookEndpoint:
    e = endpoints.find_endpoint(db.session, public_id)
    if e is None:
        raise NO_ENDPOINT.error()
    return e


def _url_refused(exc: ssrf.BlockedAddress) -> ApiError:
    detail = {"field": "url", "message": str(exc), "type": "url_not_allowed"}
    return URL_NOT_ALLOWED.error(str(exc), [detail])


def _checked(url: str) -> None:
    try:
        endpoints.check_target(url, current_app.config)
    except ssrf.BlockedAddress as exc:
        raise _url_refused(exc) from None


def delivery_out(d: WebhookDelivery, *, with_attempts: bool = False) -> DeliveryOut:
    """Render a delivery (optionally with its attempt log)."""
    event = db.session.get(WebhookEvent, d.event_id)
    endpoint_row = db.session.get(WebhookEndpoint, d.endpoint_id)
    assert event is not None and endpoint_row is not None
    log = None
    if with_attempts:
        log = [
            AttemptOut(
                number=a.number,
                started_at=a.started_at,
                duration_ms=a.duration_ms,
                status_code=a.status_code,
                error=a.error,
            )
            for a in endpoints.attempt_log(db.session, d.id)
        ]
    return DeliveryOut(
        id=d.id,
        endpoint=endpoint_row.public_id,
        event_type=event.type,
        webhook_id=event.msg_id,
        status=d.status,  # type: ignore[arg-type]
        attempts=endpoints.attempts_made(db.session, [d.id])[d.id],
        next_attempt_at=d.next_attempt_at,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        created_at=d.created_at,
        completed_at=d.completed_at,
        attempt_log=log,
    )


@endpoint(
    bp,
    "GET",
    "/webhooks/endpoints",
    responses={200: EndpointList},
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def list_webhook_endpoints() -> EndpointList:
    """List webhook endpoints (admins only)."""
    return EndpointList(items=[EndpointOut.of(e) for e in endpoints.list_endpoints(db.session)])


@endpoint(
    bp,
    "POST",
    "/webhooks/endpoints",
    body=EndpointIn,
    responses={201: EndpointCreated},
    errors=(URL_NOT_ALLOWED,),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def create_webhook_endpoint(body: EndpointIn) -> tuple[EndpointCreated, int]:
    """Register a webhook endpoint; the answer holds its secret, shown only this once."""
    try:  # add_endpoint runs the SSRF check (DNS included) once
        e, secret = endpoints.add_endpoint(
            db.session,
            body.url,
            list(body.events),
            current_app.config,
            description=body.description,
        )
    except ssrf.BlockedAddress as exc:
        raise _url_refused(exc) from None
    db.session.flush()
    audit.record(
        db.session,
        "webhook_endpoint.created",
        e.public_id,
        after=audit.snapshot(e, endpoints.AUDITED),
    )
    return EndpointCreated(**EndpointOut.of(e).model_dump(), secret=secret), 201


@endpoint(
    bp,
    "GET",
    "/webhooks/endpoints/<endpoint_id>",
    responses={200: EndpointOut},
    errors=(NO_ENDPOINT,),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def get_webhook_endpoint(endpoint_id: str) -> EndpointOut:
    """Show one webhook endpoint (admins only)."""
    return EndpointOut.of(_endpoint(endpoint_id))


@endpoint(
    bp,
    "PATCH",
    "/webhooks/endpoints/<endpoint_id>",
    body=EndpointPatch,
    responses={200: EndpointOut},
    errors=(NO_ENDPOINT, URL_NOT_ALLOWED),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def update_webhook_endpoint(endpoint_id: str, body: EndpointPatch) -> EndpointOut:
    """Change an endpoint's URL, events, description, or enable/disable it."""
    e = _endpoint(endpoint_id)
    before = audit.snapshot(e, endpoints.AUDITED)
    if body.url is not None:
        _checked(body.url)
        e.url = body.url
    if body.events is not None:
        e.events = endpoints.normalise_events(list(body.events))
    if body.description is not None:
        e.description = body.description
    if body.active is not None:
        endpoints.set_active(e, body.active, None)
        if body.active:
            wakeup.notify_worker()
    e.updated_at = utcnow()
    audit.changed(db.session, "webhook_endpoint.updated", e.public_id, before, e)
    return EndpointOut.of(e)


@endpoint(
    bp,
    "POST",
    "/webhooks/endpoints/<endpoint_id>/rotate-secret",
    body=RotateIn,
    responses={200: SecretOut},
    errors=(NO_ENDPOINT,),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def rotate_webhook_secret(endpoint_id: str, body: RotateIn) -> SecretOut:
    """Give an endpoint a new secret; the old one keeps signing during the window."""
    e = _endpoint(endpoint_id)
    before = audit.snapshot(e, endpoints.AUDITED)
    secret = endpoints.rotate_secret(e, window=body.window_seconds)
    audit.changed(db.session, "webhook_endpoint.secret_rotated", e.public_id, before, e)
    return SecretOut(id=e.public_id, secret=secret, previous_secret_until=e.previous_secret_until)


@endpoint(
    bp,
    "GET",
    "/webhooks/deliveries",
    query=DeliveryQuery,
    responses={200: DeliveryList},
    errors=(NO_ENDPOINT,),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def list_webhook_deliveries(query: DeliveryQuery) -> DeliveryList:
    """List webhook deliveries, newest first (admins only)."""
    rows = endpoints.recent_deliveries(
        db.session,
        endpoint=_endpoint(query.endpoint) if query.endpoint else None,
        status=query.status,
        limit=query.limit,
    )
    return DeliveryList(items=[delivery_out(d) for d, _, _ in rows])


def _delivery(delivery_id: int) -> WebhookDelivery:
    d = db.session.get(WebhookDelivery, delivery_id)
    if d is None:
        raise NO_DELIVERY.error()
    return d


@endpoint(
    bp,
    "GET",
    "/webhooks/deliveries/<id:delivery_id>",
    responses={200: DeliveryOut},
    errors=(NO_DELIVERY,),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def get_webhook_delivery(delivery_id: int) -> DeliveryOut:
    """Show one delivery with every attempt (admins only)."""
    return delivery_out(_delivery(delivery_id), with_attempts=True)


@endpoint(
    bp,
    "POST",
    "/webhooks/deliveries/<id:delivery_id>/redeliver",
    responses={202: DeliveryOut},
    errors=(NO_DELIVERY,),
    admin=True,
    tags=("admin",),
    scope="webhooks:manage",
)
def redeliver_webhook(delivery_id: int) -> tuple[DeliveryOut, int]:
    """Queue a delivery again now (same webhook-id, fresh retry schedule)."""
    d = _delivery(delivery_id)
    before = audit.snapshot(d, endpoints.AUDITED_DELIVERY)
    endpoints.redeliver(d)
    audit.changed(db.session, "webhook_delivery.redelivered", str(d.id), before, d)
    return delivery_out(d), 202
