"""Upload profiles: each kind of upload an app has (avatar, gallery photo, scan) with its rules.

Offers `Profile`, `Profiles` (the configured set, `default` always among them), `profiles_of`
(the set of an app's settings, read once), `load` / `parse` (a TOML document → profiles, or a
`ProfileConfigError` listing every problem at once), `Actor` and `may_use` (who may use a
profile), `Violation` and `violation` (what an original breaks, measured), and the refusals of
the create path (`UNKNOWN_PROFILE`, `PROFILE_NOT_ALLOWED`, `METADATA_SCHEMA`,
`SIGNED_URLS_FIXED`).

Rules it enforces:
- the `default` profile is the global settings (`BROKER_UPLOAD_ALLOWED_FORMATS`, `…_MAX_BYTES`,
  `…_MAX_DIMENSION`, `BROKER_MAX_PENDING_UPLOADS`, `…_PER_DAY`, `BROKER_UPLOAD_DEFAULT_EXPIRY`);
  a `[profiles.default]` table in the file changes only the keys it sets;
- the file (`BROKER_UPLOAD_PROFILES`) is read with the standard library's `tomllib` and checked
  whole at start: unknown keys, wrong types, impossible bounds and broken JSON Schemas are all
  reported in one error;
- a replace-mode profile takes one file per pick and keeps one current image per user.
Pure logic: no Flask import; nothing here touches the database.
"""

from __future__ import annotations

import functools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from broker.platform.config import MAX_QUOTA_LIMIT, ConfigError, Settings
from broker.platform.errors import Kind, Refusal
from broker.uploads.policy import UploadError

DEFAULT = "default"
# A profile's name travels in URLs (`/upload?profile=…`), Cloudflare metadata and events.
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
ROLES = ("user", "admin")
# Formats Cloudflare Images accepts, as Pillow names them (plus SVG, recognised by text).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "SVG", "HEIF", "AVIF")
_ALIASES = {"JPG": "JPEG", "HEIC": "HEIF"}
DEFAULT_ASPECT_TOLERANCE = 0.01
DEFAULT_REPLACE_GRACE = 60

UNKNOWN_PROFILE = Refusal(
    Kind.INVALID,
    "validation_error",
    "profile '{profile}' does not exist; GET /api/v1/profiles lists them",
    {"profile": "banner"},
    field="profile",
)
PROFILE_NOT_ALLOWED = Refusal(
    Kind.FORBIDDEN,
    "profile_not_allowed",
    "You may not upload with profile '{profile}': {why}.",
    {"profile": "staff-photo", "why": "it is for admins"},
)
METADATA_SCHEMA = Refusal(
    Kind.INVALID,
    "validation_error",
    "metadata{path} breaks profile '{profile}': {problem}",
    {"path": ".album", "profile": "gallery", "problem": "'album' is a required property"},
    field="metadata",
)
SIGNED_URLS_FIXED = Refusal(
    Kind.INVALID,
    "validation_error",
    "profile '{profile}' sets require_signed_urls to {fixed}",
    {"profile": "avatar", "fixed": "false"},
    field="require_signed_urls",
)


class ProfileConfigError(ConfigError):
    """The profiles file cannot be used; the message lists every problem."""


