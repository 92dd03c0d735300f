"""Upload quotas, per user and profile: drafts waiting, uploads a day, images kept.

Offers `quotas_for` (the profile's quotas; on the `default` profile the user's overrides
first), `reserve_slot` and `release_slot`, and the refusals (`TOO_MANY_PENDING`,
`DAILY_QUOTA`, both 429 with the seconds until a slot frees for sure, and `STORED_QUOTA`, 403
until an image is deleted), each naming the profile and the limit.

Rules it enforces: a create holds a slot (an `UploadReservation` row) from before it calls
Cloudflare until its upload row takes the slot over, so concurrent creates never exceed a
quota. `reserve_slot` must run as its own transaction, committed before the caller goes
upstream (the request's unit of work, `broker.api.unit_of_work`, runs it as a step): the check
and the reservation are then serialised per user, on PostgreSQL by the user's advisory lock,
on SQLite by the database's write lock, which the reservation's INSERT takes before anything
is counted (the same statement returns the counts), and no lock is held while Cloudflare
answers.
On PostgreSQL the step is one round trip (`_reserve_in_one_round_trip`): the locks are held
while the server runs it and commits, not across this process's turns.
A reservation left by a killed process stops counting after `RESERVATION_TTL` (the retention
job deletes it later). Each profile's uploads count against that profile's quotas only.
Nothing here commits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform.config import Settings
from broker.platform.db import Finish, Session, Statement, UTCDateTime
from broker.platform.errors import Kind, Refusal
from broker.uploads.lifecycle import PENDING, READY
from broker.uploads.models import Upload, UploadReservation
from broker.uploads.policy import UploadError
from broker.uploads.profiles import DEFAULT, Profile, profiles_of
from broker.upstream import budget as budget_statements
from broker.upstream.budget import UpstreamBudget
from broker.upstream.cloudflare import Budget, Priority

DAY = timedelta(hours=24)
# How long a create's reservation holds a slot: no create lives this long (upstream timeout
# times retries), so only a killed process's reservation ever reaches it.
RESERVATION_TTL = timedelta(minutes=2)

TOO_MANY_PENDING = Refusal(
    Kind.LIMIT_REACHED,
    "too_many_pending_uploads",
    "You have {limit} {uploads} waiting for a file, your limit for profile '{profile}'; "
    "finish or delete one first.",
    {"limit": 20, "uploads": "uploads", "profile": "default"},
    retry_after=True,
)
DAILY_QUOTA = Refusal(
    Kind.LIMIT_REACHED,
    "daily_upload_limit",
    "You created {limit} uploads in the last 24 hours, your limit for profile '{profile}'.",
    {"limit": 500, "profile": "default"},
    retry_after=True,
)
# 403, not 429: no time frees it (Retry-After would have nothing true to say); a deletion does.
STORED_QUOTA = Refusal(
    Kind.FORBIDDEN,
    "stored_image_limit",
    "You keep {limit} {images} of profile '{profile}' (uploads waiting included), its limit; "
    "delete one first.",
    {"limit": 100, "images": "images", "profile": "gallery"},
)


class Quotas(NamedTuple):
    """A user's quotas in one profile: drafts waiting for a file at once, uploads per 24
    hours, images kept (None: no limit)."""

    pending: int
    daily: int
    stored: int | None = None
    profile: str = DEFAULT


def quotas_for(user: User, settings: Settings, profile: Profile | None = None) -> Quotas:
    """Return the user's quotas in `profile` (default: the `default` profile, where the
    user's overrides come first)."""
    profile = profile or profiles_of(settings).get(DEFAULT)
    pending, daily = profile.max_pending, profile.max_per_day
    if profile.name == DEFAULT:
        if user.max_pending_uploads is not None:
            pending = user.max_pending_uploads
        if user.max_uploads_per_day is not None:
            daily = user.max_uploads_per_day
    # Replace mode keeps one image whatever is stored: the newest replaces the others.
    stored = None if profile.replace else profile.max_stored
    return Quotas(pending, daily, stored, profile.name)


@functools.cache
def _reserving() -> sa.Insert:
    """One statement storing the reservation `own` and returning the user's usage with it
    (`_usage_query`'s columns): the write comes first, so SQLite's write lock is taken before
    anything is counted, and the whole step is one round trip after the user's lock."""
    return _reservation().returning(*_usage_query().selected_columns)


