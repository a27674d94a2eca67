"""The ASGI app of ``noodle serve`` (FastAPI): OpenAI routes, auth, errors, metrics, health, status page.

* :class:`~noodle.serve.guard.Guard` runs first: credentials and body limits are checked by the
  headers before a body is read (``/v1/*`` needs ``Authorization: Bearer KEY`` when the server
  has an API key); ``/health``, ``/healthz``, ``/readyz``, ``/metrics``, ``/`` and ``/noodle/status``
  do not (bind to 127.0.0.1, the default, to keep them private).
* :class:`~noodle.serve.requestid.RequestId` is outermost: every response echoes ``X-Request-Id``.
* Every error is OpenAI's error JSON; an unexpected exception is a 500 with a
  generic message (logged server-side), never a traceback.
* Several models (``more_models``): each has its own runtime (engine, scheduler, stages), plan and
  metrics; a request's ``model`` picks one, ``/metrics`` labels every series with ``model_name``,
  ``/noodle/status?model=ID`` shows one, ``/readyz`` is 200 once every model is ready.
* The stages load on a thread after start-up, so ``/healthz`` answers at once and
  ``/readyz`` (and vLLM's ``/health``) turns 200 when the pipeline runs.
  :meth:`ServeApp.begin_drain` (called on SIGTERM/SIGINT) refuses new requests with 503, waits up
  to ``drain_timeout_s`` for in-flight ones, cancels the rest and calls ``on_drained``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from noodle.plandoc import PlanDoc
from noodle.serve.guard import LOCAL_HOSTS, MAX_REQUEST_BYTES, EdgePolicy, Guard, authorized
from noodle.serve.limits import quiet_accept_errors
from noodle.serve.metrics import CONTENT_TYPE, ServeMetrics, merged_registry, stage_rows
from noodle.serve.openai_api import ServedModel, ServedModels, openai_router
from noodle.serve.protocol import ApiError, error_body
from noodle.serve.reference import ReferenceCheck
from noodle.serve.requestid import RequestId
from noodle.serve.runtime import Runtime
from noodle.serve.switching import LivePlan

__all__ = ["ModelEntry", "ServeApp", "create_app"]

log = logging.getLogger(__name__)
_STATUS_HTML = Path(__file__).with_name("status.html")
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/metrics", "/health",
              "/healthz", "/readyz", "/",
              "/noodle/status", "/noodle/cluster", "/noodle/cluster/join", "/noodle/cluster/heartbeat", "/noodle/cluster/leave",
              "/noodle/cluster/export")  # fmt: skip


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _CountRequests:
    """Pure ASGI middleware (streaming- and disconnect-safe): counts responses by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()


@dataclass(frozen=True)
class ModelEntry:
    """One more model a server answers: its id in the API, its runtime and the plan it runs."""

    model_id: str
    runtime: Runtime
    plan: PlanDoc


def _plan_now(plan: PlanDoc | LivePlan) -> PlanDoc | None:
    """The plan served now; a cluster's :class:`LivePlan` has none until its first plan."""
    return plan.current if isinstance(plan, LivePlan) else plan


@dataclass
class _Served:
    model: ServedModel
    plan: PlanDoc | LivePlan
    metrics: ServeMetrics
    reference: ReferenceCheck


