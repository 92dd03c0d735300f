"""Gunicorn settings of the broker's web tier: `gunicorn -c gunicorn.conf.py wsgi:app`.

compose.yaml, the Dockerfile and the system test (tests/system) start every web instance with
exactly this command; what differs between them comes from the environment:

- the address: gunicorn's own `PORT` (binds 0.0.0.0:$PORT) or `GUNICORN_CMD_ARGS="--bind …"`
  (the system test hands over a socket it bound itself: `--bind fd://N`);
- `WEB_CONCURRENCY` processes (default 2) of `GUNICORN_THREADS` threads (default 8) each.
"""

import contextlib
import ctypes
import ctypes.util
import gc
import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback

import gunicorn.util
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


_UNSAFE_IN_ATOM = re.compile('[\\\\"\x00-\x1f\x7f-\x9f]')


def _safe_atom(value):
    """Return an access-line value with `\\`, `"` and control characters backslash-escaped."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return _UNSAFE_IN_ATOM.sub(
        lambda m: "\\" + m.group() if m.group() in '\\"' else repr(m.group())[1:-1], value
    )


def _once_a_second(render):
    """Return a function giving `render(second)` of the current second, rendered once a second
    (the access line's time and the `Date` header show whole seconds)."""
    stamp = (-1, "")

    def current():
        nonlocal stamp
        second = int(time.time())
        now = stamp  # one tuple, read and replaced whole: safe across threads
        if now[0] != second:
            now = stamp = (second, render(second))
        return now[1]

    return current


_log_time = _once_a_second(
    lambda second: time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))
)


class AccessLineLogger(Logger):
    """gunicorn's logger, computing only the atoms the access line shows. gunicorn's own makes
    an atom of every request header, response header and environ entry (some 60) on every
    request, and decodes a Basic user: ≈ 1 % of a create's CPU. A format that names any other
    atom (an operator's --access-logformat) gets gunicorn's full set.

    With the plain atoms the line is also logged the short way: its record made and handed to
    the handlers directly (`Logger.info` first walks the stack for a caller the line never
    shows), the time atom rendered once a second, the format read once."""

    PLAIN = frozenset("hltrsbfa")

    def setup(self, cfg):
        """Note whether the configured format uses only the plain atoms built here."""
        super().setup(cfg)
        self.line_format = cfg.access_log_format or ""
        used = set(re.findall(r"%\(([^)]*)\)", self.line_format))
        self.plain_format = used <= self.PLAIN

    def access(self, resp, req, environ, request_time):
        """Log the request's access line (gunicorn's, see Logger.access)."""
        if not self.plain_format:
            return super().access(resp, req, environ, request_time)
        log = self.access_log
        if not self.access_log_enabled or not log.isEnabledFor(logging.INFO):
            return None
        try:
            # A quote in a value (a user agent) cannot end its field, as with gunicorn's
            # SafeAtoms; a backslash cannot make the closing quote look escaped, and a byte that
            # terminals act on (C0/C1 controls: 0x9b starts an escape sequence) is shown escaped.
            atoms = {
                name: _safe_atom(value) if isinstance(value, str) else value
                for name, value in self.atoms(resp, req, environ, request_time).items()
            }
            line = self.line_format % atoms
            log.handle(log.makeRecord(log.name, logging.INFO, "", 0, line, (), None))
        except Exception:
            self.error(traceback.format_exc())
        return None

    def now(self):
        """Return the time in Apache's Common Log Format (gunicorn's), rendered once a second."""
        return _log_time()

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


def _http_date_once_a_second(render=gunicorn.util.http_date):
    """Return gunicorn's `http_date` (the `Date` header of every response) rendering the
    current time once a second: the header shows whole seconds, and email.utils' formatting of
    it on every response cost ≈ 1 % of a create's CPU."""
    current = _once_a_second(render)

    def http_date(timestamp=None):
        return current() if timestamp is None else render(timestamp)

    http_date.rendered = render
    return http_date


if not hasattr(gunicorn.util.http_date, "rendered"):  # this file may be read more than once
    gunicorn.util.http_date = _http_date_once_a_second()


def on_starting(server):
    """Size each process's database pools to its threads (broker.platform.db), before any
    process loads the app; an operator's own BROKER_DB_POOL_SIZE wins. Then load the app once,
    here, for every web process to share."""
    os.environ.setdefault("BROKER_DB_POOL_SIZE", str(server.cfg.threads))
    application = getattr(server, "app", None)
    if application is not None:
        _load_before_fork(application)


