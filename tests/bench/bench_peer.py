"""Benchmark: the cost of a create beside the closest peer, in one run (`make bench`; not a test).

On each database (SQLite, and PostgreSQL when BENCH_DATABASE_URL names a server), starts one
emulator and, against it, under gunicorn 2 x 16 gthread:

- `broker`: this tree's `POST /api/v1/uploads` with a bearer token;
- `baseline`: the same from another commit (`--baseline REV`, exported with `git archive`);
- `peer`: django-cloudflareimages-toolkit's own `POST …/api/upload-url/` in a minimal Django
  project with DRF tokens (its own virtualenv, made once under .venv/bench-peer), `creator` sent
  as the user's id;

then prints creates/s ÷ the emulator's at 1/8/32 clients, p99 added over the emulator, the
workers' memory (warm, and after the run: RSS, PSS and private), a bare route's CPU with a
bearer ÷ without (in process), and the statements one create runs. Options: --clients 1,8,32
--seconds 3 --baseline REV --databases sqlite,postgresql --users 256.

The 1/8/32 rows send every create as one user (per-user limits lifted), so that user's quota
counts grow with the run; one more row, at the most clients, sends each create as the next of
`--users` users (each side its own, round-robin): many end users with a few drafts each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import bench_uploads as up  # noqa: E402
from tests.bench.bench_scale import fresh_database  # noqa: E402

PEER_VENV = ROOT / ".venv" / "bench-peer"
PEER_PACKAGES = [
    "django-cloudflareimages-toolkit==1.1.6",
    "djangorestframework",
    "gunicorn",
    "psycopg[binary]",
]
GUNICORN = ["-w", "2", "-k", "gthread", "--threads", "16"]

Request = tuple[dict[str, str], dict[str, Any]]  # one create's headers and JSON body
Call = Callable[[requests.Session], None]


def in_turn(items: list[Request]) -> Callable[[], Request]:
    """Return a function giving `items` round-robin, safe to call from every load thread."""
    ring = itertools.cycle(items)
    lock = threading.Lock()

    def take() -> Request:
        with lock:
            return next(ring)

    return take


def peer_python() -> Path:
    """Return the peer virtualenv's Python, creating the virtualenv on first use."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"== setting up the peer in {PEER_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES], check=True)
    return python


PEER_SETTINGS = """
SECRET_KEY = "bench-peer-secret-key-not-for-production"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "peer_urls"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes", "django.contrib.auth", "rest_framework",
    "rest_framework.authtoken", "django_cloudflareimages_toolkit",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES = {{"default": {database}}}
REST_FRAMEWORK = {{
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.TokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}}
CLOUDFLARE_IMAGES = {{
    "ACCOUNT_ID": "{account}", "API_TOKEN": "{token}", "ACCOUNT_HASH": "benchhash0000000000000",
    "BASE_URL": "{api_base}",
}}
"""
PEER_URLS = """
from django.urls import include, path
urlpatterns = [path("cf/", include("django_cloudflareimages_toolkit.urls"))]
"""
PEER_USER = """
import sys
import django; django.setup()
from django.contrib.auth.models import User
from django.db import transaction
from rest_framework.authtoken.models import Token
user = User.objects.create_user("bench", password="bench password long enough")
print(user.pk, Token.objects.create(user=user).key)
with transaction.atomic():  # the many-users row's: token-only users (no password to hash)
    for n in range(int(sys.argv[1])):
        user = User.objects.create_user(f"bench{n}")
        print(user.pk, Token.objects.create(user=user).key)
"""


def peer_database(url: str) -> str:
    """Return Django's DATABASES entry for a SQLAlchemy URL (SQLite file or PostgreSQL)."""
    # Persistent connections, and WAL on SQLite: what a deployment of either would use.
    if url.startswith("sqlite"):
        return repr(
            {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": url.split("///", 1)[1],
                "CONN_MAX_AGE": 600,
                "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;", "timeout": 20},
            }
        )
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    return repr(
        {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parsed.database,
            "USER": parsed.username,
            "PASSWORD": parsed.password or "",
            "HOST": parsed.host,
            "PORT": str(parsed.port or 5432),
            "CONN_MAX_AGE": 600,
        }
    )


