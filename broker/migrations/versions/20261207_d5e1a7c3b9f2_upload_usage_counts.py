"""uploads keep their users' usage counts, so a create's quota check reads counts, not history

Revision ID: d5e1a7c3b9f2
Revises: c7a2e4f1d9b6
Create Date: 2026-12-07 18:00:00.000000

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = 'd5e1a7c3b9f2'
down_revision = 'c7a2e4f1d9b6'
branch_labels = None
depends_on = None

# Triggers on uploads keep the counts (broker.uploads.models.UploadUsage): on SQLite they update
# them directly (one writer at a time there); on PostgreSQL they append a change row, which the
# user's next create folds in (or the worker, for a user who stops creating), so no write of a
# user waits for another's commit on a count's row lock. Named for the drift check
# (tests/platform/test_db.py).
TRIGGERS = {
    'sqlite': ('uploads_usage_insert', 'uploads_usage_update', 'uploads_usage_delete'),
    'postgresql': ('uploads_usage_write', 'uploads_usage_update'),
}
FUNCTION = 'upload_usage_change'
# What a row counts in: its user, profile, status and creation hour (whole hours since the
# epoch, as broker.uploads.quotas computes them).
WATCHED = 'user_id, profile, status, created_at'
CHANGED = (
    'OLD.user_id IS NOT NEW.user_id OR OLD.profile IS NOT NEW.profile'
    ' OR OLD.status IS NOT NEW.status OR OLD.created_at IS NOT NEW.created_at'
)
# SQLite's strftime rounds to the millisecond (23:59:59.9996 would land in the next hour): the
# whole seconds only, as stored ('YYYY-MM-DD HH:MM:SS.ffffff').
SQLITE_HOUR = "CAST(strftime('%s', substr({row}.created_at, 1, 19)) AS INTEGER) / 3600"
PG_HOUR = 'floor(extract(epoch FROM {row}.created_at) / 3600)::bigint'


def _sqlite_counts(row, sign):
    hour = SQLITE_HOUR.format(row=row)
    return (
        'INSERT INTO upload_usage (user_id, profile, pending, ready) VALUES ('
        f"{row}.user_id, {row}.profile, {sign}({row}.status = 'pending'),"
        f" {sign}({row}.status = 'ready')) ON CONFLICT (user_id, profile) DO UPDATE SET"
        ' pending = pending + excluded.pending, ready = ready + excluded.ready; '
        'INSERT INTO upload_usage_hours (user_id, profile, hour, created) VALUES ('
        f'{row}.user_id, {row}.profile, {hour}, {sign}1) ON CONFLICT (user_id, profile, hour)'
        ' DO UPDATE SET created = created + excluded.created;'
    )


def _pg_change(row, sign):
    hour = PG_HOUR.format(row=row)
    return (
        'INSERT INTO upload_usage_changes (user_id, profile, hour, pending, ready, created)'
        f" VALUES ({row}.user_id, {row}.profile, {hour}, {sign}({row}.status = 'pending')::int,"
        f" {sign}({row}.status = 'ready')::int, {sign}1);"
    )


def _sqlite_write_lock():
    """SQLite: hold the database's write lock for the whole revision. Its driver runs DDL
    outside a transaction, each statement committing alone: an upload written between the
    triggers' creation and the counting below would be counted twice (by its trigger, then by
    the count), and a failure half way would leave the tables without the revision recorded.
    In one transaction from here, Alembic's version stamp included, it commits once."""
    raw = op.get_bind().connection.driver_connection
    assert raw is not None
    if not raw.in_transaction:
        raw.execute('BEGIN IMMEDIATE')


