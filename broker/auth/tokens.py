"""API bearer tokens: issue (shown once), look up by SHA-256, expire, revoke.

A token is `brk_` + 43 URL-safe characters (256 random bits). Only its SHA-256 is stored, so a
copy of the database cannot be replayed; lookups go by that hash (an index hit that reveals
nothing about the secret), and the match is confirmed with a constant-time comparison.

A web process keeps the tokens it checked (`TokenCache`, keyed by the hash, at most CACHE_TTL
seconds). Any change to a token or an account through the ORM (revoking, deactivating, a new
password, new limits; not the last-used and last-login stamps) moves the version in
`auth_versions` in the same transaction (`watch_sessions`); its commit drops what this process
keeps at once and, with Redis configured, tells every other process through Redis
(`broker.auth.changes`). A process that follows Redis trusts what it keeps with no statement at
all; one that does not (no Redis, or its subscription is not confirmed live) reads the version
on every request (one primary-key read) and drops what it keeps when it moved. Either way the
next request refuses a revoked token. Expiry is checked on every request against the kept
expiry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from flask import current_app, g, has_app_context
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import attributes, scoped_session

from broker.auth import changes
from broker.auth.models import ApiToken, AuthVersion, ServiceKey, User
from broker.platform import health
from broker.platform.db import Session, server_connect_args, upsert_insert, utcnow

log = logging.getLogger("broker.auth")

PREFIX = "brk_"
DEFAULT_TTL = timedelta(days=90)
# last_used_at is written at most this often, so each API call does not cost a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# session.info key: a last-used stamp is written in this transaction (for the caller to commit).
STAMPED = "api_token_stamped"
# Longer than any secret we issue: refused before it is even hashed.
MAX_SECRET_LENGTH = 200
# How long a process trusts what it kept about a token when nothing moved the version: a bound
# on a change made outside the ORM (plain SQL), which does not move it.
CACHE_TTL = 30.0
# Tokens kept per process; past it the oldest half is dropped.
CACHE_SIZE = 10_000
# What moves the version: a change to any column of a token or an account (the cache keeps
# them all: usable or not, and what the request reads, such as a user's limits), but these
# stamps, written on every login and once a minute per token.
_UNWATCHED = {ApiToken: {"last_used_at"}, User: {"last_login_at"}}

# session.info key: the version this transaction moved the tokens to, told of at its commit.
_MOVED = "auth_version_moved"

# What is looked up by its secret's hash: API tokens and service keys.
_Hashed = TypeVar("_Hashed", ApiToken, ServiceKey)


@dataclass(frozen=True)
class IssuedToken:
    """A freshly issued token: the secret (shown once) and its stored row."""

    secret: str = field(repr=False)  # a repr may end up in a log line
    token: ApiToken


def digest(secret: str) -> str:
    """Return the hex SHA-256 stored for `secret`."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret(prefix: str) -> str:
    """Return a fresh secret: `prefix` and 256 random bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def find_by_secret(
    session: Session, model: type[_Hashed], secret: str, prefix: str
) -> _Hashed | None:
    """Return the row of `model` stored for `secret`, else None.

    Looked up by the hash (an index hit that reveals nothing about the secret) and confirmed
    with a constant-time comparison.
    """
    if not secret.startswith(prefix) or len(secret) > MAX_SECRET_LENGTH:
        return None
    hashed = digest(secret)
    row = session.scalar(sa.select(model).where(model.token_hash == hashed))
    if row is None or not hmac.compare_digest(row.token_hash, hashed):
        return None
    return row


def stamp_used(row: ApiToken | ServiceKey, now: datetime) -> bool:
    """Record that `row` was used now, at most once per LAST_USED_RESOLUTION; tell if it was."""
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        return True
    return False


def issue(
    session: Session,
    user: User,
    name: str,
    *,
    ttl: timedelta = DEFAULT_TTL,
    now: datetime | None = None,
) -> IssuedToken:
    """Create a token for `user` (added to the session; the caller commits)."""
    now = now or utcnow()
    secret = new_secret(PREFIX)
    token = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=digest(secret),
        prefix=secret[: len(PREFIX) + 6],
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(token)
    session.flush()
    return IssuedToken(secret, token)


def is_usable(token: ApiToken, now: datetime | None = None) -> bool:
    """Tell whether `token` is neither revoked nor expired."""
    now = now or utcnow()
    return token.revoked_at is None and token.expires_at > now


def authenticate(
    session: Session,
    secret: str,
    now: datetime | None = None,
    cache: TokenCache | None = None,
) -> ApiToken | None:
    """Return the usable token whose secret this is, else None; stamps when it was last used
    (at most once a minute, so most requests write nothing; the caller commits).

    With `cache`, a token this process checked since the version last moved costs one
    primary-key read instead of the token's row and its user's.
    """
    now = now or utcnow()
    if cache is None:
        token = find_by_secret(session, ApiToken, secret, PREFIX)
    else:
        token = cache.find(session, secret)
    if token is None or not is_usable(token, now) or not token.user.is_active:
        return None
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        _stamp(session, token, now)
        if cache is not None:
            cache.remember(token)
    return token


def _stamp(session: Session, token: ApiToken, now: datetime) -> None:
    """Write that `token` was used now, unless a process wrote it less than LAST_USED_RESOLUTION
    ago: the condition is in the UPDATE, since each process's kept copy of the stamp is its own
    (with two processes, each would otherwise write it once a minute)."""
    if sa.inspect(token).detached:
        session.add(token)  # the stamp is to be written: the request's session begins
    session.execute(
        sa.update(ApiToken)
        .where(
            ApiToken.id == token.id,
            sa.or_(
                ApiToken.last_used_at.is_(None),
                ApiToken.last_used_at <= now - LAST_USED_RESOLUTION,
            ),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    # Not written again by the view's flush; this process asks again in a minute either way.
    attributes.set_committed_value(token, "last_used_at", now)
    session.info[STAMPED] = True


def refusal_reason(session: Session, secret: str, now: datetime | None = None) -> str:
    """Say why `authenticate` refused `secret`: `expired`, `revoked` (also: its account was
    deactivated) or `invalid` (no such token). Told only to whoever holds the secret."""
    token = find_by_secret(session, ApiToken, secret, PREFIX)
    if token is None:
        return "invalid"
    if token.revoked_at is not None or not token.user.is_active:
        return "revoked"
    return "expired" if not is_usable(token, now) else "invalid"


def _columns(model: type[Any]) -> tuple[str, ...]:
    return tuple(attr.key for attr in sa.inspect(model).column_attrs)


def _attach(session: Session, model: type[Any], values: dict[str, Any], key: Any) -> Any:
    """Return the row of `model` with these column values in `session`, with no SELECT."""
    present = session.identity_map.get(key)
    if present is not None:
        return present
    row = _row(model, values, key)
    session.add(row)  # detached with its identity: adding it makes it persistent
    return row


def _started(session: Session) -> bool:
    """Tell whether the request's session already exists (or this is not a request's session)."""
    return (
        not isinstance(session, scoped_session) or not has_app_context() or session.registry.has()
    )


def _row(model: type[Any], values: dict[str, Any], key: Any) -> Any:
    """Return a detached row of `model` with these loaded column values (no session, no SELECT)."""
    row = sa.orm.instrumentation.manager_of_class(model).new_instance()
    row.__dict__.update(values)  # loaded values, no history: as a SELECT would leave them
    attributes.instance_state(row).key = key
    return row


def _detached(kept: _Kept) -> ApiToken:
    """Return the kept token and its user outside any session, added to the request's session
    as soon as that session begins (`_join_waiting`), so that whatever the view changes on them
    is written by its commit, as before. Making a session and adding two rows to it was half of
    an authenticated request's cost on a route that needs no database at all."""
    token = _row(ApiToken, kept.token, kept.token_key)
    attributes.set_committed_value(token, "user", _row(User, kept.user, kept.user_key))
    g._detached_token = token  # the app context is the request session's scope: both end together
    return cast(ApiToken, token)


