"""`create_app(config)`: the monitor's FastAPI app for one traind instance.

    from daemon.config import load_config
    from monitor.app import create_app
    app = create_app(load_config("config.json"))          # uvicorn.run(app, host="127.0.0.1", port=8080)

Nothing is built at import time, so tests point an app at a temporary tree.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from daemon.config import Config
from daemon.jobqueue import JobQueue
from daemon.history_db import HISTORY_FILE, HistoryDB
from monitor import (activity_api, auth, control_api, events, forgetting_api, history, metrics, playground_api,
                     queue_view, resources, status_api, upload)
from monitor.deps import MonitorState, ReadAuth
from monitor.gpu import GpuProbe
from monitor.host import ProcessSampler
from monitor.security import SecurityHeaders
from monitor.settings import MonitorSettings

log = logging.getLogger(__name__)


def create_app(config: Config, settings: MonitorSettings | None = None) -> FastAPI:
    settings = settings or MonitorSettings()
    token = settings.token or auth.load_or_create_token(config.path("status"))
    state = MonitorState(cfg=config, settings=settings, token=token,
                         queue=JobQueue(config.path("queue")), gpu=GpuProbe(), procs=ProcessSampler())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Build the history summary now, not on the first page load (about a second per million steps).
        threading.Thread(target=_warm_history, args=(state,), name="history-warmup", daemon=True).start()
        yield
        state.closing = True
        state.gpu.close()

    app = FastAPI(
        title="traind monitor", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
        description="Live status, history, queue, resources and controls of a traind daemon. "
                    f"State-changing endpoints need the token from status/{auth.TOKEN_FILE} in the {auth.HEADER} header.",
    )
    app.state.monitor = state
    for module in (status_api, history, activity_api, forgetting_api, queue_view, resources, events, metrics, control_api, upload,
                   playground_api):
        app.include_router(module.router)
    _add_docs(app)
    app.add_middleware(SecurityHeaders, loopback_only=not settings.token_for_reads)
    # Last: API routes above win over files of the same name.
    app.mount("/", StaticFiles(directory=settings.web_dir, html=True), name="web")
    return app


def _warm_history(state: MonitorState) -> None:
    path = state.cfg.path("status") / HISTORY_FILE
    if not path.exists():
        return
    db = HistoryDB.open_readonly(path)
    try:
        state.history.refresh(db.conn)
    except sqlite3.Error as e:  # the first request tries again and reports it
        log.warning("history summary not built at start: %s", e)
    finally:
        db.close()


def _add_docs(app: FastAPI) -> None:
    """Swagger UI from web/vendor/swagger-ui instead of FastAPI's default CDN: nothing is
    fetched at run time. Off loopback both need the token, like every API endpoint
    (the schema says what the server can do); the dashboard page itself holds no data."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[ReadAuth])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[ReadAuth])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="traind monitor API",
            swagger_js_url="/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/favicon.svg",
        )
