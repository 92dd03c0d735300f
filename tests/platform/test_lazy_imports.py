"""A web process loads only what serving requests needs: the migration tooling (Alembic, Mako,
Pygments), the emulator and Pillow wait until something asks for them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.factories import production_env

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_A_WEB_PROCESS = ("alembic", "mako", "pygments", "flask_migrate", "PIL", "broker.emulator")


def _run(args: list[str], database_url: str, tmp_path: Path) -> str:
    """Run `args` as a production process on `database_url`; return its output."""
    env = production_env(database_url, str(tmp_path))
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_web_process_leaves_the_tooling_unloaded(migrated: str, tmp_path: Path) -> None:
    probe = (
        "import json, sys, wsgi\n"
        "wsgi.app.test_client().get('/livez')\n"
        f"print(json.dumps([m for m in {list(NOT_IN_A_WEB_PROCESS)!r} if m in sys.modules]))\n"
    )
    out = _run([sys.executable, "-c", probe], migrated, tmp_path)
    assert json.loads(out.splitlines()[-1]) == []


def test_flask_db_still_runs_flask_migrate(migrated: str, tmp_path: Path) -> None:
    flask = str(Path(sys.executable).parent / "flask")
    assert "(head)" in _run([flask, "--app", "broker", "db", "current"], migrated, tmp_path)
