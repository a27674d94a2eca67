"""HTTP routes of ``noodle serve --cluster``: join, heartbeat, cluster status and export.

``POST /noodle/cluster/join`` and ``POST /noodle/cluster/heartbeat`` need
``Authorization: Bearer <cluster token>`` (the workers' gRPC token: one secret for the
cluster). ``GET /noodle/cluster`` (nodes, plan, re-plans) and ``GET /noodle/cluster/export``
(the measured spec, YAML; ``?links=relay`` prices each hop through the coordinator, default
``direct``) are open like ``/noodle/status``.
"""

from __future__ import annotations

import hmac
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from noodle.serve.controller import ClusterController
from noodle.serve.links import LINK_MODES
from noodle.serve.protocol import ApiError
from noodle.serve.registry import Heartbeat, JoinRequest, cluster_spec, unit_mismatch

__all__ = ["cluster_router"]


def cluster_router(ctl: ClusterController, token: str | None) -> APIRouter:
    router = APIRouter()

    def check(request: Request) -> None:
        if not token:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong cluster token: send Authorization: Bearer <the --token of noodle serve>",
                           code="invalid_api_key")  # fmt: skip

    @router.post("/noodle/cluster/join")
    async def join(body: JoinRequest, request: Request) -> dict[str, Any]:
        check(request)
        reg = ctl.registry
        if reg.model_hash and body.model_hash != reg.model_hash:
            raise ApiError(409, f"model_hash: the worker's model folder is {body.model_hash}, the coordinator serves "
                           f"{reg.model_hash}; give the worker a copy of the same model", param="model_hash",
                           code="model_mismatch")  # fmt: skip
        wrong = unit_mismatch(body.costs, reg.unit_names) if reg.unit_names else None
        if wrong:
            raise ApiError(400, f"costs.units: {wrong}; the worker measured another model "
                           f"(its units must be {', '.join(reg.unit_names)})", param="costs.units",
                           code="invalid_value")  # fmt: skip
        if body.address.startswith(("0.0.0.0:", "[::]:")) and request.client is not None:  # listens everywhere
            body = body.model_copy(update={"address": f"{request.client.host}:{body.address.rsplit(':', 1)[1]}"})
        rec = reg.join(body)
        ctl.events.add("info", f"node {rec.id} joined from {rec.address}: {rec.device_kind} ({rec.device_name}), "
                       f"{rec.free_memory_bytes / 2**30:.1f} GiB free, decode {rec.decode_ms:.2f} ms over "
                       f"{len(rec.profile.unit_names)} units"
                       f"{' (cached)' if rec.cached else ''}")  # fmt: skip
        return {"ok": True, "heartbeat_s": reg.heartbeat_s}

    @router.post("/noodle/cluster/heartbeat")
    async def heartbeat(body: Heartbeat, request: Request) -> dict[str, Any]:
        check(request)
        if not ctl.registry.heartbeat(body):
            raise ApiError(404, f"id: node {body.id!r} is not joined (or was declared dead); join again",
                           param="id", code="not_joined")  # fmt: skip
        return {"ok": True}

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
        data = cluster_spec(records, ctl.model_dir, concurrency=ctl.concurrency,
                            links=ctl.registry.links.measurements(mode=links))
        head = "# measured by noodle serve --cluster; solve with `noodle solve FILE`\n"
        return PlainTextResponse(head + yaml.safe_dump(data, sort_keys=False), media_type="application/yaml")

    return router
