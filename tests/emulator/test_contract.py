"""The contract the broker relies on, checked through the broker's own client: against the
emulator in every run, and against a real Cloudflare account with `make test-live`.

`make test-live` sets BROKER_TEST_LIVE=1: the same tests then talk to
https://api.cloudflare.com with CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN from the
environment (and skip, saying so, when either is missing). Each test cleans up what it made.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.emulator.testing import make_image
from broker.platform.config import CLOUDFLARE_API_BASE
from broker.upstream.cloudflare import (
    CloudflareBadRequest,
    CloudflareImages,
    CloudflareNotFound,
)

ROOT = Path(__file__).resolve().parents[2]
LIVE = os.environ.get("BROKER_TEST_LIVE") == "1"
CREDENTIALS = ("CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN")


@pytest.fixture
def cloudflare(request: pytest.FixtureRequest) -> Iterator[CloudflareImages]:
    """The broker's client for the account under test: a real one in live mode, else the
    emulator's (the same code path either way)."""
    if LIVE:
        missing = [name for name in CREDENTIALS if not os.environ.get(name)]
        if missing:
            pytest.skip(f"live contract tests skipped: set {' and '.join(missing)}")
        client = CloudflareImages(
            CLOUDFLARE_API_BASE,
            os.environ["CLOUDFLARE_ACCOUNT_ID"],
            os.environ["CLOUDFLARE_API_TOKEN"],
            timeout=30,
        )
    else:
        emulator = request.getfixturevalue("emulator")
        client = CloudflareImages(
            f"{emulator.url}/client/v4", emulator.account_id, emulator.api_token
        )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def made(cloudflare: CloudflareImages) -> Iterator[list[str]]:
    """Ids of images a test made; deleted afterwards (gone already is fine)."""
    ids: list[str] = []
    yield ids
    for image_id in ids:
        with contextlib.suppress(CloudflareNotFound):  # the test deleted it itself
            cloudflare.delete_image(image_id)


def _creator() -> str:
    return "contract-" + secrets.token_hex(6)


def test_an_upload_keeps_creator_and_metadata_and_deletes_once(
    cloudflare: CloudflareImages, made: list[str]
) -> None:
    creator = _creator()
    image = cloudflare.upload_image(
        file=make_image(40, 30), filename="cat.png", creator=creator, metadata={"k": "v"}
    )
    made.append(image.id)
    fetched = cloudflare.get_image(image.id)
    assert (fetched.creator, fetched.meta, fetched.filename) == (creator, {"k": "v"}, "cat.png")
    assert not fetched.draft and fetched.variants
    cloudflare.delete_image(image.id)
    with pytest.raises(CloudflareNotFound):
        cloudflare.get_image(image.id)
    with pytest.raises(CloudflareNotFound):
        cloudflare.delete_image(image.id)


def test_a_direct_upload_is_a_draft_until_its_file_arrives(
    cloudflare: CloudflareImages, made: list[str]
) -> None:
    creator = _creator()
    expiry = datetime.now(UTC) + timedelta(minutes=10)
    draft = cloudflare.direct_upload(creator=creator, expiry=expiry, require_signed_urls=False)
    made.append(draft.id)
    assert cloudflare.get_image(draft.id).draft
    assert [i.id for i in cloudflare.iter_images_v2(creator=creator)] == []  # drafts unlisted
    sent = requests.post(
        draft.upload_url, files={"file": ("dog.png", make_image(20, 20))}, timeout=30
    )
    assert sent.status_code == 200, sent.text
    arrived = cloudflare.get_image(draft.id)
    assert not arrived.draft and arrived.creator == creator and arrived.filename == "dog.png"
    assert [i.id for i in cloudflare.iter_images_v2(creator=creator)] == [draft.id]


def test_the_v2_listing_pages_with_continuation_tokens_and_filters_by_creator(
    cloudflare: CloudflareImages, made: list[str]
) -> None:
    creator = _creator()
    for _ in range(12):
        made.append(cloudflare.upload_image(file=make_image(8, 8), creator=creator).id)
    first = cloudflare.list_images_v2(creator=creator, per_page=10)
    assert len(first.images) == 10 and first.continuation_token
    rest = cloudflare.list_images_v2(
        creator=creator, per_page=10, continuation_token=first.continuation_token
    )
    assert rest.continuation_token is None
    seen = [i.id for i in first.images + rest.images]
    assert sorted(seen) == sorted(made) and len(set(seen)) == 12
    assert {i.creator for i in first.images + rest.images} == {creator}


def test_stats_count_the_images_and_name_the_allowance(cloudflare: CloudflareImages) -> None:
    stats = cloudflare.stats()
    assert stats.allowed > 0 and 0 <= stats.current <= stats.allowed


def test_bad_requests_are_refused_as_such(cloudflare: CloudflareImages) -> None:
    too_soon = datetime.now(UTC) + timedelta(seconds=10)  # below the 2-minute minimum
    with pytest.raises(CloudflareBadRequest):
        cloudflare.direct_upload(creator=None, expiry=too_soon)
    with pytest.raises(CloudflareNotFound):
        cloudflare.get_image("contract-" + secrets.token_hex(8))


@pytest.mark.skipif(LIVE, reason="this test runs `make test-live` itself")
def test_make_test_live_says_it_skipped_without_credentials(tmp_path: Any) -> None:
    """Without an account in the environment, `make test-live` skips every test and says why."""
    # As a reader runs it from a shell: not with what an outer `make test PYTEST_ARGS=…` exports
    # to its recipes (its command-line variables too: the inner run would take its test paths).
    outer_make = {"MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL", "PYTEST_ARGS"}
    env = {k: v for k, v in os.environ.items() if k not in {*CREDENTIALS, *outer_make}}
    done = subprocess.run(
        ["make", "-s", "test-live"],
        cwd=ROOT,
        env={**env, "PYTEST_ADDOPTS": f"-p no:cacheprovider --basetemp={tmp_path}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "live contract tests skipped: set CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN" in (
        done.stdout
    )
    # Every test skipped, none run (this one skips itself in live mode).
    assert done.stdout.rstrip().splitlines()[-1].strip("= ").startswith("6 skipped in")