def when_ready(server):
    """Before forking a web process, stop in one line (as wsgi.py does) when the app's
    settings cannot run as many web processes as gunicorn is about to fork: the app cannot
    tell by itself how many run."""
    problem = _web_processes_problem(server, server.cfg.workers)
    if problem:
        sys.stderr.write(f"upload broker refuses to start: {problem}\n")
        raise SystemExit(1)


def nworkers_changed(server, new_value, old_value):
    """Keep the web processes at their number, in one log line, when SIGTTIN, `gunicornc
    worker add` or a reload asks for more than the app's settings can run: checked at the
    start only, a process added later would go unrefused."""
    if old_value is None or new_value <= old_value:  # the start (when_ready) or fewer
        return
    problem = _web_processes_problem(server, new_value)
    if problem:
        server.log.error("upload broker refuses another web process: %s", problem)
        server.num_workers = old_value  # gunicorn forks up to this number, after this hook
        server.cfg.set("workers", old_value)  # a reload forks this many before it settles


def _web_processes_problem(server, processes):
    """Return why the app loaded in the master cannot run `processes` web processes, else None
    (also when it is not loaded there: each process then loads its own)."""
    app = getattr(getattr(server, "app", None), "callable", None)  # loaded in on_starting
    check = getattr(app, "extensions", {}).get("web_processes_problem")
    return check(processes) if check is not None else None


def _load_before_fork(application):
    """Load the app in the master, so each web process forked from it shares its pages.

    Loaded in each process instead, every one held its own copy of everything imported (62 MB
    private of 89 MB resident); forked from a master that holds it, a process starts with about
    17 MB of its own. The master closes the connections the load opened (no two processes may
    share one) and freezes the objects it holds, so no collection in a web process writes to
    (and so copies) their pages. It starts no thread: each web process warms itself up
    (post_worker_init). A load that fails here is left to the web processes, which report it
    as they always did (one line, and gunicorn stops)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            app = application.wsgi()
    except (Exception, SystemExit):
        application.callable = None
        return
    finally:
        _write_to_stderr(captured)
    sys.stderr.write(captured.getvalue())  # loaded: what the load logged is for the log
    # No warm-up here: it serves a request, and a request starts threads (the token feed, the
    # inline worker) and opens connections that must be each web process's own.
    release = getattr(app, "extensions", {}).get("release_connections")
    if release is not None:
        release()
    gc.collect()
    gc.freeze()
    # Every page resident in the master at the fork is resident in each web process too: the
    # load's freed memory (the compiled files read, the parsers' temporaries) goes back first.
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _write_to_stderr(captured):
    """Point every log handler the load built on `captured` at the real stderr: the broker's
    handler takes the stream current when the app is made, and would otherwise write every
    later line of this process and of each web process into `captured`, unseen."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is captured:
                handler.setStream(sys.stderr)


# glibc's mallopt option for the number of malloc arenas (malloc.h).
M_ARENA_MAX = -8
# How often a web process that served requests since gives its freed heap pages back.
TRIM_INTERVAL = 1.0


def _libc():
    """Return the C library when it is glibc's (mallopt, malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:  # no C library by that name
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc: its allocator is left as it is
    return libc


def post_fork(server, worker):
    """Cap the process's malloc arenas at two before its threads start: glibc otherwise gives
    each request thread an arena of its own as they contend, and a web process's memory grows
    by megabytes over its first busy minutes for no gain (the GIL runs one thread at a time).
    Then start the thread that gives freed heap pages back after requests."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 2)
        threading.Thread(
            target=_trim_after_requests, args=(worker, libc), name="heap-trim", daemon=True
        ).start()


def _trim_after_requests(worker, libc, interval=TRIM_INTERVAL):
    """Once a second, if the process served requests since, hand the heap's free pages back.

    Sixteen threads allocating at once leave free holes between live blocks that glibc keeps
    (it returns only the top of the heap by itself): a process grew by 5-10 MB over a run of
    32 clients, most of it free. malloc_trim releases every free page (well under a
    millisecond, without the GIL), so a process's size after a run is what it holds."""
    seen = worker.nr
    while worker.alive:
        time.sleep(interval)
        if worker.nr != seen:
            seen = worker.nr
            libc.malloc_trim(0)


def post_worker_init(worker):
    """Before the process takes requests: run the create path's database work once, rolled
    back (broker.uploads.warmup), so its first requests under load cost what later ones do."""
    warm_up = getattr(worker.wsgi, "extensions", {}).get("warm_up")
    if warm_up is not None:
        seconds = warm_up(connections=worker.cfg.threads)
        worker.log.info("warmed up in %.0f ms", seconds * 1000)
