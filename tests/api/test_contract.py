"""The API contract as an app developer meets it, over real HTTP against the live broker (real
database, the emulator): the document validates as OpenAPI 3.1; schemathesis sends generated
requests and every answer is one the document lists (no server error, documented statuses,
headers, content types and bodies); a client generated from the document runs the upload flow.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import sqlalchemy as sa
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from broker import worker
from broker.platform.db import db
from tests import factories

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Generated cases per operation and mode: the whole run stays well under a minute on CI.
EXAMPLES = 10
# Webhook URLs the generated cases register: an address literal, so no name is ever looked up.
HOOK_URL = "https://127.0.0.1:9/hooks/images"


@dataclass
class Live:
    """The broker over real HTTP, an admin, and ids of real things its paths can name."""

    app: Flask
    url: str
    ids: dict[str, str]
    headers: dict[str, str]

    def token(self) -> dict[str, str]:
        """A fresh token of the admin, for the operation that revokes the one it is sent with."""
        return factories.issue_token(self.app, "root")


@pytest.fixture
def emulator(fresh_emulator: Any) -> Any:
    """An emulator of these tests' own: they sync variants and keys into its account."""
    return fresh_emulator


@pytest.fixture
def live(make_app: Any, make_user: Any) -> Iterator[Live]:
    app = make_app(WEBHOOK_ALLOW_PRIVATE=True, MAX_PENDING_UPLOADS=1000)
    runner = app.test_cli_runner()
    made = ["service-keys", "create", "contract", "--scope", "uploads:read"]
    for command in (["variants", "sync"], ["keys", "sync"], made):
        assert runner.invoke(args=command).exit_code == 0
    admin = make_user("root", is_admin=True)
    factories.issue_token(app, admin, name="listed")
    factories.add_webhook_endpoint(app, HOOK_URL)
    factories.queue_events(app, 1)
    from broker.auth import external
    from broker.auth.models import ApiToken, ServiceKey, User
    from broker.erasure import erase
    from broker.webhooks.models import WebhookDelivery, WebhookEndpoint

    gone = make_user("gone")
    with app.app_context():
        # An account the example erasure names, and one already erased to show.
        external.create_account(db.session, "service-keys", "customer-1234")
        erased, _ = erase.request_erasure(db.session, db.session.get(User, gone.id))
        db.session.commit()
        ids = {
            "upload_id": factories.upload_image(app, admin.id, size=(64, 48)),
            "public_id": admin.public_id,
            "user": erased.public_id,
            "endpoint_id": db.session.scalars(sa.select(WebhookEndpoint.public_id)).one(),
            "delivery_id": str(db.session.scalars(sa.select(WebhookDelivery.id)).one()),
            "key_id": db.session.scalars(sa.select(ServiceKey.public_id)).one(),
            "token_id": db.session.scalars(
                sa.select(ApiToken.public_id).where(ApiToken.name == "listed")
            ).one(),
        }
    with factories.live_server(app) as url:
        app.config["PUBLIC_URL"] = url  # what an operator sets; the document names it
        yield Live(app, url, ids, factories.issue_token(app, admin))


