"""Every configuration problem is reported in one start, not one per restart."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from broker.platform.config import ConfigError, finalize
from tests.factories import production_settings
from tests.support.guide import run

FLASK = str(Path(sys.executable).parent / "flask")


def test_finalize_lists_every_problem(tmp_path: Path) -> None:
    """Four things wrong: four lines, under their count."""
    config = production_settings(
        SECRET_KEY="short",
        CLOUDFLARE_API_TOKEN=None,
        CLOUDFLARE_API_BASE="http://emulator:8788/client/v4",
        ENCRYPTION_KEYS=None,
        LOG_FORMAT="xml",
    )
    with pytest.raises(ConfigError) as caught:
        finalize(config, str(tmp_path))
    message = caught.value.message
    assert message.startswith("5 settings to fix:\n")
    for part in (
        "BROKER_LOG_FORMAT must be text or json, not 'xml'",
        "BROKER_SECRET_KEY is too short",
        "Cloudflare settings missing: BROKER_CLOUDFLARE_API_TOKEN",
        # The batch host derived from that base is named with it.
        "BROKER_CLOUDFLARE_API_BASE, BROKER_CLOUDFLARE_BATCH_BASE must be https://",
        "BROKER_ENCRYPTION_KEYS is missing",
    ):
        assert f"  - {part}" in message


@pytest.mark.parametrize("share", ["nan", "inf", "-0.5", "1.5"])
def test_a_share_of_the_budget_outside_0_to_1_is_refused(tmp_path: Path, share: str) -> None:
    """Not a stack trace from the budget's arithmetic at start: one line naming the setting."""
    with pytest.raises(ConfigError) as caught:
        finalize(production_settings(COMPLETE_INLINE_BUDGET=share), str(tmp_path))
    assert "BROKER_COMPLETE_INLINE_BUDGET must be from 0 to 1" in caught.value.message


def test_quota_limits_past_what_a_create_counts_within_are_refused(tmp_path: Path) -> None:
    """Not a 500 at every create once the count's integer overflows: one line each."""
    with pytest.raises(ConfigError) as caught:
        finalize(
            production_settings(MAX_UPLOADS_PER_DAY=3_000_000_000, MAX_PENDING_UPLOADS="-1"),
            str(tmp_path),
        )
    assert "BROKER_MAX_UPLOADS_PER_DAY must be at most 2,147,483,647" in caught.value.message
    assert "BROKER_MAX_PENDING_UPLOADS must be at least 0" in caught.value.message
    finalize(
        production_settings(MAX_UPLOADS_PER_DAY=2**31 - 1, MAX_PENDING_UPLOADS=0),
        str(tmp_path),
    )


def test_a_flask_command_prints_them_all_and_exits_1(tmp_path: Path) -> None:
    """`flask --app broker …` in production with nothing set says everything missing at once."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("BROKER_", "FLASK_"))
    }
    env.update(BROKER_ENV="production", BROKER_INSTANCE_PATH=str(tmp_path))
    done = run([FLASK, "--app", "broker", "db", "current"], env)
    assert done.returncode == 1, done.stderr
    assert "Error: 3 settings to fix:" in done.stderr
    assert "BROKER_SECRET_KEY is the insecure default" in done.stderr
    assert "Cloudflare settings missing: BROKER_CLOUDFLARE_ACCOUNT_ID" in done.stderr
    assert "BROKER_ENCRYPTION_KEYS is missing" in done.stderr
    assert "Traceback" not in done.stderr
