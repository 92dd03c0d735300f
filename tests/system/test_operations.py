"""The operations guide, run as written: its nginx and Caddy configs each in front of two
gunicorn instances, its install, services, secrets and first-admin commands, and its backup and
restore.

The blocks come from broker/OPERATIONS.md (tests/support/guide.py finds them by first line), so
the test runs what the guide says; only addresses, the certificate and ports are swapped for
loopback ones. Needs PostgreSQL (BROKER_TEST_POSTGRES_URL), nginx, caddy and redis-server (Debian).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet

from broker import create_app
from broker.platform.db import db
from broker.webhooks.models import WebhookEndpoint
from tests.conftest import base_config, require
from tests.support import databases as ops_fixtures
from tests.support.guide import block, run
from tests.support.tls import self_signed
from tests.system.topology import (
    BIN,
    compose_commands,
    listening_socket,
    topology,
    wait_for,
    wait_http,
)

# The scratch-database fixture (tests/support/databases.py) (a module attribute pytest collects).
new_database = ops_fixtures.new_database

ROOT_DIR = Path(__file__).resolve().parents[2]
HOST = "broker.example.com"
AUTH_LIMIT = 3


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as psql and pg_dump take it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _base_env(work: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "FLASK_"))},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "BROKER_INSTANCE_PATH": str(work / "instance"),
    }


def run_block(text: str, env: dict[str, str], cwd: Path, stdin: str = "") -> str:
    """Run a guide's shell block with `sh -e` as a reader pastes it; return its output."""
    done = run(["sh", "-e", "-c", text], env, cwd, stdin)
    assert done.returncode == 0, f"{text}\nfailed ({done.returncode}):\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def nginx_conf(work: Path, web_ports: list[int], http_port: int, https_port: int) -> Path:
    """The guide's site file with loopback addresses, inside a main config of the test's own."""
    site = block(
        "# /etc/nginx/sites-available/broker — then: ln -s ../sites-available/broker "
        "/etc/nginx/sites-enabled/",
        "nginx",
    )
    cert, key = self_signed(work, HOST)
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in web_ports)
    site, n = re.subn(r"(?m)^    server 10\.0\.0\.\d+:8000;.*\n", "", site)
    assert n == 2
    site = site.replace("    keepalive 16;", servers + "    keepalive 16;")
    site = re.sub(r"(?m)^    listen \[::\].*\n", "", site)
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    site = site.replace("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl")
    site = site.replace(f"/etc/letsencrypt/live/{HOST}/fullchain.pem", str(cert))
    site = site.replace(f"/etc/letsencrypt/live/{HOST}/privkey.pem", str(key))
    assert "10.0.0." not in site and "/etc/" not in site.split("\n", 1)[1]
    (work / "broker.conf").write_text(site)
    for folder in ("client_body", "proxy"):
        (work / folder).mkdir()
    main = work / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    main.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {work}/nginx.pid;\n"
        f"error_log {work}/nginx-error.log info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n  access_log {work}/nginx-access.log;\n"
        f"  client_body_temp_path {work}/client_body;\n  proxy_temp_path {work}/proxy;\n"
        "  fastcgi_temp_path /dev/null; uwsgi_temp_path /dev/null; scgi_temp_path /dev/null;\n"
        f"  include {work}/broker.conf;\n}}\n"
    )
    return main


class Client:
    """HTTPS to the proxy from a loopback address of our choosing, trusting the test's CA."""

    def __init__(self, port: int, cafile: Path, source: str) -> None:
        self.port, self.source = port, source
        self.context = ssl.create_default_context(cafile=str(cafile))

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request on a new connection (with SNI and Host = HOST)."""
        conn = http.client.HTTPSConnection(
            HOST, self.port, context=self.context, source_address=(self.source, 0), timeout=10
        )
        conn.sock = self.context.wrap_socket(
            socket.create_connection(("127.0.0.1", self.port), 10, (self.source, 0)),
            server_hostname=HOST,
        )
        try:
            data = None if body is None else json.dumps(body)
            sent = {"Host": HOST, **({"Content-Type": "application/json"} if data else {})}
            conn.request(method, path, body=data, headers={**sent, **(headers or {})})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder others may enter (nginx's workers run as another user when we are root)."""
    tmp_path.chmod(0o755)
    return tmp_path


