"""The signing routine against the documented test vector, and its verification rules."""

from __future__ import annotations

from broker.emulator.signing import sign, signature, strip_sig, verify

VECTOR_KEY = "YOUR_KEY_FROM_IMAGES_DASHBOARD"
VECTOR_STRING = "/cheeW4oKsx5ljh8e8BoL2A/bc27a117-9509-446b-8c69-c81bfeac0a01/mobile?exp=1631289275"
VECTOR_SIG = "f5dbc282189c443accb7b86a95a66b29d42ea4ced234cdbe3c2db71fd61a88a0"
VECTOR_PATH = VECTOR_STRING.split("?")[0]


def test_signature_matches_the_documented_vector() -> None:
    assert signature(VECTOR_STRING, VECTOR_KEY) == VECTOR_SIG


def test_sign_builds_the_documented_url() -> None:
    assert sign(VECTOR_PATH, 1631289275, VECTOR_KEY) == f"{VECTOR_STRING}&sig={VECTOR_SIG}"


def test_verify_accepts_the_vector_before_expiry_with_any_key() -> None:
    query = f"exp=1631289275&sig={VECTOR_SIG}"
    assert verify([VECTOR_PATH], query, ["other", VECTOR_KEY], now=1631289000)


def test_verify_refuses_expired_tampered_and_unsigned() -> None:
    query = f"exp=1631289275&sig={VECTOR_SIG}"
    assert not verify([VECTOR_PATH], query, [VECTOR_KEY], now=1631289276)
    assert not verify([VECTOR_PATH.replace("mobile", "public")], query, [VECTOR_KEY], now=0)
    assert not verify([VECTOR_PATH], query.replace("1631289275", "1631289999"), [VECTOR_KEY], 0)
    assert not verify([VECTOR_PATH], "exp=1631289275", [VECTOR_KEY], now=0)
    assert not verify([VECTOR_PATH], f"sig={VECTOR_SIG}", [VECTOR_KEY], now=0)
    assert not verify([VECTOR_PATH], query, ["wrong-key"], now=0)


def test_strip_sig_keeps_the_other_parameters_in_order() -> None:
    assert strip_sig("a=1&sig=abc&exp=2") == ("a=1&exp=2", "abc")
    assert strip_sig("") == ("", None)