def upgrade():
    if op.get_bind().dialect.name == 'sqlite':
        _sqlite_write_lock()
    op.create_table(
        'upload_usage',
        sa.Column('user_id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('profile', sa.String(length=32), nullable=False),
        sa.Column('pending', sa.Integer(), nullable=False),
        sa.Column('ready', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('user_id', 'profile', name=op.f('pk_upload_usage')),
    )
    op.create_table(
        'upload_usage_hours',
        sa.Column('user_id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('profile', sa.String(length=32), nullable=False),
        sa.Column('hour', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('created', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('user_id', 'profile', 'hour', name=op.f('pk_upload_usage_hours')),
    )
    op.create_table(
        'upload_usage_changes',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('profile', sa.String(length=32), nullable=False),
        sa.Column('hour', sa.BigInteger(), nullable=False),
        sa.Column('pending', sa.Integer(), nullable=False),
        sa.Column('ready', sa.Integer(), nullable=False),
        sa.Column('created', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_upload_usage_changes')),
    )
    op.create_index(
        'ix_upload_usage_changes_user_profile', 'upload_usage_changes', ['user_id', 'profile']
    )
    dialect = op.get_bind().dialect.name
    if dialect == 'sqlite':
        insert, update, delete = TRIGGERS['sqlite']
        op.execute(
            f'CREATE TRIGGER {insert} AFTER INSERT ON uploads'
            f" BEGIN {_sqlite_counts('NEW', '+')} END"
        )
        op.execute(
            f'CREATE TRIGGER {update} AFTER UPDATE OF {WATCHED} ON uploads WHEN {CHANGED}'
            f" BEGIN {_sqlite_counts('OLD', '-')} {_sqlite_counts('NEW', '+')} END"
        )
        op.execute(
            f'CREATE TRIGGER {delete} AFTER DELETE ON uploads'
            f" BEGIN {_sqlite_counts('OLD', '-')} END"
        )
        hour = SQLITE_HOUR.format(row='uploads')
        recent = "created_at > datetime('now', '-25 hours')"
    else:
        # Creating the triggers locks out writes to uploads until this commits, so the counts
        # below miss no row. Fail after 5 s rather than queue every request behind a long
        # transaction (see c7a2e4f1d9b6).
        op.execute(
            "SELECT set_config('lock_timeout', '5s', true)"
            " WHERE current_setting('lock_timeout')::interval NOT BETWEEN '1 ms' AND '5 s'"
        )
        op.execute(
            f'CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN'
            f" IF TG_OP <> 'INSERT' THEN {_pg_change('OLD', '-')} END IF;"
            f" IF TG_OP <> 'DELETE' THEN {_pg_change('NEW', '+')} END IF;"
            ' RETURN NULL; END $$'
        )
        write, update = TRIGGERS['postgresql']
        op.execute(
            f'CREATE TRIGGER {write} AFTER INSERT OR DELETE ON uploads'
            f' FOR EACH ROW EXECUTE FUNCTION {FUNCTION}()'
        )
        op.execute(
            f'CREATE TRIGGER {update} AFTER UPDATE OF {WATCHED} ON uploads FOR EACH ROW'
            f" WHEN ({CHANGED.replace(' IS NOT ', ' IS DISTINCT FROM ')})"
            f' EXECUTE FUNCTION {FUNCTION}()'
        )
        hour = PG_HOUR.format(row='uploads')
        recent = "created_at > now() - interval '25 hours'"
    op.execute(
        'INSERT INTO upload_usage (user_id, profile, pending, ready)'
        " SELECT user_id, profile, sum(CASE WHEN status = 'pending' THEN 1 ELSE 0 END),"
        " sum(CASE WHEN status = 'ready' THEN 1 ELSE 0 END) FROM uploads"
        ' GROUP BY user_id, profile'
    )
    # Only the hours the daily quota can still read (it reads the last 24).
    op.execute(
        'INSERT INTO upload_usage_hours (user_id, profile, hour, created)'
        f' SELECT user_id, profile, {hour}, count(*) FROM uploads WHERE {recent}'
        f' GROUP BY user_id, profile, {hour}'
    )
    if dialect == 'postgresql':
        op.execute('SET LOCAL lock_timeout TO DEFAULT')


def downgrade():
    dialect = op.get_bind().dialect.name
    for name in TRIGGERS[dialect]:
        op.execute(f'DROP TRIGGER IF EXISTS {name}' + ('' if dialect == 'sqlite' else ' ON uploads'))
    if dialect == 'postgresql':
        op.execute(f'DROP FUNCTION IF EXISTS {FUNCTION}()')
    op.drop_index('ix_upload_usage_changes_user_profile', table_name='upload_usage_changes')
    op.drop_table('upload_usage_changes')
    op.drop_table('upload_usage_hours')
    op.drop_table('upload_usage')
