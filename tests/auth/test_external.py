"""Accounts of the app's own users: created on first use in the caller's transaction, and two
first uses at once end with one account, without spoiling the loser's other work."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Session

from broker.auth import external, users
from broker.auth.models import User
from broker.platform.db import db

ISSUER = "https://id.example"


def test_a_concurrent_first_use_reads_the_winners_account(app: Flask) -> None:
    """Another process created the account after this one looked: the insert hits the unique
    key in a savepoint, the winner's row comes back, and this transaction's own work survives."""
    with app.app_context():
        bystander = users.create_user(db.session, "bystander", "a-long-enough-password")
        db.session.commit()
        bystander_id = bystander.id
        assert external.find_account(db.session, ISSUER, "sub-1") is None
        # The other process's first use, committed meanwhile on its own connection.
        with Session(db.engine) as other:
            winner = external.create_account(other, ISSUER, "sub-1")
            other.commit()
            winner_id = winner.id
        bystander.active = False  # this transaction's own pending work
        user = external.create_account(db.session, ISSUER, "sub-1")
        assert user.id == winner_id
        db.session.commit()
    with app.app_context():
        accounts = db.session.scalars(sa.select(User).where(User.external_subject == "sub-1"))
        assert [u.id for u in accounts] == [winner_id]
        assert db.session.get(User, bystander_id).active is False  # type: ignore[union-attr]


def test_a_new_account_is_left_for_the_caller_to_commit(app: Flask) -> None:
    """The domain function writes in the caller's transaction: nothing survives a rollback."""
    with app.app_context():
        external.create_account(db.session, ISSUER, "sub-2")
        db.session.rollback()
        assert external.find_account(db.session, ISSUER, "sub-2") is None
