"""The transaction rule of `broker.platform.db`, checked: domain modules never commit or roll back.

Only views, CLI commands, the worker loop, the leased-work unit (`broker.platform.leases`) and
the development commands own a unit of work; every other module works in the session it is
given. The check reads the source (ast), so it holds for code no test happens to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

BROKER = Path(__file__).resolve().parents[2] / "broker"

# Who may commit or roll back, by paths relative to broker/: a module name any feature may
# have, a top folder, or one module.
OWNERS_BY_NAME = {"api.py", "views.py", "cli.py"}  # views and CLI commands (broker/cli.py too)
OWNERS_BY_FOLDER = {"web", "api"}  # the browser pages; the API's own plumbing
OWNERS = {
    "platform/leases.py",  # the leased-work unit
    "worker.py",  # the worker loop: each job's leftovers
    "devserver.py",  # development command: make run's setup
    "auth/middleware.py",  # the request middleware: authentication's own unit of work
    "uploads/cloudflare_hook.py",  # a view: Cloudflare's inbound completion notification
    "platform/health.py",  # views: /livez and /readyz (a probe's failed query is rolled back)
    "platform/outages.py",  # an error handler: a request the database failed is rolled back
    "uploads/warmup.py",  # a web process's warm-up: the create path in a rolled-back transaction
    "reconcile/run.py",  # a whole-account walk: commits between its steps, none open upstream
}


def _may_commit(relative: Path) -> bool:
    return (
        relative.name in OWNERS_BY_NAME
        or relative.parts[0] in OWNERS_BY_FOLDER
        or relative.as_posix() in OWNERS
    )


def transaction_calls(source: str) -> list[tuple[int, str]]:
    """Return (line, name) of every `….commit()` and `….rollback()` call in `source`.

    `super().commit()` is not one: it is a connection class implementing commit itself
    (broker.platform.sqlite_writes), not a unit of work ending.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("commit", "rollback"):
            continue
        target = node.func.value
        if (
            isinstance(target, ast.Call)
            and isinstance(target.func, ast.Name)
            and target.func.id == "super"
        ):
            continue
        found.append((node.lineno, node.func.attr))
    return found


def breaches(root: Path = BROKER) -> list[str]:
    """Return `path:line: name()` for every commit or rollback outside the modules that own one."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] == "migrations" or _may_commit(relative):
            continue
        for line, name in transaction_calls(path.read_text()):
            found.append(f"{relative.as_posix()}:{line}: {name}()")
    return found


def test_domain_modules_never_commit_or_roll_back() -> None:
    """Every commit()/rollback() in broker/ is in a view, a CLI command, the worker loop or the
    leased-work unit."""
    assert breaches() == []


def test_the_check_finds_a_planted_commit(tmp_path: Path) -> None:
    """A domain module that commits (or rolls back) is named, with its line; a view is not."""
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "completion.py").write_text(
        "def finish(session):\n    session.flush()\n    session.commit()\n"
        "def undo(session):\n    db.session.rollback()\n"
    )
    (tmp_path / "uploads" / "api.py").write_text("def view():\n    db.session.commit()\n")
    (tmp_path / "platform").mkdir()
    (tmp_path / "platform" / "pool.py").write_text(
        "class C(Base):\n    def commit(self):\n        super().commit()\n"
    )
    assert breaches(tmp_path) == [
        "uploads/completion.py:3: commit()",
        "uploads/completion.py:5: rollback()",
    ]


def test_every_named_owner_exists_and_commits() -> None:
    """A module named as an owner still exists and still commits: the list cannot go stale."""
    stale = [
        name
        for name in OWNERS
        if not (BROKER / name).exists() or not transaction_calls((BROKER / name).read_text())
    ]
    assert stale == []
