"""An identity provider that is down, hangs or trickles cannot stall the broker: a real issuer
over loopback HTTP answering 500, holding its answer until released, or sending its key set a
byte at a time; time is injected (a clock the test moves), waits are bounded by events."""

from __future__ import annotations

import threading

import pytest
from flask import Flask

from broker.auth import oidc
from tests.support.oidc_issuer import AUDIENCE, Issuer


class Clock:
    """A clock the test moves; each reading lets a trickling issuer send one more byte."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.reads = threading.Semaphore(0)

    def __call__(self) -> float:
        self.reads.release()
        return self.now


@pytest.fixture
def clock() -> Clock:
    """The verifier's clock."""
    return Clock()


@pytest.fixture
def broker(broker: Flask, idp: Issuer, clock: Clock) -> Flask:
    """The broker trusting `idp`, its verifier on the test's clock."""
    app = broker
    app.extensions["oidc"] = oidc.Verifier(idp.url, AUDIENCE, frozenset({"RS256"}), clock=clock)
    return app


def _me(app: Flask, token: str) -> tuple[int, dict, dict]:
    answer = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    return answer.status_code, answer.get_json(), dict(answer.headers)


def test_a_failing_issuer_is_asked_at_most_once_per_interval_with_backoff(broker, idp, clock):
    idp.jwks_status = 500
    token = idp.token()
    answers = [_me(broker, token) for _ in range(50)]
    assert {status for status, _, _ in answers} == {503}
    assert {body["error"]["code"] for _, body, _ in answers} == {"identity_provider_unavailable"}
    assert idp.jwks_fetches == 1  # not 50
    # Retry-After says when the issuer is asked again: after the first failure, 5 s.
    assert answers[0][2]["Retry-After"] == "5"
    assert 1 <= int(answers[-1][2]["Retry-After"]) <= 5

    clock.now += oidc.MIN_FETCH_INTERVAL - 0.5
    assert _me(broker, token)[0] == 503 and idp.jwks_fetches == 1
    clock.now += 0.5
    assert _me(broker, token)[0] == 503 and idp.jwks_fetches == 2
    # The second failure in a row doubles the wait (10 s), and so on up to MAX_BACKOFF.
    clock.now += oidc.MIN_FETCH_INTERVAL
    assert [_me(broker, token)[0] for _ in range(10)] == [503] * 10
    assert idp.jwks_fetches == 2
    idp.jwks_status = 200  # the issuer is back
    clock.now += oidc.MIN_FETCH_INTERVAL
    assert _me(broker, token)[0] == 200
    assert idp.jwks_fetches == 3


def test_requests_never_queue_behind_a_hanging_issuer(broker, idp, clock):
    token = idp.token()
    idp.hold = threading.Event()
    first: list[int] = []
    fetching = threading.Thread(target=lambda: first.append(_me(broker, token)[0]))
    fetching.start()
    try:
        assert idp.entered.wait(10)  # one request is fetching, and the issuer holds it
        client = broker.test_client()
        # Probes look at no token and answer at once.
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200
        # No key was ever fetched (a cold start): another token request waits for that fetch
        # (at most its deadline) rather than start a second one or fail the first burst.
        while clock.reads.acquire(blocking=False):
            pass  # forget the fetching request's readings of the clock
        waiting = threading.Thread(target=lambda: first.append(_me(broker, token)[0]))
        waiting.start()
        # Its verifier read the clock: it found the fetch in flight (the issuer still holds
        # it), so it is waiting for it now.
        assert clock.reads.acquire(timeout=10)
    finally:
        idp.hold.set()
        fetching.join(10)
    waiting.join(10)
    assert first == [200, 200]  # both got their answer when the issuer sent its keys
    assert idp.jwks_fetches == 1

    # Keys cached, now stale: one request refreshes while the issuer hangs again, and every
    # other request verifies with the last good keys meanwhile.
    idp.hold.clear()
    idp.entered.clear()
    clock.now += oidc.JWKS_TTL + 1
    refreshing = threading.Thread(target=lambda: first.append(_me(broker, token)[0]))
    refreshing.start()
    try:
        assert idp.entered.wait(10)
        assert [_me(broker, token)[0] for _ in range(5)] == [200] * 5
        assert idp.jwks_fetches == 2
    finally:
        idp.hold.set()
        refreshing.join(10)
    assert first == [200, 200, 200]


def test_a_trickling_issuer_is_cut_off_at_the_fetch_deadline(idp, clock):
    """A byte every 2 s passes any per-read timeout; the fetch as a whole still ends at 5 s."""
    verifier = oidc.Verifier(
        idp.url, AUDIENCE, frozenset({"RS256"}), jwks_url=f"{idp.url}/jwks.json", clock=clock
    )
    start = clock.now

    def a_byte_every_two_seconds() -> bool:
        # One byte per reading of the verifier's clock (bounded: never a stuck server thread).
        if not clock.reads.acquire(timeout=10):
            return False
        clock.now += 2.0
        return True

    idp.trickle = a_byte_every_two_seconds
    try:
        with pytest.raises(oidc.IssuerUnavailable, match="within 5 s"):
            verifier.verify(idp.token())
        sent, elapsed = idp.trickled, clock.now - start
    finally:
        idp.trickle = None
        clock.reads.release(10)  # let the server thread see the trickle is over
    assert idp.jwks_fetches == 1
    # Cut off after the deadline's worth of bytes (give or take the one in flight), not after
    # the whole key set (~500 bytes, 1000 s at this pace).
    assert 1 <= sent <= 6
    assert oidc.FETCH_DEADLINE <= elapsed <= 2 * 6  # seconds on the verifier's clock, not 1000
    # Backing off: the next token does not start another fetch within the interval.
    with pytest.raises(oidc.IssuerUnavailable):
        verifier.verify(idp.token())
    assert idp.jwks_fetches == 1
