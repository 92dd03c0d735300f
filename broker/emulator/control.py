"""Test and benchmark controls: request counters (with how many run at once), fault injection,
the rate-limit model, the clock.

All of it lives on one `Controls` object per app and is reachable over HTTP under `/_emulator/`
only when `CONTROL_ENABLED` is set, and then only from this machine's loopback — unless
`CONTROL_TOKEN` is set, when any client sending it as `Authorization: Bearer <token>` may use
them (an emulator in a container, driven from the host). Whoever reaches the controls can reset
the account, move its clock and inject faults, so a listener on every interface (`--host
0.0.0.0`) must not hand them to its network by default.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import random
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, abort, current_app, jsonify, request

from broker.emulator.errors import CfError

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Return the real time as an aware UTC datetime."""
    return datetime.now(UTC)


@dataclass
class Fault:
    """One injected misbehaviour for one endpoint (or `*` for every endpoint)."""

    endpoint: str = "*"
    status: int | None = None
    latency_ms: int = 0
    error_rate: float = 1.0
    drop: bool = False
    count: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def as_dict(self) -> dict[str, Any]:
        """Return the fault as JSON-ready data."""
        return asdict(self)


class RateLimiter:
    """A per-token sliding window; going over blocks every call of that token for one window."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._calls: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget every call and block."""
        with self._lock:
            self._calls.clear()
            self._blocked_until.clear()

    def hit(self, token: str, now: float) -> int | None:
        """Record a call at `now` (seconds); return Retry-After seconds when it is refused."""
        with self._lock:
            until = self._blocked_until.get(token)
            if until is not None:
                if now < until:
                    return max(1, math.ceil(until - now))
                del self._blocked_until[token]
                self._calls.pop(token, None)
            calls = self._calls.setdefault(token, deque())
            while calls and calls[0] <= now - self.window:
                calls.popleft()
            if len(calls) >= self.limit:
                self._blocked_until[token] = now + self.window
                return max(1, math.ceil(self.window))
            calls.append(now)
            return None