@dataclass(frozen=True)
class Allow:
    """Who may use a profile; an empty rule allows everyone."""

    # `user` (any account) and/or `admin`.
    roles: tuple[str, ...] = ()
    # A service key must hold every one of these scopes (a person's own token is not limited).
    scopes: tuple[str, ...] = ()
    # An OpenID Connect token must carry each claim with one of the listed values.
    claims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """One kind of upload and its rules; None (or empty) means "no limit" for a rule."""

    name: str
    description: str = ""
    formats: tuple[str, ...] = ()
    max_bytes: int | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    # Width divided by height, with a relative tolerance (0.01: within 1 %).
    aspect_ratio: float | None = None
    aspect_tolerance: float = DEFAULT_ASPECT_TOLERANCE
    max_files: int | None = None
    max_pending: int = 20
    max_per_day: int = 500
    max_stored: int | None = None
    # Seconds the upload URL lives unless the client asks otherwise.
    expires_in: int = 1800
    # None: the client's choice (default `BROKER_REQUIRE_SIGNED_URLS`); else fixed.
    require_signed_urls: bool | None = None
    default_variant: str | None = None
    metadata_schema: Mapping[str, Any] | None = None
    allow: Allow = field(default_factory=Allow)
    replace: bool = False
    replace_grace: int = DEFAULT_REPLACE_GRACE

    @property
    def files_per_pick(self) -> int | None:
        """How many files one pick may hold (one in replace mode)."""
        return 1 if self.replace else self.max_files

    @property
    def checks_original(self) -> bool:
        """Tell whether an arrived original must be fetched and measured against this profile."""
        return bool(
            self.formats
            or self.max_bytes
            or self.aspect_ratio
            or any(
                getattr(self, name) is not None
                for name in (
                    "min_width",
                    "max_width",
                    "min_height",
                    "max_height",
                    "min_pixels",
                    "max_pixels",
                )
            )
        )

    def public(self) -> dict[str, Any]:
        """The rules a client may check before sending (`GET /api/v1/profiles`)."""
        return {
            "name": self.name,
            "description": self.description,
            "formats": list(self.formats),
            "max_bytes": self.max_bytes,
            "min_width": self.min_width,
            "max_width": self.max_width,
            "min_height": self.min_height,
            "max_height": self.max_height,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "aspect_ratio": self.aspect_ratio,
            "aspect_tolerance": self.aspect_tolerance if self.aspect_ratio else None,
            "files_per_pick": self.files_per_pick,
            "max_pending": self.max_pending,
            "max_per_day": self.max_per_day,
            "max_stored": self.max_stored,
            "expires_in": self.expires_in,
            "require_signed_urls": self.require_signed_urls,
            "default_variant": self.default_variant,
            "metadata_schema": dict(self.metadata_schema) if self.metadata_schema else None,
            "replace": self.replace,
            "replace_grace": self.replace_grace if self.replace else None,
        }

    def rules_in_words(self) -> list[str]:
        """The rules as short sentences, for the upload page."""
        words: list[str] = []
        if self.formats:
            words.append("Formats: " + ", ".join(self.formats) + ".")
        if self.max_bytes:
            words.append(f"Up to {_size(self.max_bytes)} per file.")
        for side, low, high in (
            ("Width", self.min_width, self.max_width),
            ("Height", self.min_height, self.max_height),
        ):
            if low and high:
                words.append(f"{side} {low} to {high} px.")
            elif high:
                words.append(f"{side} at most {high} px.")
            elif low:
                words.append(f"{side} at least {low} px.")
        if self.max_pixels:
            words.append(f"At most {self.max_pixels / 1e6:g} megapixels.")
        if self.min_pixels:
            words.append(f"At least {self.min_pixels / 1e6:g} megapixels.")
        if self.aspect_ratio:
            words.append(f"Aspect ratio {_ratio(self.aspect_ratio)} (width:height).")
        if self.replace:
            words.append("One image: a new upload replaces your current one.")
        elif self.max_files:
            words.append(f"Up to {self.max_files} files at once.")
        return words


