"""`/api/v1/erasures`: erase an account (admins by public id; the app's backend, with a service
key of scope `users:erase`, by its own user id) and follow the erasure."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self

import sqlalchemy as sa
from flask import g
from pydantic import BaseModel, Field, model_validator

from broker.api import bp
from broker.api.spec import endpoint, example, field_error, not_found
from broker.auth import external
from broker.auth.models import User
from broker.erasure import erase
from broker.erasure.models import Erasure, ErasureStatus
from broker.platform import wakeup
from broker.platform.db import db

TAGS = ("admin",)
NO_USER = not_found("user")
NO_ERASURE = not_found("erasure")
NEEDS_EXTERNAL_ID = field_error(
    422,
    "validation_error",
    "A service key names the user by `external_id`.",
    "external_id",
    "value_error",
)
_EXAMPLE = {
    "user": "u_3a7bd3e2360a3d29eea436fc",
    "status": "pending",
    "requested_at": "2026-05-04T09:00:00Z",
    "completed_at": None,
    "images_deleted": 120,
}


class EraseIn(BaseModel):
    """Who to erase: a public id, or an id in your own namespace (`external_id`)."""

    model_config = example({"external_id": "customer-1234"}, forbid_extra=True)

    user: str | None = Field(default=None, max_length=32, description="The public id `u_…`.")
    external_id: str | None = Field(
        default=None, min_length=1, max_length=255, description="Your id of the user."
    )
    issuer: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Namespace of `external_id` (administrators only; a service key uses its own).",
    )

    @model_validator(mode="after")
    def _one_name(self) -> Self:
        if (self.user is None) == (self.external_id is None):
            raise ValueError("give exactly one of user, external_id")
        return self


class ErasureOut(BaseModel):
    """An erasure: `pending` while images are being deleted at Cloudflare, then `done`."""

    model_config = example(_EXAMPLE)

    user: str = Field(description="The erased account's public id.")
    status: Literal["pending", "done"]
    requested_at: datetime
    completed_at: datetime | None
    images_deleted: int

    @classmethod
    def of(cls, row: Erasure) -> Self:
        """Render an Erasure row."""
        return cls(
            user=row.public_id,
            status=row.status.value,
            requested_at=row.requested_at,
            completed_at=row.completed_at,
            images_deleted=row.images_deleted,
        )


def _target(body: EraseIn) -> User:
    key = g.get("service_key")
    if key is not None and body.external_id is None:
        raise NEEDS_EXTERNAL_ID.error()
    if body.external_id is not None:
        issuer = key.issuer if key is not None else (body.issuer or "service-keys")
        user = external.find_account(db.session, issuer, body.external_id)
        if user is None:
            user = erase.find_erased(db.session, issuer, body.external_id)
    else:
        user = db.session.scalar(sa.select(User).where(User.public_id == body.user))
    if user is None:
        raise NO_USER.error()
    return user


@endpoint(
    bp,
    "POST",
    "/erasures",
    body=EraseIn,
    responses={200: ErasureOut, 202: ErasureOut},
    errors=(NO_USER, NEEDS_EXTERNAL_ID),
    description="Locks the account out at once (sessions, tokens, personal fields); the worker "
    "then deletes every image at Cloudflare and sends one `user.erased` event. 202 while "
    "pending, 200 once done; asking again is safe and changes nothing.",
    admin=True,
    tags=TAGS,
    scope="users:erase",
)
def erase_user(body: EraseIn) -> tuple[ErasureOut, int]:
    """Erase a user: every image, credential and personal field."""
    erasure, created = erase.request_erasure(db.session, _target(body))
    if created:
        wakeup.notify_worker()
    return ErasureOut.of(erasure), 200 if erasure.status == ErasureStatus.DONE else 202


@endpoint(
    bp,
    "GET",
    "/erasures/<user>",
    responses={200: ErasureOut},
    errors=(NO_ERASURE,),
    admin=True,
    tags=TAGS,
    scope="users:erase",
)
def get_erasure(user: str) -> ErasureOut:
    """Show how an erasure stands (by the account's public id)."""
    row = db.session.scalar(sa.select(Erasure).where(Erasure.public_id == user))
    if row is None:
        raise NO_ERASURE.error()
    key = g.get("service_key")
    if key is not None:
        account = db.session.get(User, row.user_id)
        if account is None or account.external_issuer != key.issuer:
            raise NO_ERASURE.error()
    return ErasureOut.of(row)
