"""Bearer JWTs from the app's OpenID Connect issuer: an RSA key pair made here, the issuer's
discovery document and JWKS served over loopback, the broker checking every claim."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
import time_machine
from flask import Flask

from broker import create_app
from broker.auth import oidc
from broker.auth.models import User
from broker.platform.config import ConfigError
from broker.platform.db import db
from tests.conftest import base_config
from tests.support.oidc_issuer import AUDIENCE


def _me(app: Flask, token: str) -> tuple[int, dict]:
    response = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    return response.status_code, response.get_json()


def _accounts(app: Flask) -> list[User]:
    with app.app_context():
        return list(db.session.scalars(sa.select(User).order_by(User.id)))


def test_a_valid_token_acts_as_its_subjects_account(broker, idp, emulator) -> None:
    client = broker.test_client()
    auth = {"Authorization": f"Bearer {idp.token(sub='alice-42')}"}
    created = client.post("/api/v1/uploads", json={}, headers=auth)
    assert created.status_code == 201, created.get_json()
    (alice,) = _accounts(broker)
    assert (alice.external_issuer, alice.external_subject) == (idp.url, "alice-42")
    assert created.get_json()["owner"] == alice.public_id
    draft = emulator.emulator.store.get_image(created.get_json()["image_id"])
    assert draft.creator == alice.public_id  # stamped as Cloudflare's creator

    # A fresh token for the same subject is the same account; another subject is another.
    assert _me(broker, idp.token(sub="alice-42"))[1]["public_id"] == alice.public_id
    status, bob = _me(broker, idp.token(sub="bob-7"))
    assert status == 200 and bob["public_id"] is None  # a read creates no account
    assert len(_accounts(broker)) == 1
    bob_sees = client.get(
        f"/api/v1/uploads/{created.get_json()['id']}",
        headers={"Authorization": f"Bearer {idp.token(sub='bob-7')}"},
    )
    assert bob_sees.status_code == 404
    # No password: the account cannot log in to the broker's pages.
    from broker.auth import users

    with broker.app_context():
        assert users.authenticate(db.session, alice.username, "") is None
    assert idp.jwks_fetches == 1  # the key set is cached


@pytest.mark.parametrize(
    ("case", "claims", "code"),
    [
        ("expired", {"exp": -120}, "token_expired"),
        ("not yet valid", {"nbf": 120}, "token_invalid"),
        ("wrong audience", {"aud": "another-app"}, "token_wrong_audience"),
        ("wrong issuer", {"iss": "https://evil.example"}, "token_wrong_issuer"),
        ("no expiry", {"exp": None}, "token_invalid"),
        ("no subject", {"sub": None}, "token_invalid"),
    ],
)
def test_bad_claims_are_401(broker, idp, case, claims, code) -> None:
    now = int(time.time())
    claims = {
        k: (now + v if k in ("exp", "nbf") and v is not None else v) for k, v in claims.items()
    }
    status, body = _me(broker, idp.token(**claims))
    assert status == 401, case
    assert body["error"]["code"] == code  # RFC 6750 invalid_token, with its own reason
    assert _accounts(broker) == []


def test_small_clock_skew_is_tolerated(broker, idp) -> None:
    now = int(time.time())
    assert _me(broker, idp.token(exp=now - 10))[0] == 200  # within the 30 s leeway
    assert _me(broker, idp.token(nbf=now + 10))[0] == 200


def test_alg_none_and_hs256_with_the_public_key_are_refused(broker, idp) -> None:
    assert _me(broker, idp.token())[0] == 200  # the key set is loaded and the key is known
    for alg in ("none", "HS256"):
        status, body = _me(broker, idp.forged(alg))
        assert (status, body["error"]["code"]) == (401, "token_invalid")
    # Even an app that allows more algorithms never accepts a symmetric one.
    with pytest.raises(ConfigError, match="asymmetric"):
        oidc.parse_algorithms("RS256,HS256")
    with pytest.raises(ConfigError, match="asymmetric"):
        oidc.parse_algorithms("none")


def test_an_unknown_kid_refreshes_the_key_set_then_the_rotated_key_works(broker, idp) -> None:
    start = time.time()
    assert _me(broker, idp.token("k1"))[0] == 200
    assert idp.jwks_fetches == 1
    idp.new_key("k2", publish=False)
    idp.new_key("k3", publish=False)

    with time_machine.travel(start + oidc.REFRESH_COOLDOWN + 1, tick=False):
        # Not published yet: the broker asks the issuer again, then refuses.
        assert _me(broker, idp.token("k2"))[0] == 401
        assert idp.jwks_fetches == 2
        # Asking again at once does not make the broker hammer the issuer.
        assert _me(broker, idp.token("k2"))[0] == 401
        assert _me(broker, idp.token("k3"))[0] == 401  # nor does a made-up kid
        assert _me(broker, idp.token("k3"))[1]["error"]["code"] == "token_invalid"
        assert idp.jwks_fetches == 2

    idp.publish("k2")  # the issuer rotates the key in
    with time_machine.travel(start + 2 * oidc.REFRESH_COOLDOWN + 2, tick=False):
        assert _me(broker, idp.token("k2"))[0] == 200
        assert idp.jwks_fetches == 3
        assert _me(broker, idp.token("k1"))[0] == 200  # the old key still verifies
        assert idp.jwks_fetches == 3


def test_a_key_published_before_first_use_is_fetched_at_once(broker, idp) -> None:
    assert _me(broker, idp.token("k1"))[0] == 200
    idp.new_key("k2")  # the issuer rotated; the broker's cached set predates it
    with time_machine.travel(time.time() + oidc.REFRESH_COOLDOWN + 1, tick=False):
        assert _me(broker, idp.token("k2"))[0] == 200
    assert idp.jwks_fetches == 2


def test_an_unreachable_or_oversized_key_set_is_503_not_a_guess(broker, idp) -> None:
    idp.jwks_status = 500
    status, body = _me(broker, idp.token())
    assert status == 503 and body["error"]["code"] == "identity_provider_unavailable"
    idp.jwks_status = 200
    idp.jwks_padding = oidc.MAX_DOCUMENT_BYTES
    start = time.time()
    # Each failure waits longer before the next fetch (5 s, then 10 s).
    with time_machine.travel(start + oidc.MIN_FETCH_INTERVAL, tick=False):
        assert _me(broker, idp.token())[0] == 503
    idp.jwks_padding = 0
    with time_machine.travel(start + 3 * oidc.MIN_FETCH_INTERVAL + 1, tick=False):
        assert _me(broker, idp.token())[0] == 200
    assert idp.jwks_fetches == 3


def test_once_loaded_a_failing_issuer_does_not_stop_known_keys(broker, idp) -> None:
    assert _me(broker, idp.token())[0] == 200
    idp.jwks_status = 500
    with time_machine.travel(time.time() + oidc.JWKS_TTL + 1, tick=False):
        assert _me(broker, idp.token())[0] == 200


def test_other_bearer_kinds_still_work_beside_oidc(broker, idp, make_user, bearer) -> None:
    user = make_user("carol")
    status, body = _me(broker, bearer(broker, user)["Authorization"].split()[1])
    assert status == 200 and body["username"] == "carol"
    assert _me(broker, "not-a-jwt")[0] == 401


def test_without_an_issuer_jwts_are_not_accepted(make_app, idp) -> None:
    app = make_app()
    assert _me(app, idp.token())[0] == 401
    assert idp.jwks_fetches == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"OIDC_ISSUER": "https://id.example"}, "BROKER_OIDC_AUDIENCE"),
        (
            {"OIDC_ISSUER": "https://id.example", "OIDC_AUDIENCE": "a", "OIDC_ALGORITHMS": "HS256"},
            "asymmetric",
        ),
    ],
)
def test_an_incomplete_or_unsafe_setup_refuses_to_start(tmp_path, settings, message) -> None:
    config = base_config(f"sqlite:///{tmp_path}/x.sqlite3", str(tmp_path), **settings)
    with pytest.raises(ConfigError, match=message):
        create_app(config)


def test_time_for_leeway_is_configurable(make_app, idp) -> None:
    app = make_app(OIDC_ISSUER=idp.url, OIDC_AUDIENCE=AUDIENCE, OIDC_LEEWAY=0)
    now = int(time.time())
    assert _me(app, idp.token(exp=now - 5))[0] == 401


def test_time_claims_given_as_strings_are_401(broker, idp) -> None:
    """RFC 7519's NumericDate is a number: an `exp` (or `nbf`, `iat`) string is refused, though
    PyJWT would read it as a time."""
    later = int(time.time()) + 600
    assert _me(broker, idp.token(exp=later))[0] == 200
    assert _me(broker, idp.token(exp=str(later)))[0] == 401
    assert _me(broker, idp.token(iat=str(later - 600)))[0] == 401
    assert _me(broker, idp.token(exp=True))[0] == 401
