"""``passbridge redis start|stop|status``: the embedded Redis server."""

from __future__ import annotations

import typer

from passbridge.cli.common import console, emit_json, fail, settings

app = typer.Typer(help="The embedded Redis server (used when REDIS_URL is unset).", no_args_is_help=True)


@app.command()
def start(port: int = typer.Option(0, help="Port (0 = a free one).")) -> None:
    """Start the embedded Redis (AOF on) unless it is running; print its URL."""
    # Imported here: passbridge.redis_server imports redis, which every other command's --help can skip.
    from passbridge.redis_server import RedisServerError, ensure_embedded

    s = settings()
    try:
        server = ensure_embedded(s.state_dir, port or None, appendfsync=s.redis_appendfsync)
    except RedisServerError as exc:
        fail(str(exc))
    typer.echo(server.url)


@app.command()
def stop() -> None:
    """Stop the embedded Redis (it writes its AOF first)."""
    from passbridge.redis_server import stop_embedded

    s = settings()
    if stop_embedded(s.state_dir):
        console.print("stopped")
    else:
        console.print("no embedded Redis was running")


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Whether the embedded Redis is running, and where."""
    from passbridge.redis_server import read_state

    s = settings()
    server = read_state(s.state_dir)
    doc = {
        "running": bool(server),
        "url": server.url if server else None,
        "pid": server.pid if server else None,
    }
    if as_json:
        emit_json(doc)
    elif server:
        typer.echo(f"running at {server.url} (pid {server.pid}, data in {server.data_dir})")
    else:
        typer.echo("not running")
    if not server:
        raise typer.Exit(1)  # with --json too: a script checks the same exit code a person does
