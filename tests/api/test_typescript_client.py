"""A TypeScript app against the broker: types generated from the live OpenAPI document by
openapi-typescript at its default options, a client program (tests/ts/flow.ts) type-checked
with tsc, then run with node through the whole flow against the live broker and the emulator.

Needs node and the pinned npm packages in tests/ts/node_modules (`npm ci --prefix tests/ts`,
which .ci/run does); without them the tests skip saying so (in CI they fail).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import factories
from tests.conftest import require

TS = Path(__file__).resolve().parents[1] / "ts"
MODULES = TS / "node_modules"
GENERATOR = MODULES / "openapi-typescript" / "bin" / "cli.js"
TSC = MODULES / "typescript" / "bin" / "tsc"


@pytest.fixture
def node() -> str:
    """The node binary, with the pinned packages installed (skip, or fail in CI, without)."""
    found = shutil.which("node")
    require(found is not None, "needs node on PATH")
    require(
        GENERATOR.exists() and TSC.exists(),
        "needs the npm packages of tests/ts: run `npm ci --prefix tests/ts`",
    )
    assert found
    return found


def _run(*args: Any, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )


def _project(tmp_path: Path, node: str, document: dict[str, Any], program: str) -> Path:
    """Generate `api.d.ts` from `document` next to `program`, with a strict tsconfig."""
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    made = _run(node, GENERATOR, "openapi.json", "--output", "api.d.ts", cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    (tmp_path / "flow.ts").write_text(program)
    config = {
        "compilerOptions": {
            "target": "ES2022",
            "module": "NodeNext",
            "moduleResolution": "NodeNext",
            "strict": True,
            "noEmitOnError": True,
            "skipLibCheck": True,
            "outDir": "out",
            "typeRoots": [str(MODULES / "@types")],
            "types": ["node"],
        },
        "files": ["flow.ts", "api.d.ts"],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    (tmp_path / "package.json").write_text('{"type": "module"}')
    return tmp_path


@pytest.fixture
def live(make_app: Any, make_user: Any, fresh_emulator: Any) -> Iterator[tuple[str, Any]]:
    """The broker over real HTTP with synced variants and keys, and a user."""
    app = make_app()
    for command in (["variants", "sync"], ["keys", "sync"]):
        assert app.test_cli_runner().invoke(args=command).exit_code == 0
    make_user("ana")
    with factories.live_server(app) as url:
        yield url, app


@pytest.fixture
def emulator(fresh_emulator: Any) -> Any:
    """An emulator of these tests' own (they sync variants and keys into it)."""
    return fresh_emulator


def test_a_typescript_app_creates_with_only_what_it_needs_and_runs_the_flow(
    live: tuple[str, Any], node: str, tmp_path: Path
) -> None:
    from broker.emulator.testing import make_image

    url, _ = live
    document = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
    project = _project(tmp_path, node, document, (TS / "flow.ts").read_text())
    checked = _run(node, TSC, "-p", "tsconfig.json", cwd=project)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    image = tmp_path / "photo.png"
    image.write_bytes(make_image(64, 48))
    env = {
        "PATH": str(Path(node).parent),
        "BROKER_URL": url,
        "BROKER_USERNAME": "ana",
        "BROKER_PASSWORD": factories.PASSWORD,
        "IMAGE_PATH": str(image),
    }
    ran = _run(node, "out/flow.js", cwd=project, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert seen == {
        "created": 201,
        "sent": 200,
        "complete": 200,
        "status": "ready",
        "file_state": "received",
        "image": 200,
        "image_type": seen["image_type"],
    }
    assert seen["image_type"].startswith("image/")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("{ expires: 60 }", "a field the API does not have"),
        ('{ expires_in: "60" }', "a string where a number goes"),
    ],
)
def test_the_type_check_refuses_a_wrong_request(
    live: tuple[str, Any], node: str, tmp_path: Path, body: str, why: str
) -> None:
    """The check can fail: a body the document does not allow is a tsc error."""
    url, _ = live
    document = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
    program = (
        'import type { paths } from "./api.js";\n'
        'type Body = paths["/api/v1/uploads"]["post"]["requestBody"];\n'
        'type Create = NonNullable<Body>["content"]["application/json"];\n'
        f"export const wrong: Create = {body};\n"
    )
    project = _project(tmp_path, node, document, program)
    checked = _run(node, TSC, "-p", "tsconfig.json", cwd=project)
    assert checked.returncode != 0, why
    assert "error TS" in checked.stdout, checked.stdout