def _reservation() -> sa.Insert:
    table = cast(sa.Table, UploadReservation.__table__)
    return sa.insert(table).values(
        id=sa.bindparam("own", type_=sa.String),
        user_id=sa.bindparam("user_id", type_=sa.Integer),
        profile=sa.bindparam("profile", type_=sa.String),
        created_at=sa.bindparam("now", type_=UTCDateTime()),
        expires_at=sa.bindparam("until", type_=UTCDateTime()),
    )


@functools.cache
def _usage_query() -> sa.Select[int, int, int, int]:
    """One statement counting a user's live drafts, last-24-h uploads and live reservations
    other than `own` (the caller's, counted as the one asked for).

    Built once: constructing SQLAlchemy statements costs more than running this one. Upload
    counts stop at `cap_*` so they stay cheap however many rows a user has.
    """
    user_id = sa.bindparam("user_id", type_=sa.Integer)
    profile = sa.bindparam("profile", type_=sa.String)
    now = sa.bindparam("now", type_=UTCDateTime())
    mine = (Upload.user_id == user_id, Upload.profile == profile)
    # Each count selects a column its index holds (not the id: SQLite's indexes hold the rowid,
    # not this text key), so it reads the index alone, never a row of the table.
    pending = (
        sa.select(Upload.user_id)
        .where(*mine, Upload.status == PENDING, Upload.expires_at > now)
        .limit(sa.bindparam("cap_pending", type_=sa.Integer))
        .subquery()
    )
    recent = (
        sa.select(Upload.user_id)
        .where(*mine, Upload.created_at > sa.bindparam("since", type_=UTCDateTime()))
        .limit(sa.bindparam("cap_daily", type_=sa.Integer))
        .subquery()
    )
    # Images kept: ready ones, and drafts still waiting (each may become one).
    stored = (
        sa.select(Upload.user_id)
        .where(
            *mine,
            sa.or_(
                Upload.status == READY, sa.and_(Upload.status == PENDING, Upload.expires_at > now)
            ),
        )
        .limit(sa.bindparam("cap_stored", type_=sa.Integer))
        .subquery()
    )
    reserved = sa.select(sa.func.count()).where(
        UploadReservation.user_id == user_id,
        UploadReservation.profile == profile,
        UploadReservation.expires_at > now,
        UploadReservation.id != sa.bindparam("own", type_=sa.String),
    )
    return sa.select(
        sa.select(sa.func.count()).select_from(pending).scalar_subquery(),
        sa.select(sa.func.count()).select_from(recent).scalar_subquery(),
        reserved.scalar_subquery(),
        sa.select(sa.func.count()).select_from(stored).scalar_subquery(),
    )


def _usage(quotas: Quotas, user_id: int, own: str, now: datetime) -> dict[str, Any]:
    """The parameters of `_reserving` and `_usage_query` for `quotas` of `user_id`."""
    return {
        "user_id": user_id,
        "profile": quotas.profile,
        "own": own,
        "now": now,
        "until": now + RESERVATION_TTL,
        "since": now - DAY,
        "cap_pending": max(quotas.pending, 0),
        "cap_daily": max(quotas.daily, 0),
        "cap_stored": max(quotas.stored or 0, 0),
    }


