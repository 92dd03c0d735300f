"""A web process loads only what serving requests needs: the migration tooling (Alembic, Mako,
Pygments), the emulator, Pillow, PyJWT (OpenID Connect only) and jsonschema (a profile with a
metadata schema only) wait until something asks for them; of SQLAlchemy's dialects only the
database's own is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from tests.factories import production_env

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_A_WEB_PROCESS = (
    "alembic",
    "mako",
    "pygments",
    "flask_migrate",
    "PIL",
    "broker.emulator",
    "jwt",
    "cryptography.x509",
    "jsonschema",
)
# A JWT-shaped bearer, a token that matches nothing and a page: the ways a request could pull
# in what only OIDC needs.
PROBE = (
    "import json, sys, wsgi\n"
    "client = wsgi.app.test_client()\n"
    "client.get('/livez')\n"
    "for bearer in ('eyJhbGciOiJSUzI1NiJ9.e30.x', 'brk_nothing'):\n"
    "    client.get('/api/v1/uploads', headers={'Authorization': 'Bearer ' + bearer})\n"
    "client.get('/login')\n"
    f"print(json.dumps([m for m in {list(NOT_IN_A_WEB_PROCESS)!r} if m in sys.modules]))\n"
)


def _run(args: list[str], database_url: str, tmp_path: Path, **env_overrides: str) -> str:
    """Run `args` as a production process on `database_url`; return its output."""
    env = {**production_env(database_url, str(tmp_path)), **env_overrides}
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_web_process_leaves_the_tooling_unloaded(migrated: str, tmp_path: Path) -> None:
    out = _run([sys.executable, "-c", PROBE], migrated, tmp_path)
    assert json.loads(out.splitlines()[-1]) == []


def test_a_web_process_loads_the_sqlalchemy_dialect_of_its_database_only(
    migrated: str, tmp_path: Path
) -> None:
    name = sa.make_url(migrated).get_backend_name()
    other = {"sqlite": "postgresql", "postgresql": "sqlite"}[name]
    # The warm-up runs the create path's statements; upsert_insert builds its ON CONFLICT ones.
    probe = (
        "import sys, wsgi\n"
        "from broker.platform.db import upsert_insert\n"
        "wsgi.app.extensions['warm_up'](connections=1)\n"
        f"upsert_insert({name!r})\n"
        f"print(sorted(m for m in sys.modules if m.startswith('sqlalchemy.dialects.{other}')))\n"
    )
    out = _run([sys.executable, "-c", probe], migrated, tmp_path)
    assert out.splitlines()[-1] == "[]"


def test_what_a_setting_asks_for_is_loaded_at_start(migrated: str, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.avatar]\nmetadata_schema = { type = "object" }\n')
    out = _run(
        [sys.executable, "-c", PROBE],
        migrated,
        tmp_path,
        BROKER_OIDC_ISSUER="https://issuer.example",
        BROKER_OIDC_AUDIENCE="broker",
        BROKER_UPLOAD_PROFILES=str(profiles),
    )
    assert json.loads(out.splitlines()[-1]) == ["jwt", "cryptography.x509", "jsonschema"]


def test_flask_db_still_runs_flask_migrate(migrated: str, tmp_path: Path) -> None:
    flask = str(Path(sys.executable).parent / "flask")
    assert "(head)" in _run([flask, "--app", "broker", "db", "current"], migrated, tmp_path)
