"""The browser pages: landing, upload, gallery and image detail."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from broker import uploads

bp = Blueprint("web", __name__)

GALLERY_PAGE_SIZE = 24


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    """Send signed-in users to the upload page; show the landing page to everyone else."""
    if current_user.is_authenticated:
        return redirect(url_for("web.upload"))
    return render_template("web/index.html")


@bp.get("/upload")
@login_required
def upload():  # type: ignore[no-untyped-def]
    """Show the drag-and-drop upload page."""
    return render_template("web/upload.html")


@bp.get("/gallery")
@login_required
def gallery():  # type: ignore[no-untyped-def]
    """List the user's images, newest first, a page at a time."""
    before = request.args.get("before") or None
    try:
        rows, next_cursor = uploads.list_uploads(
            user_id=current_user.id,
            cursor=before,
            limit=GALLERY_PAGE_SIZE,
            include_deleted=False,
        )
    except uploads.UploadError:
        abort(400, "That page link is not valid.")
    return render_template(
        "web/gallery.html", uploads=rows, next_cursor=next_cursor, newer=before is not None
    )


@bp.get("/gallery/<upload_id>")
@login_required
def image_detail(upload_id: str):  # type: ignore[no-untyped-def]
    """Show one image with its larger variant, copy-link and delete."""
    row = uploads.find_upload(current_user, upload_id)
    if row is None:
        abort(404)
    return render_template(
        "web/image.html", upload=row, detail_variant=_detail_variant(current_app.config)
    )


def _detail_variant(config: dict) -> str:  # type: ignore[type-arg]
    """Pick the larger declared variant for the detail view (`medium` by default)."""
    from broker.signing import parse_variants

    names = [v.name for v in parse_variants(config["VARIANTS"])]
    return "medium" if "medium" in names else (names[-1] if names else "public")


@bp.get("/admin")
@login_required
def admin():  # type: ignore[no-untyped-def]
    """Show operators the users, webhook endpoints and latest deliveries."""
    if not current_user.is_admin:
        abort(403)
    import sqlalchemy as sa

    from broker.db import db
    from broker.models import Upload, User

    users = db.session.scalars(sa.select(User).order_by(User.created_at.desc()).limit(100)).all()
    counts = dict(
        db.session.execute(sa.select(Upload.status, sa.func.count()).group_by(Upload.status)).all()
    )
    return render_template("web/admin.html", users=users, counts=counts)
