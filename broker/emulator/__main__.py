"""Run the emulator standalone: `cf-images-emulator` or `python -m broker.emulator`."""

from __future__ import annotations

import argparse
import os
import sys

from werkzeug.serving import run_simple

from broker.emulator import create_app


def main(argv: list[str] | None = None) -> None:
    """Serve the emulator on a threaded development server."""
    parser = argparse.ArgumentParser(description="Local Cloudflare Images emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8788)
    parser.add_argument("--data-dir", help="overrides EMULATOR_DATA_DIR")
    parser.add_argument(
        "--control", action="store_true", help="enable the /_emulator control endpoints"
    )
    args = parser.parse_args(argv)
    # Flags go through the environment so the factory stays the one place reading settings.
    if args.data_dir:
        os.environ["EMULATOR_DATA_DIR"] = args.data_dir
    if args.control:
        os.environ["EMULATOR_CONTROL_ENABLED"] = "true"
        if not os.environ.get("EMULATOR_CONTROL_TOKEN"):
            print(
                "/_emulator controls answer loopback clients only "
                "(set EMULATOR_CONTROL_TOKEN to let others in with it)",
                file=sys.stderr,
            )
    # Port 0 (the OS picks one) leaves it to the host each request came to.
    if "EMULATOR_PUBLIC_URL" not in os.environ and args.port != 0:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # noqa: S104
        os.environ["EMULATOR_PUBLIC_URL"] = f"http://{host}:{args.port}"
    run_simple(args.host, args.port, create_app(), threaded=True)


if __name__ == "__main__":
    main()
