"""Passwords: Argon2id parameters, rehash on login, unreadable hashes, salting."""

from __future__ import annotations

from argon2 import PasswordHasher, Type, extract_parameters

from broker.auth import passwords, users
from broker.auth.models import User
from broker.platform.db import db
from tests.factories import PASSWORD


def test_production_hash_is_argon2id_with_owasp_minimums():
    """m ≥ 19 MiB, t ≥ 2, Argon2id — checked on a real production hash."""
    params = extract_parameters(passwords.PRODUCTION.hash("some password here"))
    assert params.type is Type.ID
    assert params.memory_cost >= 19 * 1024
    assert params.time_cost >= 2
    assert params.parallelism >= 1


def test_apps_outside_testing_use_the_production_parameters(make_app):
    """Only ENV=testing gets the cheap profile; development uses production parameters."""
    dev = make_app(ENV="development")
    with dev.app_context():
        assert passwords.hasher() is passwords.PRODUCTION
        stored = passwords.hash_password("some password here")
    assert stored.startswith("$argon2id$")
    assert extract_parameters(stored).memory_cost >= 19 * 1024
    assert passwords.hasher() is passwords.PRODUCTION  # no app: production
    testing = make_app()
    with testing.app_context():
        assert extract_parameters(passwords.hash_password("x" * 12)).type is Type.ID


def test_login_rehashes_when_parameters_change(app, make_user):
    """A hash made with old parameters is replaced by one with the current ones at login."""
    user = make_user()
    old = PasswordHasher(time_cost=1, memory_cost=16, parallelism=1, type=Type.ID).hash(PASSWORD)
    with app.app_context():
        db.session.get(User, user.id).password_hash = old
        db.session.commit()
        assert passwords.needs_rehash(old)
        assert users.authenticate(db.session, "alice", PASSWORD) is not None
        db.session.commit()
        new = db.session.get(User, user.id).password_hash
        assert new != old and not passwords.needs_rehash(new)
        assert passwords.verify_password(new, PASSWORD)
        # a wrong password leaves the hash alone
        assert users.authenticate(db.session, "alice", "wrong password!!") is None
        assert db.session.get(User, user.id).password_hash == new


def test_unreadable_hash_never_authenticates(app, make_user):
    """A corrupt stored hash is a failed login, not a 500."""
    user = make_user()
    with app.app_context():
        db.session.get(User, user.id).password_hash = "not-a-hash"
        db.session.commit()
        assert users.authenticate(db.session, "alice", PASSWORD) is None
        assert passwords.needs_rehash("not-a-hash")


def test_password_hash_is_salted(app):
    """The same password hashes differently each time."""
    with app.app_context():
        assert passwords.hash_password(PASSWORD) != passwords.hash_password(PASSWORD)
