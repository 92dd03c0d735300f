"""The browser pages: landing, upload, gallery and image detail."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import (
    Blueprint,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required

from broker.audit import log as audit
from broker.auth import admin_required
from broker.auth.models import User
from broker.images import variants
from broker.platform.config import CLOUDFLARE_API_BASE, current_settings
from broker.platform.db import db
from broker.platform.errors import ApiError
from broker.reconcile import check, usage
from broker.reconcile.models import CloudflareUsage
from broker.uploads import lifecycle, profiles, queries
from broker.uploads.models import Upload, UploadStatus
from broker.uploads.policy import UploadError
from broker.upstream.cloudflare import UpstreamError, get_client
from broker.webhooks import endpoints
from broker.webhooks.models import WebhookDelivery

bp = Blueprint("web", __name__)

GALLERY_PAGE_SIZE = 24
ADMIN_DELIVERIES = 25
# The gallery's views: finished images, drafts still waiting for their file, and uploads that
# ended without an image (refused by the rules or the image service; the link ran out).
SHOWS = {
    "images": UploadStatus.READY,
    "drafts": UploadStatus.PENDING,
    "refused": UploadStatus.REJECTED,
    "expired": UploadStatus.EXPIRED,
}
# Most drafts discarded in one request (the pending limit is far below this).
DISCARD_BATCH = 200


@bp.get("/")
def index() -> ResponseReturnValue:
    """Send signed-in users to the upload page; show the landing page to everyone else."""
    if current_user.is_authenticated:
        return redirect(url_for("web.upload"))
    return render_template("web/index.html")


@bp.get("/upload")
@login_required
def upload() -> ResponseReturnValue:
    """Show the drag-and-drop upload page, for one upload profile (`?profile=`) and its rules."""
    known = profiles.profiles_of(current_settings())
    name = request.args.get("profile")
    if name is not None and name not in known.names:
        abort(404, "There is no such upload profile.")
    profile = known.get(name)
    why = profiles.refusal_to_use(profile, profiles.Actor(is_admin=current_user.is_admin))
    if why:
        abort(403, f"You may not upload with this profile: {why}.")
    return render_template(
        "web/upload.html",
        detail_variant=profile.default_variant or _detail_variant(),
        profile=profile,
        accept=profiles.accept_attribute(profile),
        rules=upload_rules(profile),
    )


def upload_rules(profile: profiles.Profile) -> dict[str, Any]:
    """Return the rules the page checks and prepares files to: the profile's public rules, with
    the names the page's scripts read (checks.js, prepare.js)."""
    # prepare.js fits a picture inside `max_width` and `max_height` each (a 4000x1000 limit
    # leaves a 3000x800 picture as it is); `max_dimension` is one limit for both sides, only
    # where the two are the same (the default profile's BROKER_UPLOAD_MAX_DIMENSION).
    same = profile.max_width is not None and profile.max_width == profile.max_height
    return {
        **profile.public(),
        "allowed_formats": list(profile.formats) or None,
        "max_bytes": profile.max_bytes or None,
        "max_dimension": profile.max_width if same else None,
        # Location and device details leave the device only where a profile asks for them.
        "keep_metadata": False,
    }


@bp.get("/gallery")
@login_required
def gallery() -> ResponseReturnValue:
    """List the user's images (or drafts, refused or expired uploads), newest first, a page at a
    time, of one upload profile if `profile` names one."""
    before = request.args.get("before") or None
    show = request.args.get("show", "images")
    if show not in SHOWS:
        abort(400, "Show images, drafts, refused or expired.")
    names = profiles.profiles_of(current_settings()).names
    profile = request.args.get("profile") or None
    if profile is not None and profile not in names:
        abort(404, "There is no such upload profile.")
    try:
        rows, next_cursor = queries.list_uploads(
            db.session,
            user_id=current_user.id,
            status=SHOWS[show],
            cursor=before,
            limit=GALLERY_PAGE_SIZE,
            include_deleted=False,
            profile=profile,
        )
    except UploadError:
        abort(400, "That page link is not valid.")
    return render_template(
        "web/gallery.html",
        uploads=rows,
        next_cursor=next_cursor,
        newer=before is not None,
        show=show,
        profile=profile,
        profile_names=names if len(names) > 1 else (),
        counts=_own_counts(),
        facts={row.id: file_facts(row) for row in rows},
    )


def _own_counts() -> dict[str, int]:
    """Count the signed-in user's images and drafts (the gallery's two tabs)."""
    rows = db.session.execute(
        sa.select(Upload.status, sa.func.count())
        .where(Upload.user_id == current_user.id, Upload.status.in_(SHOWS.values()))
        .group_by(Upload.status)
    )
    by_status = {status: count for status, count in rows}
    return {show: by_status.get(status, 0) for show, status in SHOWS.items()}


