"""Standard Webhooks signing: secrets, signatures the reference library verifies, the test
vector, tampering, rotation windows."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from broker.webhooks import endpoints, signing
from broker.webhooks.models import WebhookEndpoint


def test_secret_format():
    secret = signing.generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert signing.generate_secret() != secret


def test_signature_verifies_with_the_standardwebhooks_library():
    secret = signing.generate_secret()
    body = b'{"type":"upload.completed","data":{"upload":{"id":"up_1"}}}'
    ts = int(time.time())
    headers = {
        "webhook-id": "msg_abc",
        "webhook-timestamp": str(ts),
        "webhook-signature": signing.sign(secret, "msg_abc", ts, body),
    }
    assert Webhook(secret).verify(body, headers)["type"] == "upload.completed"
    assert signing.verify(secret, "msg_abc", ts, body, headers["webhook-signature"])


@pytest.mark.parametrize("part", ["body", "id", "timestamp", "signature"])
def test_one_byte_tampering_fails_verification(part):
    secret = signing.generate_secret()
    body = b'{"type":"upload.completed"}'
    ts = int(time.time())
    headers = {
        "webhook-id": "msg_abc",
        "webhook-timestamp": str(ts),
        "webhook-signature": signing.sign(secret, "msg_abc", ts, body),
    }
    if part == "body":
        body = body[:-2] + b"X}"
    elif part == "id":
        headers["webhook-id"] = "msg_abd"
    elif part == "timestamp":
        headers["webhook-timestamp"] = str(ts - 1)
    else:
        raw = bytearray(base64.b64decode(headers["webhook-signature"][3:]))
        raw[0] ^= 1
        headers["webhook-signature"] = "v1," + base64.b64encode(bytes(raw)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)


def test_known_vector():
    # The Standard Webhooks reference vector (libraries' own test suites).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    sig = signing.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_rotation_window_signs_with_both_secrets():
    endpoint = WebhookEndpoint(secret=signing.generate_secret(), events="*")
    old = endpoint.secret
    now = datetime(2030, 1, 1, tzinfo=UTC)
    new = endpoints.rotate_secret(endpoint, window=3600, now=now)
    assert signing.signing_secrets(endpoint, now) == [new, old]
    assert signing.signing_secrets(endpoint, now + timedelta(hours=2)) == [new]
    header = signing.signature_header([new, old], "msg_1", 1, b"{}")
    assert signing.verify(old, "msg_1", 1, b"{}", header, now=1)
    assert signing.verify(new, "msg_1", 1, b"{}", header, now=1)
