"""Direct-upload completion notifications, sent like Cloudflare's webhook: a static shared secret
in `cf-webhook-auth`, no HMAC. Sent from a background thread so the upload answer is not delayed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import requests

log = logging.getLogger(__name__)


class Notifier:
    """POST one JSON notification per direct-upload outcome to a configured URL."""

    def __init__(self, url: str | None, secret: str | None, timeout: float = 5.0) -> None:
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Tell whether a notification URL is configured."""
        return bool(self.url)

    def send(self, payload: dict[str, Any]) -> None:
        """Send `payload` in the background (a no-op when no URL is configured)."""
        if not self.url:
            return
        thread = threading.Thread(target=self._post, args=(payload,), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for notifications still in flight (used on shutdown and in tests)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def _post(self, payload: dict[str, Any]) -> None:
        assert self.url is not None
        headers = {"cf-webhook-auth": self.secret or ""}
        try:
            resp = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout)
            resp.close()
            if resp.status_code >= 400:
                log.warning("notification to %s answered %s", self.url, resp.status_code)
        except requests.RequestException as exc:
            # Cloudflare does not retry either; the receiver must confirm with GET /v1/{id}.
            log.warning("notification to %s failed: %s", self.url, exc)
        except Exception:
            log.exception("notification to %s crashed", self.url)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
