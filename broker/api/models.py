"""The API's own tables: the `Idempotency-Key` answers kept for replay.

Every change here needs an Alembic migration (`flask --app broker db migrate -m "…"`);
tests fail when the migrations and the models drift apart.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from broker.platform.db import Model, UTCDateTime, utcnow
from broker.platform.encryption import EncryptedText


class IdempotencyKey(Model):
    """A client's `Idempotency-Key` and the answer it got, replayed for 24 hours."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (sa.UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(sa.String(255))
    # method + path + SHA-256 of the body: the same key with another request is refused.
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    # None while the first request is still running.
    response_status: Mapped[int | None] = mapped_column()
    # Encrypted: a create's answer holds its one-time `upload_url`, good for anyone until used.
    response_body: Mapped[str | None] = mapped_column(EncryptedText)
    response_headers: Mapped[dict[str, str] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
