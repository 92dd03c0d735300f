"""Upload quotas, per user and profile: drafts waiting, uploads a day, images kept.

Offers `quotas_for` (the profile's quotas; on the `default` profile the user's overrides
first), `reserve_slot` and `release_slot`, `recorded_usage` (what the check reads),
`fold_usage_changes` (the worker's), and the refusals (`TOO_MANY_PENDING`,
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
The check reads counts the triggers on uploads keep (`UploadUsage`, `UploadUsageHour`; on
PostgreSQL plus the `UploadUsageChange` rows not folded in yet), never the user's history: its
cost is the same at 100 uploads a day or 100,000. Every fold of a user's changes runs under the
user's lock.
A reservation left by a killed process stops counting after `RESERVATION_TTL` (the retention
job deletes it later). Each profile's uploads count against that profile's quotas only.
Nothing here commits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

import sqlalchemy as sa

from broker.auth.models import User
from broker.platform.config import Settings
from broker.platform.db import Finish, Session, Statement, UTCDateTime
from broker.platform.errors import Kind, Refusal
from broker.uploads.lifecycle import PENDING
from broker.uploads.models import (
    Upload,
    UploadReservation,
    UploadUsage,
    UploadUsageChange,
    UploadUsageHour,
)
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


_USER = sa.bindparam("user_id", type_=sa.Integer)
_PROFILE = sa.bindparam("profile", type_=sa.String)
_NOW = sa.bindparam("now", type_=UTCDateTime())
_SINCE_HOUR = sa.bindparam("since_hour", type_=sa.BigInteger)


@functools.cache
def _usage_query(unfolded: bool = False) -> sa.Select[int, int, int, int]:
    """One statement reading a user's live drafts, last-24-h uploads and images kept in the
    profile, and counting live reservations other than `own` (the caller's, counted as the one
    asked for); with `unfolded`, the usage changes not folded in yet added (PostgreSQL: SQLite
    has none).

    The uploads are not walked: triggers keep their counts (`UploadUsage`, `UploadUsageHour`).
    Built once: constructing SQLAlchemy statements costs more than running this one.
    """
    usage, hours, changes = _usage_tables()

    def total(column: str, *, hourly: bool = False) -> Any:
        """`column` summed over the user's rows of the counts (and of the changes)."""
        kept = _sum((hours if hourly else usage).c[column], hourly=hourly)
        return kept + _sum(changes.c[column], hourly=hourly) if unfolded else kept

    pending, today, others, stored = _usage_columns(
        total("pending"), total("ready"), total("created", hourly=True)
    )
    return sa.select(pending, today, others, stored)


def _sum(column: Any, *, hourly: bool = False, mine: bool = True) -> Any:
    """The sum of `column` over its table's rows (those of the user in the profile when
    `mine`; of the hours after the one the last 24 hours start in when `hourly`); 0 when there
    are none."""
    table = column.table
    where = [table.c.user_id == _USER, table.c.profile == _PROFILE] if mine else []
    if hourly:
        where.append(table.c.hour > _SINCE_HOUR)
    return sa.func.coalesce(sa.select(sa.func.sum(column)).where(*where).scalar_subquery(), 0)


def _usage_columns(
    kept_pending: Any, kept_ready: Any, created: Any, parts: dict[str, Any] | None = None
) -> tuple[Any, Any, Any, Any]:
    """A user's live drafts, last-24-h uploads, other live reservations and images kept, from
    the counts (`kept_pending`, `kept_ready`, and `created` in the whole hours after the one
    the last 24 start in) and `parts` (`_usage_parts`, or columns holding them)."""
    parts = parts or _usage_parts()
    pending = kept_pending - parts["stale"]
    today = created + parts["first_hour"]
    # Images kept: ready ones, and drafts still waiting (each may become one).
    return pending, today, parts["others"], kept_ready + pending


def _usage_parts() -> dict[str, Any]:
    """What a user's usage reads besides the counts, each a scalar subquery: `stale`, the
    drafts the counts hold as pending although their URL has expired (the worker has not
    marked them yet); `first_hour`, the uploads of the hour the last 24 start in, after its
    start, counted exactly; `others`, the live reservations other than `own`. The first two
    are bounded ranges of one index of uploads."""

    def uploads(*where: sa.ColumnElement[bool]) -> Any:
        # A column the index holds (not the id: SQLite's indexes hold the rowid, not this text
        # key), so the count reads the index alone.
        rows = sa.select(Upload.user_id).where(
            Upload.user_id == _USER, Upload.profile == _PROFILE, *where
        )
        return sa.select(sa.func.count()).select_from(rows.subquery()).scalar_subquery()

    others = sa.select(sa.func.count()).where(
        UploadReservation.user_id == _USER,
        UploadReservation.profile == _PROFILE,
        UploadReservation.expires_at > _NOW,
        UploadReservation.id != sa.bindparam("own", type_=sa.String),
    )
    return {
        "stale": uploads(Upload.status == PENDING, Upload.expires_at <= _NOW),
        "first_hour": uploads(
            Upload.created_at > sa.bindparam("since", type_=UTCDateTime()),
            Upload.created_at < sa.bindparam("next_hour", type_=UTCDateTime()),
        ),
        "others": others.scalar_subquery(),
    }


