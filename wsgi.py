"""WSGI entry point for gunicorn: `gunicorn wsgi:app`."""

import sys

from broker import create_app
from broker.platform.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # One line, no traceback: the operator needs the setting to fix, not our call stack.
    sys.stderr.write(f"upload broker refuses to start: {exc}\n")
    raise SystemExit(1) from None