def _check(
    conn: sa.Connection,
    user_id: int,
    quotas: Quotas,
    now: datetime,
    usage: Sequence[int],
    *,
    own_reservation: str,
) -> None:
    """Refuse when the user's uploads plus other reservations (`usage`, as `_usage_query`
    counts them) leave no slot for the caller's own reservation `own_reservation`, which is
    never the slot a retry waits for."""
    since = now - DAY
    pending, today, others, stored = usage
    if pending + others >= quotas.pending:
        # A slot frees for sure when the oldest live draft's URL (or a reservation) expires.
        first_expiry = _earliest(
            conn,
            Upload.expires_at,
            sa.and_(Upload.status == PENDING, Upload.expires_at > now),
            UploadReservation.expires_at,
            user_id,
            now,
            own_reservation,
            quotas.profile,
        )
        raise UploadError(
            TOO_MANY_PENDING,
            limit=quotas.pending,
            uploads="upload" if quotas.pending == 1 else "uploads",
            profile=quotas.profile,
            retry_after=_seconds_until(first_expiry, now),
        )
    if today + others >= quotas.daily:
        oldest = _earliest(
            conn,
            Upload.created_at,
            Upload.created_at > since,
            UploadReservation.created_at,
            user_id,
            now,
            own_reservation,
            quotas.profile,
        )
        raise UploadError(
            DAILY_QUOTA,
            limit=quotas.daily,
            profile=quotas.profile,
            retry_after=_seconds_until(oldest + DAY if oldest else None, now),
        )
    if quotas.stored is not None and stored + others >= quotas.stored:
        raise UploadError(
            STORED_QUOTA,
            limit=quotas.stored,
            images="image" if quotas.stored == 1 else "images",
            profile=quotas.profile,
        )


def _earliest(
    conn: sa.Connection,
    column: Any,
    condition: sa.ColumnElement[bool],
    reservation_column: Any,
    user_id: int,
    now: datetime,
    own_reservation: str,
    profile: str,
) -> datetime | None:
    """The earliest `column` of the user's uploads in `profile` meeting `condition`, and
    `reservation_column` of the user's other live reservations there."""
    moments = (
        sa.select(column.label("moment"))
        .where(Upload.user_id == user_id, Upload.profile == profile, condition)
        .union_all(_live_reservations(user_id, now, reservation_column, own_reservation, profile))
        .subquery()
    )
    earliest: datetime | None = conn.scalar(sa.select(sa.func.min(moments.c.moment)))
    return earliest


def _live_reservations(
    user_id: int, now: datetime, column: Any, own_reservation: str, profile: str
) -> sa.Select[Any]:
    """Select `column` of the user's other live reservations (a refused request's own short
    reservation frees nothing the caller could wait for)."""
    return sa.select(column.label("moment")).where(
        UploadReservation.user_id == user_id,
        UploadReservation.profile == profile,
        UploadReservation.expires_at > now,
        UploadReservation.id != own_reservation,
    )


def reserve_slot(
    conn: sa.Connection,
    user_id: int,
    quotas: Quotas,
    upload_id: str,
    now: datetime,
    *,
    budget: Budget | None = None,
    finish: Finish | None = None,
) -> bool:
    """Hold one slot of the user's quotas for `upload_id`, or raise UploadError 429.

    Run it as a transaction of its own on `conn` (see the module's rules); the caller commits
    it. With `budget` the upstream call is paid for in the same transaction when possible (one
    write instead of two per create); returns whether it was (BudgetExhausted when it is
    spent: nothing is reserved then, once the caller rolls back). On PostgreSQL, given the
    caller's `finish` (how it ends the transaction in one round trip), the whole step is that
    round trip (`_reserve_in_one_round_trip`).
    """
    params = _usage(quotas, user_id, upload_id, now)
    if finish is not None and conn.dialect.name == "postgresql":
        paid = _reserve_in_one_round_trip(conn, finish, user_id, quotas, params, budget)
        if paid is not None:
            return paid
        # The budget's state row is missing (its very first call): one statement at a time.
    if conn.dialect.name == "sqlite":
        # The INSERT takes the database's write lock, which serialises the whole step.
        usage = conn.execute(_reserving(), params).one()
        _check(conn, user_id, quotas, now, usage, own_reservation=upload_id)
        return budget is not None and budget.acquire_in(conn, Priority.INTERACTIVE)
    # The user's lock serialises this user's reservations (`_user_lock`).
    conn.execute(_user_lock(), {"user_id": user_id})
    usage = conn.execute(_reserving(), params).one()
    _check(conn, user_id, quotas, now, usage, own_reservation=upload_id)
    # Last: the budget's row lock is shared by every process; hold it briefly.
    return budget is not None and budget.acquire_in(conn, Priority.INTERACTIVE)


