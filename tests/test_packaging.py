"""A non-editable install (a wheel) carries the templates and static files and keeps its
instance folder where the README says; a refused configuration stops gunicorn; the repository
stands on its own."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.factories import TEST_ENCRYPTION_KEY

ROOT = Path(__file__).resolve().parent.parent
# Where the repository's own text lives (beside its top-level files), and what counts as text.
SOURCES = ("broker", "tests", "templates", "static", ".ci")
TEXT = {".py", ".md", ".toml", ".txt", ".html", ".js", ".css", ".cfg", ".ini", ".sh", ""}
REFUSAL = (
    "upload broker refuses to start: BROKER_SECRET_KEY is the insecure default; "
    "set a long random value"
)
# Production settings in order but the secret key: the refusal names that one problem (each
# start names every problem, one line each under a count when there are several).
OTHERWISE_READY = {
    "BROKER_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
    "BROKER_CLOUDFLARE_ACCOUNT_ID": "a",
    "BROKER_CLOUDFLARE_API_TOKEN": "t",
    "BROKER_CLOUDFLARE_ACCOUNT_HASH": "h",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The broker's wheel, built once for this module."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "--target", "wheel", "--directory", dist],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (built,) = dist.glob("*.whl")
    return built


def test_wheel_ships_templates_and_renders_them_from_elsewhere(tmp_path, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "broker/templates/base.html" in names
    assert "broker/static/css/app.css" in names
    assert any(n.startswith("broker/migrations/versions/") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(
        f"""
        from broker import create_app
        app = create_app({{"ENV": "testing", "SECRET_KEY": "x", "INSTANCE_PATH": {str(tmp_path)!r},
                          "DATABASE_URL": "sqlite://"}})
        assert app.template_folder.startswith({str(site)!r}), app.template_folder
        page = app.test_client().get("/")
        assert page.status_code == 200 and "<title>Upload broker</title>" in page.text
        css = app.test_client().get("/static/css/app.css")
        assert css.status_code == 200 and b"--accent" in css.data
        css.close()
        print("rendered")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rendered"


def test_instance_folder_after_pip_install_is_where_the_readme_says(tmp_path, wheel):
    """README: after `pip install .` the default instance folder (and SQLite file) is
    `<prefix>/var/broker-instance`, inside the environment; the broker warns and says what to
    set. BROKER_INSTANCE_PATH moves it anywhere, a reinstall included."""
    prefix = tmp_path / "venv"
    # --ignore-installed: never uninstall the running environment's own (editable) broker.
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
    ]
    subprocess.run(
        [*pip, "--no-compile", "--prefix", str(prefix), str(wheel)],
        check=True,
        capture_output=True,
    )
    (site,) = prefix.glob("lib/python*/site-packages")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "from broker import create_app; app = create_app(); "
        "print(app.instance_path); print(app.config['DATABASE_URL'])"
    )

    def instance(**env: str) -> tuple[list[str], str]:
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=elsewhere,
            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "BROKER_ENV": "testing", **env},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split(), result.stderr

    (path, url), warning = instance()
    assert path == str(prefix / "var" / "broker-instance")
    assert url == f"sqlite:///{path}/broker.sqlite3"
    assert "BROKER_INSTANCE_PATH" in warning and path in warning
    kept = tmp_path / "state"
    (path, url), warning = instance(BROKER_INSTANCE_PATH=str(kept))
    assert (path, url) == (str(kept), f"sqlite:///{kept}/broker.sqlite3")
    assert "BROKER_INSTANCE_PATH" not in warning
    (_, _), warning = instance(BROKER_DATABASE_URL="sqlite:///" + str(kept / "x.sqlite3"))
    assert "BROKER_INSTANCE_PATH" not in warning  # no SQLite file in the environment


def test_production_with_default_secret_fails_fast_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=ROOT,
        env={
            "BROKER_ENV": "production",
            "BROKER_INSTANCE_PATH": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            **OTHERWISE_READY,
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 4  # gunicorn's "application cannot load"
    assert result.stderr.strip().splitlines() == [REFUSAL]


@pytest.mark.parametrize("workers", [1, 2])
def test_gunicorn_stops_on_a_refused_configuration(tmp_path, workers):
    """A refused configuration stops the whole server, master included, with the one-line
    reason; no worker is booted again and again. (When several workers fail at the same moment,
    gunicorn 27 stops all the same but reports status 1 and a traceback of its own.)"""
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    server = subprocess.Popen(
        [gunicorn, "--bind", "127.0.0.1:0", "--workers", str(workers), "wsgi:app"],
        cwd=ROOT,
        env={
            "BROKER_ENV": "production",
            "BROKER_INSTANCE_PATH": str(tmp_path),
            "HOME": str(tmp_path),  # gunicorn's control socket goes there, not in a shared home
            "PATH": "/usr/bin:/bin",
            **OTHERWISE_READY,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode in ((4,) if workers == 1 else (4, 1)), stderr
    lines = stderr.splitlines()
    assert 1 <= lines.count(REFUSAL) <= workers, stderr  # each booted once, not again and again
    assert "App failed to load" in stderr


def test_the_repository_stands_on_its_own():
    """Nothing in the repository points at the team's notes outside it; the emulator's wire
    facts are written down in it, each with a public Cloudflare link."""
    outside = re.compile("(" + "|".join(["shared" + "/", "/work" + "/"]) + ")")
    found = []
    for path in [*ROOT.glob("*"), *(p for d in SOURCES for p in (ROOT / d).rglob("*"))]:
        if path.name == ".git" or "__pycache__" in path.parts:  # a worktree's .git is a file
            continue
        if path.is_file() and path.suffix in TEXT:
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if outside.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
    emulator_readme = (ROOT / "broker" / "emulator" / "README.md").read_text()
    facts = emulator_readme.split("## Wire facts", 1)[1].split("\n## ", 1)[0]
    for topic in ("direct_upload", "uploadURL", "draft", "exp=", "cf-webhook-auth", "1200"):
        assert topic in facts, topic
    links = re.findall(r"\]\((https?://[^)]+)\)", facts)
    assert len(links) >= 8 and all(
        u.startswith("https://developers.cloudflare.com/") for u in links
    )
