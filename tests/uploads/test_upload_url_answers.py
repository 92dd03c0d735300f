"""What `upload_url` answers a mobile app, as the README's table says, checked against the
emulator over real HTTP: each row's status and Cloudflare code is produced here."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import requests
import time_machine

from broker.emulator.testing import make_image
from tests.factories import create_upload, load_upload, send_file

README = Path(__file__).resolve().parents[2] / "README.md"


def _table() -> dict[int, set[int]]:
    """The README's `upload_url` table: each status with the Cloudflare codes it lists."""
    text = README.read_text()
    start = text.index("| status (code) | meaning | what to do |")
    rows: dict[int, set[int]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        status, *codes = (int(n) for n in re.findall(r"\d+", line.split("|")[1]))
        rows[status] = set(codes)
    return rows


def _post(url: str, **kwargs) -> tuple[int, int | None]:
    response = requests.post(url, timeout=30, **kwargs)
    if response.status_code == 200:
        assert response.json()["success"] is True
        return 200, None
    body = response.json()  # Cloudflare's envelope, not the broker's error shape
    assert body["success"] is False and body["result"] is None
    return response.status_code, body["errors"][0]["code"]


def test_every_answer_in_the_readme_table_is_what_upload_url_gives(app, alice) -> None:
    _, auth = alice
    client = app.test_client()
    up = create_upload(client, auth, expires_in=600)
    url = up["upload_url"]
    seen: dict[int, set[int]] = {}

    def saw(answer: tuple[int, int | None]) -> None:
        status, code = answer
        seen.setdefault(status, set()).update({code} if code else set())

    png = make_image(64, 48)
    saw(_post(url, files={"wrong": ("a.png", png)}))  # no `file` field
    saw(_post(url, files={"file": ("wide.png", make_image(12_001, 1))}))  # over 12,000 px
    saw(_post(url, data=b"x" * 100, headers={"Content-Type": "application/octet-stream"}))
    saw(_post(url, files={"file": ("a.txt", b"not an image")}))  # 415, 5455
    too_big = b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024)
    saw(_post(url, files={"file": ("big.png", too_big)}))
    # After all these refusals the same URL still takes a good file, once.
    saw(_post(url, files={"file": ("a.png", png)}))
    saw(_post(url, files={"file": ("a.png", png)}))  # 409: already used

    late = create_upload(client, auth, expires_in=120)
    expires_at = load_upload(app, late["id"]).expires_at
    with time_machine.travel(expires_at + timedelta(seconds=1), tick=False):
        saw(_post(late["upload_url"], files={"file": ("a.png", png)}))

    assert seen == {status: codes for status, codes in _table().items()}


def test_the_file_limits_the_readme_states_are_the_emulators() -> None:
    from broker.emulator import imaging

    text = README.read_text()
    assert imaging.MAX_BYTES == 10 * 1024 * 1024 and "at most 10 MB" in text
    assert imaging.MAX_SIDE == 12_000 and "12,000 px a side" in text
    assert imaging.MAX_PIXELS == 100_000_000 and "100 megapixels" in text


def test_a_send_that_failed_can_be_repeated_then_completed(app, alice) -> None:
    """The README's advice for a 413: the same URL, a smaller file, then /complete."""
    _, auth = alice
    client = app.test_client()
    up = create_upload(client, auth)
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024)
    assert _post(up["upload_url"], files={"file": ("big.png", big)}) == (413, 5413)
    send_file(up)
    answer = client.post(f"/api/v1/uploads/{up['id']}/complete", headers=auth)
    assert answer.status_code == 200  # verified at once: the budget has headroom here
    assert answer.get_json()["status"] == "ready"
    assert answer.get_json()["file_state"] == "received"
