"""EmulatorServer.stop() waits for a request still running before it closes the store."""

from __future__ import annotations

import threading
import time

import requests

from broker.emulator.testing import EmulatorServer


def test_stop_lets_a_running_request_finish(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    emulator = EmulatorServer(tmp_path).start()
    answers: list[int] = []
    emulator.inject_fault("direct_upload", latency_ms=300, count=1)
    url = f"{emulator.api_base}/accounts/{emulator.account_id}/images/v2/direct_upload"

    def upload() -> None:
        response = requests.post(
            url,
            files={"_": (None, "")},
            headers={"Authorization": f"Bearer {emulator.api_token}"},
            timeout=30,
        )
        answers.append(response.status_code)

    client = threading.Thread(target=upload)
    client.start()
    # The fault is used up once the request is inside the emulator (then it waits 300 ms).
    deadline = time.monotonic() + 30
    while emulator.emulator.controls.faults() and time.monotonic() < deadline:
        threading.Event().wait(0.005)
    assert not emulator.emulator.controls.faults(), "the request never arrived"
    emulator.stop()
    client.join(30)
    assert answers == [200]
    assert "closed database" not in caplog.text
