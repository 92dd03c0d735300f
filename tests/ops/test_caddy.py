"""The guide's Caddyfile is one Caddy accepts, and it sets the forwarding header itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import require
from tests.ops.guide import block, run


def test_caddy_adapts_the_guides_caddyfile(tmp_path: Path) -> None:
    """`caddy adapt` (Debian's caddy) turns it into a config: the two upstreams, the body
    limit, and X-Forwarded-For set to the address Caddy sees."""
    caddy = shutil.which("caddy")
    require(caddy is not None, "needs caddy (Debian package caddy)")
    assert caddy
    path = tmp_path / "Caddyfile"
    path.write_text(block("# /etc/caddy/Caddyfile", "caddy"))
    done = run([caddy, "adapt", "--config", str(path), "--adapter", "caddyfile"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    server = next(iter(config["apps"]["http"]["servers"].values()))
    text = json.dumps(server)
    assert '"broker.example.com"' in text
    assert '"dial": "10.0.0.11:8000"' in text and '"dial": "10.0.0.12:8000"' in text
    assert '"X-Forwarded-For": ["{http.request.remote.host}"]' in text
    assert '"max_size": 1000000' in text