def _join_waiting(session: OrmSession, transaction: Any) -> None:
    """Add this request's detached token (and so its user) to its session as that begins."""
    if transaction.parent is not None or not has_app_context():
        return
    token = g.get("_detached_token")
    if token is None:
        return
    from broker.platform.db import db

    scope = db.session.registry
    if not scope.has() or scope() is not session:
        return  # another session (a unit of work's own): the request's session gets it
    del g._detached_token
    if sa.inspect(token).key not in session.identity_map:
        session.add(token)


@dataclass(frozen=True)
class _Kept:
    """What a process keeps about a checked token: its row's and its user's columns, and their
    identity-map keys (worked out once, not on every request)."""

    token: dict[str, Any]
    user: dict[str, Any]
    kept_at: float
    token_key: Any
    user_key: Any


class TokenCache:
    """Token hash → the token's and its user's columns, per process, while nothing moved the
    version (and at most CACHE_TTL seconds).

    Every drop starts a new generation; a token read from the database is kept only if no drop
    happened since the request began, so a row read before a change's commit never outlives
    the news of it.
    """

    def __init__(
        self,
        stamp: VersionStamp,
        ttl: float = CACHE_TTL,
        size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        redis_url: str | None = None,
    ) -> None:
        self.stamp, self.ttl, self.size, self.clock = stamp, ttl, size, clock
        self._kept: dict[str, _Kept] = {}
        self._version: int | None = None  # every change up to it is in what is kept
        self._generation = 0
        self._lock = threading.Lock()
        self._token_columns = _columns(ApiToken)
        self._user_columns = _columns(User)
        self.feed: changes.Feed | None = None
        self.publisher: changes.Publisher | None = None
        if redis_url is not None:
            self.feed = changes.Feed(
                redis_url, read_version=stamp.read, kept=self.version_kept, moved=self.moved
            )
            self.publisher = changes.Publisher(redis_url)

    def find(self, session: Session, secret: str) -> ApiToken | None:
        """Return the token stored for `secret` (kept, or read and kept), else None."""
        if not secret.startswith(PREFIX) or len(secret) > MAX_SECRET_LENGTH:
            return None
        hashed = digest(secret)
        generation = self._trusted()
        if generation is None:  # the version cannot be read: trust nothing kept
            return find_by_secret(session, ApiToken, secret, PREFIX)
        kept = self._kept.get(hashed)
        if kept is not None and self.clock() - kept.kept_at < self.ttl:
            if not _started(session):  # the request has no session yet: none is made for this
                return _detached(kept)
            token = _attach(session, ApiToken, kept.token, kept.token_key)
            user = _attach(session, User, kept.user, kept.user_key)
            attributes.set_committed_value(token, "user", user)
            return cast(ApiToken, token)
        token = find_by_secret(session, ApiToken, secret, PREFIX)
        if token is not None:
            self._keep(token, generation)
        return token

    def _trusted(self) -> int | None:
        """Return the generation what is kept may be trusted under now (None: trust nothing).

        Following Redis, with every notice that arrived applied: no statement. Otherwise the
        version is read (before the token: a token read after a change's commit is never kept
        under the version from before it), and what is kept dropped when it moved.
        """
        if self.feed is not None and self.feed.current():
            return self._generation
        version = self.stamp.read()
        if version is None:
            return None
        return self.moved(version, read=True)

    def moved(self, version: int, read: bool = False, since: int | None = None) -> int:
        """Drop what is kept unless it already holds every change up to `version` (a notice, a
        commit); return the generation. `read`: the version as just read from the database
        (a request, a new subscription), which what is kept must match exactly: a lower one
        means the database went back (a restore), so what was kept since is not trusted.
        `since`: the version kept when that read began (changes applied meanwhile may be newer
        than the read): a read below it is a restore, one above what is kept now a change."""
        with self._lock:
            kept = self._version
            if kept is None:
                stale = True
            elif not read:
                stale = version > kept
            elif since is None:
                stale = version != kept
            else:
                stale = version < since or version > kept
            if stale:
                self._drop(version)
            return self._generation

    def version_kept(self) -> int | None:
        """Return the version what is kept holds every change up to (None: nothing kept)."""
        return self._version

    def changed(self, version: int) -> None:
        """A commit moved the version to `version`: drop what this process keeps, tell the
        others (with Redis)."""
        self.moved(version)
        if self.publisher is not None:
            self.publisher.publish(version)

    def _drop(self, version: int) -> None:
        self._kept.clear()
        self._version = version
        self._generation += 1

    def remember(self, token: ApiToken) -> None:
        """Note `token`'s new last-used stamp in what is kept (if it still is)."""
        with self._lock:
            kept = self._kept.get(token.token_hash)
            if kept is not None:  # only that column: the rest stays as read under its version
                stamped = {**kept.token, "last_used_at": token.last_used_at}
                self._kept[token.token_hash] = dataclasses.replace(kept, token=stamped)

    def _keep(self, token: ApiToken, generation: int) -> None:
        kept = _Kept(
            {name: getattr(token, name) for name in self._token_columns},
            {name: getattr(token.user, name) for name in self._user_columns},
            self.clock(),
            sa.orm.util.identity_key(ApiToken, token.id),
            sa.orm.util.identity_key(User, token.user.id),
        )
        with self._lock:
            if generation != self._generation:
                return  # something was dropped since this was read: not to be trusted
            if len(self._kept) >= self.size:
                for stale in list(self._kept)[: self.size // 2]:
                    del self._kept[stale]
            self._kept[token.token_hash] = kept

    def close(self) -> None:
        """Stop following Redis and close the connections of its own."""
        if self.feed is not None:
            self.feed.close()
        if self.publisher is not None:
            self.publisher.close()
        self.stamp.close()


class VersionStamp:
    """Reads `auth_versions` on a connection of its own: one per process, autocommit, outside
    the request's session and its pool, so a request whose token is kept checks out nothing.

    Without Redis the read is a statement of its own, not folded into the batch API's per-token
    rate statement: it must come before the request writes anything (a revoked token's create
    must not reserve a slot), while the rate counts a call in the second it leaves, after the
    create's reservation is committed. One round trip for both would count the call early (or
    for a create refused before its call) or trust the token through the reservation."""

    SQL = "SELECT version FROM auth_versions WHERE id = 1"

    def __init__(self, url: sa.URL) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._conn: Any = None
        self._closer: weakref.finalize[Any, Any] | None = None
        self._pid = 0
        self.reads = 0  # round trips made, for tests that count a request's
        self._begun = self._done = 0  # reads begun and the last one finished, in turns
        self._value: int | None = None

    def read(self) -> int | None:
        """Return the version (0 before anything moved it); None when it cannot be read.

        Threads waiting on the one connection share a read that began after they asked: what
        it saw was committed before they asked too, and a busy process makes one read per turn.
        """
        asked = self._begun
        with self._lock:
            if self._done > asked:
                return self._value
            self._begun += 1
            turn = self._begun
            try:
                if self._conn is None or self._pid != os.getpid():  # new, or forked
                    self._open()
                cursor = self._conn.cursor()
                self.reads += 1
                try:
                    cursor.execute(self.SQL)
                    row = cursor.fetchone()
                finally:
                    cursor.close()
            except Exception as exc:  # a dropped connection: read from the session this time
                log.warning("token cache: cannot read auth_versions (%s)", type(exc).__name__)
                with contextlib.suppress(Exception):
                    self._conn.invalidate()  # dead: closed without the pool resetting it first
                self.close()
                return None
            self._value = int(row[0]) if row else 0
            self._done = turn
            return self._value

    def _open(self) -> None:
        if self._closer is not None:  # forked: the parent's connection is the parent's to close
            self._closer.detach()
        # Each read is a transaction of its own: behind PgBouncer in transaction mode (before
        # 1.21) the statement psycopg would prepare on its fifth read is gone by the sixth.
        server = self._url.get_backend_name() != "sqlite"
        engine = sa.create_engine(
            self._url,
            poolclass=sa.pool.NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args=server_connect_args() if server else {},
        )
        self._conn = engine.raw_connection()
        self._pid = os.getpid()
        # Closed with the app too: an app dropped without close() must not leak a connection.
        self._closer = weakref.finalize(self, _close_connection, self._conn, engine)

    def close(self) -> None:
        """Close the connection (it is opened again on the next read)."""
        closer, self._closer, self._conn = self._closer, None, None
        if closer is not None and self._pid == os.getpid():
            closer()


def _close_connection(conn: Any, engine: sa.Engine) -> None:
    with contextlib.suppress(Exception):
        conn.close()
    engine.dispose()


def move_version(session: Session | OrmSession) -> None:
    """Move the version in `session`'s transaction: every process drops the tokens it kept
    (this one and, with Redis, the others once it commits; the others otherwise on their next
    read of the version).

    Once per transaction, and before the rows it is about: every such transaction locks the
    version's row first, so two of them never wait on each other's rows (no deadlock).
    """
    own: OrmSession = session() if isinstance(session, scoped_session) else session
    if own.info.get(_MOVED) is not None:
        return
    conn = own.connection()
    table = AuthVersion.__table__
    statement = upsert_insert(conn.dialect.name)(table).values(id=1, version=1)
    moved = conn.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.id], set_={"version": table.c.version + 1}
        ).returning(table.c.version)
    ).scalar_one()
    # With the savepoint it was moved in (None: the transaction itself), which takes it along
    # if rolled back.
    own.info[_MOVED] = (int(moved), own.get_nested_transaction())


