"""The service's commands: ``refute demo``, ``stack``, ``serve``, ``worker``, ``db upgrade``."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from refute import console
from refute.errors import RefuteError

db_app = typer.Typer(help="Database administration.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the database schema (REFUTE_DATABASE_URL) to the latest migration."""
    from refute.settings import get_settings
    from verifier.db import migrate

    try:
        url = get_settings().database_url
        migrate(url)
    except RefuteError as exc:
        raise console.fail(exc) from exc
    console.out.print(f"database at {url.split('@')[-1]} is up to date", highlight=False)


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated: spotcheck, prove, timers.")]
    = "spotcheck",
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    beat: Annotated[bool, typer.Option(help="Also run the timer scheduler (one per "
                                            "deployment).")] = False,
    loglevel: Annotated[str | None, typer.Option(
        help="Log level (default: REFUTE_LOG_LEVEL).")] = None,
) -> None:
    """Run a Celery worker on the given queues (and, with --beat, the timer scheduler); the
    database schema is created or upgraded first, as `refute serve` does."""
    from refute.logs import configure_logging
    from refute.settings import get_settings
    from verifier.worker import QUEUES, celery_app

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(wanted) - set(QUEUES))
    if unknown or not wanted:
        raise console.fail(RefuteError(f"unknown queues {unknown}; choose from {list(QUEUES)}"))
    try:
        settings = get_settings()
        level = (loglevel or settings.log_level).upper()
        configure_logging(settings, level=level)
        _upgrade_schema(settings.database_url)  # as `refute serve` does: a fresh home works
    except RefuteError as exc:
        raise console.fail(exc) from exc
    # --quiet: no banner on stdout; everything else Celery says goes through logging.
    argv = ["--quiet", "worker", "-Q", ",".join(wanted), "-c", str(concurrency), "-l", level,
            "--without-gossip", "--without-mingle", "-n", f"refute-{'-'.join(wanted)}@%h"]
    if beat:
        argv.append("-B")
    celery_app().worker_main(argv)


def _upgrade_schema(database_url: str) -> None:
    """Create or upgrade the schema at start, or refuse in one line naming what to run."""
    from verifier.db import migrate

    try:
        migrate(database_url)
    except RefuteError:
        raise
    except Exception as exc:  # the database cannot be reached or migrated
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RefuteError(f"cannot create or upgrade the database schema ("
                          f"{type(exc).__name__}: {first}): check REFUTE_DATABASE_URL, then "
                          "run `refute db upgrade`") from exc


def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    admin_token: Annotated[str | None, typer.Option(
        envvar="REFUTE_ADMIN_TOKEN", help="Token required to create networks.")] = None,
    migrate_first: Annotated[bool, typer.Option(
        "--migrate/--no-migrate", help="Create or upgrade the database schema before serving "
        "(turn off when a deployment runs `refute db upgrade` once itself).")] = True,
    workers: Annotated[int, typer.Option(
        min=0, max=64, help="Worker processes (0: one per core). Several share the port; "
        "/metrics sums their HTTP metrics.")] = 0,
) -> None:
    """Run the HTTP API; the database schema is created or upgraded first (as
    `refute db upgrade` does), so a fresh home serves at once."""
    import uvicorn

    from refute.logs import configure_logging
    from refute.settings import get_settings
    from verifier.service import ServiceContext

    count = workers or os.cpu_count() or 1
    try:
        settings = get_settings()
        configure_logging(settings)
        if migrate_first:
            _upgrade_schema(settings.database_url)
        ServiceContext.create(settings).engine.dispose()  # the settings hold: fail here, once
    except RefuteError as exc:
        raise console.fail(exc) from exc
    # log_config=None: uvicorn's own loggers go through the handler configured above.
    if count == 1:
        from verifier.api.app import create_app

        api = create_app(ServiceContext.create(settings), admin_token=admin_token)
        uvicorn.run(api, host=host, port=port, log_level="warning", log_config=None)
        return
    from verifier.api.factory import ADMIN_TOKEN_ENV

    with tempfile.TemporaryDirectory(prefix="refute-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker starts
        if admin_token is not None:
            os.environ[ADMIN_TOKEN_ENV] = admin_token
        uvicorn.run("verifier.api.factory:app_from_environment", factory=True, workers=count,
                    host=host, port=port, log_level="warning", log_config=None)


def stack(
    workdir: Annotated[Path, typer.Option(help="Folder for the database, blobs, logs.")]
    = Path(".refute/stack"),
    flower: Annotated[bool, typer.Option(
        "--flower", help="Run Flower, the Celery monitor, beside the workers.")] = False,
    api_workers: Annotated[int, typer.Option(
        min=1, max=64, help="API worker processes (`refute serve --workers`).")] = 1,
) -> None:
    """Start the whole local stack (redis-server, API, workers) until interrupted."""
    from verifier.stack import LocalStack

    # Ctrl-C and SIGTERM stop the stack, even when started in the background (a shell then
    # starts it with SIGINT ignored, and Python would install no handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with LocalStack(workdir, flower=flower, api_workers=api_workers) as running:
            console.out.print(f"API      {running.api_url}  (admin token {running.admin_token})",
                           highlight=False)
            console.out.print(f"redis    127.0.0.1:{running.redis_port}", highlight=False)
            if flower:
                console.out.print(f"Flower   {running.flower_url}", highlight=False)
            console.out.print(f"logs     {running.workdir}/*.log   — Ctrl-C stops everything",
                           highlight=False)
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        console.out.print("stopped", highlight=False)
    except RefuteError as exc:
        raise console.fail(exc) from exc


def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the stack, traces and bundles.")]
    = Path("out/demo"),
    model: Annotated[str, typer.Option(
        "--model", metavar="mlp|mobilenet|gpt2",
        help="mlp: an 8×256 MLP, two networks, two cheats (≈ 4 min). mobilenet: MobileNet v1 "
        "224×224, one spot-checked network, a cheat in a middle convolution proven on its tile "
        "(registration ≈ half an hour, up to 16 GB). gpt2: GPT-2 small, a cheat in block 6's "
        "Q·Kᵀ (registration: hours).")] = "mlp",
) -> None:
    """Run a real end-to-end dispute demo (starts and stops its own local stack)."""
    from verifier.demo import MODELS, run_demo

    if model not in MODELS:
        raise console.fail(RefuteError(f"unknown --model {model!r}: choose from "
                                       f"{', '.join(MODELS)}"))
    try:
        ok = run_demo(workdir, console.out, model)
    except RefuteError as exc:
        raise console.fail(exc) from exc
    if not ok:
        console.err.print("[red]error:[/red] the demo did not reach the expected verdicts")
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the service's commands to the ``refute`` app."""
    app.command()(demo)
    app.command()(stack)
    app.command()(serve)
    app.command()(worker)
    app.add_typer(db_app, name="db")