def _reserve_in_one_round_trip(
    conn: sa.Connection,
    finish: Finish,
    user_id: int,
    quotas: Quotas,
    params: dict[str, Any],
    budget: Budget | None,
) -> bool | None:
    """`reserve_slot` on PostgreSQL as one round trip: the statements below and the COMMIT
    sent together (`finish`), so the locks are held while the server runs them and commits,
    never across a round trip or a turn of this process, which every create of the user (and,
    for the budget's lock, of every process) would wait for.

    In order, each reading the rows committed before it starts (READ COMMITTED), so after a
    lock it sees all its previous holder committed: the user's lock; the reservation,
    inserted only when the quotas leave room, its counts returned either way; the budget's
    state row lock, taken only when the reservation exists (after the counts, so the lock every
    create shares is not held while a user's history is counted); the spend, only when the
    reservation exists and the budget has room, deleting the reservation when refused. Lock
    order: the user's lock, then the budget's row, as everywhere. A refusal so leaves nothing
    behind;
    its Retry-After is read afterwards. None (nothing reserved) when the budget's state row is
    missing: the caller goes one statement at a time then.
    """
    statements: list[Statement] = [
        (_user_lock(), {"user_id": user_id}),
        (_reserving_if_room(), {**params, **_limits(quotas)}),
    ]
    # The budget spent in this database's statements, if it is kept there.
    shared = budget if isinstance(budget, UpstreamBudget) and budget.shares(conn) else None
    if shared is not None:
        moment = shared.clock()
        spend = shared.spending_params(moment, Priority.INTERACTIVE)
        statements += [
            (_locking_if_reserved(), {"locked_scope": shared.scope, "own": params["own"]}),
            (_spending_or_unreserving(), {**spend, "own": params["own"]}),
        ]
    rows = finish(statements)
    *usage, reserved = rows[1][0]
    if not reserved:
        _check(conn, user_id, quotas, params["now"], usage, own_reservation=params["own"])
        raise AssertionError("the reservation's room and `_check` disagree")  # pragma: no cover
    if shared is None:
        return False  # the client pays for its call itself (`acquire`)
    calls = rows[3][0][0]
    if not rows[2]:
        return None  # the state row is missing: the spend recorded nothing, unreserved
    if (
        calls is not None
        and shared.spending_params(shared.clock(), Priority.INTERACTIVE)["start"] != spend["start"]
    ):
        # The locks were awaited past the bucket's end: counted in the bucket before, the
        # call could leave the window early. Not paid: the client counts it again in the
        # bucket it is sent in (once too many, never too few).
        return False
    if shared.settle(conn, calls, moment, Priority.INTERACTIVE):
        return True
    return None  # the state row went missing meanwhile: nothing paid, nothing reserved


@functools.cache
def _reserving_if_room() -> sa.Select[Any]:
    """The user's usage (`_usage_query`'s columns) and whether the reservation `own` was
    inserted, which it is only when the quotas (`_limits`) leave room for it, as `_check`
    counts it: one statement (PostgreSQL, after the user's lock)."""
    pending, today, others, stored = _usage_query().selected_columns
    counts = sa.select(
        pending.label("pending"),
        today.label("today"),
        others.label("others"),
        stored.label("stored"),
    ).cte("usage")
    room = sa.and_(
        counts.c.pending + counts.c.others < sa.bindparam("limit_pending", type_=sa.Integer),
        counts.c.today + counts.c.others < sa.bindparam("limit_daily", type_=sa.Integer),
        sa.or_(
            sa.bindparam("stored_unlimited", type_=sa.Boolean),
            counts.c.stored + counts.c.others < sa.bindparam("limit_stored", type_=sa.Integer),
        ),
    )
    table = cast(sa.Table, UploadReservation.__table__)
    row = sa.select(
        sa.bindparam("own", type_=sa.String),
        sa.bindparam("user_id", type_=sa.Integer),
        sa.bindparam("profile", type_=sa.String),
        sa.bindparam("now", type_=UTCDateTime()),
        sa.bindparam("until", type_=UTCDateTime()),
    ).where(room)
    inserted = (
        sa.insert(table)
        .from_select(["id", "user_id", "profile", "created_at", "expires_at"], row)
        .returning(table.c.id)
        .cte("reserved")
    )
    return sa.select(
        counts.c.pending,
        counts.c.today,
        counts.c.others,
        counts.c.stored,
        sa.select(sa.func.count()).select_from(inserted).scalar_subquery(),
    )


