"""HTTP routes of ``noodle serve --cluster``: join, heartbeat, leave, cluster status and export.

``POST /noodle/cluster/join``, ``/heartbeat`` and ``/leave`` need
``Authorization: Bearer <cluster token>`` (the workers' gRPC token: one secret for the
cluster). ``GET /noodle/cluster`` (nodes, plan, re-plans) and ``GET /noodle/cluster/export``
(the measured spec, YAML; ``?links=relay`` prices each hop through the coordinator, default
``direct``) show worker addresses and the model's path: they need the API key or the cluster
token. :class:`~noodle.serve.guard.Guard` checks all of it (and the body's size) before a body
is read; bodies are parsed off the event loop.

``/leave`` is a worker stopping on purpose (SIGTERM): it is dead to the planner at once, and the
answer waits (up to the body's ``wait_s``) until the served plan holds no stage on it, so the
worker keeps computing the steps in flight while the coordinator drains and re-plans around it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ValidationError

from noodle.serve.claims import ClaimRefused, Heartbeat, JoinRequest, Leave, field_message, unit_mismatch
from noodle.serve.controller import ClusterController
from noodle.serve.links import LINK_MODES
from noodle.serve.protocol import ApiError
from noodle.serve.registry import cluster_spec

__all__ = ["cluster_router"]

W = TypeVar("W", bound=BaseModel)


def _parse(raw: bytes, model: type[W]) -> W:
    """A wire body, or the 400 that names its field and the value it got."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, an integer of 4,300+ digits
        raise ApiError(400, f"body: not valid JSON ({str(exc)[:200]}); send a JSON object", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        param, message = field_message(exc)
        raise ApiError(400, f"{param}: {message}", param=param, code="invalid_value") from None


async def _body(request: Request, model: type[W]) -> W:
    return await asyncio.to_thread(_parse, await request.body(), model)


def cluster_router(ctl: ClusterController) -> APIRouter:
    """The cluster's routes; credentials and body sizes are the Guard's (see the module docstring)."""
    router = APIRouter()

    @router.post("/noodle/cluster/join")
    async def join(request: Request) -> dict[str, Any]:
        body = await _body(request, JoinRequest)
        reg = ctl.registry
        if reg.model_hash and body.model_hash != reg.model_hash:
            raise ApiError(409, f"model_hash: the worker's model folder is {body.model_hash}, the coordinator serves "
                           f"{reg.model_hash}; give the worker a copy of the same model", param="model_hash",
                           code="model_mismatch")  # fmt: skip
        if reg.weights_sha256 and body.weights_sha256 != reg.weights_sha256:
            raise ApiError(409, f"weights_sha256: the worker's weights hash to {body.weights_sha256[:16]}..., the "
                           f"coordinator's to {reg.weights_sha256[:16]}...: same config and file sizes, other weights; "
                           "give the worker a byte-for-byte copy of the coordinator's model folder",
                           param="weights_sha256", code="weights_mismatch")  # fmt: skip
        wrong = unit_mismatch(body.costs, reg.unit_names) if reg.unit_names else None
        if wrong:
            raise ApiError(400, f"costs.units: {wrong}; the worker measured another model "
                           f"(its units must be {', '.join(reg.unit_names)})", param="costs.units",
                           code="invalid_value")  # fmt: skip
        if body.address.startswith(("0.0.0.0:", "[::]:")) and request.client is not None:  # listens everywhere
            body = body.model_copy(update={"address": f"{request.client.host}:{body.address.rsplit(':', 1)[1]}"})
        try:
            rec = reg.join(body, verified=ctl.verifier is None)
        except ClaimRefused as exc:
            raise ApiError(exc.status, str(exc), param=exc.param, code=exc.code) from None
        ctl.events.add("info", f"node {rec.id} joined from {rec.address}: {rec.device_kind} ({rec.device_name}), "
                       f"{rec.free_memory_bytes / 2**30:.1f} GiB free, decode {rec.decode_ms:.2f} ms over "
                       f"{len(rec.profile.unit_names)} units"
                       f"{' (cached)' if rec.cached else ''}"
                       f"{'' if rec.verified else '; timing a stage on it before it is planned'}")  # fmt: skip
        if ctl.verifier is not None:
            ctl.verifier.wake()
        return {"ok": True, "heartbeat_s": reg.heartbeat_s, "secret": rec.secret}

    @router.post("/noodle/cluster/heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        body = await _body(request, Heartbeat)
        try:
            known = ctl.registry.heartbeat(body)
        except ClaimRefused as exc:
            raise ApiError(exc.status, str(exc), param=exc.param, code=exc.code) from None
        if not known:
            raise ApiError(404, f"id: node {body.id!r} is not joined (or was declared dead); join again",
                           param="id", code="not_joined")  # fmt: skip
        return {"ok": True}

    @router.post("/noodle/cluster/leave")
    async def leave(request: Request) -> dict[str, Any]:
        body = await _body(request, Leave)
        try:
            live = ctl.registry.leave(body.id, body.secret)
        except ClaimRefused as exc:
            raise ApiError(exc.status, str(exc), param=exc.param, code=exc.code) from None
        if not live:
            return {"ok": True, "left": False, "in_plan": False, "waited_s": 0.0}
        ctl.events.add("info", f"node {body.id} is leaving (stopped on purpose): re-planning without it")
        loop, t0 = asyncio.get_running_loop(), asyncio.get_running_loop().time()

        def holds() -> bool:
            plan = ctl.plan.current
            return (plan is not None and any(s.node == body.id for s in plan.stages)
                    and ctl.registry.alive_count() > 0)  # fmt: skip

        while holds() and loop.time() - t0 < body.wait_s:
            await asyncio.sleep(0.1)
        return {"ok": True, "left": True, "in_plan": holds(), "waited_s": loop.time() - t0}

    @router.get("/noodle/cluster")
    async def status() -> dict[str, Any]:
        return ctl.status()

    @router.get("/noodle/cluster/export")
    async def export(links: str = "direct") -> PlainTextResponse:
        if links not in LINK_MODES:
            raise ApiError(400, f"links: {links!r} is not a links mode; give one of {', '.join(LINK_MODES)}",
                           param="links", code="invalid_value")  # fmt: skip
        records = ctl.registry.records(alive_only=True)
        if not records:
            raise ApiError(409, "no live worker has joined; nothing to export", code="no_workers")
        data = cluster_spec(records, ctl.card, concurrency=ctl.concurrency, continuous=ctl.continuous,
                            links=ctl.registry.links.measurements(mode=links))
        head = "# measured by noodle serve --cluster; solve with `noodle solve FILE`\n"
        return PlainTextResponse(head + yaml.safe_dump(data, sort_keys=False), media_type="application/yaml")

    return router
