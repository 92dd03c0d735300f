"""Tell every web process at once that a token or an account changed: Redis pub/sub.

With `BROKER_RATELIMIT_STORAGE_URI` on Redis, a commit that moved the token version
(`tokens.move_version`) publishes the new version on CHANNEL, and each web process follows the
channel on a connection of its own (`Feed`): a process whose subscription is confirmed trusts
the tokens it keeps without reading `auth_versions`, so an authenticated request makes no
database statement at all.

Trusted only while that is safe. A request first applies every notice that reached the process
(one non-blocking poll of the subscription's socket); a process that is not subscribed yet, or
no longer (connect failure, a dropped connection, a Redis restart: the socket's end is read like
a notice), reads the version on every request as without Redis, until it has subscribed again
and re-read the version after that (notices missed meanwhile are in it). Every HEARTBEAT seconds
the subscriber pings Redis (a connection that stopped answering counts as lost) and re-reads the
version, so a notice that was never published (its writer could not reach Redis, or was not
configured with it), or a version gone back (a restore), is picked up within HEARTBEAT seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("broker.auth")

CHANNEL = "broker:auth-version"
# Seconds between the subscriber's pings and re-reads of the version; a ping unanswered by the
# next one means the connection is lost.
HEARTBEAT = 1.0
# Seconds a Redis call may take: a revocation's commit must not wait on a Redis that hangs.
TIMEOUT = 1.0
# Seconds between attempts to subscribe again, doubling up to the last.
RETRY = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def redis_url(storage_uri: str | None) -> str | None:
    """Return the redis-py URL of a Redis rate-limit storage URI, else None (no notices)."""
    uri = storage_uri or ""
    if uri.startswith("redis+unix://"):
        return "unix://" + uri.removeprefix("redis+unix://")
    if uri.startswith(("redis://", "rediss://")):
        return uri
    return None  # memory, a database, Sentinel, Cluster: every process reads the version


def _connection(url: str) -> Any:
    """Return a new, unconnected redis-py connection to `url`, retrying nothing by itself (a
    silent reconnect would lose the subscription without anyone noticing)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = redis.ConnectionPool.from_url(
        url,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return pool.make_connection()


class Publisher:
    """Publishes a moved version; never raises (a notice lost is caught by the heartbeat)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = 0
        self.failures = 0

    def publish(self, version: int) -> bool:
        """Publish `version` on CHANNEL; tell whether Redis took it.

        One attempt, and a second on a new connection only when the first failed at once on a
        connection opened before (Redis restarted since and closed it): a commit that changed
        a token waits on Redis at most one timeout (a hung Redis would make it wait on each
        try), and the first change after a restart still reaches the processes subscribed
        again. A notice lost all the same is caught by each process's heartbeat."""
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None and self._pid == os.getpid()
                try:
                    self._send(version)
                    return True
                except Exception as exc:
                    self._drop()
                    if attempt == 1 and reused and not _timed_out(exc):
                        continue
                    self.failures += 1
                    log.warning(
                        "token cache: cannot publish a change to Redis (%s): other "
                        "processes see it within %ss",
                        type(exc).__name__,
                        HEARTBEAT,
                    )
                    return False
            raise AssertionError("unreachable")

    def _send(self, version: int) -> None:
        if self._conn is None or self._pid != os.getpid():
            self._conn, self._pid = _connection(self._url), os.getpid()
        self._conn.send_command("PUBLISH", CHANNEL, str(version))
        self._conn.read_response()
        # Redis writes a notice to every subscriber before it reads another command: once
        # this answers, it is on its way to each one (in the socket of a process on this
        # host), so the caller's next request there comes after it.
        self._conn.send_command("PING")
        self._conn.read_response()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.disconnect()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop()


class Feed:
    """A subscription to CHANNEL, followed by a thread of the process's own (started by the
    first request, so a forked process gets its own)."""

    def __init__(
        self,
        url: str,
        *,
        read_version: Callable[[], int | None],
        kept: Callable[[], int | None],
        moved: Callable[[int, bool, int | None], object],
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._url = url
        self._read_version = read_version  # the database's version, None: cannot be read
        self._kept = kept  # the version what is kept holds every change up to (None: nothing)
        # Drop what is kept unless it holds every change up to this version (a notice), or,
        # given True, unless it was kept under this very version (a read of the database's);
        # given also the version kept when the read began, a read from that one up to the one
        # kept now is nothing new (changes were applied while it was read).
        self._moved = moved
        self.heartbeat = heartbeat
        self._lock = threading.Lock()  # held by whoever reads the subscription
        self._live = False
        self._conn: Any = None
        self._fd: int | None = None  # the subscription's socket
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._closed_in = 0  # the process that closed it
        self._awaiting_pong = False
        self._told = False  # the outage under way was logged
        self.subscribed = threading.Event()  # set while live, for tests and the metric
        self.subscriptions = 0  # how often it subscribed (again)

    def current(self) -> bool:
        """Tell whether what the process keeps may be trusted without reading the version:
        subscribed, re-synced, and every notice that reached the process applied."""
        if self._pid != os.getpid():
            self._start()
            return False
        if not self._live:
            return False
        # Something arrived (a notice, a pong, the connection's end) or someone is applying
        # what arrived: wait for it to be applied before answering.
        if _readable(self._fd, 0) or self._lock.locked():
            with self._lock:
                self._drain()
        return self._live

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            if self._closed.is_set():
                if self._closed_in == os.getpid():
                    self._pid = os.getpid()  # closed here: stays closed
                    return
                self._closed = threading.Event()  # a parent's close (before forking) is its own
            self._pid = os.getpid()
            self._live, self._conn, self._fd = False, None, None  # a parent's, if forked
            self.subscribed.clear()
            self._thread = threading.Thread(target=self._run, name="token-feed", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            try:
                self._subscribe()
                attempt = 0
                self._follow()
            except Exception as exc:
                self._lose(exc)
            if not self._closed.is_set():
                self._closed.wait(RETRY[min(attempt, len(RETRY) - 1)])
                attempt += 1

    def _subscribe(self) -> None:
        conn = _connection(self._url)
        with self._lock:
            self._conn = conn  # `_lose` and `close` disconnect it from here on
        conn.connect()
        conn.send_command("SUBSCRIBE", CHANNEL)
        reply = conn.read_response(push_request=True)
        if _kind(reply) != "subscribe":
            raise ConnectionError(f"unexpected answer to SUBSCRIBE: {reply!r}")
        # Subscribed: a change from now on is heard of; one before is in the version read now.
        version = self._read_version()
        if version is None:
            raise ConnectionError("the version cannot be read")
        fd = conn._sock.fileno()
        with self._lock:
            if self._closed.is_set() or self._conn is not conn:
                conn.disconnect()  # closed meanwhile
                return
            self._moved(version, True, None)
            self._fd, self._live, self._awaiting_pong = fd, True, False
            self.subscriptions += 1
            self.subscribed.set()
            self._told = False
        log.info("token cache: hearing of token and account changes through Redis")

    def _follow(self) -> None:
        """Apply notices as they come; ping and re-read the version every heartbeat."""
        next_beat = time.monotonic() + self.heartbeat
        while self._live and not self._closed.is_set():
            _readable(self._fd, max(0.0, next_beat - time.monotonic()))
            with self._lock:
                self._drain()
            if time.monotonic() >= next_beat and self._live:
                self._beat()
                next_beat = time.monotonic() + self.heartbeat

    def _beat(self) -> None:
        with self._lock:
            if self._awaiting_pong:
                raise ConnectionError("Redis did not answer a ping")
            self._conn.send_command("PING")
            self._awaiting_pong = True
            # Before the read: requests apply notices, and commits here their own changes
            # (`TokenCache.changed`, without this lock), while it is read.
            since = self._kept()
        version = self._read_version()
        if version is None:
            return
        with self._lock:
            self._drain()  # a notice that arrived while it was read is applied first
            # A read, not a notice: a version lower than the one kept when it began means the
            # database went back (a restore), so what was kept since is dropped now, not at
            # the cache's TTL; one higher than the one kept now, a change never told. Between
            # the two, it predates a change applied meanwhile: nothing new.
            self._moved(version, True, since)

    def _drain(self) -> None:
        """Apply every notice received (the caller holds the lock); lose the subscription on
        any failure, so that the version is read instead."""
        conn = self._conn
        if not self._live or conn is None:
            return
        try:
            while conn.can_read(timeout=0):
                reply = conn.read_response(push_request=True)
                kind = _kind(reply)
                if kind == "message":
                    self._moved(int(reply[2]), False, None)
                elif kind == "pong":
                    self._awaiting_pong = False
        except Exception as exc:
            self._lose(exc, locked=True)

    def _lose(self, exc: Exception, locked: bool = False) -> None:
        """Stop trusting what is kept until subscribed again; log it once per outage."""
        with contextlib.nullcontext() if locked else self._lock:
            was_live = self._live
            self._live, self._fd = False, None
            self.subscribed.clear()
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
        if (was_live or not self._told) and not self._closed.is_set():
            self._told = True  # once per outage (the first attempt's failure counts as one)
            log.warning(
                "token cache: not subscribed to Redis (%s): reading the token version on every "
                "request until subscribed again",
                type(exc).__name__,
            )

    def close(self) -> None:
        """Stop following: the thread ends, the connection is closed (a process forked from
        this one after that follows of its own again)."""
        self._closed_in = os.getpid()
        self._closed.set()
        with self._lock:
            self._live, self._fd = False, None
            self.subscribed.clear()
            conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.disconnect()  # its shutdown wakes the thread's poll
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            thread.join(5 * TIMEOUT + self.heartbeat)


def _timed_out(exc: Exception) -> bool:
    """Tell whether a Redis call failed by waiting out its timeout (a hung Redis)."""
    import redis

    return isinstance(exc, redis.exceptions.TimeoutError | TimeoutError)


def _readable(fd: int | None, seconds: float) -> bool:
    """Tell whether `fd` has something to read (or its end), waiting at most `seconds`."""
    if fd is None:
        return False
    poll = select.poll()  # one per call: a poll object is not for two threads at once
    poll.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poll.poll(int(seconds * 1000)))


def _kind(reply: Any) -> str:
    """Return what a reply on the subscription is: `subscribe`, `message` or `pong`."""
    first = reply[0] if isinstance(reply, list) and reply else reply
    text = first.decode() if isinstance(first, bytes) else str(first)
    return text.lower()  # a ping's answer is `PONG` alone (RESP3) or `["pong", ""]` (RESP2)