class ServeApp:
    """The app plus what the CLI needs to run it: the runtime(s), metrics and the drain control.

    ``runtime``, ``plan``, ``model`` and ``metrics`` are the first model's; ``more_models`` adds others.
    """

    def __init__(
        self,
        runtime: Runtime,
        plan: PlanDoc | LivePlan,
        *,
        model_id: str,
        backend: str = "local",
        emulate: bool = False,
        api_key: str | None = None,
        drain_timeout_s: float = 30.0,
        on_drained: Callable[[], None] | None = None,
        cluster: Any = None,
        cluster_token: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        hosts: frozenset[str] | None = LOCAL_HOSTS,
        origins: frozenset[str] = frozenset(),
        more_models: Sequence[ModelEntry] = (),
    ) -> None:
        self.runtime = runtime
        self.plan = plan
        self.model = ServedModel(runtime, model_id)
        self.backend = backend
        self.emulate = emulate
        self.api_key = api_key
        self.drain_timeout_s = drain_timeout_s
        self.on_drained = on_drained or (lambda: None)
        self.metrics = ServeMetrics(runtime, plan, model_name=model_id)
        self.cluster = cluster  # a ClusterController with --cluster (its routes and metrics join the app)
        self.cluster_token = cluster_token
        self.policy = EdgePolicy(api_key=api_key, cluster_token=cluster_token, max_request_bytes=max_request_bytes,
                                 hosts=hosts, origins=origins)  # fmt: skip
        if cluster is not None:
            from noodle.serve.controller import ClusterCollector

            self.metrics.registry.register(ClusterCollector(cluster))
        runtime.observer = self.metrics
        self._drain_started: float | None = None
        self.served = [_Served(self.model, plan, self.metrics, ReferenceCheck(self._warner(runtime)))]
        for entry in more_models:
            metrics = ServeMetrics(entry.runtime, entry.plan, model_name=entry.model_id)
            entry.runtime.observer = metrics
            self.served.append(_Served(ServedModel(entry.runtime, entry.model_id), entry.plan, metrics,
                                       ReferenceCheck(self._warner(entry.runtime))))  # fmt: skip
        self.models = ServedModels([s.model for s in self.served])
        # one model: its own registry, as ever; several: one exposition, every series labelled model_name
        self._exposition = self.metrics.registry if not more_models else merged_registry(
            [(s.model.model_id, s.metrics.registry) for s in self.served])  # fmt: skip
        self.app = self._build()

    @staticmethod
    def _warner(runtime: Runtime) -> Callable[[str], None]:
        return lambda msg: runtime.events.add("warning", msg)

    @property
    def runtimes(self) -> list[Runtime]:
        """Every served model's runtime, the first model's first."""
        return [s.model.runtime for s in self.served]

    @property
    def in_flight(self) -> int:
        return sum(rt.in_flight for rt in self.runtimes)

    # -- draining ------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Refuse new requests from now on; safe to call from a signal handler (sets flags only)."""
        if self._drain_started is None:
            self._drain_started = time.monotonic()
            for rt in self.runtimes:
                rt.drain()

    async def _watch(self) -> None:
        """Background task: sample the status history; finish a drain when in-flight requests are done."""
        last_sample = 0.0
        while True:
            await asyncio.sleep(0.1)
            if self._drain_started is not None:
                waited = time.monotonic() - self._drain_started
                if self.in_flight == 0 or waited > self.drain_timeout_s:
                    if self.in_flight:
                        self.runtime.events.add("warning", f"drain: cancelling {self.in_flight} request(s) "
                                                f"still running after {self.drain_timeout_s:g} s")  # fmt: skip
                        for rt in self.runtimes:
                            rt.cancel_all()
                        await asyncio.sleep(0.2)  # let the cancelled streams send their last events
                    self.on_drained()
                    return
            if time.monotonic() - last_sample >= 1.0:
                last_sample = time.monotonic()
                for s in self.served:
                    s.model.runtime.sample()
                    if _plan_now(s.plan) is not None:
                        s.reference.observe(s.plan, stage_rows(s.model.runtime.stats(), s.plan))

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop)
        loaded = asyncio.Event()

        def load() -> None:
            try:
                for rt in self.runtimes:  # one after another: loading is memory-bound, not worth racing
                    rt.load()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(loaded.set)

        # a daemon thread: a shutdown while stages load (a worker that hangs in LoadStage) does not wait for it
        threading.Thread(target=load, name="noodle-load", daemon=True).start()
        watcher = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            watcher.cancel()
            if self.cluster is not None:  # first: its opener may be waiting for workers until it is stopped
                await asyncio.to_thread(self.cluster.close)
            try:
                await asyncio.wait_for(loaded.wait(), timeout=max(1.0, self.drain_timeout_s))
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self.runtime.events.add("warning", f"stopping while the stages still load (over "
                                        f"{max(1.0, self.drain_timeout_s):g} s); not waiting for them")  # fmt: skip
            for rt in self.runtimes:
                rt.cancel_all()
            for rt in self.runtimes:
                await asyncio.to_thread(rt.close, min(10.0, self.drain_timeout_s))

    # -- the app -------------------------------------------------------------------------------
    def status(self, model_id: str | None = None) -> dict[str, Any]:
        """What the status page shows, as JSON: of ``model_id`` (default: the first model)."""
        served = self.served[0] if model_id is None else next(s for s in self.served if s.model.model_id == model_id)
        rt, plan, metrics = served.model.runtime, _plan_now(served.plan), served.metrics
        stats = rt.stats()
        return {
            "model": served.model.model_id,
            "models": list(self.models.by_id),
            "backend": self.backend,
            "emulated": self.emulate,
            "state": rt.state,
            "error": rt.error,
            "uptime_s": time.time() - rt.started_at,
            "limits": {"prompt_tokens": rt.limits.prompt_tokens, "context_tokens": rt.limits.context_tokens},
            "plan": None if plan is None else {
                "name": plan.name, "objective": plan.objective, "solver": plan.solver.name, "status": plan.solver.status,
                "predicted": plan.predicted.model_dump(), "units": len(plan.units),
                "nodes": [n.model_dump() for n in plan.nodes],
            },  # fmt: skip
            "stages": stage_rows(stats, served.plan),
            "pipeline": None if stats is None else {
                **{k: float(getattr(stats, k, 0) or 0) for k in ("queue_depth", "in_flight", "tokens_generated", "tokens_per_s")},
                "completed": float(metrics.completed),  # since the server started, across re-plans
            },  # fmt: skip
            "in_flight_requests": rt.in_flight,
            "requests": self.metrics.request_counts(),
            "history": [[s.t, s.tokens_per_s, s.in_flight, s.queue_depth] for s in rt.history],
            "events": rt.events.recent(),
            "cluster": None if self.cluster is None else self.cluster.status(),
        }

    def _build(self) -> FastAPI:
        app = FastAPI(title="noodle", lifespan=self._lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        app.include_router(openai_router(self.models))  # credentials: checked by the Guard, before any body
        if self.cluster is not None:
            from noodle.serve.cluster_api import cluster_router

            app.include_router(cluster_router(self.cluster))

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/readyz")
        async def readyz() -> JSONResponse:
            # several models: the first one not ready speaks (its id leads its error)
            for rt in self.runtimes:
                down = rt.unavailable() if rt.state == "ready" else None
                if rt.state != "ready" or down is not None:
                    break
            error = down[0] if down else rt.error
            if error and len(self.runtimes) > 1:
                error = f"{self.served[self.runtimes.index(rt)].model.model_id}: {error}"
            ok = rt.state == "ready" and down is None
            return JSONResponse({"ready": ok, "state": rt.state, "error": error}, status_code=200 if ok else 503)

        app.add_api_route("/health", readyz, methods=["GET"])  # vLLM's probe: 200 once requests can be served

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self._exposition), media_type=CONTENT_TYPE)

        @app.get("/noodle/status")
        async def status(request: Request, model: str | None = None) -> dict[str, Any]:
            if model is not None and model not in self.models.by_id:
                self.models.get(model)  # the 404 naming the served ids
            out = self.status(model)
            secrets = self.policy.secrets_for("/noodle/cluster")
            if out["cluster"] is not None and secrets and not authorized(request.headers.get("authorization"), secrets):
                for node in out["cluster"]["nodes"]:  # addresses are for the key or token holders (/noodle/cluster)
                    node["address"] = "(hidden)"
            return out

        @app.get("/", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            return HTMLResponse(_STATUS_HTML.read_text())

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError) -> JSONResponse:
            return _error_response(exc)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            msg = f"{request.method} {request.url.path}: {exc.detail}"
            return JSONResponse(error_body(msg, type=kind, code=str(exc.status_code)), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))  # fmt: skip

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
            err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
            param = ".".join(str(p) for p in err["loc"] if p != "body") or None
            return JSONResponse(error_body(f"{param or 'body'}: {err['msg']}", type="invalid_request_error",
                                           param=param, code="invalid_value"), status_code=400)  # fmt: skip

        @app.exception_handler(ClientDisconnect)
        async def client_left(request: Request, exc: ClientDisconnect) -> Response:
            log.debug("client left %s %s before its body was read", request.method, request.url.path)
            return Response(status_code=499)  # nobody reads it; counted in the metrics

        @app.exception_handler(Exception)
        async def unexpected(request: Request, exc: Exception) -> JSONResponse:
            log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
            return JSONResponse(error_body("internal server error; see the server log", type="server_error",
                                           code="internal_error"), status_code=500)  # fmt: skip

        inner: ASGIApp = app
        if self.policy.origins:  # pages from these origins may call the API: answer their CORS preflights
            from starlette.middleware.cors import CORSMiddleware

            inner = CORSMiddleware(app, allow_origins=sorted(self.policy.origins), allow_methods=["GET", "POST"],
                                   allow_headers=["authorization", "content-type", "x-request-id"],
                                   expose_headers=["x-request-id"])  # fmt: skip
        return RequestId(_CountRequests(Guard(inner, self.policy), self.metrics))  # type: ignore[return-value]


def create_app(runtime: Runtime, plan: PlanDoc, **kwargs: Any) -> ServeApp:
    """A :class:`ServeApp`; its ``.app`` is the ASGI application to hand to uvicorn."""
    return ServeApp(runtime, plan, **kwargs)
