"""The suite's own layout: tests mirror the packages they test, and read CSRF tokens one way."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# Test folders that are not a broker package: the pages driven in real Chromium, and the
# whole topology as real processes.
HARNESSES = {"browser", "system"}
# Test modules at the top of tests/, each with what it tests.
TOP_LEVEL = {
    "test_app.py": "broker/__init__.py",  # create_app()
    "test_devserver.py": "broker/devserver.py",
    "test_worker.py": "broker/worker.py",
    "test_packaging.py": "pyproject.toml",
    "test_deployment.py": "compose.yaml",
    "test_compose.py": ".env.example",  # and .env.emulator, with compose.yaml
    "test_operations.py": "broker/operations.py",
    "test_retention.py": "broker/retention.py",
    "test_layout.py": "tests/__init__.py",
    "test_readme.py": "README.md",
}


def _packages() -> set[str]:
    return {p.parent.name for p in (ROOT / "broker").glob("*/__init__.py")} - {"migrations"}


def test_test_modules_mirror_the_packages() -> None:
    """A test module lives in tests/<package>/ for broker/<package>/, or at the top for a
    top-level module: never in a folder named after where the test came from."""
    misplaced = []
    for module in TESTS.rglob("test_*.py"):
        folder = module.parent.relative_to(TESTS).parts
        if not folder:
            if module.name not in TOP_LEVEL:
                misplaced.append(str(module.relative_to(ROOT)))
        elif folder[0] not in _packages() | HARNESSES:
            misplaced.append(str(module.relative_to(ROOT)))
    assert misplaced == []
    assert [t for t in TOP_LEVEL.values() if not (ROOT / t).exists()] == []


def test_every_package_has_its_test_package() -> None:
    """broker/<package>/ has tests/<package>/, importable as `tests.<package>`."""
    missing = [p for p in sorted(_packages()) if not (TESTS / p / "__init__.py").exists()]
    assert missing == []
    folders = {m.parent for m in TESTS.rglob("*.py")} - {TESTS}
    assert [str(f) for f in sorted(folders) if not (f / "__init__.py").exists()] == []


def test_csrf_tokens_are_read_by_the_one_helper() -> None:
    """No test cuts a CSRF token out of a page by string splitting: `factories.csrf_from` does."""
    cutting = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in TESTS.rglob("*.py")
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "csrf-token" in line and ".split(" in line
    ]
    assert cutting == []


def test_only_the_database_url_fixture_reads_the_test_database_from_the_environment() -> None:
    """CI's PostgreSQL pass (BROKER_TEST_DATABASE_ONLY=1, tests/conftest.py) runs only the tests
    that ask for `database_url` or `postgres_url`: a test reading the URL itself would escape it."""
    readers = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in TESTS.rglob("*.py")
        if path not in (TESTS / "conftest.py", Path(__file__).resolve())
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if any(name in line for name in ("BROKER_TEST_DATABASE_URL", "BROKER_TEST_POSTGRES_URL"))
        and ("environ" in line or "getenv" in line)
    ]
    assert readers == []