def _free_ports(n: int) -> list[int]:
    """Ports of 127.0.0.1 free now (found by binding and letting go), for a proxy to bind."""
    sockets = [listening_socket() for _ in range(n)]
    ports = [int(sock.getsockname()[1]) for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _behind_a_proxy(
    postgres_url: str,
    new_database: Callable[[str], str],
    work: Path,
    start_proxy: Callable[[Any, list[int]], tuple[Any, int, int, Path]],
) -> None:
    """Two gunicorn instances behind the proxy `start_proxy` starts (given their ports; it
    returns the process, its http and https ports and the CA to trust): HSTS and Secure cookies
    over https, http redirected to https, rate limits counting the client's own address
    (shared by both instances through Redis), a client's spoofed X-Forwarded-For ignored."""
    require(shutil.which("redis-server") is not None, "needs redis-server")
    commands = compose_commands()
    env = _base_env(work)
    secret_key, encryption_key = run_block(block("# Make the secrets", "sh"), env, work).split()
    assert len(secret_key) >= 32 and Fernet(encryption_key.encode())
    url = new_database(postgres_url)
    env.update(
        {
            "BROKER_ENV": "production",
            "BROKER_SECRET_KEY": secret_key,
            "BROKER_ENCRYPTION_KEYS": encryption_key,
            "BROKER_DATABASE_URL": url,
            "BROKER_PROXY_COUNT": "1",
            "BROKER_AUTH_RATE_LIMIT": f"{AUTH_LIMIT} per hour",
            "BROKER_LOG_LEVEL": "INFO",
            # Production wants https origins; nothing here calls Cloudflare.
            "BROKER_CLOUDFLARE_API_BASE": "https://api.cloudflare.invalid/client/v4",
            "BROKER_CLOUDFLARE_BATCH_BASE": "https://batch.cloudflare.invalid",
            "BROKER_CLOUDFLARE_ACCOUNT_ID": "acc",
            "BROKER_CLOUDFLARE_API_TOKEN": "tok",
            "BROKER_CLOUDFLARE_ACCOUNT_HASH": "hash",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": "2",
        }
    )
    with topology(work, env) as topo:
        topo.env["BROKER_RATELIMIT_STORAGE_URI"] = topo.start_redis(commands["redis"])
        topo.run([str(BIN / "flask"), "--app", "broker", "db", "upgrade"])
        run_block(
            block("# The first administrator", "sh"),
            {**topo.env, "ADMIN_PASSWORD": "correct horse battery staple"},
            work,
        )
        sockets = [listening_socket(), listening_socket()]
        webs = [topo.start_web(commands["web"], sock) for sock in sockets]
        ports = [int(s.getsockname()[1]) for s in sockets]
        for port, web in zip(ports, webs, strict=True):
            wait_http(f"http://127.0.0.1:{port}/readyz", process=web)
        for sock in sockets:
            sock.close()
        proxy, http_port, https_port, cafile = start_proxy(topo, ports)
        client = Client(https_port, cafile, "127.0.0.2")

        def up() -> bool:
            assert proxy.alive(), proxy.output()
            try:
                return client.request("GET", "/livez")[0] == 200
            except OSError:
                return False

        wait_for(up, 30, "the proxy to pass /livez on")

        status, headers, _ = client.request("GET", "/auth/login")
        assert status == 200
        assert headers["Strict-Transport-Security"].startswith("max-age=")
        cookies = headers.get_all("Set-Cookie") or []
        assert cookies and all("; Secure" in cookie for cookie in cookies), cookies

        plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        plain.request("GET", "/auth/login?next=/", headers={"Host": HOST})
        redirect = plain.getresponse()
        redirect.read()
        plain.close()
        assert redirect.status in (301, 308)
        assert redirect.headers["Location"] == f"https://{HOST}/auth/login?next=/"

        def attempt(source: Client, n: int, spoof: str | None = None) -> int:
            headers = {"X-Forwarded-For": spoof} if spoof else {}
            body = {"username": f"nobody{n}", "password": "wrong", "device_name": "test"}
            return source.request("POST", "/api/v1/auth/tokens", body, headers)[0]

        # 127.0.0.2 spends its budget, a new spoofed address each time: were the header
        # trusted, each attempt would count under an address of its own and never hit 429.
        spent = [attempt(client, n, spoof=f"203.0.113.{n}") for n in range(AUTH_LIMIT + 1)]
        assert spent == [401] * AUTH_LIMIT + [429]
        # Another client (127.0.0.3) still has its own: the broker counts the client's
        # address, not the proxy's (127.0.0.1 for both).
        other = Client(https_port, cafile, "127.0.0.3")
        assert attempt(other, 99) == 401
        assert attempt(client, 100, spoof="127.0.0.3") == 429
        # Both instances took requests, and share the counters through Redis.
        for web in webs:
            assert "POST /api/v1/auth/tokens" in web.output()


def test_nginx_from_the_guide_in_front_of_two_gunicorn_instances(
    postgres_url: str,
    new_database: Callable[[str], str],
    work: Path,
) -> None:
    """The guide's nginx site in front of two gunicorn instances (see `_behind_a_proxy`); its
    access log shows each client's own address."""
    require(shutil.which("nginx") is not None, "needs nginx (Debian: nginx-light)")

    def start(topo: Any, ports: list[int]) -> tuple[Any, int, int, Path]:
        http_port, https_port = _free_ports(2)
        conf = nginx_conf(work, ports, http_port, https_port)
        nginx = topo.start("nginx", ["nginx", "-e", str(work / "nginx-early.log"), "-c", str(conf)])
        return nginx, http_port, https_port, work / "fullchain.pem"

    _behind_a_proxy(postgres_url, new_database, work, start)
    access = (work / "nginx-access.log").read_text()
    assert "127.0.0.2" in access and "127.0.0.3" in access


def caddy_conf(work: Path, web_ports: list[int], http_port: int, https_port: int) -> Path:
    """The guide's Caddyfile with loopback upstreams, behind global options of the test's own:
    its ports, its folders, and certificates from Caddy's own local CA (no ACME, no internet,
    nothing installed in the system's trust store)."""
    site = block("# /etc/caddy/Caddyfile", "caddy")
    upstreams = " ".join(f"127.0.0.1:{port}" for port in web_ports)
    site, n = re.subn(r"10\.0\.0\.11:8000 10\.0\.0\.12:8000", upstreams, site)
    assert n == 1
    options = (
        "{\n\tadmin off\n\tlocal_certs\n\tskip_install_trust\n"
        f"\thttp_port {http_port}\n\thttps_port {https_port}\n"
        f"\tstorage file_system {work / 'caddy-data'}\n}}\n"
    )
    path = work / "Caddyfile"
    path.write_text(options + site)
    return path


def test_caddy_from_the_guide_in_front_of_two_gunicorn_instances(
    postgres_url: str,
    new_database: Callable[[str], str],
    work: Path,
) -> None:
    """The guide's Caddyfile in front of two gunicorn instances (see `_behind_a_proxy`), on
    loopback ports with a certificate from Caddy's local CA."""
    caddy = shutil.which("caddy")
    require(caddy is not None, "needs caddy (Debian: caddy)")
    assert caddy

    def start(topo: Any, ports: list[int]) -> tuple[Any, int, int, Path]:
        http_port, https_port = _free_ports(2)
        conf = caddy_conf(work, ports, http_port, https_port)
        home = {"HOME": str(work), "XDG_CONFIG_HOME": str(work), "XDG_DATA_HOME": str(work)}
        process = topo.start(
            "caddy", [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"], env=home
        )
        root = work / "caddy-data" / "pki" / "authorities" / "local" / "root.crt"
        wait_for(lambda: root.exists() or not process.alive(), 30, "Caddy's local CA")
        assert process.alive(), process.output()
        return process, http_port, https_port, root

    _behind_a_proxy(postgres_url, new_database, work, start)


def test_backup_and_restore_from_the_guide(
    postgres_url: str,
    new_database: Callable[[str], str],
    work: Path,
) -> None:
    """The guide's pg_dump backup restores into a new database where the broker serves (a
    token made before the backup works) and decrypts the webhook secrets with the same keys,
    and `flask encryption check` refuses other keys."""
    require(shutil.which("pg_dump") is not None, "needs pg_dump (Debian: postgresql-client)")
    commands = compose_commands()
    keys = Fernet.generate_key().decode()
    source = new_database(postgres_url)
    env = {
        **_base_env(work),
        "BROKER_ENV": "testing",
        "BROKER_SECRET_KEY": "s" * 40,
        "BROKER_ENCRYPTION_KEYS": keys,
        "BROKER_DATABASE_URL": source,
        "BROKER_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    flask = [str(BIN / "flask"), "--app", "broker"]
    with topology(work, env) as topo:
        topo.run([*flask, "db", "upgrade"])
        topo.run([*flask, "users", "create", "alice", "--password-stdin"], stdin="pw-0123456789\n")
        token = re.search(r"\S{30,}", topo.run([*flask, "tokens", "create", "alice"]))
        added = topo.run([*flask, "webhooks", "add", "http://127.0.0.1:9/hooks", "--events", "*"])
        assert token
        first = re.search(r"(whsec_\S+)", added)
        endpoint_id = re.search(r"^endpoint (\S+) ", added, re.M)
        assert endpoint_id
        rotated = topo.run([*flask, "webhooks", "rotate-secret", endpoint_id.group(1)])
        second = re.search(r"(whsec_\S+)", rotated)
        assert first and second

        run_block(
            block("# Back up (daily, and before every upgrade)", "sh"),
            {**env, "DB": _libpq(source)},
            work,
        )
        assert (work / "broker.dump").stat().st_size > 0
        target = new_database(postgres_url)
        restore = block("# Restore into a new, empty database", "sh")
        out = run_block(restore, {**env, "NEW_DB": _libpq(target)}, work)
        # What the guide says to expect, N being the endpoint's two secrets here.
        expected = re.search(r"# → (all N stored secret\(s\) decrypt)", restore)
        assert expected
        assert expected.group(1).replace("N", "2") in out, out

        # The broker serves from the restored database: the token made before the backup works.
        sock = listening_socket()
        small = {"WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "2"}
        web = topo.start_web(commands["web"], sock, {"BROKER_DATABASE_URL": target, **small})
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        wait_http(f"{base}/readyz", process=web)
        sock.close()
        listed = requests.get(
            f"{base}/api/v1/uploads",
            headers={"Authorization": f"Bearer {token.group(0)}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text

    # The endpoint's secrets, decrypted with the same keys, are the ones shown at the time.
    app = create_app(base_config(target, str(work / "app"), ENCRYPTION_KEYS=[keys]))
    with app.app_context():
        endpoint = db.session.scalars(sa.select(WebhookEndpoint)).one()
        assert (endpoint.secret, endpoint.previous_secret) == (second.group(1), first.group(1))
        db.session.remove()
        db.engine.dispose()
    app.extensions["budget"].engine.dispose()

    # Without the backup's keys nothing opens: the check says so and fails.
    other_keys = {"BROKER_ENCRYPTION_KEYS": Fernet.generate_key().decode()}
    wrong = run(
        [*flask, "encryption", "check"], {**env, "BROKER_DATABASE_URL": target, **other_keys}
    )
    assert wrong.returncode == 1
    assert "2 stored secret(s) cannot be decrypted" in wrong.stderr


def _filled_in(text: str, values: dict[str, str]) -> str:
    """The guide's block with every `NAME=…` placeholder given the test's value for NAME (the
    guide naming a variable the test does not know fails); other lines stay as written."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in values, f"the guide asks for {name}; give the test a value for it"
        return f"{name}={shlex.quote(values[name])}"

    filled = re.sub(r"\b([A-Z][A-Z0-9_]*)=\S*…\S*", value, text)
    assert "…" not in re.sub(r"#.*", "", filled), filled  # only comments may still say …
    return filled


def _tls_emulator(topo: Any, work: Path, cert: Path, key: Path) -> str:
    """Start the emulator behind TLS (production accepts https only); return its origin."""
    sock = listening_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    script = (
        "import sys; from werkzeug.serving import run_simple; "
        "from broker.emulator import create_app; "
        "run_simple('127.0.0.1', int(sys.argv[1]), create_app(), threaded=True, "
        "ssl_context=(sys.argv[2], sys.argv[3]))"
    )
    topo.start(
        "emulator",
        [sys.executable, "-c", script, str(port), str(cert), str(key)],
        env={"EMULATOR_DATA_DIR": str(work / "emulator"), "EMULATOR_API_TOKEN": "cf-token"},
    )
    origin = f"https://127.0.0.1:{port}"
    wait_for(
        lambda: _answers(f"{origin}/client/v4/accounts/emulator-account/images/v1/stats", cert),
        60,
        "the TLS emulator",
    )
    return origin


def _answers(url: str, cert: Path) -> bool:
    try:
        requests.get(url, verify=str(cert), timeout=2).close()
    except requests.ConnectionError:
        return False
    return True


def test_install_configure_and_run_from_the_guide(
    postgres_url: str,
    new_database: Callable[[str], str],
    work: Path,
) -> None:
    """The guide's install block, as written but for its `…` values: `pip install .` (into a
    folder of its own, not this test's environment), production settings, the migrations and
    the syncs against a Cloudflare (the emulator behind TLS) on PostgreSQL; then each line of its
    services block: gunicorn serves (a create through it gets an https upload URL), the worker
    runs and its health command exits 0, and 1 once the worker has stopped."""
    require(shutil.which("redis-server") is not None, "needs redis-server")
    commands = compose_commands()
    cert, key = self_signed(work, HOST)
    prefix = work / "prefix"
    env = _base_env(work)
    env["REQUESTS_CA_BUNDLE"] = str(cert)  # the emulator's certificate, as a CA the host trusts
    with topology(work, env) as topo:
        origin = _tls_emulator(topo, work, cert, key)
        secret_key, encryption_key = run_block(block("# Make the secrets", "sh"), env, work).split()
        values = {
            "BROKER_SECRET_KEY": secret_key,
            "BROKER_ENCRYPTION_KEYS": encryption_key,
            "BROKER_DATABASE_URL": new_database(postgres_url),
            "BROKER_CLOUDFLARE_ACCOUNT_ID": "emulator-account",
            "BROKER_CLOUDFLARE_API_TOKEN": "cf-token",
            "BROKER_CLOUDFLARE_ACCOUNT_HASH": "emuhash000000000000000",
            "BROKER_CLOUDFLARE_WEBHOOK_SECRET": secret_key[:32],
            "BROKER_RATELIMIT_STORAGE_URI": topo.start_redis(commands["redis"]),
        }
        install = _filled_in(block("# Install, configure, migrate", "sh"), values)
        # `pip install .` from the checkout, into its own prefix: this test's environment
        # (an editable install) stays as it is, and brings the dependencies.
        (pip_line,) = [line for line in install.splitlines() if line.startswith("pip install .")]
        install = install.replace(
            pip_line,
            f"python -m pip install -q --no-deps --no-index --no-build-isolation "
            f"--ignore-installed --prefix {shlex.quote(str(prefix))} {ROOT_DIR}",
        )
        # Production wants Cloudflare's origins over https: the emulator's, here.
        cloudflare = {
            "BROKER_CLOUDFLARE_API_BASE": f"{origin}/client/v4",
            "BROKER_CLOUDFLARE_DELIVERY_BASE": origin,
            "BROKER_CLOUDFLARE_UPLOAD_ORIGIN": origin,
            "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": "2",
        }
        shell = f"{install}\nenv | grep -E '^(BROKER|PYTHONPATH)' > {work}/reader.env\n"
        run_block(shell, {**env, **cloudflare, "PYTHONPATH": _site_of(prefix)}, ROOT_DIR)
        reader = dict(line.split("=", 1) for line in (work / "reader.env").read_text().splitlines())
        assert reader["BROKER_ENV"] == "production"
        services = [
            re.sub(r"\s+#.*", "", line)
            for line in block("# Services", "sh").splitlines()[1:]
            if line.strip()
        ]
        assert len(services) == 3
        probe = listening_socket()  # a free port, let go for gunicorn's --bind
        web_port = int(probe.getsockname()[1])
        probe.close()
        served = {
            **env,
            **reader,
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{web_port}",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": "2",
        }
        checked = run([sys.executable, "-c", "import broker; print(broker.__file__)"], served, work)
        assert checked.stdout.startswith(str(prefix)), checked.stdout + checked.stderr
        web = topo.start("web", ["sh", "-c", f"exec {services[0]}"], env=served, group=True)
        worker = topo.start("worker", ["sh", "-c", f"exec {services[1]}"], env=served)
        base = f"http://127.0.0.1:{web_port}"
        wait_http(f"{base}/readyz", process=web)
        wait_for(lambda: "started" in worker.output() or not worker.alive(), 60, "the worker")
        run_block(
            block("# The first administrator", "sh"),
            {**served, "ADMIN_PASSWORD": "correct horse battery staple"},
            work,
        )
        proxied = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}
        with requests.Session() as http:
            token = http.post(
                f"{base}/api/v1/auth/tokens",
                json={
                    "username": "admin",
                    "password": "correct horse battery staple",
                    "device_name": "guide",
                },
                headers=proxied,
                timeout=30,
            )
            assert token.status_code == 201, token.text
            auth = {**proxied, "Authorization": f"Bearer {token.json()['token']}"}
            created = http.post(f"{base}/api/v1/uploads", json={}, headers=auth, timeout=30)
            assert created.status_code == 201, created.text
            assert created.json()["upload_url"].startswith(f"{origin}/"), created.json()
        health = ["sh", "-c", services[2]]
        fresh = run(health, served, work)
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr + worker.output()
        assert worker.stop(30) == 0, worker.output()
        gone = run(health, served, work)
        assert gone.returncode == 1 and "has written a heartbeat" in gone.stderr, gone.stderr
        assert "Traceback" not in web.output() + worker.output()


def _site_of(prefix: Path) -> str:
    """Where `pip install --prefix` puts packages, for PYTHONPATH (made before pip runs)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(prefix / "lib" / version / "site-packages")