def _document(live: Live) -> dict[str, Any]:
    response = requests.get(f"{live.url}/api/v1/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def test_the_document_is_valid_openapi_31_and_names_this_server(live: Live) -> None:
    document = _document(live)
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": live.url, "description": "This broker"}]


@pytest.mark.timeout(600)  # about 30 s on an idle CI machine; far longer on a loaded one
def test_generated_requests_get_documented_answers(live: Live) -> None:
    schema = schemathesis.openapi.from_url(f"{live.url}/api/v1/openapi.json")
    failures: dict[str, str] = {}
    answers: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        seen = answers[label] = Counter()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                _run(live, operation, mode, seen)
            except (Exception, BaseExceptionGroup) as exc:  # report every operation's failure
                failures[f"{label} ({mode.value})"] = str(exc)
    print(f"\nschemathesis: {sum(sum(c.values()) for c in answers.values())} cases")
    for label, seen in sorted(answers.items()):
        print(f"  {label}: {dict(sorted(seen.items()))}")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert len(answers) >= 22
    # The cases got past authentication and reached the views: the check could have failed.
    assert all(set(seen) - {401} for seen in answers.values()), answers
    assert all(any(s < 300 for s in seen) for seen in answers.values()), answers


def _run(live: Live, operation: Any, mode: Any, seen: Counter[int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        # Every other case names things that exist, so the views go past their 404s.
        if case.path_parameters and sum(seen.values()) % 2:
            case.path_parameters = {k: live.ids.get(k, v) for k, v in case.path_parameters.items()}
        if isinstance(case.body, dict) and isinstance(case.body.get("url"), str):
            case.body["url"] = HOOK_URL
        # and every other erasure names the account already erased (asking again is safe), so
        # a success is seen however the generated bodies fall.
        if (
            case.path == "/api/v1/erasures"
            and isinstance(case.body, dict)
            and sum(seen.values()) % 2
        ):
            case.body = {"user": live.ids["user"]}
        logs_in = case.path == "/api/v1/auth/tokens" and isinstance(case.body, dict)
        if logs_in and sum(seen.values()) % 2:  # and every other login is the admin's own
            case.body.update(username="root", password=factories.PASSWORD)
        revokes = case.path == "/api/v1/auth/tokens/current"
        headers = live.token() if revokes else live.headers
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        seen[response.status_code] += 1

    run()


# --- A client generated from the document -----------------------------------------------------

GENERATOR = Path(sys.executable).parent / "openapi-python-client"


@pytest.fixture
def generated_client(live: Live, tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "openapi.json").write_text(json.dumps(_document(live)))
    (tmp_path / "config.json").write_text(
        json.dumps({"package_name_override": "broker_client", "post_hooks": []})
    )
    done = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            *("--path", "openapi.json", "--config", "config.json"),
            *("--meta", "none", "--output-path", "broker_client"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("broker_client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "broker_client"]:
            del sys.modules[name]


def test_a_generated_client_creates_sends_completes_and_mints(
    live: Live, generated_client: Any, make_user: Any
) -> None:
    make_user("ana")
    api = generated_client
    auth = importlib.import_module("broker_client.api.auth.create_token")
    create = importlib.import_module("broker_client.api.uploads.create_upload")
    complete = importlib.import_module("broker_client.api.uploads.complete_upload")
    mint = importlib.import_module("broker_client.api.images.image_url")
    models = importlib.import_module("broker_client.models")

    anonymous = api.Client(base_url=live.url)
    login = models.CreateToken(
        username="ana", password=factories.PASSWORD, device_name="Ana's phone"
    )
    token = auth.sync(client=anonymous, body=login).token
    client = api.AuthenticatedClient(base_url=live.url, token=token)

    # `profile` is an enum of the app's upload profiles in the document: the client sends it.
    body = models.CreateUpload(
        metadata=models.CreateUploadMetadataType0.from_dict({"a": "1"}),
        profile=models.CreateUploadProfileType0("default"),
    )
    assert body.to_dict()["profile"] == "default"
    first = create.sync_detailed(client=client, body=body, idempotency_key="ana-photo-1")
    assert first.status_code == 201 and first.headers["Location"].endswith(first.parsed.id)
    assert first.parsed.profile == "default"
    # The retry after a lost answer: the same upload, no second one.
    again = create.sync_detailed(client=client, body=body, idempotency_key="ana-photo-1")
    assert again.parsed.id == first.parsed.id
    assert again.headers["Idempotent-Replayed"] == "true"

    upload = first.parsed
    factories.send_file({"upload_url": upload.upload_url})
    answer = complete.sync_detailed(upload.id, client=client)
    if answer.status_code == 202:  # being verified: the worker's next round settles it
        assert int(answer.headers["Retry-After"]) >= 1
        worker.run_once(live.app, now=factories.later())
        answer = complete.sync_detailed(upload.id, client=client)
    assert answer.status_code == 200 and answer.parsed.status == "ready"

    variant = models.ImageUrlVariant("thumb")
    signed = mint.sync(upload.id, client=client, variant=variant, ttl=600)
    assert signed.url.startswith(live.app.config["CLOUDFLARE_DELIVERY_BASE"])
    assert requests.get(signed.url, timeout=10).status_code == 200  # the image, served
