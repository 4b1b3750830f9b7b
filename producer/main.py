"""``producer.main:app``: the app built from the environment, for ``uvicorn --workers N``."""

from __future__ import annotations

from passbridge.cli.uvicorn_workers import install_stack_dump
from passbridge.logging import configure_logging
from passbridge.redis_server import resolve_redis_url
from passbridge.settings import get_settings
from producer.app import create_app

# A worker process still running when the supervisor's stop deadline passes is told to write its stacks to the
# log before it is killed (passbridge.cli.uvicorn_workers), so the log shows where it was stuck.
install_stack_dump()

_settings = get_settings()
configure_logging(_settings.log_level, _settings.log_format)
app = create_app(
    _settings,
    resolve_redis_url(_settings.redis_url, _settings.state_dir, appendfsync=_settings.redis_appendfsync),
)