def start_peer(
    stack: ExitStack, folder: Path, emulator_url: str, database_url: str, users: int
) -> tuple[str, list[tuple[str, str]], subprocess.Popen[bytes]]:
    """Set up and up.start the peer; return its URL, (user id, token) of the one-user rows'
    user and then of `users` more, and its gunicorn master."""
    python = peer_python()
    folder.mkdir(parents=True)
    (folder / "peer_settings.py").write_text(
        PEER_SETTINGS.format(
            database=peer_database(database_url),
            account=up.ACCOUNT,
            token=up.TOKEN,
            api_base=f"{emulator_url}/client/v4",
        )
    )
    (folder / "peer_urls.py").write_text(PEER_URLS)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "peer_settings", "PYTHONPATH": str(folder)}
    admin = [str(python), "-m", "django"]
    subprocess.run([*admin, "migrate", "-v", "0"], env=env, cwd=folder, check=True)
    done = subprocess.run(
        [str(python), "-c", PEER_USER, str(users)],
        env=env,
        cwd=folder,
        check=True,
        capture_output=True,
    )
    made = [(pk, key) for pk, key in (line.split() for line in done.stdout.decode().splitlines())]
    port = up.free_port()
    gunicorn = str(python.parent / "gunicorn")
    proc = up.start(
        stack,
        [gunicorn, *GUNICORN, "-b", f"127.0.0.1:{port}", "django.core.wsgi:get_wsgi_application()"],
        {"DJANGO_SETTINGS_MODULE": "peer_settings", "PYTHONPATH": str(folder)},
        folder / "gunicorn.log",
        cwd=folder,
    )
    return f"http://127.0.0.1:{port}", made[-1 - users :], proc


def analyze(databases: list[str]) -> None:
    """Give PostgreSQL's planner the statistics of each database, every side alike: in
    production autovacuum gathers them within a minute of a table's first rows, and a fresh
    bench database is younger than that (without them the planner may pick any index that
    starts with the user's id). SQLite gathers none by itself, so nothing is done there."""
    import sqlalchemy as sa

    for url in databases:
        if not url.startswith("postgresql"):
            continue
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
        engine.dispose()


