"""Every BROKER_* setting in one table: name, default and meaning.

`create_app` loads these defaults, then the optional `instance/config.py`, then `BROKER_*`
environment variables (`app.config.from_prefixed_env("BROKER")`), then a test's own mapping.
README.md carries the same table; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import click

from broker.platform.encryption import key_problem, parse_keys

DEFAULT_SECRET_KEY = "dev-insecure-change-me"  # noqa: S105 (refused outside development)


@dataclass(frozen=True)
class Setting:
    """One configuration key, its default and what it does."""

    name: str
    default: Any
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "ENV",
        "development",
        "`development`, `testing` or `production`; production refuses unsafe settings, `testing` (for automated test suites) skips those checks.",
    ),
    Setting(
        "INSTANCE_PATH",
        None,
        "Folder for the SQLite file, the optional `config.py` and local state (env only). Default: `instance/` beside the code in a checkout; after `pip install .`, `<prefix>/var/broker-instance` inside the Python environment, which a new virtualenv does not keep (the broker warns while its SQLite file is there): set it, or use PostgreSQL, in production.",
    ),
    Setting(
        "SECRET_KEY",
        DEFAULT_SECRET_KEY,
        "Signs sessions and CSRF tokens. Must be set outside development.",
    ),
    Setting(
        "DATABASE_URL",
        None,
        "SQLAlchemy URL; default `sqlite:///<instance>/broker.sqlite3`. PostgreSQL: `postgresql+psycopg://user:pw@host/db`; each broker process keeps up to 16 connections open per engine (two: the app's and the upstream budget's; a web process opens one per gunicorn thread on each as it starts, to warm them up) and opens up to 32 more per engine under load, so size PostgreSQL's `max_connections` for your processes.",
    ),
    Setting(
        "ENCRYPTION_KEYS",
        None,
        "Fernet keys, newest first (JSON list or comma-separated), that encrypt webhook secrets and signing-key values in the database; required in production. Elsewhere a key is generated into `instance/dev-encryption.key`.",
    ),
    Setting("LOG_LEVEL", "INFO", "Log level of the `broker` loggers."),
    Setting(
        "CLOUDFLARE_API_BASE",
        "https://api.cloudflare.com/client/v4",
        "Cloudflare REST base URL; point at the emulator in development.",
    ),
    Setting("CLOUDFLARE_ACCOUNT_ID", None, "Cloudflare account id (required outside development)."),
    Setting(
        "CLOUDFLARE_API_TOKEN",
        None,
        "API token with Images edit permission (required outside development; never logged).",
    ),
    Setting(
        "CLOUDFLARE_ACCOUNT_HASH",
        None,
        "Account hash used in delivery URLs (required outside development).",
    ),
    Setting(
        "CLOUDFLARE_DELIVERY_BASE", "https://imagedelivery.net", "Delivery origin for image URLs."
    ),
    Setting(
        "CLOUDFLARE_UPLOAD_ORIGIN",
        "https://upload.imagedelivery.net",
        "Origin the browser posts files to (allowed by the page's CSP).",
    ),
    Setting("CLOUDFLARE_TIMEOUT", 10.0, "Seconds before an upstream call times out."),
    Setting(
        "CLOUDFLARE_WEBHOOK_SECRET",
        None,
        "Shared secret Cloudflare sends in `cf-webhook-auth` on its upload notifications.",
    ),
    Setting(
        "CLOUDFLARE_BATCH",
        "auto",
        "`auto`: direct upload, details, list, update and delete go through Cloudflare's batch API (not counted in the global limit); `off`: everything uses the global API.",
    ),
    Setting(
        "CLOUDFLARE_BATCH_BASE",
        "https://batch.imagedelivery.net",
        "Batch API origin (the emulator serves it under `/batch`).",
    ),
    Setting(
        "CLOUDFLARE_BATCH_RATE",
        200,
        "Batch API requests per second per token, shared by all processes (Cloudflare allows 200).",
    ),
    Setting(
        "CLOUDFLARE_BATCH_COOLDOWN",
        600,
        "Seconds an endpoint the batch host refused (code 103, token refused, repeated errors) stays on the global API.",
    ),
    Setting(
        "REGISTRATION",
        None,
        "Allow self-registration; default on in development, off in production.",
    ),
    Setting(
        "AUTH_RATE_LIMIT",
        "10 per minute",
        "Login and token-creation attempts allowed per IP and per username (Flask-Limiter syntax).",
    ),
    Setting(
        "PUBLIC_URL",
        "",
        "The broker's public base URL (e.g. `https://uploads.example.com`): the server the OpenAPI document names and the docs page's snippets use. Unset: the document's server is relative (`/`). Never taken from the request's `Host` header.",
    ),
    Setting(
        "PASSWORD_HASH_CONCURRENCY",
        2,
        "Password checks (Argon2id, 64 MiB each) one process runs at once; more wait up to 1 s, then get 503 `server_busy` with `Retry-After`.",
    ),
    Setting(
        "SESSION_LIFETIME",
        43200,
        "Seconds a browser login lasts (also ended by closing the browser); a remember-me cookie then starts a new one, for at most 30 days after the login.",
    ),
    Setting("API_TOKEN_TTL_DAYS", 90, "Lifetime of a new API bearer token, in days."),
    Setting(
        "OIDC_ISSUER",
        None,
        "Your OpenID Connect issuer (its `iss`, e.g. `https://id.example.com`); set, the API accepts its JWTs as `Authorization: Bearer` (keys from its JWKS). Off when unset.",
    ),
    Setting(
        "OIDC_AUDIENCE",
        None,
        "The `aud` those JWTs must carry (your app's client id or API identifier); required with `BROKER_OIDC_ISSUER`.",
    ),
    Setting(
        "OIDC_ALGORITHMS",
        "RS256",
        "Signature algorithms accepted, comma-separated; asymmetric only (RS*, PS*, ES*, EdDSA): `none` and HS* are refused at start.",
    ),
    Setting(
        "OIDC_JWKS_URL",
        None,
        "The issuer's key set URL; default: the `jwks_uri` of its `/.well-known/openid-configuration`.",
    ),
    Setting("OIDC_LEEWAY", 30, "Seconds of clock skew allowed when checking `exp` and `nbf`."),
    Setting(
        "CORS_ORIGINS",
        None,
        "Origins whose pages may call `/api/v1` with a bearer token (e.g. `https://app.example.com`, comma-separated; no wildcard). Cookies never work cross-origin.",
    ),
    Setting(
        "METRICS_TOKEN",
        None,
        "Bearer token a Prometheus scraper sends to `GET /metrics`; unset, the endpoint is off (404). Never logged.",
    ),
    Setting(
        "PROXY_COUNT",
        0,
        "Reverse proxies in front of the broker whose `X-Forwarded-For`/`-Proto`/`-Host` are trusted (client IPs for rate limits, https detection).",
    ),
    Setting(
        "RATELIMIT_STORAGE_URI",
        "memory://",
        "Flask-Limiter storage; use `redis://…` when several instances run.",
    ),
    Setting(
        "UPSTREAM_BUDGET",
        1000,
        "Upstream calls allowed per budget window, shared by all processes (Cloudflare blocks at 1200 / 5 min).",
    ),
    Setting("UPSTREAM_BUDGET_WINDOW", 300, "Budget window in seconds."),
    Setting(
        "UPSTREAM_BACKGROUND_RESERVE",
        200,
        "Calls of each window kept for interactive requests: background work never uses them.",
    ),
    Setting(
        "UPSTREAM_BACKGROUND_SHARE",
        200,
        "Calls of each window kept for background work (verification, expiry, draft deletion, key sync): interactive requests never use them.",
    ),
    Setting("REQUIRE_SIGNED_URLS", True, "Default `requireSignedURLs` for new uploads."),
    Setting("UPLOAD_DEFAULT_EXPIRY", 1800, "Default upload URL lifetime in seconds (120..21600)."),
    Setting("MAX_PENDING_UPLOADS", 20, "Pending drafts a user may hold at once."),
    Setting("MAX_UPLOADS_PER_DAY", 500, "Uploads a user may create per 24 hours."),
    Setting(
        "EXPIRY_GRACE",
        300,
        "Seconds after `expires_at` before a still-draft upload becomes `expired`.",
    ),
    Setting(
        "WORKER_INLINE",
        None,
        "Run the worker in a thread of each web process (`make run` starts it at once, `flask run` and gunicorn with the first request; never `flask` commands); default on in development.",
    ),
    Setting("WORKER_POLL_INTERVAL", 1.0, "Seconds the worker idles between empty polls."),
    Setting(
        "WEBHOOK_ALLOW_PRIVATE",
        False,
        "Allow webhook endpoints on loopback addresses, http included (development and tests only).",
    ),
    Setting("WEBHOOK_TIMEOUT", 15.0, "Seconds before an outgoing webhook attempt times out."),
    Setting(
        "MAX_CONTENT_LENGTH",
        1024 * 1024,
        "Largest request body in bytes the broker reads (413 beyond); files never pass through it.",
    ),
    Setting(
        "VERIFY_BATCH_WINDOW",
        1.5,
        "Seconds a due completion check waits so the checks due meanwhile share one `GET /v2` listing.",
    ),
    Setting(
        "COMPLETE_INLINE_BUDGET",
        0.5,
        "`POST …/complete` verifies the upload at once (200 `ready`) while the batch API carries details calls or less than this fraction of the global budget is used (in the window, and at its recent pace); otherwise the worker verifies it (202). 0 turns inline checks off.",
    ),
    Setting(
        "UPLOAD_ALLOWED_FORMATS",
        None,
        "Policy on completed originals: formats allowed after decoding (e.g. `JPEG,PNG,WEBP,HEIC`); others are deleted and `rejected`.",
    ),
    Setting(
        "UPLOAD_MAX_BYTES", None, "Policy: largest original in bytes; bigger ones are rejected."
    ),
    Setting(
        "UPLOAD_MAX_DIMENSION",
        None,
        "Policy: longest side in pixels; bigger originals are rejected.",
    ),
    Setting("KEYS_SYNC_INTERVAL", 3600, "Seconds between the worker's signing-key syncs."),
    Setting("SIGNED_URL_TTL", 3600, "Default lifetime in seconds of minted delivery URLs."),
    Setting("SIGNED_URL_MAX_TTL", 604800, "Longest lifetime a client may ask for (7 days)."),
    Setting(
        "SIGNED_URL_BUCKET",
        300,
        "Expiry is rounded up to this many seconds so repeated requests share a URL.",
    ),
    Setting(
        "VARIANTS",
        "thumb:256x256:cover,medium:1024x1024:scale-down",
        "Variants the app needs, `name:WxH:fit[:metadata=…][:never-signed]` comma-separated; synced upstream by `flask variants sync`.",
    ),
    Setting(
        "KEY_ROTATION_GRACE", 86400, "Seconds an old signing key is kept after `flask keys rotate`."
    ),
)

DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


# `make run` writes its emulator's Cloudflare settings here (in the instance folder) so that
# `flask …` commands in development reach the same emulator.
DEV_EMULATOR_FILE = "dev-emulator.json"

# Sessions and CSRF tokens are only as strong as this key (e.g. `secrets.token_urlsafe(32)`).
MIN_SECRET_KEY_LENGTH = 32


class ConfigError(click.ClickException):
    """The configuration cannot run safely; the message says which setting to fix.

    A ClickException so that `flask …` commands print the one line, not a traceback.
    """


def finalize(config: dict[str, Any], instance_path: str) -> None:
    """Fill derived defaults in place and refuse unsafe production settings.

    Only `production` is checked. `testing` is for automated test suites, which run the
    emulator over http with throwaway secrets and switch TESTING (or CSRF) as a test needs, so
    it skips every refusal; unlike `development` it starts no inline worker and never reads
    make run's emulator file. Nothing that serves real users may run with it.
    """
    env = config["ENV"]
    if env not in {"development", "testing", "production"}:
        raise ConfigError(f"BROKER_ENV must be development, testing or production, not {env!r}")
    dev = env == "development"
    if not config.get("DATABASE_URL"):
        config["DATABASE_URL"] = f"sqlite:///{instance_path}/broker.sqlite3"
    batch = str(config.get("CLOUDFLARE_BATCH") or "off").lower()
    if batch not in {"auto", "off"}:
        raise ConfigError(f"BROKER_CLOUDFLARE_BATCH must be auto or off, not {batch!r}")
    config["CLOUDFLARE_BATCH"] = batch
    for share in ("UPSTREAM_BACKGROUND_RESERVE", "UPSTREAM_BACKGROUND_SHARE"):
        if not 0 <= int(config[share]) < int(config["UPSTREAM_BUDGET"]):
            raise ConfigError(f"BROKER_{share} must be at least 0 and below BROKER_UPSTREAM_BUDGET")
    if config.get("REGISTRATION") is None:
        config["REGISTRATION"] = env != "production"
    if config.get("WORKER_INLINE") is None:
        config["WORKER_INLINE"] = dev
    config["SQLALCHEMY_DATABASE_URI"] = config["DATABASE_URL"]
    # The signed session cookie is refused past the login lifetime too (Flask's default: 31 days).
    config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=int(config["SESSION_LIFETIME"]))
    config["SESSION_COOKIE_HTTPONLY"] = True
    config["SESSION_COOKIE_SAMESITE"] = "Lax"
    config["SESSION_COOKIE_SECURE"] = env == "production"
    config["REMEMBER_COOKIE_HTTPONLY"] = True
    config["REMEMBER_COOKIE_SAMESITE"] = "Lax"
    config["REMEMBER_COOKIE_SECURE"] = env == "production"
    problem = key_problem(parse_keys(config.get("ENCRYPTION_KEYS")))
    if problem:
        raise ConfigError(problem)
    if env != "production":
        return
    if config["SECRET_KEY"] in (None, "", DEFAULT_SECRET_KEY):
        raise ConfigError("BROKER_SECRET_KEY is the insecure default; set a long random value")
    if len(str(config["SECRET_KEY"])) < MIN_SECRET_KEY_LENGTH:
        raise ConfigError(
            f"BROKER_SECRET_KEY is too short; use at least {MIN_SECRET_KEY_LENGTH} random characters"
        )
    missing = [
        f"BROKER_{k}"
        for k in ("CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_HASH")
        if not config.get(k)
    ]
    if missing:
        raise ConfigError(f"Cloudflare settings missing: {', '.join(missing)}")
    if config.get("WEBHOOK_ALLOW_PRIVATE"):
        raise ConfigError("BROKER_WEBHOOK_ALLOW_PRIVATE is for development and tests only")
    if config.get("DEBUG") or config.get("TESTING"):
        raise ConfigError("DEBUG and TESTING (FLASK_DEBUG, BROKER_DEBUG) must be off in production")
    if config.get("WTF_CSRF_ENABLED") is False:
        raise ConfigError("CSRF protection cannot be turned off in production")
    # The API token travels to the API base; an http:// URL (the emulator's) would expose it.
    https = ["CLOUDFLARE_API_BASE", "CLOUDFLARE_DELIVERY_BASE", "CLOUDFLARE_UPLOAD_ORIGIN"]
    if batch == "auto":
        https.append("CLOUDFLARE_BATCH_BASE")
    plain = [
        f"BROKER_{k}" for k in https if not str(config.get(k) or "").lower().startswith("https://")
    ]
    if plain:
        raise ConfigError(f"{', '.join(plain)} must be https:// URLs in production")
    if not parse_keys(config.get("ENCRYPTION_KEYS")):
        raise ConfigError(
            "BROKER_ENCRYPTION_KEYS is missing; set a key from `flask encryption generate-key`"
        )


def markdown_table() -> str:
    """Render the settings as the README's Markdown table."""
    rows = ["| Setting | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "—" if s.default is None else f"`{s.default}`"
        rows.append(f"| `BROKER_{s.name}` | {default} | {s.doc} |")
    return "\n".join(rows)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the settings table between the README's settings markers."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = "<!-- settings:start -->", "<!-- settings:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{markdown_table()}\n{end}{tail}")
