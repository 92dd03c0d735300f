"""The browser pages: landing, upload, gallery and image detail."""

from __future__ import annotations

import sqlalchemy as sa
from flask import (
    Blueprint,
    abort,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required

from broker.auth import admin_required
from broker.auth.models import User
from broker.images import variants
from broker.platform.db import db
from broker.uploads import queries
from broker.uploads.policy import UploadError
from broker.webhooks import endpoints
from broker.webhooks.models import WebhookDelivery

bp = Blueprint("web", __name__)

GALLERY_PAGE_SIZE = 24
ADMIN_DELIVERIES = 25


@bp.get("/")
def index() -> ResponseReturnValue:
    """Send signed-in users to the upload page; show the landing page to everyone else."""
    if current_user.is_authenticated:
        return redirect(url_for("web.upload"))
    return render_template("web/index.html")


@bp.get("/upload")
@login_required
def upload() -> ResponseReturnValue:
    """Show the drag-and-drop upload page."""
    return render_template("web/upload.html")


@bp.get("/gallery")
@login_required
def gallery() -> ResponseReturnValue:
    """List the user's images, newest first, a page at a time."""
    before = request.args.get("before") or None
    try:
        rows, next_cursor = queries.list_uploads(
            db.session,
            user_id=current_user.id,
            cursor=before,
            limit=GALLERY_PAGE_SIZE,
            include_deleted=False,
        )
    except UploadError:
        abort(400, "That page link is not valid.")
    return render_template(
        "web/gallery.html", uploads=rows, next_cursor=next_cursor, newer=before is not None
    )


@bp.get("/gallery/<upload_id>")
@login_required
def image_detail(upload_id: str) -> ResponseReturnValue:
    """Show one image with its larger variant, copy-link and delete."""
    row = queries.find_upload(db.session, current_user, upload_id)
    if row is None:
        abort(404)
    return render_template("web/image.html", upload=row, detail_variant=_detail_variant())


def _detail_variant() -> str:
    """Pick the larger declared variant for the detail view (`medium` by default)."""
    names = [v.name for v in variants.declared_variants()]
    return "medium" if "medium" in names else (names[-1] if names else "public")


@bp.get("/admin")
@admin_required
def admin() -> ResponseReturnValue:
    """Show operators the uploads, users, webhook endpoints and latest deliveries."""
    users = db.session.scalars(sa.select(User).order_by(User.created_at.desc()).limit(100)).all()
    return render_template(
        "web/admin.html",
        counts=queries.status_counts(db.session),
        users=users,
        endpoints=endpoints.list_endpoints(db.session),
        deliveries=endpoints.recent_deliveries(db.session, limit=ADMIN_DELIVERIES),
    )


@bp.post("/admin/deliveries/<id:delivery_id>/redeliver")
@admin_required
def admin_redeliver(delivery_id: int) -> ResponseReturnValue:
    """Queue a webhook delivery again (same webhook-id, fresh retry schedule)."""
    delivery = db.session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        abort(404)
    endpoints.redeliver(delivery)
    db.session.commit()
    flash(f"Delivery {delivery_id} queued again.", "info")
    return redirect(url_for("web.admin"))
