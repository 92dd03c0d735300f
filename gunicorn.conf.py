"""Gunicorn settings of the broker's web tier: `gunicorn -c gunicorn.conf.py wsgi:app`.

compose.yaml, the Dockerfile and the system test (tests/system) start every web instance with
exactly this command; what differs between them comes from the environment:

- the address: gunicorn's own `PORT` (binds 0.0.0.0:$PORT) or `GUNICORN_CMD_ARGS="--bind …"`
  (the system test hands over a socket it bound itself: `--bind fd://N`);
- `WEB_CONCURRENCY` processes (default 2) of `GUNICORN_THREADS` threads (default 8) each.
"""

import ctypes
import ctypes.util
import os
import re
import tempfile

from gunicorn.glogging import Logger

# The work is I/O-bound (the database, Cloudflare): threads, not more processes.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))

# On SIGTERM a web process finishes its requests within the same 30 s the background worker
# takes to finish or give back its work (broker.worker.SHUTDOWN_DEADLINE), so one stop timeout
# (compose's stop_grace_period) covers both.
graceful_timeout = 30
# A request thread silent this long is stuck (an upstream call times out after 10 s).
timeout = 60
keepalive = 5

# Each instance its own control socket (`gunicornc -s PATH status`): two instances on one host
# must not take over each other's. The master's pid names it unless the operator does.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET") or os.path.join(
    tempfile.gettempdir(), f"broker-web-{os.getpid()}.ctl"
)

# Logs on stderr (the container's log); one access line per request. With
# BROKER_LOG_FORMAT=json the broker's own request line (JSON, with the request id and user) is
# the access log, so a log collector gets no plain-text access lines between them.
accesslog = None if os.environ.get("BROKER_LOG_FORMAT", "").lower() == "json" else "-"
errorlog = "-"
# gunicorn's default line with "-" where it puts the user name of a Basic `Authorization`
# header: a header someone sent is not for the log (it may even be a password typed as user).
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


class AccessLineLogger(Logger):
    """gunicorn's logger, computing only the atoms the access line shows. gunicorn's own makes
    an atom of every request header, response header and environ entry (some 60) on every
    request, and decodes a Basic user: ≈ 1 % of a create's CPU. A format that names any other
    atom (an operator's --access-logformat) gets gunicorn's full set."""

    PLAIN = frozenset("hltrsbfa")

    def setup(self, cfg):
        """Note whether the configured format uses only the plain atoms built here."""
        super().setup(cfg)
        used = set(re.findall(r"%\(([^)]*)\)", cfg.access_log_format or ""))
        self.plain_format = used <= self.PLAIN

    def atoms(self, resp, req, environ, request_time):
        """Return the access line's atoms (gunicorn's values, see Logger.atoms)."""
        if not self.plain_format:
            return super().atoms(resp, req, environ, request_time)
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        sent = getattr(resp, "sent", None)
        return {
            "h": environ.get("REMOTE_ADDR", "-"),
            "l": "-",
            "t": self.now(),
            "r": f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}",
            "s": status,
            "b": str(sent) if sent is not None else "-",
            "f": environ.get("HTTP_REFERER", "-"),
            "a": environ.get("HTTP_USER_AGENT", "-"),
        }


logger_class = AccessLineLogger


def on_starting(server):
    """Size each process's database pools to its threads (broker.platform.db), before any
    process loads the app; an operator's own BROKER_DB_POOL_SIZE wins."""
    os.environ.setdefault("BROKER_DB_POOL_SIZE", str(server.cfg.threads))


# glibc's mallopt option for the number of malloc arenas (malloc.h).
M_ARENA_MAX = -8


def post_fork(server, worker):
    """Cap the process's malloc arenas at two before its threads start: glibc otherwise gives
    each request thread an arena of its own as they contend, and a web process's memory grows
    by megabytes over its first busy minutes for no gain (the GIL runs one thread at a time)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_ARENA_MAX, 2)
    except OSError:  # no C library by that name (not glibc): its allocator is left as it is
        pass


def post_worker_init(worker):
    """Before the process takes requests: run the create path's database work once, rolled
    back (broker.uploads.warmup), so its first requests under load cost what later ones do."""
    warm_up = getattr(worker.wsgi, "extensions", {}).get("warm_up")
    if warm_up is not None:
        seconds = warm_up(connections=worker.cfg.threads)
        worker.log.info("warmed up in %.0f ms", seconds * 1000)