def _before_flush(session: OrmSession, _context: Any, _instances: Any) -> None:
    """Move the version when this flush changes what makes a token or an account usable."""
    for row in (*session.dirty, *session.deleted):
        unwatched = _UNWATCHED.get(type(row))
        if unwatched is None:
            continue
        state = sa.inspect(row)
        changed = (
            attr.key
            for attr in state.mapper.column_attrs
            if state.attrs[attr.key].history.has_changes()
        )
        if row in session.deleted or any(name not in unwatched for name in changed):
            move_version(session)
            return


def _rolled_back(session: OrmSession) -> None:
    """Forget the move with the transaction (a savepoint's: `_savepoint_rolled_back` decides)."""
    if not session.in_nested_transaction():
        session.info.pop(_MOVED, None)


def _savepoint_rolled_back(session: OrmSession, previous: Any) -> None:
    """Forget the move when the savepoint rolled back took it with it: moved again if needed."""
    moved = session.info.get(_MOVED)
    savepoint = moved[1] if moved is not None else None
    while savepoint is not None and savepoint is not previous:
        savepoint = savepoint.parent
    if moved is not None and (savepoint is previous or not previous.nested):
        del session.info[_MOVED]


def _committed(session: OrmSession) -> None:
    """Tell this process's cache (and, with Redis, every process) of the version the commit
    moved; a savepoint's release waits for the transaction's own commit."""
    if session.in_nested_transaction():
        return
    moved = session.info.pop(_MOVED, None)
    if moved is None or not has_app_context():
        return
    from flask import current_app

    cache = current_app.extensions.get("tokens")
    if isinstance(cache, TokenCache):
        cache.changed(moved[0])