class Controls:
    """Counters, faults, rate limiter and clock offset of one emulator app."""

    def __init__(self, clock: Clock, rate_limit: int, rate_window: float) -> None:
        self._clock = clock
        self._offset = timedelta()
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._peaks: Counter[str] = Counter()
        self._period = 0  # bumped by every reset of the counters
        self._kinds: Counter[str] = Counter()
        self._faults: list[Fault] = []
        self.limiter = RateLimiter(rate_limit, rate_window)
        self._random = random.Random()

    # Clock.

    def now(self) -> datetime:
        """Return the emulator's current time (the configured clock plus the offset)."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward (or back, when negative)."""
        with self._lock:
            self._offset += timedelta(seconds=seconds)

    def set_offset(self, seconds: float) -> None:
        """Set the clock offset from the configured clock."""
        with self._lock:
            self._offset = timedelta(seconds=seconds)

    @property
    def offset_seconds(self) -> float:
        """Return the clock offset in seconds."""
        return self._offset.total_seconds()

    # Counters.

    def count(self, endpoint: str, kind: str = "other") -> None:
        """Count one request to `endpoint`; `kind` is `global_api`, `batch` or `other`."""
        with self._lock:
            self._counters[endpoint] += 1
            self._kinds[kind] += 1

    def count_throttled(self) -> None:
        """Count one 429 answer of the API or the batch host (its request is counted too)."""
        with self._lock:
            self._kinds["throttled"] += 1

    def counters(self) -> dict[str, int]:
        """Return a snapshot of the per-endpoint counters."""
        with self._lock:
            return dict(self._counters)

    def enter(self, endpoint: str) -> int:
        """Note that a request to `endpoint` is being handled (until `leave`); return the
        counting period it belongs to, for `leave`."""
        with self._lock:
            self._in_flight[endpoint] += 1
            self._peaks[endpoint] = max(self._peaks[endpoint], self._in_flight[endpoint])
            return self._period

    def leave(self, endpoint: str, period: int) -> None:
        """Note that a request to `endpoint` is done (one that came before the last reset of the
        counters was already forgotten by it)."""
        with self._lock:
            if period == self._period:
                self._in_flight[endpoint] -= 1

    def peak_in_flight(self) -> dict[str, int]:
        """Return, per endpoint, the most requests handled at once since the last reset."""
        with self._lock:
            return dict(self._peaks)

    def kinds(self) -> dict[str, int]:
        """Return how many requests went to the global API, the batch host and the rest, and how
        many of them were answered 429."""
        with self._lock:
            kinds = ("global_api", "batch", "other", "throttled")
            return {kind: self._kinds[kind] for kind in kinds}

    def reset_counters(self) -> None:
        """Zero every counter and peak. Requests still running then are not counted in the new
        period: a test's peak counts only the requests it made, whatever an earlier test
        abandoned (a transfer the browser aborted runs on here until its handler ends)."""
        with self._lock:
            self._counters.clear()
            self._in_flight.clear()
            self._peaks.clear()
            self._kinds.clear()
            self._period += 1

    # Faults.

    def add_fault(self, fault: Fault) -> Fault:
        """Add a fault; later requests to its endpoint may be affected."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def faults(self) -> list[Fault]:
        """Return the active faults."""
        with self._lock:
            return list(self._faults)

    def remove_fault(self, fault_id: str) -> bool:
        """Remove one fault by id."""
        with self._lock:
            before = len(self._faults)
            self._faults = [f for f in self._faults if f.id != fault_id]
            return len(self._faults) != before

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def pick_faults(self, endpoint: str) -> list[Fault]:
        """Return the faults that fire for this request, using up their counts."""
        fired: list[Fault] = []
        with self._lock:
            for fault in list(self._faults):
                if fault.endpoint not in ("*", endpoint):
                    continue
                if self._random.random() >= fault.error_rate:
                    continue
                fired.append(fault)
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                if fault.status is not None or fault.drop:
                    break
        return fired

    def reset(self) -> None:
        """Clear counters, faults, rate-limit state and the clock offset (not the data)."""
        self.reset_counters()
        self.clear_faults()
        self.limiter.reset()
        self.set_offset(0)


def parse_fault(data: Any) -> Fault:
    """Validate a fault description from JSON."""
    if not isinstance(data, dict):
        raise CfError(5400, "Fault must be a JSON object")
    unknown = set(data) - {"endpoint", "status", "latency_ms", "error_rate", "drop", "count"}
    if unknown:
        raise CfError(5400, f"Unknown fault fields: {sorted(unknown)}")
    try:
        status = data.get("status")
        count = data.get("count")
        fault = Fault(
            endpoint=str(data.get("endpoint") or "*"),
            status=None if status is None else int(status),
            latency_ms=int(data.get("latency_ms") or 0),
            error_rate=float(1.0 if data.get("error_rate") is None else data["error_rate"]),
            drop=bool(data.get("drop", False)),
            count=None if count is None else int(count),
        )
    except (TypeError, ValueError) as exc:
        raise CfError(5400, f"Invalid fault: {exc}") from exc
    if fault.status is not None and not 100 <= fault.status <= 599:
        raise CfError(5400, "status must be an HTTP status code")
    if not 0.0 <= fault.error_rate <= 1.0 or fault.latency_ms < 0:
        raise CfError(5400, "error_rate must lie in 0..1 and latency_ms be >= 0")
    if fault.count is not None and fault.count < 1:
        raise CfError(5400, "count must be >= 1 or null")
    return fault


bp = Blueprint("emulator_control", __name__, url_prefix="/_emulator")


def _controls() -> Controls:
    # Imported here: core imports this module for Controls.
    from broker.emulator.core import current_emulator

    return current_emulator().controls


def _from_loopback() -> bool:
    """Tell whether the client is on this machine (127.0.0.0/8 or ::1)."""
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False  # a unix socket or a name: not known to be local


def _token_sent(expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    sent = header[7:].strip() if header[:7].lower() == "bearer " else ""
    return hmac.compare_digest(sent.encode(), expected.encode())


@bp.before_request
def _only_when_enabled() -> None:
    if not current_app.config.get("CONTROL_ENABLED"):
        abort(404)
    token = current_app.config.get("CONTROL_TOKEN")
    if token:
        if not _token_sent(str(token)):
            raise CfError(10000, "Authentication error: send the control token", 401)
    elif not _from_loopback():
        abort(404)  # as if off: nothing tells a scanner the controls exist
    # A web page can send a form, text or empty POST cross-site without asking (a CORS-simple
    # request); a JSON content type needs a preflight these routes never grant.
    if request.method != "GET" and not request.is_json:
        raise CfError(5415, "Control requests need Content-Type: application/json", 415)


@bp.get("/counters")
def counters() -> Any:
    """Return the per-endpoint request counters."""
    controls = _controls()
    snapshot = controls.counters()
    return jsonify(
        counters=snapshot,
        total=sum(snapshot.values()),
        peak_in_flight=controls.peak_in_flight(),
        **controls.kinds(),
    )


@bp.post("/counters/reset")
def reset_counters() -> Any:
    """Zero the request counters."""
    controls = _controls()
    controls.reset_counters()
    return jsonify(
        counters={}, total=0, peak_in_flight=controls.peak_in_flight(), **controls.kinds()
    )


@bp.get("/faults")
def list_faults() -> Any:
    """List the active faults."""
    return jsonify(faults=[f.as_dict() for f in _controls().faults()])


@bp.post("/faults")
def add_fault() -> Any:
    """Add a fault from a JSON description."""
    fault = _controls().add_fault(parse_fault(request.get_json(silent=True)))
    return jsonify(fault=fault.as_dict()), 201


@bp.delete("/faults")
def clear_faults() -> Any:
    """Remove every fault."""
    _controls().clear_faults()
    return jsonify(faults=[])


@bp.delete("/faults/<fault_id>")
def delete_fault(fault_id: str) -> Any:
    """Remove one fault."""
    if not _controls().remove_fault(fault_id):
        abort(404)
    return jsonify(faults=[f.as_dict() for f in _controls().faults()])


def _clock_body() -> dict[str, Any]:
    controls = _controls()
    return {"now": controls.now().isoformat(), "offset_seconds": controls.offset_seconds}


@bp.get("/clock")
def get_clock() -> Any:
    """Return the emulator's time and clock offset."""
    return jsonify(_clock_body())