def _size(n: int) -> str:
    for unit, scale in (("MB", 1_000_000), ("kB", 1_000)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _ratio(value: float) -> str:
    if value == 1:
        return "1:1"
    for height in range(1, 33):
        width = value * height
        if abs(width - round(width)) < 1e-6:
            return f"{round(width)}:{height}"
    return f"{value:g}"


@dataclass(frozen=True)
class Profiles:
    """The configured profiles by name, `default` first."""

    by_name: Mapping[str, Profile]

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    @property
    def names(self) -> tuple[str, ...]:
        """Every profile's name, `default` first."""
        return tuple(self.by_name)

    def get(self, name: str | None) -> Profile:
        """The profile called `name` (None: `default`), or UploadError naming it."""
        found = self.by_name.get(name or DEFAULT)
        if found is None:
            raise UploadError(UNKNOWN_PROFILE, profile=name)
        return found

    def find(self, name: str | None) -> Profile:
        """The profile an existing upload was made with (`default` when it is no longer
        configured: its upload is then held to the global rules)."""
        return self.by_name.get(name or DEFAULT) or self.by_name[DEFAULT]

    @property
    def any_checks_original(self) -> bool:
        """Tell whether some profile has rules on the original."""
        return any(p.checks_original for p in self)


def default_profile(settings: Settings) -> Profile:
    """The profile equal to the global upload settings."""
    formats = tuple(_format(f) for f in settings.upload_allowed_formats if f.strip())
    side = settings.upload_max_dimension
    return Profile(
        name=DEFAULT,
        formats=tuple(dict.fromkeys(formats)),
        max_bytes=settings.upload_max_bytes or None,
        max_width=side or None,
        max_height=side or None,
        max_pending=settings.max_pending_uploads,
        max_per_day=settings.max_uploads_per_day,
        expires_in=settings.upload_default_expiry,
    )


def _format(name: str) -> str:
    upper = name.strip().upper()
    return _ALIASES.get(upper, upper)


# -- reading the file -------------------------------------------------------------------------

_INTS = (
    "max_bytes",
    "min_width",
    "max_width",
    "min_height",
    "max_height",
    "min_pixels",
    "max_pixels",
    "max_files",
    "max_pending",
    "max_per_day",
    "max_stored",
    "expires_in",
    "replace_grace",
)
# Quota limits: a create counts within an SQL integer.
_MOST = dict.fromkeys(("max_pending", "max_per_day", "max_stored"), MAX_QUOTA_LIMIT)
_KEYS = {f.name for f in fields(Profile)} - {"name"} | {"aspect_ratio"}
_ALLOW_KEYS = {"roles", "scopes", "claims"}


def _aspect(value: Any) -> float | None:
    """Read `1`, `1.5`, `"16:9"` as width/height, or None when it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and value > 0 and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:/]\s*(\d+(?:\.\d+)?)\s*", value)
        if match and float(match[2]) > 0 and float(match[1]) > 0:
            return float(match[1]) / float(match[2])
    return None


def _strings(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _read_profile(name: str, table: Any, base: Profile, problems: list[str]) -> Profile | None:
    """Read one `[profiles.<name>]` table over `base`, adding what is wrong to `problems`."""
    where = f"profiles.{name}"
    if not NAME.match(name):
        problems.append(f"{where}: a name is 1-32 of a-z, 0-9, - and _, not starting with - or _")
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table")
        return None
    found = len(problems)
    values: dict[str, Any] = {}
    for key in sorted(set(table) - _KEYS):
        problems.append(f"{where}: unknown key {key!r}")
    for key in _INTS:
        if key in table:
            value = table[key]
            top = _MOST.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{where}.{key} must be a whole number ≥ 0, not {value!r}")
            elif top is not None and value > top:
                problems.append(f"{where}.{key} must be at most {top:,}, not {value:,}")
            else:
                values[key] = value
    if "description" in table:
        if isinstance(table["description"], str):
            values["description"] = table["description"]
        else:
            problems.append(f"{where}.description must be a string")
    if "formats" in table:
        formats = _strings(table["formats"])
        wrong = [f for f in formats or () if _format(f) not in FORMATS]
        if formats is None or wrong:
            problems.append(f"{where}.formats: each one of {', '.join(FORMATS)}, not {wrong}")
        else:
            values["formats"] = tuple(dict.fromkeys(_format(f) for f in formats))
    if "aspect_ratio" in table:
        aspect = _aspect(table["aspect_ratio"])
        if aspect is None:
            problems.append(
                f"{where}.aspect_ratio: a number or 'W:H', not {table['aspect_ratio']!r}"
            )
        else:
            values["aspect_ratio"] = aspect
    if "aspect_tolerance" in table:
        tol = table["aspect_tolerance"]
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
            problems.append(f"{where}.aspect_tolerance must be a number from 0 to below 1")
        else:
            values["aspect_tolerance"] = float(tol)
    for key in ("require_signed_urls", "replace"):
        if key in table:
            if isinstance(table[key], bool):
                values[key] = table[key]
            else:
                problems.append(f"{where}.{key} must be true or false")
    if "default_variant" in table:
        if isinstance(table["default_variant"], str) and table["default_variant"]:
            values["default_variant"] = table["default_variant"]
        else:
            problems.append(f"{where}.default_variant must be a variant's name")
    if "metadata_schema" in table:
        schema = table["metadata_schema"]
        import jsonschema  # loaded only where a profile has a schema (~3 MB a process)

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
            values["metadata_schema"] = schema
        except jsonschema.SchemaError as exc:
            problems.append(f"{where}.metadata_schema is not a valid JSON Schema: {exc.message}")
    if "allow" in table:
        allow = _read_allow(where, table["allow"], problems)
        if allow is not None:
            values["allow"] = allow
    # Bounds are checked on the values that could be read, so that one start lists them too.
    profile = replace(base, name=name, **values)
    _check_bounds(where, profile, problems)
    return None if len(problems) > found else profile


def _read_allow(where: str, table: Any, problems: list[str]) -> Allow | None:
    if not isinstance(table, dict):
        problems.append(f"{where}.allow must be a table (roles, scopes, claims)")
        return None
    for key in sorted(set(table) - _ALLOW_KEYS):
        problems.append(f"{where}.allow: unknown key {key!r}")
    roles = _strings(table.get("roles", []))
    if roles is None or set(roles) - set(ROLES):
        problems.append(f"{where}.allow.roles: a list of {', '.join(ROLES)}")
    scopes = _strings(table.get("scopes", []))
    if scopes is None:
        problems.append(f"{where}.allow.scopes must be a list of scopes")
    claims_in = table.get("claims", {})
    claims: dict[str, tuple[str, ...]] = {}
    if not isinstance(claims_in, dict):
        problems.append(f"{where}.allow.claims must be a table of claim = value(s)")
    else:
        for claim, wanted in claims_in.items():
            values = _strings(wanted)
            if not values:
                problems.append(f"{where}.allow.claims.{claim}: a string or a list of strings")
            else:
                claims[claim] = values
    return Allow(roles=roles or (), scopes=scopes or (), claims=claims)


def _check_bounds(where: str, p: Profile, problems: list[str]) -> None:
    for low, high in (
        ("min_width", "max_width"),
        ("min_height", "max_height"),
        ("min_pixels", "max_pixels"),
    ):
        lo, hi = getattr(p, low), getattr(p, high)
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{where}: {low} ({lo}) is above {high} ({hi})")
    if not 120 <= p.expires_in <= 21600:
        problems.append(f"{where}.expires_in must be 120 to 21600 seconds")
    if p.replace and p.max_files not in (None, 1):
        problems.append(f"{where}: a replace profile takes one file per pick (max_files = 1)")


def parse(text: str, settings: Settings, *, source: str = "profiles") -> Profiles:
    """Read a profiles document; ProfileConfigError lists every problem in it."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileConfigError(f"{source}: not valid TOML: {exc}") from None
    problems: list[str] = []
    tables = document.pop("profiles", {})
    for key in sorted(document):
        problems.append(f"unknown top-level key {key!r} (profiles go under [profiles.<name>])")
    if not isinstance(tables, dict):
        problems.append("profiles must be a table of [profiles.<name>] tables")
        tables = {}
    base = default_profile(settings)
    default = _read_profile(DEFAULT, tables.pop(DEFAULT, {}), base, problems) or base
    by_name: dict[str, Profile] = {DEFAULT: default}
    for name, table in tables.items():
        # A profile starts from no limits but the quotas and expiry of the default one.
        start = Profile(
            name=name,
            max_pending=default.max_pending,
            max_per_day=default.max_per_day,
            expires_in=default.expires_in,
        )
        profile = _read_profile(name, table, start, problems)
        if profile is not None:
            by_name[name] = profile
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ProfileConfigError(f"{source}: {len(problems)} problem(s) to fix:\n{listed}")
    return Profiles(by_name)


def load(settings: Settings) -> Profiles:
    """Read the profiles file `BROKER_UPLOAD_PROFILES` names (none: the default profile only)."""
    path = settings.upload_profiles
    if not path:
        base = default_profile(settings)
        return Profiles({DEFAULT: base})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileConfigError(
            f"BROKER_UPLOAD_PROFILES: cannot read {path}: {exc.strerror}"
        ) from None
    return parse(text, settings, source=path)


@functools.lru_cache(maxsize=16)
def profiles_of(settings: Settings) -> Profiles:
    """The profiles of an app's settings, read once per settings snapshot."""
    return load(settings)


# -- who may use a profile ------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who asks for an upload: the account's role, a service key's scopes, a JWT's claims."""

    is_admin: bool
    scopes: frozenset[str] | None = None
    claims: Mapping[str, Any] | None = None


def refusal_to_use(profile: Profile, actor: Actor) -> str | None:
    """Say why `actor` may not use `profile`, or None when they may."""
    rule = profile.allow
    if rule.roles:
        role = "admin" if actor.is_admin else "user"
        if role not in rule.roles and "user" not in rule.roles:
            return f"it is for {' and '.join(r + 's' for r in rule.roles)}"
    if rule.scopes and actor.scopes is not None:
        missing = sorted(set(rule.scopes) - actor.scopes)
        if missing:
            return f"your service key lacks the scope {', '.join(missing)}"
    for claim, wanted in rule.claims.items():
        value = (actor.claims or {}).get(claim)
        held = value if isinstance(value, list) else [value]
        if not any(isinstance(v, str) and v in wanted for v in held):
            return f"your sign-in does not carry {claim} = {' or '.join(wanted)}"
    return None


def check_may_use(profile: Profile, actor: Actor) -> None:
    """Refuse (403) an actor the profile's `allow` rule leaves out."""
    why = refusal_to_use(profile, actor)
    if why:
        raise UploadError(PROFILE_NOT_ALLOWED, profile=profile.name, why=why)


def check_metadata(profile: Profile, metadata: Mapping[str, Any] | None) -> None:
    """Validate the caller's metadata against the profile's JSON Schema (422 naming the field)."""
    if not profile.metadata_schema:
        return
    import jsonschema  # loaded at start when a profile has a schema: no cost here

    validator = jsonschema.Draft202012Validator(profile.metadata_schema)
    errors = sorted(validator.iter_errors(dict(metadata or {})), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.path)
        if first.validator == "required" and isinstance(first.instance, dict):
            missing = next((k for k in first.validator_value if k not in first.instance), None)
            path += f".{missing}" if missing else ""
        raise UploadError(
            METADATA_SCHEMA, path=path, profile=profile.name, problem=first.message[:200]
        )


def signed_urls(profile: Profile, asked: bool | None, default: bool) -> bool:
    """The `require_signed_urls` of a new upload: the profile's when fixed, else the ask."""
    if profile.require_signed_urls is None:
        return default if asked is None else asked
    if asked is not None and asked != profile.require_signed_urls:
        raise UploadError(
            SIGNED_URLS_FIXED,
            profile=profile.name,
            fixed=str(profile.require_signed_urls).lower(),
        )
    return profile.require_signed_urls


# -- measuring an original ------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """The rule an original breaks, what was measured and the limit."""

    rule: str
    measured: Any
    limit: Any
    message: str

    @property
    def reason(self) -> str:
        """The one-line reason an upload answer and its event carry."""
        return f"{self.rule}: {self.message}"


def violation(
    profile: Profile, size: int, fmt: str | None, dims: tuple[int, int] | None
) -> Violation | None:
    """The first rule of `profile` that an original of `size` bytes, format `fmt` and
    dimensions `dims` (None: not an image Pillow decodes, e.g. SVG) breaks, or None."""
    if profile.max_bytes and size > profile.max_bytes:
        return Violation(
            "max_bytes",
            size,
            profile.max_bytes,
            f"file is {size} bytes; the limit is {profile.max_bytes}",
        )
    if profile.formats and (fmt is None or fmt not in profile.formats):
        allowed = ", ".join(profile.formats)
        return Violation(
            "formats",
            fmt,
            list(profile.formats),
            f"format {fmt or 'unknown'} is not allowed ({allowed})",
        )
    if dims is None:
        return None
    width, height = dims
    for rule, measured, unit in (
        ("max_width", width, "px wide"),
        ("max_height", height, "px high"),
        ("max_pixels", width * height, "pixels"),
    ):
        limit = getattr(profile, rule)
        if limit is not None and measured > limit:
            return Violation(rule, measured, limit, f"image is {measured} {unit}; at most {limit}")
    for rule, measured, unit in (
        ("min_width", width, "px wide"),
        ("min_height", height, "px high"),
        ("min_pixels", width * height, "pixels"),
    ):
        limit = getattr(profile, rule)
        if limit is not None and measured < limit:
            return Violation(rule, measured, limit, f"image is {measured} {unit}; at least {limit}")
    if profile.aspect_ratio and height:
        ratio = width / height
        if abs(ratio / profile.aspect_ratio - 1) > profile.aspect_tolerance:
            wanted = _ratio(profile.aspect_ratio)
            return Violation(
                "aspect_ratio",
                f"{width}:{height}",
                wanted,
                f"image is {width}x{height}; the aspect ratio must be {wanted}",
            )
    return None


# What a file picker's `accept` lists for each format (HEIC files often come without a type).
_ACCEPT = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "SVG": "image/svg+xml",
    "HEIF": "image/heic,image/heif,.heic,.heif",
    "AVIF": "image/avif",
}


def accept_attribute(profile: Profile) -> str | None:
    """The file picker's `accept` for the profile's formats (None: any image Cloudflare takes)."""
    if not profile.formats:
        return None
    return ",".join(_ACCEPT[f] for f in profile.formats)