def _usage_tables() -> tuple[sa.Table, sa.Table, sa.Table]:
    """The tables of the counts the triggers on uploads keep: by status, by hour, changes."""
    return tuple(  # type: ignore[return-value]
        cast(sa.Table, model.__table__)
        for model in (UploadUsage, UploadUsageHour, UploadUsageChange)
    )


def _usage(quotas: Quotas, user_id: int, own: str, now: datetime) -> dict[str, Any]:
    """The parameters of `_reserving` and `_usage_query` for `quotas` of `user_id`."""
    return {
        "user_id": user_id,
        "profile": quotas.profile,
        "own": own,
        "now": now,
        "until": now + RESERVATION_TTL,
        **_day_before(now),
    }


def _day_before(now: datetime) -> dict[str, Any]:
    """The last 24 hours as `_usage_query` reads them: from `since`; the hour it falls in
    (`since_hour`, whole hours since the epoch, as the triggers count them) ends at
    `next_hour`."""
    since = now - DAY
    since_hour = hour_of(since)
    next_hour = datetime.fromtimestamp((since_hour + 1) * 3600, UTC)
    return {"since": since, "since_hour": since_hour, "next_hour": next_hour}


def hour_of(moment: datetime) -> int:
    """The hour `moment` falls in, as the usage triggers count uploads: whole hours since the
    epoch."""
    return int(moment.timestamp() // 3600)


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
    *counts, reserved = conn.execute(_reserving_if_room(), {**params, **_limits(quotas)}).one()
    if not reserved:
        _check(conn, user_id, quotas, now, counts, own_reservation=upload_id)
        raise AssertionError("the reservation's room and `_check` disagree")  # pragma: no cover
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
    inserted only when the quotas leave room, its counts returned either way (the same
    statement folds the user's usage changes into the counts, `_fold`); the budget's state row
    lock, taken only when the reservation exists (after the counts, so the lock every create
    shares is not held while a user's usage is read); the spend, only when the reservation
    exists and the budget has room, deleting the reservation when refused. Lock order: the
    user's lock, then the budget's row, as everywhere. A refusal so leaves nothing behind; its
    Retry-After is read afterwards. None (nothing reserved) when the budget's state row is
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
    counts it: one statement (PostgreSQL, after the user's lock).

    The user's usage changes are folded into the counts by the same statement (`_fold`), so
    it reads them on one side or the other, never both, and the next create finds few."""
    moved, counted, counted_hours = _fold()
    _usage, hours, _changes = _usage_tables()
    # The hours as the statement began, and the changes it folds in.
    created = _sum(hours.c.created, hourly=True) + _sum(moved.c.created, hourly=True, mine=False)
    # Each part read once, whatever uses it twice.
    raw = (
        sa.select(
            counted.c.pending,
            counted.c.ready,
            created.label("created"),
            *(part.label(name) for name, part in _usage_parts().items()),
        )
        .select_from(counted)
        .cte("usage_parts")
    )
    pending, today, others, stored = _usage_columns(
        raw.c.pending, raw.c.ready, raw.c.created, dict(raw.c.items())
    )
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
        _USER,
        _PROFILE,
        _NOW,
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
    ).add_cte(counted_hours)


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
    return sa.select(sa.func.pg_advisory_xact_lock(*_user_lock_key()))


def _user_lock_key() -> tuple[Any, Any]:
    """The user's lock among PostgreSQL's advisory locks: (`USER_LOCKS`, the user's id)."""
    return sa.literal(USER_LOCKS, sa.Integer), _USER


def recorded_usage(conn: sa.Connection, user_id: int, profile: str, now: datetime) -> Usage:
    """The user's live drafts, uploads of the last 24 hours and images kept in `profile` at
    `now`, as a create's quota check reads them (reservations not included)."""
    params = {"user_id": user_id, "profile": profile, "own": "", "now": now, **_day_before(now)}
    query = _usage_query(unfolded=conn.dialect.name == "postgresql")
    pending, today, _reserved, stored = conn.execute(query, params).one()
    return Usage(pending, today, stored)


class Usage(NamedTuple):
    """What counts against a user's quotas in one profile (`recorded_usage`)."""

    pending: int
    today: int
    stored: int


# Users whose changes one background pass folds at most (each holds the user's lock until the
# pass commits).
FOLD_BATCH = 100


def fold_usage_changes(conn: sa.Connection, now: datetime) -> int:
    """Fold the usage changes of users who left some (PostgreSQL: users who create nothing more
    never fold theirs), at most `FOLD_BATCH` users; return how many changes went. The worker's
    job, committed by it right after.

    Each user's fold under the user's lock, taken in an earlier statement, as a create's: the
    counts read in a create's statement are exact only if no other fold of the user commits
    while it runs (it would read the hours as before that fold, and the counts after it), and
    two folds of one user could take the counts' rows in opposite orders (a statement's writes
    run in no set order) and deadlock. A user whose lock is held is skipped: that create is
    folding the user's changes anyway."""
    if conn.dialect.name != "postgresql":
        return 0
    changes = cast(sa.Table, UploadUsageChange.__table__)
    # The oldest changes first: an active user always has a recent one (folded by the user's
    # next create), and must not keep a quiet user's out of the batch.
    owners = conn.execute(
        sa.select(changes.c.user_id, changes.c.profile)
        .group_by(changes.c.user_id, changes.c.profile)
        .order_by(sa.func.min(changes.c.id))
        .limit(FOLD_BATCH)
    ).all()
    since_hour = hour_of(now - DAY)
    moved = 0
    for user_id, profile in owners:
        if conn.execute(_user_try_lock(), {"user_id": user_id}).scalar_one():
            params = {"user_id": user_id, "profile": profile, "since_hour": since_hour}
            moved += conn.execute(_folding(), params).scalar_one()
    return moved


@functools.cache
def _folding() -> sa.Select[int]:
    """Fold the usage changes of `user_id` in `profile` into its counts (`_fold`); returns how
    many there were."""
    moved, counted, counted_hours = _fold()
    return sa.select(sa.select(sa.func.count()).select_from(moved).scalar_subquery()).add_cte(
        counted, counted_hours
    )


def _fold() -> tuple[Any, Any, Any]:
    """The CTEs moving the usage changes of `user_id` in `profile` into its counts
    (PostgreSQL, where the triggers on uploads append changes): the changes deleted (`moved`),
    the counts by status upserted with their sums (`counted`, returning the new counts: always
    one row), the hourly counts upserted (`counted_hours`), only for hours after `since_hour`
    (the daily count reads no other) and only where they change (a status change adds and
    takes one in the same hour). In one statement, so a reader sees the changes on one side
    or the other.

    Run it only under the user's lock (`_user_lock`), taken by an earlier statement: a fold
    committed by another transaction while this statement runs would be half seen (the hours
    as before it, the counts as after it)."""
    # PostgreSQL only: a SQLite process never loads the dialect.
    from sqlalchemy.dialects.postgresql import insert as upsert

    usage, hours, changes = _usage_tables()
    moved = (
        sa.delete(changes)
        .where(changes.c.user_id == _USER, changes.c.profile == _PROFILE)
        .returning(changes.c.hour, changes.c.pending, changes.c.ready, changes.c.created)
        .cte("moved")
    )
    adding = upsert(usage).from_select(
        ["user_id", "profile", "pending", "ready"],
        sa.select(
            _USER,
            _PROFILE,
            sa.func.coalesce(sa.func.sum(moved.c.pending), 0),
            sa.func.coalesce(sa.func.sum(moved.c.ready), 0),
        ).select_from(moved),
    )
    totals = adding.on_conflict_do_update(
        index_elements=[usage.c.user_id, usage.c.profile],
        set_={
            "pending": usage.c.pending + adding.excluded.pending,
            "ready": usage.c.ready + adding.excluded.ready,
        },
    ).returning(usage.c.pending, usage.c.ready)
    per_hour = upsert(hours).from_select(
        ["user_id", "profile", "hour", "created"],
        sa.select(_USER, _PROFILE, moved.c.hour, sa.func.sum(moved.c.created))
        .select_from(moved)
        .where(moved.c.hour > _SINCE_HOUR)
        .group_by(moved.c.hour)
        .having(sa.func.sum(moved.c.created) != 0),
    )
    per_hour = per_hour.on_conflict_do_update(
        index_elements=[hours.c.user_id, hours.c.profile, hours.c.hour],
        set_={"created": hours.c.created + per_hour.excluded.created},
    )
    return moved, totals.cte("counted"), per_hour.cte("counted_hours")


@functools.cache
def _user_try_lock() -> sa.Select[Any]:
    """`_user_lock` if it is free now (PostgreSQL): whether it was taken."""
    return sa.select(sa.func.pg_try_advisory_xact_lock(*_user_lock_key()))


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
