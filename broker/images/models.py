"""Signing keys mirrored from Cloudflare, as a typed SQLAlchemy model.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.db import Model, UTCDateTime, utcnow
from broker.platform.encryption import EncryptedText


class SigningKey(Model):
    """A delivery URL signing key mirrored from Cloudflare (`GET /v1/keys`); the value is secret.

    The key that signs is the newest one not retired; a retired key stays (and keeps verifying
    the URLs it signed) until `delete_after`, when it is deleted upstream and here.
    """

    __tablename__ = "signing_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(32), unique=True)
    # Signing needs the raw value: stored encrypted (broker.platform.encryption).
    value: Mapped[str] = mapped_column(EncryptedText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delete_after: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<SigningKey {self.name!r} retired={self.retired_at is not None}>"
