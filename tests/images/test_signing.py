"""Unit tests of the pure signing module: test vector, bucket rounding, exemptions, bounds."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from broker.images import signing
from broker.images.signing import Delivery, Signer, Variant

VECTOR_KEY = "YOUR_KEY_FROM_IMAGES_DASHBOARD"
VECTOR_HASH = "cheeW4oKsx5ljh8e8BoL2A"
VECTOR_ID = "bc27a117-9509-446b-8c69-c81bfeac0a01"
VECTOR_SIG = "f5dbc282189c443accb7b86a95a66b29d42ea4ced234cdbe3c2db71fd61a88a0"
MOBILE = Variant("mobile", 400, 400)


def test_signature_matches_the_documented_test_vector() -> None:
    to_sign = f"/{VECTOR_HASH}/{VECTOR_ID}/mobile?exp=1631289275"
    assert Signer("default", VECTOR_KEY).signature(to_sign) == VECTOR_SIG


def test_delivery_url_matches_the_test_vector_end_to_end() -> None:
    delivery = Delivery.from_settings("https://imagedelivery.net", VECTOR_HASH)
    url = signing.delivery_url(
        delivery,
        VECTOR_ID,
        MOBILE,
        require_signed=True,
        exp=1631289275,
        signer=Signer("default", VECTOR_KEY),
    )
    assert url == (
        f"https://imagedelivery.net/{VECTOR_HASH}/{VECTOR_ID}/mobile?exp=1631289275&sig={VECTOR_SIG}"
    )


def test_signer_reuse_gives_independent_signatures() -> None:
    signer = Signer("k", "secret")
    first = signer.signature("/a?exp=1")
    signer.signature("/b?exp=2")
    assert signer.signature("/a?exp=1") == first
    assert first == hmac.new(b"secret", b"/a?exp=1", hashlib.sha256).hexdigest()
    assert "secret" not in repr(signer)


def test_public_image_and_exempt_variant_are_not_signed() -> None:
    delivery = Delivery("https://imagedelivery.net", "/h")
    exempt = Variant("thumb", 256, 256, "cover", never_signed=True)
    for require_signed, variant in ((False, MOBILE), (True, exempt), (False, exempt)):
        url = signing.delivery_url(
            delivery, "img", variant, require_signed=require_signed, exp=10, signer=None
        )
        assert url == f"https://imagedelivery.net/h/img/{variant.name}"


def test_private_image_without_a_key_is_refused() -> None:
    with pytest.raises(ValueError, match="no signing key"):
        signing.delivery_url(
            Delivery("https://x", "/h"), "img", MOBILE, require_signed=True, exp=1, signer=None
        )


@pytest.mark.parametrize(
    ("now", "ttl", "bucket", "expected"),
    [
        (1000, 3600, 300, 4800),  # 4600 rounds up to 4800
        (1199, 3600, 300, 4800),  # same bucket: same URL
        (1200, 3600, 300, 4800),  # exact boundary stays
        (1201, 3600, 300, 5100),
        (1000.5, 10, 1, 1011),  # no bucket: next whole second
        (1000, 10, 0, 1010),
    ],
)
def test_expiry_rounds_up_to_the_bucket(now: float, ttl: int, bucket: int, expected: int) -> None:
    assert signing.bucketed_expiry(now, ttl, bucket) == expected


def test_expiry_never_outlives_the_maximum() -> None:
    week = 604800
    now = 1_000_123
    exp = signing.bucketed_expiry(now, week, 300, max_ttl=week)
    assert exp <= now + week
    assert exp % 300 == 0
    assert exp > now + week - 300
    # A bucket longer than half the window falls back to the exact limit.
    assert signing.bucketed_expiry(1001, 60, 300, max_ttl=60) == 1061


def test_repeated_requests_in_a_bucket_share_one_url() -> None:
    delivery = Delivery("https://imagedelivery.net", "/h")
    signer = Signer("k", "v")
    urls = {
        signing.delivery_url(
            delivery,
            "img",
            MOBILE,
            require_signed=True,
            exp=signing.bucketed_expiry(now, 3600, 300),
            signer=signer,
        )
        for now in range(1201, 1500, 7)
    }
    assert len(urls) == 1


def test_check_ttl_bounds() -> None:
    assert signing.check_ttl(None, 3600, 604800) == 3600
    assert signing.check_ttl(None, 3600, 600) == 600
    assert signing.check_ttl(1, 3600, 604800) == 1
    assert signing.check_ttl(604800, 3600, 604800) == 604800
    for bad in (0, -5, 604801):
        with pytest.raises(ValueError, match="between 1 and 604800"):
            signing.check_ttl(bad, 3600, 604800)
    with pytest.raises(ValueError):
        signing.bucketed_expiry(0, 0, 300)


def test_parse_variants_default_and_extended_syntax() -> None:
    parsed = signing.parse_variants(
        "thumb:256x256:cover, medium:1024x1024:scale-down,"
        " avatar:64x64:crop:metadata=copyright:never-signed"
    )
    assert parsed == (
        Variant("thumb", 256, 256, "cover"),
        Variant("medium", 1024, 1024, "scale-down"),
        Variant("avatar", 64, 64, "crop", "copyright", True),
    )
    assert parsed[2].spec() == "avatar:64x64:crop:metadata=copyright:never-signed"
    assert signing.parse_variants(parsed[2].spec()) == (parsed[2],)
    assert parsed[0].options() == {"fit": "cover", "width": 256, "height": 256, "metadata": "none"}
    assert signing.parse_variants(["a:1x2"]) == (Variant("a", 1, 2),)
    assert signing.parse_variants("") == ()


@pytest.mark.parametrize(
    "spec",
    ["thumb", "th-umb:1x1", "t:0x5", "t:10:cover", "t:1x1:stretch", "t:1x1:cover:x", "a:1x1,a:2x2"],
)
def test_parse_variants_rejects_bad_entries(spec: str) -> None:
    with pytest.raises(ValueError, match="variant"):
        signing.parse_variants(spec)


def test_delivery_from_variant_url() -> None:
    url = "https://imagedelivery.net/HASH/abc-123/public"
    assert Delivery.from_variant_url(url, "abc-123") == Delivery(
        "https://imagedelivery.net", "/HASH"
    )
    emulator = Delivery.from_variant_url("http://127.0.0.1:8788/H/dir/a%20b/thumb", "dir/a b")
    assert emulator == Delivery("http://127.0.0.1:8788", "/H")
    assert emulator.path("dir/a b", "thumb") == "/H/dir/a%20b/thumb"
    assert Delivery.from_variant_url("https://x/H/other/public", "abc") is None
    assert Delivery.from_variant_url("not a url", "abc") is None


def test_delivery_from_settings_keeps_a_path_prefix() -> None:
    assert Delivery.from_settings("http://127.0.0.1:8788/", "H") == Delivery(
        "http://127.0.0.1:8788", "/H"
    )
    assert Delivery.from_settings("https://cdn.example/img", "H").path("i", "v") == "/img/H/i/v"
