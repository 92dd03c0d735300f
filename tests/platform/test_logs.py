"""One log line per request, with its request id."""

from __future__ import annotations

import logging
import re


def test_request_id_is_generated_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="broker.request"):
        response = client.get("/livez")
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    line = caplog.records[-1].getMessage()
    assert re.fullmatch(rf"GET /livez 200 \d+\.\dms request_id={request_id}", line)


def test_request_id_honoured_when_plain_replaced_when_not(client):
    assert client.get("/livez", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == (
        "abc-123"
    )
    forged = client.get("/livez", headers={"X-Request-ID": "x 200 FAKE=1 " + "y" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-ID"])
