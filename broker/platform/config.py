"""Every BROKER_* setting in one table: name, default and meaning; and the typed `Settings`.

`create_app` loads these defaults, then the optional `instance/config.py`, then `BROKER_*`
environment variables (`app.config.from_prefixed_env("BROKER")`), then a test's own mapping.
`finalize` fills derived defaults and refuses unsafe production settings; `init_app` then reads
the result once into a frozen `Settings` (every setting with its real type), kept in
`app.extensions["settings"]`. Code takes a `settings: Settings` argument, or calls
`current_settings()` (a request, a CLI command, the worker: anywhere an app context is) or
`settings_of(app)`. The Flask config keeps the raw values for Flask and its extensions.
README.md carries the same table; a test keeps the two in step.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import click
from cryptography.fernet import Fernet
from flask import Flask, current_app

DEFAULT_SECRET_KEY = "dev-insecure-change-me"  # noqa: S105 (refused outside development)


@dataclass(frozen=True)
class Setting:
    """One configuration key, its default and what it does."""

    name: str
    default: Any
    doc: str
    minimum: int | None = None  # a number below it is refused at start, named with the others
    maximum: int | None = None  # and one above this


CLOUDFLARE_API_BASE = "https://api.cloudflare.com/client/v4"
CLOUDFLARE_BATCH_BASE = "https://batch.imagedelivery.net"
API_PATH = "/client/v4"

# The largest quota limit a setting or a profile may give: a create's quota check counts within
# an SQL integer.
MAX_QUOTA_LIMIT = 2**31 - 1

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
        "SQLAlchemy URL; default `sqlite:///<instance>/broker.sqlite3`. PostgreSQL: `postgresql+psycopg://user:pw@host/db`. Each process opens at most 2 x (`BROKER_DB_POOL_SIZE` + `BROKER_DB_MAX_OVERFLOW`) connections (two engines: the app's and the upstream budget's).",
    ),
    Setting(
        "ENCRYPTION_KEYS",
        None,
        "Fernet keys, newest first (JSON list or comma-separated), that encrypt webhook secrets and signing-key values in the database; required in production. Elsewhere a key is generated into `instance/dev-encryption.key`.",
    ),
    Setting(
        "DB_POOL_SIZE",
        None,
        "PostgreSQL connections each engine keeps per process; default: the process's threads (`gunicorn.conf.py` sets it to gunicorn's `threads`), else 8. Set 1 for `flask worker` processes.",
    ),
    Setting(
        "DB_MAX_OVERFLOW",
        2,
        "Connections each engine may open beyond its pool for a moment of need.",
    ),
    Setting(
        "DB_PROCESSES",
        1,
        "Broker processes sharing the database (all web processes and workers); in production each process warns at start when that many processes like it may open more connections than PostgreSQL's `max_connections` allows.",
    ),
    Setting("LOG_LEVEL", "INFO", "Log level of the `broker` loggers."),
    Setting(
        "LOG_FORMAT",
        "text",
        "`text`: one plain line per record; `json`: one JSON object per line (UTC time, level, logger, message, and `request_id`, `user`, `upload_id`, `delivery_id` where known), for log collectors.",
    ),
    Setting(
        "CLOUDFLARE_API_BASE",
        CLOUDFLARE_API_BASE,
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
        None,
        "Batch API origin. Default: `https://batch.imagedelivery.net` with Cloudflare's API base; with another API base ending in `/client/v4` (the emulator, a proxy), that base with `/batch` in place of `/client/v4`; with any other API base it must be set, or the broker refuses to start.",
    ),
    Setting(
        "CLOUDFLARE_BATCH_RATE",
        200,
        "Batch API requests per second in all, shared by all processes. Up to `BROKER_CLOUDFLARE_BATCH_TOKEN_RATE` one batch token carries them; above it the broker holds as many tokens as that takes (400 → 2), splits the rate between them and spreads the calls over them, each token's calls counted on their own, each token renewed on its own. At most 16 tokens: a rate that would take more stops the start.",
        minimum=1,
    ),
    Setting(
        "CLOUDFLARE_BATCH_TOKEN_RATE",
        200,
        "Batch API requests per second one batch token allows (Cloudflare: 200); no token is sent more.",
        minimum=1,
    ),
    Setting(
        "CLOUDFLARE_BATCH_RATE_SCOPE",
        "shared",
        "Where the batch API's per-token rates are counted. `shared`: in Redis when `BROKER_RATELIMIT_STORAGE_URI` is Redis, else in the database (one statement a call), right for any number of processes; `process`: in this process's memory (no statement at all), right only when this one process calls Cloudflare (one web process with `BROKER_WORKER_INLINE` and no other worker): several processes would each allow the full rate (gunicorn refuses to start more than one web process with it, or to add one later).",
    ),
    Setting(
        "CLOUDFLARE_BATCH_COOLDOWN",
        600,
        "Seconds an endpoint the batch host refused (code 103, replacement tokens refused too, repeated errors) stays on the global API; a token refused once (expired, revoked) is only replaced.",
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
        "Flask-Limiter storage; use `redis://…` when several instances run. On Redis (`redis://`, `rediss://`, `redis+unix://`) it also carries token and account changes to every web process, which then authenticate a kept token with no database statement.",
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
    Setting(
        "MAX_PENDING_UPLOADS",
        20,
        "Pending drafts a user may hold at once.",
        minimum=0,
        maximum=MAX_QUOTA_LIMIT,
    ),
    Setting(
        "MAX_UPLOADS_PER_DAY",
        500,
        "Uploads a user may create per 24 hours.",
        minimum=0,
        maximum=MAX_QUOTA_LIMIT,
    ),
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
        "WORKER_STALE_AFTER",
        300.0,
        "Seconds without a heartbeat after which a worker counts as stale (`flask worker health` exits 1).",
    ),
    Setting(
        "RETENTION_DELIVERED_DAYS",
        30,
        "Days a delivered webhook delivery (with its attempts) is kept; 0 keeps them forever.",
    ),
    Setting(
        "RETENTION_FAILED_DAYS",
        90,
        "Days a webhook delivery that gave up (with its attempts) is kept; 0 keeps them forever.",
    ),
    Setting(
        "RETENTION_UPLOADS_DAYS",
        30,
        "Days an `expired` or `deleted` upload row is kept; 0 keeps them forever.",
    ),
    Setting(
        "WEBHOOK_ALLOW_PRIVATE",
        False,
        "Allow webhook endpoints on loopback addresses, http included (development and tests only).",
    ),
    Setting("WEBHOOK_TIMEOUT", 15.0, "Seconds before an outgoing webhook attempt times out."),
    Setting(
        "WEBHOOK_CONCURRENCY",
        8,
        "Webhook attempts one worker process sends at the same time (over all endpoints).",
    ),
    Setting(
        "WEBHOOK_ENDPOINT_CONCURRENCY",
        1,
        "Webhook attempts one worker process sends to the same endpoint at the same time (1 keeps each endpoint's events in order); a slow endpoint holds only these.",
    ),
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
    Setting(
        "UPLOAD_PROFILES",
        None,
        "Path of a TOML file of upload profiles (`[profiles.<name>]` tables: formats, sizes, quotas, metadata schema, who may use it, replace mode); checked at start. Unset: only the `default` profile, made of the settings above.",
    ),
    Setting("KEYS_SYNC_INTERVAL", 3600, "Seconds between the worker's signing-key syncs."),
    Setting(
        "ERASURE_LEASE",
        120,
        "Seconds a worker holds an erasure's turn (up to 50 deletions at Cloudflare): a worker that dies mid-turn leaves it to another this long after the turn began. Keep it well above a turn's length.",
        minimum=1,
    ),
    Setting(
        "RECONCILE_INTERVAL",
        86400,
        "Seconds between the worker's reconciliations with Cloudflare's listing (0: only `flask reconcile`).",
    ),
    Setting(
        "RECONCILE_ORPHANS",
        "adopt",
        "An image at Cloudflare stamped with a user's `creator` but unknown to the broker: `adopt` (recorded as the user's upload) or `delete`; reported either way.",
    ),
    Setting(
        "RECONCILE_GRACE",
        600,
        "Seconds an image or row must be old before reconciliation acts on it (an upload in flight is never touched).",
    ),
    Setting(
        "USAGE_INTERVAL",
        3600,
        "Seconds between the worker's questions for the account's image count and allowance (0: only `flask usage`).",
    ),
    Setting(
        "USAGE_WARN_RATIO",
        0.9,
        "Warn (log, admin page, `broker_cloudflare_images_allowance_warning`) once the account holds this share of its image allowance.",
    ),
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


# Batch tokens the broker holds at most (each fetched, stored and renewed on its own): a bound
# on the rows, leases and fetches a mistyped BROKER_CLOUDFLARE_BATCH_RATE could cause.
MAX_BATCH_TOKENS = 16


class ConfigError(click.ClickException):
    """The configuration cannot run safely; the message says which setting to fix.

    A ClickException so that `flask …` commands print the one line, not a traceback.
    """


def finalize(config: dict[str, Any], instance_path: str) -> None:
    """Fill derived defaults in place and refuse unsafe production settings.

    Every problem found is reported in one ConfigError (one line each), so an operator fixes
    them all before the next start. Only `production` is checked for safety. `testing` is for
    automated test suites, which run the emulator over http with throwaway secrets and switch
    TESTING (or CSRF) as a test needs, so it skips every refusal; unlike `development` it
    starts no inline worker and never reads make run's emulator file. Nothing that serves real
    users may run with it.
    """
    problems: list[str] = []
    env = config["ENV"]
    if env not in {"development", "testing", "production"}:
        problems.append(f"BROKER_ENV must be development, testing or production, not {env!r}")
    dev = env == "development"
    if not config.get("DATABASE_URL"):
        config["DATABASE_URL"] = f"sqlite:///{instance_path}/broker.sqlite3"
    batch = str(config.get("CLOUDFLARE_BATCH") or "off").lower()
    if batch not in {"auto", "off"}:
        problems.append(f"BROKER_CLOUDFLARE_BATCH must be auto or off, not {batch!r}")
    config["CLOUDFLARE_BATCH"] = batch
    if batch == "auto" and not config.get("CLOUDFLARE_BATCH_BASE"):
        try:
            config["CLOUDFLARE_BATCH_BASE"] = batch_base_for(str(config["CLOUDFLARE_API_BASE"]))
        except ConfigError as exc:
            problems.append(exc.message)
    log_format = str(config.get("LOG_FORMAT") or "text").lower()
    if log_format not in {"text", "json"}:
        problems.append(f"BROKER_LOG_FORMAT must be text or json, not {log_format!r}")
    config["LOG_FORMAT"] = log_format
    try:
        budget = _coerce("UPSTREAM_BUDGET", config["UPSTREAM_BUDGET"], int)
        for share in ("UPSTREAM_BACKGROUND_RESERVE", "UPSTREAM_BACKGROUND_SHARE"):
            if not 0 <= _coerce(share, config[share], int) < budget:
                problems.append(
                    f"BROKER_{share} must be at least 0 and below BROKER_UPSTREAM_BUDGET"
                )
    except ConfigError as exc:
        problems.append(exc.message)
    try:
        rate = _coerce("CLOUDFLARE_BATCH_RATE", config["CLOUDFLARE_BATCH_RATE"], int)
        per_token = _coerce(
            "CLOUDFLARE_BATCH_TOKEN_RATE", config["CLOUDFLARE_BATCH_TOKEN_RATE"], int
        )
        if per_token >= 1 and -(-rate // per_token) > MAX_BATCH_TOKENS:
            problems.append(
                f"BROKER_CLOUDFLARE_BATCH_RATE must be at most {MAX_BATCH_TOKENS} times "
                f"BROKER_CLOUDFLARE_BATCH_TOKEN_RATE ({MAX_BATCH_TOKENS * per_token}): "
                f"the broker holds at most {MAX_BATCH_TOKENS} batch tokens"
            )
    except ConfigError:
        pass  # not a number: said once, with the minimums below
    try:
        share = _coerce("COMPLETE_INLINE_BUDGET", config["COMPLETE_INLINE_BUDGET"], float)
        if not 0 <= share <= 1:  # NaN fails both comparisons
            problems.append(f"BROKER_COMPLETE_INLINE_BUDGET must be from 0 to 1, not {share}")
    except ConfigError as exc:
        problems.append(exc.message)
    for setting in SETTINGS:
        if setting.minimum is None and setting.maximum is None:
            continue
        try:
            value = _coerce(setting.name, config[setting.name], float)
            if setting.minimum is not None and value < setting.minimum:
                problems.append(f"BROKER_{setting.name} must be at least {setting.minimum}")
            if setting.maximum is not None and value > setting.maximum:
                problems.append(f"BROKER_{setting.name} must be at most {setting.maximum:,}")
        except ConfigError as exc:
            problems.append(exc.message)
    if config.get("REGISTRATION") is None:
        config["REGISTRATION"] = env != "production"
    if config.get("WORKER_INLINE") is None:
        config["WORKER_INLINE"] = dev
    config["SQLALCHEMY_DATABASE_URI"] = config["DATABASE_URL"]
    # The signed session cookie is refused past the login lifetime too (Flask's default: 31 days).
    config["PERMANENT_SESSION_LIFETIME"] = timedelta(
        seconds=_coerce("SESSION_LIFETIME", config["SESSION_LIFETIME"], int)
    )
    config["SESSION_COOKIE_HTTPONLY"] = True
    config["SESSION_COOKIE_SAMESITE"] = "Lax"
    config["SESSION_COOKIE_SECURE"] = env == "production"
    config["REMEMBER_COOKIE_HTTPONLY"] = True
    config["REMEMBER_COOKIE_SAMESITE"] = "Lax"
    config["REMEMBER_COOKIE_SECURE"] = env == "production"
    keys: tuple[str, ...] = _coerce(
        "ENCRYPTION_KEYS", config.get("ENCRYPTION_KEYS"), tuple[str, ...]
    )
    problem = _key_problem(keys)
    if problem:
        problems.append(problem)
    if env == "production":
        problems += production_problems(config, batch)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else _listed(problems))


def _listed(problems: list[str]) -> str:
    """Say every problem, one per line, under a count."""
    return f"{len(problems)} settings to fix:\n" + "\n".join(f"  - {p}" for p in problems)


def production_problems(config: dict[str, Any], batch: str) -> list[str]:
    """Return what production refuses in `config`, one sentence each (empty: all is well)."""
    problems: list[str] = []
    if config["SECRET_KEY"] in (None, "", DEFAULT_SECRET_KEY):
        problems.append("BROKER_SECRET_KEY is the insecure default; set a long random value")
    elif len(str(config["SECRET_KEY"])) < MIN_SECRET_KEY_LENGTH:
        problems.append(
            f"BROKER_SECRET_KEY is too short; use at least {MIN_SECRET_KEY_LENGTH} random characters"
        )
    missing = [
        f"BROKER_{k}"
        for k in ("CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_HASH")
        if not config.get(k)
    ]
    if missing:
        problems.append(f"Cloudflare settings missing: {', '.join(missing)}")
    if config.get("WEBHOOK_ALLOW_PRIVATE"):
        problems.append("BROKER_WEBHOOK_ALLOW_PRIVATE is for development and tests only")
    if config.get("DEBUG") or config.get("TESTING"):
        problems.append("DEBUG and TESTING (FLASK_DEBUG, BROKER_DEBUG) must be off in production")
    if config.get("WTF_CSRF_ENABLED") is False:
        problems.append("CSRF protection cannot be turned off in production")
    # The API token travels to the API base; an http:// URL (the emulator's) would expose it.
    https = ["CLOUDFLARE_API_BASE", "CLOUDFLARE_DELIVERY_BASE", "CLOUDFLARE_UPLOAD_ORIGIN"]
    if batch == "auto" and config.get("CLOUDFLARE_BATCH_BASE"):  # unset: said already
        https.append("CLOUDFLARE_BATCH_BASE")
    plain = [
        f"BROKER_{k}" for k in https if not str(config.get(k) or "").lower().startswith("https://")
    ]
    if plain:
        problems.append(f"{', '.join(plain)} must be https:// URLs in production")
    if not _coerce("ENCRYPTION_KEYS", config.get("ENCRYPTION_KEYS"), tuple[str, ...]):
        problems.append(
            "BROKER_ENCRYPTION_KEYS is missing; set a key from `flask encryption generate-key`"
        )
    return problems


def _key_problem(keys: tuple[str, ...]) -> str | None:
    """Return why these encryption keys cannot be used (None when they are all Fernet keys)."""
    for n, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            return (
                f"BROKER_ENCRYPTION_KEYS key #{n} is not a Fernet key (32 url-safe base64 "
                "bytes; make one with `flask encryption generate-key`)"
            )
    return None


def batch_base_for(api_base: str) -> str:
    """Return the batch host that goes with `api_base`, or refuse when none can be told.

    A base that is not Cloudflare's (the emulator, a proxy) never reaches Cloudflare's batch
    host with its token: its batch host is beside its API, at `/batch` for `/client/v4`.
    """
    base = api_base.rstrip("/")
    if base == CLOUDFLARE_API_BASE:
        return CLOUDFLARE_BATCH_BASE
    if base.endswith(API_PATH):
        return base.removesuffix(API_PATH) + "/batch"
    raise ConfigError(
        f"BROKER_CLOUDFLARE_BATCH_BASE is needed: BROKER_CLOUDFLARE_API_BASE ({base}) does not"
        f" end in {API_PATH}, so its batch host cannot be derived (or set BROKER_CLOUDFLARE_BATCH=off)"
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


# ---------------------------------------------------------------------------------------------
# Typed settings

EXTENSION_KEY = "settings"

Env = Literal["development", "testing", "production"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every BROKER_* setting with its real type (the table above says what each one does).

    Built once by `init_app` from the finalized config: derived defaults are filled in
    (`database_url`, `registration`, `worker_inline`), `None` stands for "not set", and a list
    setting is a tuple whatever form it was given in (a list, or a comma-separated string).
    A snapshot: changing `app.config` afterwards changes nothing here; give `create_app` the
    settings an app should run with.
    """

    env: Env
    instance_path: str | None
    secret_key: str
    database_url: str
    encryption_keys: tuple[str, ...]
    db_pool_size: int | None
    db_max_overflow: int
    db_processes: int
    log_level: str
    log_format: Literal["text", "json"]
    public_url: str | None
    password_hash_concurrency: int
    cloudflare_api_base: str
    cloudflare_account_id: str | None
    cloudflare_api_token: str | None
    cloudflare_account_hash: str | None
    cloudflare_delivery_base: str
    cloudflare_upload_origin: str
    cloudflare_timeout: float
    cloudflare_webhook_secret: str | None
    cloudflare_batch: Literal["auto", "off"]
    cloudflare_batch_base: str | None  # derived from the API base unless set; None when off
    cloudflare_batch_rate: int
    cloudflare_batch_token_rate: int
    cloudflare_batch_rate_scope: Literal["shared", "process"]
    cloudflare_batch_cooldown: float
    registration: bool
    auth_rate_limit: str
    session_lifetime: int
    api_token_ttl_days: int
    oidc_issuer: str | None
    oidc_audience: str | None
    oidc_algorithms: tuple[str, ...]
    oidc_jwks_url: str | None
    oidc_leeway: float
    cors_origins: tuple[str, ...]
    metrics_token: str | None
    proxy_count: int
    ratelimit_storage_uri: str
    upstream_budget: int
    upstream_budget_window: int
    upstream_background_reserve: int
    upstream_background_share: int
    require_signed_urls: bool
    upload_default_expiry: int
    max_pending_uploads: int
    max_uploads_per_day: int
    expiry_grace: float
    worker_inline: bool
    worker_poll_interval: float
    worker_stale_after: float
    retention_delivered_days: int
    retention_failed_days: int
    retention_uploads_days: int
    webhook_allow_private: bool
    webhook_timeout: float
    webhook_concurrency: int
    webhook_endpoint_concurrency: int
    max_content_length: int
    verify_batch_window: float
    complete_inline_budget: float
    upload_allowed_formats: tuple[str, ...]
    upload_max_bytes: int | None
    upload_max_dimension: int | None
    upload_profiles: str | None
    keys_sync_interval: float
    erasure_lease: int
    reconcile_interval: float
    reconcile_orphans: Literal["adopt", "delete"]
    reconcile_grace: float
    usage_interval: float
    usage_warn_ratio: float
    signed_url_ttl: int
    signed_url_max_ttl: int
    signed_url_bucket: int
    variants: tuple[str, ...]
    key_rotation_grace: float


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bad(name: str, value: Any, wanted: str) -> ConfigError:
    return ConfigError(f"BROKER_{name} must be {wanted}, not {value!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Read one raw config value as the type `hint`, or raise ConfigError naming the setting."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType) and NoneType in args:
        if value is None or value == "":
            return None
        (inner,) = (a for a in args if a is not NoneType)
        return _coerce(name, value, inner)
    if origin is tuple:
        if not isinstance(value, str):
            items = list(value or ())
        elif name in _SPACE_SEPARATED:
            items = value.replace(",", " ").split()
        else:
            items = value.split(",")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if hint is bool:
        if value is None or isinstance(value, bool | int):
            return bool(value)
        if str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise _bad(name, value, "true or false")
    if value is None:
        raise ConfigError(f"BROKER_{name} must be set")
    if origin is Literal:
        if value not in args:
            raise _bad(name, value, " or ".join(args))
        return value
    if hint is str:
        return str(value)
    number = _number(value)
    if number is None:
        raise _bad(name, value, "a number")
    if hint is float:
        return number
    if not number.is_integer():
        raise _bad(name, value, "a whole number")
    return int(number)


def _number(value: Any) -> float | None:
    """A config value read as a number (a number, or a string holding one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


# Lists written as words (`JPEG PNG` as well as `JPEG,PNG`); the others are comma-separated only.
_SPACE_SEPARATED = {"UPLOAD_ALLOWED_FORMATS"}


def build_settings(config: Mapping[str, Any]) -> Settings:
    """Read the finalized config into typed `Settings` (ConfigError names a bad setting)."""
    hints = typing.get_type_hints(Settings)
    return Settings(
        **{
            s.name.lower(): _coerce(s.name, config.get(s.name), hints[s.name.lower()])
            for s in SETTINGS
        }
    )


def init_app(app: Flask) -> None:
    """Build the app's `Settings` once, after `finalize`, into `app.extensions["settings"]`."""
    app.extensions[EXTENSION_KEY] = build_settings(app.config)


def settings_of(app: Flask) -> Settings:
    """Return `app`'s typed settings."""
    settings: Settings = app.extensions[EXTENSION_KEY]
    return settings


def current_settings() -> Settings:
    """Return the current app's typed settings (in a request, a CLI command or the worker)."""
    return settings_of(current_app)