def _limits(quotas: Quotas) -> dict[str, Any]:
    """The parameters of `_reserving_if_room`'s room: `_check`'s limits."""
    return {
        "limit_pending": quotas.pending,
        "limit_daily": quotas.daily,
        "stored_unlimited": quotas.stored is None,
        "limit_stored": quotas.stored or 0,
    }


@functools.cache
def _reserved() -> sa.Exists:
    """Whether the reservation `own` exists (inserted by the statement before, in this
    transaction)."""
    table = cast(sa.Table, UploadReservation.__table__)
    return sa.exists().where(table.c.id == sa.bindparam("own", type_=sa.String))


# Set (for the transaction only) by the budget's lock statement when it locked the state row:
# the spend after it runs only then. Without it, a state row that another process created
# between the two statements (the very first calls) would be spent without its lock.
_LOCKED = "broker.budget_locked"


@functools.cache
def _locking_if_reserved() -> sa.Update:
    """The budget's lock (`budget.locking`), taken only when the reservation `own` exists;
    marks the transaction as holding it (`_LOCKED`)."""
    mark = sa.func.set_config(_LOCKED, sa.bindparam("locked_scope", type_=sa.String), True)
    return budget_statements.locking().where(_reserved()).returning(mark)


@functools.cache
def _holding_the_lock() -> sa.ColumnElement[bool]:
    """Whether this transaction's `_locking_if_reserved` locked the scope `scope`'s row."""
    setting = sa.func.current_setting(_LOCKED, True)
    return sa.and_(_reserved(), setting == sa.bindparam("scope", type_=sa.String))


@functools.cache
def _spending_or_unreserving() -> sa.Select[tuple[int | None, int]]:
    """The budget's spend (`budget.spending`), only when the reservation `own` exists and this
    transaction holds the budget's lock (`_holding_the_lock`), and the reservation's deletion
    when that spend recorded nothing; returns the bucket's new count (None: refused) and
    whether the reservation was deleted."""
    upsert = budget_statements.spending(
        "postgresql", Priority.INTERACTIVE, when=_holding_the_lock()
    )
    spend = cast(sa.Insert, upsert).cte("budget_spend")
    table = cast(sa.Table, UploadReservation.__table__)
    gone = (
        sa.delete(table)
        .where(
            table.c.id == sa.bindparam("own", type_=sa.String),
            ~sa.exists(sa.select(spend.c.calls)),
        )
        .returning(table.c.id)
        .cte("unreserved")
    )
    return sa.select(
        sa.select(spend.c.calls).scalar_subquery(),
        sa.select(sa.func.count()).select_from(gone).scalar_subquery(),
    )


# The space of the users' reservation locks among PostgreSQL's advisory locks: "quot".
USER_LOCKS = 0x71756F74


@functools.cache
def _user_lock() -> sa.Select[Any]:
    """The user's lock (PostgreSQL) taken before counting, built once: an advisory lock (in
    `USER_LOCKS`, keyed by the user's id) until the transaction ends.

    Not the user's row: a row lock just released goes to whichever backend asks first, and a
    create arriving then went ahead of those already waiting (one user's creates at 32 clients:
    p99 +81 / +108 ms over the emulator's, +52 / +62 with this lock). The lock manager hands an
    advisory lock to its waiters in turn. Nor does it touch the row, whose foreign key checks
    (the reservation's, the upload's) take their own share of it."""
    return sa.select(
        sa.func.pg_advisory_xact_lock(
            sa.literal(USER_LOCKS, sa.Integer), sa.bindparam("user_id", type_=sa.Integer)
        )
    )


def release_slot(session: Session, upload_id: str) -> None:
    """Give back the slot of a create that failed (it expires anyway; the caller commits)."""
    session.connection().execute(_releasing(), {"upload_id": upload_id})


@functools.cache
def _releasing() -> sa.Delete:
    """The DELETE of `release_slot`, built once."""
    table = cast(sa.Table, UploadReservation.__table__)
    return sa.delete(table).where(table.c.id == sa.bindparam("upload_id", type_=sa.String))


def _seconds_until(moment: datetime | None, now: datetime) -> int:
    if moment is None:
        return 60
    return max(1, int((moment - now).total_seconds() + 0.999))
