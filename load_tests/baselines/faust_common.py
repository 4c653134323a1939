"""What the Faust baselines share: the pages the load harness reads, and running one as a worker."""

from __future__ import annotations

import logging.config
from collections.abc import Callable
from typing import Any

import faust

from stream_app.live import faust_internals
from stream_app.logs import logging_config
from stream_app.settings import Settings


def add_harness_pages(app: Any, counts: Callable[[], dict[str, Any]]) -> None:
    """``/counts`` (the worker's format: events and dead letters processed) and ``/ready``
    (partitions assigned and tables recovered), as the load harness polls them."""

    async def counts_page(web: Any, request: Any) -> Any:
        return web.json(counts())

    async def ready(web: Any, request: Any) -> Any:
        assigned = bool(faust_internals.assigned_partitions(app))
        recovered = faust_internals.tables_recovered(app)
        body = {"assigned": assigned, "recovered": recovered}
        return web.json(body, status=200 if assigned and recovered else 503)

    app.page("/counts", name="counts")(counts_page)
    app.page("/ready", name="ready")(ready)


def run(create: Callable[[Settings], Any]) -> None:
    """Build the app from STREAM_APP_* settings and run it as a Faust worker until SIGTERM."""
    settings = Settings()
    logging.config.dictConfig(logging_config(settings.log_level))
    worker = faust.Worker(
        create(settings),
        loglevel=settings.log_level,
        quiet=True,
        logging_config=logging_config(settings.log_level),
    )
    worker.execute_from_commandline()
