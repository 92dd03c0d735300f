"""The OpenAPI document, and a docs page of it a developer can read on a phone (no CDN)."""

from __future__ import annotations

from typing import Any

from flask import jsonify, render_template, request
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


@bp.get("/openapi.json")
def openapi_json() -> ResponseReturnValue:
    """Serve the OpenAPI 3.1 document of every JSON endpoint."""
    return jsonify(openapi_document())


@bp.get("/docs")
def docs_page() -> ResponseReturnValue:
    """Render the API reference and the upload flow's snippets from the OpenAPI document."""
    document = openapi_document()
    base = request.host_url.rstrip("/")
    # Rendered as text here; the page escapes them like any other value.
    snippets = [
        (key, label, render_template(name, base=base, variant=_a_variant(document)))
        for key, label, name in SNIPPETS
    ]
    ops = reference.operations(document)
    tags = [(tag, [op for op in ops if op.tag == tag["name"]]) for tag in document.get("tags", [])]
    return render_template(
        "api/docs.html",
        doc=document,
        tags=tags,
        schemas=reference.schemas(document),
        snippets=snippets,
        md=reference.inline,
    )


def _a_variant(document: dict[str, Any]) -> str:
    """A declared variant for the snippets (the document lists them on the URL route)."""
    op = document["paths"].get("/api/v1/images/{upload_id}/url", {}).get("get", {})
    for param in op.get("parameters", []):
        if param.get("name") == "variant":
            declared = [v for v in param["schema"].get("enum", []) if v != "public"]
            return declared[0] if declared else "public"
    return "public"
