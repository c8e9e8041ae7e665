"""`sf-reward-server` / `python -m reward_server`: load settings, then serve the app with uvicorn."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from reward_server.app import create_app
from services.settings import Settings, SettingsError, add_settings_arguments, settings_from_args
from services.telemetry import Telemetry, configure_logging


def refuse_reason(settings: Settings) -> str | None:
    """Why the server must not start with these settings, or None when it may."""
    server = settings.reward_server
    if server.auth_required and (server.auth_token is None or not server.auth_token.get_secret_value()):
        return (
            "reward_server.auth_required is true but reward_server.auth_token is empty: set "
            "SF_REWARD_SERVER__AUTH_TOKEN (or --set reward_server.auth_token=...), or turn auth off for a "
            "local demo with --set reward_server.auth_required=false"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse flags, refuse unsafe settings, and run uvicorn with one worker until interrupted."""
    parser = argparse.ArgumentParser(prog="sf-reward-server", description=__doc__)
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as error:
        print(f"sf-reward-server: {error}", file=sys.stderr)
        return 2
    reason = refuse_reason(settings)
    if reason is not None:
        print(f"sf-reward-server: refusing to start: {reason}", file=sys.stderr)
        return 2
    log = configure_logging(settings.telemetry, "reward_server")
    server = settings.reward_server
    app = create_app(server, Telemetry("reward_server"))
    log.info("starting", extra={"host": server.host, "port": server.port, "auth": server.auth_required})
    # One worker process, as the metrics registry lives in it. Scoring runs on its own bounded thread pool
    # (reward_server.score_threads), off the event loop, so probes answer while long batches are scored.
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        workers=1,
        access_log=False,
        log_level=settings.telemetry.log_level.lower(),
        log_config=None,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
