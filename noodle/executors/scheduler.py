"""The grouped engine: requests admitted in fixed groups, every stage busy.

:class:`Pipeline` (on :class:`~noodle.executors.pipecore.PipelineCore`'s lane threads and
scheduler thread) admits requests in *groups* (up to ``micro_batch`` requests, left-padded into
one batch, one KV-cache session per stage) while fewer than ``concurrency`` groups are in
flight and the stages' KV budget holds their context. A group's step walks the lanes in
order; while lane ``k`` runs group ``g``, lane ``k+1`` runs group ``g-1``. When the last
lane returns a group's logits, the scheduler samples each row with its request's own
seeded sampler and sends the group's next step, or ends the group: an end marker walks
the lanes behind its last step and frees its KV cache on each stage at once.

Chunked prefill cuts a prompt into ``prefill_chunk``-token pieces sent back to back, so
lane 1 starts chunk 2 while lane 2 runs chunk 1 and other groups' decode steps interleave.

Tokens stay exact: a group of one request is the same computation as ``generate`` on
that prompt alone, whatever else is in flight (each lane keeps one KV cache per session).
The continuous-batching engine is :mod:`noodle.executors.batching`.
"""

from __future__ import annotations

import time

import torch

from noodle.executors.generation import left_pad
from noodle.executors.messages import StageInput
from noodle.executors.pipecore import PipelineCore
from noodle.executors.requests import (
    Completion,
    Lane,
    LaneStats,
    PipelineStats,
    QueueFull,
    RequestHandle,
    _End,
    _Group,
    _Request,
    _Step,
)
from noodle.graph.costmodel import pipeline_tokens_per_s as predicted_tokens_per_s

__all__ = [
    "Lane",
    "Pipeline",
    "RequestHandle",
    "Completion",
    "LaneStats",
    "PipelineStats",
    "QueueFull",
    "predicted_tokens_per_s",
]


class Pipeline(PipelineCore):
    """Fixed groups of ``micro_batch`` requests, each its own KV session (see the module docstring).

    Args: as :class:`~noodle.executors.pipecore.PipelineCore`.
    """

    @property
    def batching(self) -> str:
        """The engine's mode (:func:`noodle.executors.batching.make_pipeline`): fixed groups here."""
        return "groups"

    def _admit(self) -> None:
        while self._waiting and len(self._groups) < self.concurrency:
            with self._lock:
                batch: list[_Request] = []
                while self._waiting and len(batch) < self.micro_batch:
                    cand = self._waiting[0]
                    width = max([len(r.prompt) for r in batch] + [len(cand.prompt)])
                    longest = max([r.max_new_tokens for r in batch] + [cand.max_new_tokens])
                    need = (len(batch) + 1) * (width + longest)
                    if self._kv_cap is not None and self._reserved + need > self._kv_cap:
                        break  # waits until a group ends and frees its KV
                    batch.append(self._waiting.popleft())
                if not batch:
                    return
                width = max(len(r.prompt) for r in batch)
                longest = max(r.max_new_tokens for r in batch)
                gid = next(self._gids)
                ids, mask = left_pad([r.prompt for r in batch], self.pad_token_id)
                group = _Group(gid, f"g{gid}-{batch[0].rid}", batch, mask, len(batch) * (width + longest))
                self._reserved += group.reserved_tokens
                self._groups[gid] = group
                self._peak = max(self._peak, sum(len(g.requests) for g in self._groups.values()))
            now = time.monotonic()
            for r in batch:
                r.t_admit = now
            self._send_prefill(group, ids)

    def _send_prefill(self, group: _Group, ids: torch.Tensor) -> None:
        width = ids.shape[1]
        chunk = self.prefill_chunk or width
        starts = list(range(0, width, chunk))
        for n, lo in enumerate(starts):
            hi = min(width, lo + chunk)
            part_mask = None if group.mask is None else group.mask[:, lo:hi]
            msg = StageInput(group.session, ids[:, lo:hi], part_mask, prefill=(n == 0))
            self._queues[0].put(_Step(group.gid, msg, final=(n == len(starts) - 1)))

    def _on_logits(self, gid: int, logits: torch.Tensor) -> None:
        group = self._groups.get(gid)
        if group is None:
            return
        group.steps += 1
        now = time.monotonic()
        nxt = torch.full((len(group.requests),), self.pad_token_id, dtype=torch.long)
        for row, req in enumerate(group.requests):
            if req.finish is not None:
                continue
            token = int(req.sampler(logits[row : row + 1])[0])
            nxt[row] = token
            req.tokens.append(token)
            req.stamps.append(now)
            with self._lock:
                self._tokens += 1
                self._token_times.append(now)
            self._call(req.on_token, req.sampler.emitted(token), req)
            if token in self._eos:
                req.finish = "stop"
            elif len(req.tokens) >= req.max_new_tokens:
                req.finish = "length"
        if all(r.finish is not None for r in group.requests):
            self._end_group(group)
            return
        step_mask = None if group.mask is None else torch.ones(len(group.requests), 1, dtype=torch.long)
        msg = StageInput(group.session, nxt.unsqueeze(-1), step_mask, prefill=False)
        self._queues[0].put(_Step(gid, msg, final=True, decode=True))

    def _cancel(self, rid: str) -> None:
        with self._lock:
            req = self._by_rid.get(rid)
            if req is None or req.finish is not None:
                return
            if req in self._waiting:
                self._waiting.remove(req)
                req.finish = "cancelled"
                queued = True
            else:
                queued = False
        if not queued:
            req.finish = "cancelled"  # its row is padded from the next step on; the group frees its KV when it ends
        self._finish(req)

    def _fail_group(self, gid: int, text: str) -> None:
        group = self._groups.get(gid)
        if group is None:
            return
        for req in group.requests:
            if req.finish is None:
                req.finish, req.error = "error", text
        self._end_group(group)

    def _end_group(self, group: _Group) -> None:
        with self._lock:
            self._groups.pop(group.gid, None)
            self._reserved -= group.reserved_tokens
        self._queues[0].put(_End(group.session))
        for req in group.requests:
            self._finish(req)

    def _fail_everything(self, text: str) -> None:
        self._cancel_waiting(text)
        for group in list(self._groups.values()):
            for req in group.requests:
                if req.finish is None:
                    req.finish, req.error = "cancelled", text
            self._end_group(group)
