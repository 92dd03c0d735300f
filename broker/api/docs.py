"""The OpenAPI document, and a docs page of it a developer can read on a phone (no CDN).

Both name the broker by BROKER_PUBLIC_URL, never by the request's Host header: a forged Host
must not end up in a document a cache or a client's code generator keeps. Without the setting
the document's server is relative (`/`) and the page's snippets use a placeholder.
"""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify, render_template, request
from flask.typing import ResponseReturnValue

from broker.api import bp, reference
from broker.api.spec import openapi_document

# The upload flow in each language the page shows: (id, label, template).
SNIPPETS = (
    ("curl", "curl", "api/snippets/curl.sh"),
    ("fetch", "JavaScript (fetch)", "api/snippets/fetch.js"),
    ("swift", "Swift (URLSession)", "api/snippets/upload.swift"),
    ("kotlin", "Kotlin (OkHttp)", "api/snippets/upload.kt"),
)


# Shown in the snippets when BROKER_PUBLIC_URL is unset.
PLACEHOLDER_URL = "https://broker.example.com"
# The document is the same for everyone: shared caches may keep it a few minutes. The page
# carries the reader's CSRF token and name: only their browser may keep it, and must ask again.
DOCUMENT_CACHE = "public, max-age=300"
PAGE_CACHE = "private, no-cache"


def _public_url() -> str:
    """Return BROKER_PUBLIC_URL without its trailing slash ("" when unset)."""
    return str(current_app.config.get("PUBLIC_URL") or "").rstrip("/")


def _document() -> dict[str, Any]:
    """Return the OpenAPI document, its server named by configuration alone."""
    return {
        **openapi_document(),
        "servers": [{"url": _public_url() or "/", "description": "This broker"}],
    }


@bp.get("/openapi.json")
def openapi_json() -> ResponseReturnValue:
    """Serve the OpenAPI 3.1 document of every JSON endpoint."""
    response = jsonify(_document())
    response.headers["Cache-Control"] = DOCUMENT_CACHE
    response.add_etag()
    return response.make_conditional(request)


@bp.get("/docs")
def docs_page() -> ResponseReturnValue:
    """Render the API reference and the upload flow's snippets from the OpenAPI document."""
    document = _document()
    base = _public_url() or PLACEHOLDER_URL
    # Rendered as text here; the page escapes them like any other value.
    snippets = [
        (key, label, render_template(name, base=base, variant=_a_variant(document)))
        for key, label, name in SNIPPETS
    ]
    ops = reference.operations(document)
    tags = [(tag, [op for op in ops if op.tag == tag["name"]]) for tag in document.get("tags", [])]
    page = render_template(
        "api/docs.html",
        doc=document,
        tags=tags,
        schemas=reference.schemas(document),
        snippets=snippets,
        md=reference.inline,
    )
    return page, 200, {"Cache-Control": PAGE_CACHE}


def _a_variant(document: dict[str, Any]) -> str:
    """A declared variant for the snippets (the document lists them on the URL route)."""
    op = document["paths"].get("/api/v1/images/{upload_id}/url", {}).get("get", {})
    for param in op.get("parameters", []):
        if param.get("name") == "variant":
            declared = [v for v in param["schema"].get("enum", []) if v != "public"]
            return declared[0] if declared else "public"
    return "public"