def watch_sessions() -> None:
    """Move the version from every ORM session's flush that revokes, deactivates or re-keys."""
    if not sa.event.contains(OrmSession, "before_flush", _before_flush):
        sa.event.listen(OrmSession, "before_flush", _before_flush)
        sa.event.listen(OrmSession, "after_commit", _committed)
        sa.event.listen(OrmSession, "after_rollback", _rolled_back)
        # A savepoint rolled back may have taken the move with it: move again when needed.
        sa.event.listen(OrmSession, "after_soft_rollback", _savepoint_rolled_back)
    if not sa.event.contains(OrmSession, "after_transaction_create", _join_waiting):
        sa.event.listen(OrmSession, "after_transaction_create", _join_waiting)


def active_tokens(session: Session, user: User, now: datetime | None = None) -> list[ApiToken]:
    """Return `user`'s tokens that are neither revoked nor expired, newest first."""
    now = now or utcnow()
    return list(
        session.scalars(
            sa.select(ApiToken)
            .where(
                ApiToken.user_id == user.id,
                ApiToken.revoked_at.is_(None),
                ApiToken.expires_at > now,
            )
            .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
        )
    )


def all_tokens(session: Session, user: User) -> list[ApiToken]:
    """Return every token of `user`, revoked and expired ones too, newest first."""
    return list(
        session.scalars(
            sa.select(ApiToken)
            .where(ApiToken.user_id == user.id)
            .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
        )
    )