@bp.post("/gallery/drafts/discard")
@login_required
def discard_drafts() -> ResponseReturnValue:
    """Discard the user's drafts waiting for a file in one action (except those in `keep`)."""
    body = request.get_json(silent=True) if request.is_json else None
    keep = body.get("keep") if isinstance(body, dict) else None
    keep_ids = {k for k in keep if isinstance(k, str)} if isinstance(keep, list) else set()
    drafts = db.session.scalars(
        sa.select(Upload)
        .where(Upload.user_id == current_user.id, Upload.status == lifecycle.PENDING)
        .order_by(Upload.created_at)
        .limit(DISCARD_BATCH)
    ).all()
    client = get_client()
    discarded = 0
    try:
        for draft in drafts:
            if draft.id in keep_ids:
                continue
            # The API's DELETE, one draft at a time: each commit frees a slot even if a later
            # call to the image service fails.
            discarded += lifecycle.delete_upload(db.session, draft, client)
            db.session.commit()
    except UpstreamError:
        db.session.rollback()
        said = (
            f"{discarded} draft{'' if discarded == 1 else 's'} discarded; the image service is"
            " not answering, so the rest are still waiting. Try again in a moment."
        )
        if request.is_json:
            raise ApiError(
                502, "upstream_unavailable", said, headers={"Retry-After": "5"}
            ) from None
        flash(said, "error")
        return redirect(url_for("web.gallery", show="drafts"))
    if request.is_json:
        return jsonify(discarded=discarded)
    flash(f"{discarded} draft{'' if discarded == 1 else 's'} discarded.", "info")
    return redirect(url_for("web.gallery", show="drafts"))


def file_facts(upload: Upload) -> dict[str, Any]:
    """What the upload page recorded about the original (name, type, bytes, size), checked."""
    raw = (upload.meta or {}).get("file")
    if not isinstance(raw, dict):
        return {}
    facts: dict[str, Any] = {}
    for key, longest in (("name", 255), ("type", 16)):
        if isinstance(raw.get(key), str) and 0 < len(raw[key]) <= longest:
            facts[key] = raw[key]
    for key in ("bytes", "width", "height"):
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            facts[key] = value
    facts["animated"] = raw.get("animated") is True
    return facts


@bp.get("/gallery/<upload_id>")
@login_required
def image_detail(upload_id: str) -> ResponseReturnValue:
    """Show one image with its facts, a link to every variant, and delete."""
    row = queries.find_upload(db.session, current_user, upload_id)
    if row is None:
        abort(404)
    return render_template(
        "web/image.html",
        upload=row,
        detail_variant=_detail_variant(),
        variant_names=sorted(variants.known_variants()),
        facts=file_facts(row),
        # The local emulator serves the first frame of an animated GIF; Cloudflare animates it.
        emulated=current_settings().cloudflare_api_base != CLOUDFLARE_API_BASE,
    )


def _detail_variant() -> str:
    """Pick the larger declared variant for the detail view (`medium` by default)."""
    names = [v.name for v in variants.declared_variants()]
    return "medium" if "medium" in names else (names[-1] if names else "public")


@bp.get("/admin")
@admin_required
def admin() -> ResponseReturnValue:
    """Show operators the uploads, users, webhook endpoints, latest deliveries and audit log."""
    users = db.session.scalars(sa.select(User).order_by(User.created_at.desc()).limit(100)).all()
    return render_template(
        "web/admin.html",
        counts=queries.status_counts(db.session),
        profile_names=profiles.profiles_of(current_settings()).names,
        profile_usage=queries.profile_usage(db.session),
        users=users,
        endpoints=endpoints.list_endpoints(db.session),
        deliveries=endpoints.recent_deliveries(db.session, limit=ADMIN_DELIVERIES),
        audit_entries=audit.recent(db.session, limit=ADMIN_DELIVERIES),
        usage=(row := db.session.get(CloudflareUsage, 1)),
        near_allowance=usage.near_allowance(row, current_settings().usage_warn_ratio),
        top_users=usage.per_user(db.session),
        report=check.latest(db.session),
    )


@bp.post("/admin/deliveries/<id:delivery_id>/redeliver")
@admin_required
def admin_redeliver(delivery_id: int) -> ResponseReturnValue:
    """Queue a webhook delivery again (same webhook-id, fresh retry schedule)."""
    delivery = db.session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        abort(404)
    before = audit.snapshot(delivery, endpoints.AUDITED_DELIVERY)
    endpoints.redeliver(delivery)
    audit.changed(db.session, "webhook_delivery.redelivered", str(delivery.id), before, delivery)
    db.session.commit()
    flash(f"Delivery {delivery_id} queued again.", "info")
    return redirect(url_for("web.admin"))
