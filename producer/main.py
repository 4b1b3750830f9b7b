"""``producer.main:app``: the app built from the environment, for ``uvicorn --workers N``."""

from __future__ import annotations

import faulthandler
import signal

from passbridge.logging import configure_logging
from passbridge.redis_server import resolve_redis_url
from passbridge.settings import get_settings
from producer.app import create_app

# A worker process still running when the supervisor's stop deadline passes is sent SIGUSR1 before it is killed
# (passbridge.cli.uvicorn_workers): every thread's stack then goes to stderr, so the log shows where it was stuck.
faulthandler.register(signal.SIGUSR1, all_threads=True)

_settings = get_settings()
configure_logging(_settings.log_level, _settings.log_format)
app = create_app(
    _settings,
    resolve_redis_url(_settings.redis_url, _settings.state_dir, appendfsync=_settings.redis_appendfsync),
)
