"""What the auth tests share: the app's identity provider over HTTP, and a broker trusting it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask import Flask

from tests.support.oidc_issuer import AUDIENCE, Issuer, serve_issuer


@pytest.fixture
def idp() -> Iterator[Issuer]:
    """The identity provider, with key k1 published."""
    with serve_issuer() as issuer:
        issuer.new_key("k1")
        yield issuer
        if issuer.hold is not None:
            issuer.hold.set()  # never leave a server thread waiting


@pytest.fixture
def broker(make_app: Callable[..., Flask], idp: Issuer) -> Flask:
    """The broker trusting `idp` for the audience shop-app."""
    return make_app(OIDC_ISSUER=idp.url, OIDC_AUDIENCE=AUDIENCE, OIDC_ALGORITHMS="RS256")
