"""The variants the app needs (`BROKER_VARIANTS`) and keeping them in step upstream.

The declaration is parsed once per app (a bad one stops start-up with a ConfigError naming the
entry); `sync_variants` creates missing variants upstream and updates changed ones, and never
deletes variants it does not know about (other apps on the account may use them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from flask import Flask, current_app

from broker.images.signing import PUBLIC_VARIANT, Variant, parse_variants
from broker.platform.config import ConfigError, settings_of
from broker.upstream.cloudflare import CloudflareImages, Priority
from broker.upstream.cloudflare import Variant as UpstreamVariant

log = logging.getLogger("broker.variants")

EXTENSION_KEY = "variants"


@dataclass(frozen=True)
class VariantSync:
    """What happened to one declared variant: `created`, `updated` or `unchanged`."""

    name: str
    action: str


def init_app(app: Flask) -> None:
    """Parse `BROKER_VARIANTS` once; the variants apps may ask for include `public`."""
    try:
        declared = parse_variants(settings_of(app).variants)
    except ValueError as exc:
        raise ConfigError(f"BROKER_VARIANTS: {exc}") from None
    by_name = {PUBLIC_VARIANT.name: PUBLIC_VARIANT}
    by_name.update((v.name, v) for v in declared)
    app.extensions[EXTENSION_KEY] = (declared, by_name)


def declared_variants() -> tuple[Variant, ...]:
    """Return the variants declared in `BROKER_VARIANTS`, in their order."""
    return cast(tuple[Variant, ...], current_app.extensions[EXTENSION_KEY][0])


def known_variants() -> dict[str, Variant]:
    """Return the variants URLs may be minted for, by name (the declared ones and `public`)."""
    return cast(dict[str, Variant], current_app.extensions[EXTENSION_KEY][1])


def _matches(up: UpstreamVariant, want: Variant) -> bool:
    return (up.fit, up.width, up.height, up.metadata, up.never_require_signed_urls) == (
        want.fit,
        want.width,
        want.height,
        want.metadata,
        want.never_signed,
    )


def sync_variants(client: CloudflareImages, declared: Iterable[Variant]) -> list[VariantSync]:
    """Create or update each declared variant upstream; return what was done to each."""
    upstream = {v.id: v for v in client.list_variants(priority=Priority.BACKGROUND)}
    done = []
    for want in declared:
        have = upstream.get(want.name)
        args = (want.name, want.fit, want.width, want.height, want.metadata, want.never_signed)
        if have is None:
            client.create_variant(*args, priority=Priority.BACKGROUND)
            done.append(VariantSync(want.name, "created"))
        elif not _matches(have, want):
            client.update_variant(*args, priority=Priority.BACKGROUND)
            done.append(VariantSync(want.name, "updated"))
        else:
            done.append(VariantSync(want.name, "unchanged"))
    changed = [d for d in done if d.action != "unchanged"]
    if changed:
        log.info("variants synced: %s", ", ".join(f"{d.name} {d.action}" for d in changed))
    return done


def list_upstream(client: CloudflareImages) -> list[UpstreamVariant]:
    """Return the account's variants as Cloudflare has them, by name."""
    return sorted(client.list_variants(), key=lambda v: v.id)
