"""``passbridge producer``: serve the producer's HTTP API with uvicorn."""

from __future__ import annotations

import typer

from passbridge.cli.common import check_can_listen, fail, redis_url, settings


def producer(
    host: str = typer.Option(None, help="Bind address (default PASSBRIDGE_PRODUCER_HOST)."),
    port: int = typer.Option(
        None,
        min=0,
        max=65535,
        help="Port (0 = any free port, named in the log line producer_listening; default PASSBRIDGE_PRODUCER_PORT).",
    ),
    workers: int = typer.Option(1, help="uvicorn worker processes."),
) -> None:
    """Run the producer (webhooks, Apple and Google callbacks, the events API)."""
    import structlog
    import uvicorn

    s = settings(server=True)
    if s.accounts_file:
        from passbridge.accounts_file import AccountsFileError, load_accounts_file

        # Checked here too, so a broken file is one error line, not a traceback from uvicorn's start-up.
        try:
            load_accounts_file(s.accounts_file)
        except AccountsFileError as exc:
            fail(str(exc))
    from passbridge.crypto import SecretKeyError, cipher_from_settings

    # Likewise an unusable key (a generated one in a read-only or full state dir, a malformed one).
    try:
        cipher_from_settings(s)
    except SecretKeyError as exc:
        fail(str(exc))
    # `is None`, not `or`: --port 0 asks for any free port, it does not mean "unset".
    host = host or s.producer_host
    port = s.producer_port if port is None else port
    check_can_listen(host, port)  # after the file's and key's errors
    url = redis_url(s)
    from passbridge.cli.uvicorn_workers import serve
    from producer.app import create_app

    def announce(bound: int) -> None:
        structlog.get_logger("passbridge.producer").info(
            "producer_listening", host=host, port=bound, url=f"http://{host}:{bound}", workers=workers
        )

    if workers > 1:
        import os
        from pathlib import Path

        from passbridge.metrics import setup_multiprocess

        os.environ["REDIS_URL"] = url
        # Every process counts into files here; a scrape of any one of them adds them all up.
        metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or s.state_dir / "prometheus")
        try:
            setup_multiprocess(metrics_dir)
        except OSError as exc:
            fail(f"cannot write the producer's metrics files in {metrics_dir} ({exc.strerror or exc})")
    serve(
        uvicorn.Config(
            # With several processes each builds its own app from the import string.
            "producer.main:app" if workers > 1 else create_app(s, url),
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            # Requests still running after the grace are cancelled: a stop never outlasts the container's stop timeout.
            timeout_graceful_shutdown=s.producer_shutdown_grace_s,
            log_config=None,  # uvicorn's records go to the root logger, whose formatter redacts secrets
            access_log=False,
            loop="uvloop",
            http="httptools",
        ),
        announce,
    )