@bp.post("/clock")
def set_clock() -> Any:
    """Advance the clock (`advance_seconds`) or set its offset (`offset_seconds`)."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise CfError(5400, "Body must be a JSON object")
    try:
        if "offset_seconds" in data:
            _controls().set_offset(float(data["offset_seconds"]))
        if "advance_seconds" in data:
            _controls().advance(float(data["advance_seconds"]))
    except (TypeError, ValueError) as exc:
        raise CfError(5400, "Seconds must be numbers") from exc
    return jsonify(_clock_body())


@bp.get("/rate_limit")
def get_rate_limit() -> Any:
    """Return the rate-limit budget."""
    limiter = _controls().limiter
    return jsonify(limit=limiter.limit, window=limiter.window)


@bp.post("/rate_limit")
def set_rate_limit() -> Any:
    """Change the budget (`limit`, `window`) and forget past calls."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise CfError(5400, "Body must be a JSON object")
    limiter = _controls().limiter
    try:
        limit = int(data.get("limit", limiter.limit))
        window = float(data.get("window", limiter.window))
    except (TypeError, ValueError) as exc:
        raise CfError(5400, "limit and window must be numbers") from exc
    if limit < 1 or window <= 0:
        raise CfError(5400, "limit must be >= 1 and window > 0")
    limiter.limit, limiter.window = limit, window
    limiter.reset()
    return jsonify(limit=limit, window=window)


def _batch_host() -> Any:
    from broker.emulator.core import current_emulator

    return current_emulator().batch


@bp.get("/batch")
def get_batch() -> Any:
    """Return the batch host's settings, refused endpoints and live token count."""
    return jsonify(_batch_host().state())


@bp.post("/batch")
def set_batch() -> Any:
    """Refuse endpoints with code 103 (`forbidden`), set `rate_limit`/`token_ttl`, `revoke`
    every token or `revoke_token` one."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise CfError(5400, "Body must be a JSON object")
    unknown = set(data) - {"forbidden", "rate_limit", "token_ttl", "revoke", "revoke_token"}
    if unknown:
        raise CfError(5400, f"Unknown fields: {sorted(unknown)}")
    host = _batch_host()
    forbidden = data.get("forbidden")
    if forbidden is not None:
        if not isinstance(forbidden, list) or not all(isinstance(n, str) for n in forbidden):
            raise CfError(5400, "forbidden must be a list of endpoint names")
        host.forbid(set(forbidden))
    try:
        if "rate_limit" in data:
            host.rate_limit = max(1, int(data["rate_limit"]))
        if "token_ttl" in data:
            host.token_ttl = max(1.0, float(data["token_ttl"]))
    except (TypeError, ValueError) as exc:
        raise CfError(5400, "rate_limit and token_ttl must be numbers") from exc
    if data.get("revoke"):
        host.revoke_all()
    one = data.get("revoke_token")
    if one is not None and (not isinstance(one, str) or not host.revoke(one)):
        raise CfError(5404, "revoke_token names no batch token issued here")
    return jsonify(host.state())


@bp.post("/reset")
def reset() -> Any:
    """Clear counters, faults, rate-limit state, batch host state and clock offset (stored
    data stays)."""
    _controls().reset()
    _batch_host().reset()
    return jsonify(reset=True)