def token_state(token: ApiToken, now: datetime | None = None) -> str:
    """Say whether `token` is `active`, `revoked` or `expired`."""
    if token.revoked_at is not None:
        return "revoked"
    return "active" if is_usable(token, now) else "expired"


def find_own(session: Session, user: User, public_id: str) -> ApiToken | None:
    """Return `user`'s unrevoked token with this public id (another user's token: None)."""
    return session.scalar(
        sa.select(ApiToken).where(
            ApiToken.public_id == public_id,
            ApiToken.user_id == user.id,
            ApiToken.revoked_at.is_(None),
        )
    )


def revoke(token: ApiToken, now: datetime | None = None) -> None:
    """Revoke one token (the caller commits)."""
    if token.revoked_at is None:
        token.revoked_at = now or utcnow()


def revoke_all(session: Session, user: User, now: datetime | None = None) -> int:
    """Revoke every token of `user` (the caller commits); return how many were revoked."""
    move_version(session)
    result = session.execute(
        sa.update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
    )
    return cast(sa.CursorResult[Any], result).rowcount or 0


def cache_for(app: Any) -> TokenCache:
    """Return the token cache of `app`, reading the version from `app`'s database and following
    its Redis when the rate-limit storage is one."""
    from broker.platform.config import settings_of
    from broker.platform.db import db

    with app.app_context():
        url = db.engine.url
    redis_url = changes.redis_url(settings_of(app).ratelimit_storage_uri)
    return TokenCache(VersionStamp(url), redis_url=redis_url)


def metric_lines(_session: Session) -> list[str]:
    """The token cache's gauge: whether this process follows token changes through Redis."""
    feed = cast(TokenCache, current_app.extensions["tokens"]).feed
    return health.gauge(
        "broker_token_changes_subscribed",
        "1 while this process hears of token and account changes through Redis (a kept token "
        "costs no statement), 0 while it reads the token version on every request",
        int(feed is not None and feed.current()),
    )
