"""WSGI entry point for gunicorn: `gunicorn wsgi:app`."""

import sys

from broker import create_app
from broker.platform.config import ConfigError

# gunicorn's exit status for "the application cannot load" (its Arbiter.APP_LOAD_ERROR): a
# worker exiting with it stops the whole server, where any other status has the master boot
# a new worker, fail again, forever.
APP_LOAD_ERROR = 4

try:
    app = create_app()
except ConfigError as exc:
    # One line, no traceback: the operator needs the setting to fix, not our call stack.
    sys.stderr.write(f"upload broker refuses to start: {exc}\n")
    raise SystemExit(APP_LOAD_ERROR) from None
