"""The emulator started on every interface keeps its controls to this machine unless a token
guards them, and refuses to decode an image whose pixels would not fit its memory budget.

Both run the emulator as its own process (`python -m broker.emulator`), as a developer or
compose starts it: the controls are reached over the machine's own network address (not
loopback), and the memory is the process's peak resident size, read from /proc.
"""

from __future__ import annotations

import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pillow_heif
import pytest
import requests
from PIL import Image

from broker.emulator.errors import CfError
from broker.emulator.imaging import MAX_DECODE_BYTES, inspect_image
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 (what the test is about)


def _network_address() -> str | None:
    """This machine's address on its default route (no packet is sent), else None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: only the route is looked up
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@contextmanager
def _emulator_process(tmp_path: Path, *args: str, **env: str) -> Iterator[tuple[int, int]]:
    """Run `python -m broker.emulator --port 0 …`; yield (its pid, the port it listens on)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMULATOR_")}
    command = [sys.executable, "-m", "broker.emulator", "--port", "0", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        [*command, *args],
        cwd=ROOT,
        env={**environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if re.search(r"Running on http://[\d.]+:\d+", line):
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert found.wait(60), "".join(lines)
        port = int(re.findall(r"Running on http://[\d.]+:(\d+)", "".join(lines))[-1])
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(10)
        reader.join(10)
        assert process.stderr is not None
        process.stderr.close()


def test_controls_on_every_interface_answer_loopback_only_without_a_token(tmp_path) -> None:
    address = _network_address()
    require(address is not None, "needs a non-loopback network address")
    with (
        _emulator_process(tmp_path, "--host", EVERY_INTERFACE, "--control") as (_, port),
        requests.Session() as http,
    ):
        from_network = http.get(f"http://{address}:{port}/_emulator/counters", timeout=10)
        assert from_network.status_code == 404
        reset = http.post(f"http://{address}:{port}/_emulator/reset", json={}, timeout=10)
        assert reset.status_code == 404
        local = http.get(f"http://127.0.0.1:{port}/_emulator/counters", timeout=10)
        assert local.status_code == 200 and "counters" in local.json()


def test_a_control_token_lets_a_remote_client_in_with_it_only(tmp_path) -> None:
    address = _network_address()
    require(address is not None, "needs a non-loopback network address")
    secret = "control-" + os.urandom(8).hex()
    with (
        _emulator_process(
            tmp_path, "--host", EVERY_INTERFACE, "--control", EMULATOR_CONTROL_TOKEN=secret
        ) as (_, port),
        requests.Session() as http,
    ):
        for host in (address, "127.0.0.1"):  # the token is then required of everyone
            url = f"http://{host}:{port}/_emulator/counters"
            assert http.get(url, timeout=10).status_code == 401
            wrong = {"Authorization": "Bearer emulator-token"}
            assert http.get(url, headers=wrong, timeout=10).status_code == 401
            right = {"Authorization": f"Bearer {secret}"}
            assert http.get(url, headers=right, timeout=10).status_code == 200


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _rgba_png(width: int, height: int) -> bytes:
    """A transparent RGBA PNG compressed a row at a time (never held decoded in this process)."""
    squeeze = zlib.compressobj(9)
    row = b"\x00" * (1 + 4 * width)
    pixels = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_379_kb_png_of_10000_squared_rgba_pixels_stays_under_200_mb(tmp_path) -> None:
    bomb = _rgba_png(10_000, 10_000)
    assert len(bomb) < 500_000  # what an attacker sends: a few hundred KB
    with _emulator_process(tmp_path) as (pid, port), requests.Session() as http:
        base = f"http://127.0.0.1:{port}/client/v4/accounts/emulator-account/images"
        auth = {"Authorization": "Bearer emulator-token"}
        refused = http.post(
            f"{base}/v1", files={"file": ("big.png", bomb)}, headers=auth, timeout=60
        )
        assert refused.status_code == 400, refused.text
        (error,) = refused.json()["errors"]
        assert error["code"] == 5400 and "decoding budget" in error["message"]
        # Through a one-time upload URL too, the way browsers send it.
        draft = http.post(f"{base}/v2/direct_upload", files={"_": (None, "")}, headers=auth)
        sent = http.post(
            draft.json()["result"]["uploadURL"], files={"file": ("big.png", bomb)}, timeout=60
        )
        assert sent.status_code == 400 and sent.json()["errors"][0]["code"] == 5400
        peak = _peak_rss_mib(pid)
    assert peak < 200, f"the emulator peaked at {peak:.0f} MiB"


def _encoded(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif.from_pillow(img).save(out, quality=50)
    else:
        img.save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("WEBP", "RGB"), ("HEIF", "RGB")],
)
def test_every_format_is_refused_past_the_budget_before_decoding(fmt: str, mode: str) -> None:
    """1200 x 1000 pixels: 4.6 MiB decoded at 4 bytes a pixel, 1.1 MiB at one."""
    data = _encoded(Image.new(mode, (1200, 1000)), fmt)
    budget = 1024 * 1024
    with pytest.raises(CfError) as refused:
        inspect_image(data, budget=budget)
    assert refused.value.code == 5400 and "decoding budget of 1 MiB" in refused.value.message
    assert inspect_image(data, budget=MAX_DECODE_BYTES).width == 1200


def test_a_jpeg_past_the_budget_is_checked_at_a_reduced_scale() -> None:
    """JPEG decodes at 1/8 scale (still reading every byte) rather than being refused."""
    data = _encoded(Image.new("RGB", (1200, 1000), (200, 10, 10)), "JPEG")
    info = inspect_image(data, budget=1024 * 1024)
    assert (info.format, info.width, info.height) == ("JPEG", 1200, 1000)
    with pytest.raises(CfError):
        inspect_image(data[: len(data) // 2], budget=1024 * 1024)  # a truncated one still fails