def prepare_in(root: Path, settings: dict[str, Any], count: int = 1) -> list[str]:
    """Migrate and create `count` users with `root`'s own code (one process there); return
    their tokens."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys\n"
            "from tests.bench.bench_uploads import prepare_broker\n"
            "settings = json.loads(sys.argv[1])\n"
            "print(json.dumps([prepare_broker(settings) for _ in range(int(sys.argv[2]))]))",
            json.dumps(settings),
            str(count),
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        capture_output=True,
    )
    tokens: list[str] = json.loads(done.stdout.decode().splitlines()[-1])
    return tokens


def start_broker(
    stack: ExitStack, root: Path, settings: dict[str, Any], log: Path, users: int
) -> tuple[str, list[str], subprocess.Popen[bytes]]:
    """Migrate, add the one-user rows' user and `users` more, and up.start `root`'s broker;
    return its URL, their tokens (that user's first) and its master."""
    secrets = prepare_in(root, settings, 1 + users)
    env = {f"BROKER_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()}
    port = up.free_port()
    proc = up.start(
        stack,
        [str(up.BIN / "gunicorn"), *GUNICORN, "-b", f"127.0.0.1:{port}", "wsgi:app"],
        {**env, "PYTHONPATH": str(root)},
        log,
        cwd=root,
    )
    return f"http://127.0.0.1:{port}", secrets, proc


def process_memory(pid: int | str) -> dict[str, float]:
    """Return a process's memory (MB) from /proc/PID/smaps_rollup: `rss` (resident, what `ps`
    and the peer's figure show: shared pages counted in every process that maps them), `pss`
    (shared pages split between the processes that map them) and `private` (pages this process
    alone holds: what one more process costs)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        fields[name] = int(value.split()[0])
    private = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"rss": fields["Rss"] / 1024, "pss": fields["Pss"] / 1024, "private": private / 1024}


def worker_memory(master: subprocess.Popen[bytes]) -> list[dict[str, float]]:
    """Return the memory of each worker of a gunicorn master, then the master's own."""
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
    return [process_memory(pid) for pid in children] + [process_memory(master.pid)]


def memory_line(name: str, warm: list[dict[str, float]], after: list[dict[str, float]]) -> str:
    """Render one side's worker memory, warm and after the run, RSS first; then its master."""

    def sizes(measured: list[dict[str, float]], kind: str) -> str:
        return "/".join(f"{m[kind]:.0f}" for m in measured[:-1])

    master = after[-1]
    return (
        f"RSS per worker, {name}: warm {sizes(warm, 'rss')} MB, after the run "
        f"{sizes(after, 'rss')} MB (PSS {sizes(warm, 'pss')} → {sizes(after, 'pss')}, "
        f"private {sizes(warm, 'private')} → {sizes(after, 'private')}; master RSS "
        f"{master['rss']:.0f}, PSS {master['pss']:.0f}, private {master['private']:.0f})"
    )


def statements_per_create(settings: dict[str, Any]) -> str:
    """Count what one create runs (after one that warmed the token), in process, on each side:
    the main engine, the budget's, and the token cache's version read."""
    import sqlalchemy as sa

    from broker import create_app
    from broker.platform.db import db
    from broker.upstream.budget import get_budget

    app = create_app(dict(settings))
    secret = prepare_in(ROOT, settings)[0]
    client = app.test_client()
    auth = {"Authorization": f"Bearer {secret}"}
    counted: dict[str, int] = {"main": 0, "budget": 0, "commit": 0}
    with app.app_context():
        engines = {"main": db.engine, "budget": get_budget().engine}

    def counter(label: str) -> Any:
        def on_execute(*_: Any) -> None:
            counted[label] += 1

        return on_execute

    def on_commit(*_: Any) -> None:
        counted["commit"] += 1

    assert client.post("/api/v1/uploads", json={}, headers=auth).status_code == 201
    stamp = app.extensions.get("tokens")
    reads = getattr(getattr(stamp, "stamp", None), "reads", 0)
    for label, engine in engines.items():
        sa.event.listen(engine, "before_cursor_execute", counter(label))
        sa.event.listen(engine, "commit", on_commit)
    answer = client.post("/api/v1/uploads", json={}, headers=auth)
    assert answer.status_code == 201, answer.get_data(as_text=True)
    stamp_reads = getattr(getattr(stamp, "stamp", None), "reads", 0) - reads
    with app.app_context():
        db.engine.dispose()
        get_budget().engine.dispose()
    if stamp is not None:
        stamp.stamp.close()
    return (
        f"{counted['main']} main + {counted['budget']} budget + {stamp_reads} token-version "
        f"statements, {counted['commit']} commits"
    )


def export(rev: str, folder: Path) -> Path:
    """Return a copy of the tree at `rev` (`git archive`) under `folder`."""
    tree = folder / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", rev], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def bare_route(root: Path) -> dict[str, float]:
    """Return `root`'s bare-route CPU per request with and without a bearer (its own code)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, tempfile\n"
            "from pathlib import Path\n"
            "from tests.bench.bench_scale import part3\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            "    print(json.dumps(part3(Path(tmp))))",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        capture_output=True,
    )
    result: dict[str, float] = json.loads(done.stdout.decode().splitlines()[-1])
    return result


def measure(
    stack: ExitStack, tmp: Path, label: str, postgres: str | None, opts: argparse.Namespace
) -> None:
    """Run every side on one database and print its table."""
    from tests.bench.bench_scale import start_emulator

    emulator_url = start_emulator(stack, tmp, EMULATOR_RATE_LIMIT="1000000000")
    roots = {"broker": ROOT}
    if opts.baseline:
        roots["baseline"] = export(opts.baseline, tmp)
    # Per side: its URL, then each user's (headers, body): the one-user rows' user first.
    targets: dict[str, tuple[str, list[Request], subprocess.Popen[bytes]]] = {}
    databases: list[str] = []
    for name, root in roots.items():
        database = fresh_database(stack, postgres, tmp, f"{label}_{name}")
        databases.append(database)
        settings = up.broker_settings(tmp / name, emulator_url, database)
        url, secrets, proc = start_broker(stack, root, settings, tmp / f"{name}.log", opts.users)
        body = {"metadata": {"k": "v"}}
        sent = [({"Authorization": f"Bearer {secret}"}, body) for secret in secrets]
        targets[name] = (url + "/api/v1/uploads", sent, proc)
    peer_db = fresh_database(stack, postgres, tmp, f"{label}_peer")
    databases.append(peer_db)
    peer_url, peer_users, peer_proc = start_peer(
        stack, tmp / "peer", emulator_url, peer_db, opts.users
    )
    targets["peer"] = (
        peer_url + "/cf/api/upload-url/",
        [
            (
                {"Authorization": f"Token {token}"},
                {"metadata": {"k": "v"}, "creator": f"u_{user_id}", "expiry_minutes": 30},
            )
            for user_id, token in peer_users
        ],
        peer_proc,
    )
    for url, *_ in targets.values():
        up.wait_until_up(url.rsplit("/", 3)[0] + "/", timeout=90)

    from broker.upstream.cloudflare import CloudflareImages

    # One client for every load thread: its connection pool is shared and thread-safe.
    client = CloudflareImages(
        f"{emulator_url}/client/v4", up.ACCOUNT, up.TOKEN, timeout=30, max_retries=0, pool_size=64
    )
    stack.callback(client.close)

    def direct(session: requests.Session) -> None:
        expiry = datetime.now(UTC) + timedelta(minutes=30)
        client.direct_upload(creator="u_bench", expiry=expiry, metadata={"k": "v"})

    def poster(url: str, next_request: Callable[[], Request]) -> Call:
        def call(session: requests.Session) -> None:
            headers, body = next_request()
            answer = session.post(url, json=body, headers=headers, timeout=30)
            if answer.status_code != 201:
                raise RuntimeError(f"{answer.status_code}: {answer.text[:200]}")

        return call

    def one_user(request: Request) -> Callable[[], Request]:
        return lambda: request

    # The emulator has no users: the many-users row's reference is the same call.
    calls: dict[str, Call] = {"emulator": direct}
    calls.update({name: poster(url, one_user(sent[0])) for name, (url, sent, _) in targets.items()})
    many: dict[str, Call] = {"emulator": direct}
    many.update({name: poster(url, in_turn(sent[1:])) for name, (url, sent, _) in targets.items()})
    warming = [*calls.values(), *([many[name] for name in targets] if opts.users else [])]
    clients = [int(c) for c in opts.clients.split(",")]
    for call in warming:
        # As many clients as the busiest row: every process and thread serves, every pool
        # connection opens (and each user's token is read) before "warm" memory is taken. Four
        # clients often reached one of the two processes only, whose first-run pages then read
        # as growth over the run.
        up.run_load(call, max(clients), 1.0)
    analyze(databases)
    warm = {name: worker_memory(proc) for name, (*_, proc) in targets.items()}

    print(f"\n{label}: gunicorn 2 x 16 gthread each; {opts.seconds:g} s per row")
    names = list(calls)
    rows = [(f"{n}", n, calls) for n in clients]
    if opts.users:
        rows.append((f"{max(clients)}, {opts.users} users", max(clients), many))
    width = max(len("clients"), *(len(row) for row, *_ in rows))
    head = f"{'clients':>{width}} " + " ".join(f"{n + ' /s':>13}" for n in names)
    head += " " + " ".join(f"{n + ' ÷ emu':>14}" for n in names[1:])
    head += " " + " ".join(f"{n + ' +p99':>14}" for n in names[1:])
    print(head)
    print("-" * len(head))
    for row, count, row_calls in rows:
        rate, p99 = {}, {}
        for name, call in row_calls.items():
            latencies, failed = up.run_load(call, count, opts.seconds)
            rate[name] = len(latencies) / opts.seconds
            p99[name] = up.percentile(latencies, 99)
            if failed:
                print(f"  {name}: {failed} failed", file=sys.stderr)
        line = f"{row:>{width}} " + " ".join(f"{rate[n]:>13.0f}" for n in names)
        line += " " + " ".join(f"{rate[n] / rate['emulator']:>14.0%}" for n in names[1:])
        line += " " + " ".join(f"{p99[n] - p99['emulator']:>11.0f} ms" for n in names[1:])
        print(line, flush=True)
    time.sleep(1.5)  # the run's last requests finish (and freed heap pages go back)
    after = {name: worker_memory(proc) for name, (*_, proc) in targets.items()}
    for name in targets:
        print(memory_line(name, warm[name], after[name]))
    counting = fresh_database(stack, postgres, tmp, f"{label}_count")
    count_settings = {**up.broker_settings(tmp / "count", emulator_url, counting)}
    count_settings["CLOUDFLARE_BATCH"] = "auto"
    print(
        f"statements per create (this tree, batch API on): {statements_per_create(count_settings)}"
    )


def main() -> int:
    """Print the issue's table on each database, every side measured in the same run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--baseline", default="", help="a commit to measure beside this tree")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--users", type=int, default=256, help="the many-users row's users (0: no such row)"
    )
    opts = parser.parse_args()
    postgres = os.environ.get("BENCH_DATABASE_URL")
    wanted = [d.strip() for d in opts.databases.split(",") if d.strip()]
    started = time.monotonic()
    stack_tmp = tempfile.TemporaryDirectory(prefix="bench-peer-trees-")
    for label in wanted:
        if label == "postgresql" and not postgres:
            print("\npostgresql: skipped (set BENCH_DATABASE_URL to a PostgreSQL server)")
            continue
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peer-")))
            measure(stack, tmp, label, postgres if label == "postgresql" else None, opts)
    roots = {"broker": ROOT}
    if opts.baseline:
        roots["baseline"] = export(opts.baseline, Path(stack_tmp.name))
    for name, root in roots.items():
        bare = bare_route(root)
        plain, bearer = 1 / bare["broker"], 1 / bare["bare_auth"]
        print(
            f"bare route, in process (SQLite), {name}: {plain:,.0f} req/s without a bearer, "
            f"{bearer:,.0f} with one = {bearer / plain:.2f}"
        )
    stack_tmp.cleanup()
    print(textwrap.dedent(f"(whole run {time.monotonic() - started:.0f} s)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
