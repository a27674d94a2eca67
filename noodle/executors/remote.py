"""What the distributed coordinators share: surrogate logits, unit labels, step traces from timestamps.

Greedy runs without ``keep_logits`` get only the argmax token ids back from the
last stage; :func:`one_hot_logits` turns them into logits whose argmax is that
token, which is all :func:`noodle.executors.generation.generate`'s greedy
sampler looks at. :func:`star_trace` (gRPC: every stage called by the
coordinator) and :func:`ring_trace` (torchrpc: stage to stage) turn one step's
timestamps, already mapped onto the coordinator's clock, into a
:class:`~noodle.executors.netreport.StepTrace`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from noodle.errors import ExecutorError
from noodle.executors.netreport import StepTrace
from noodle.plandoc import PlanDoc

__all__ = ["one_hot_logits", "units_label", "Call", "star_trace", "ring_trace", "ring_offsets"]


def one_hot_logits(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(batch, vocab)`` logits: 0 at each row's token id, ``-inf`` elsewhere."""
    logits = torch.full((ids.shape[0], vocab_size), float("-inf"))
    return logits.scatter_(1, ids.view(-1, 1).to(torch.long), 0.0)


def units_label(plan: PlanDoc, index: int) -> str:
    """``"block.1..block.2"`` for a stage of several units, the unit's name for one."""
    st = plan.stages[index]
    names = plan.units[st.start : st.end]
    return f"{names[0]}..{names[-1]}" if len(names) > 1 else names[0]


@dataclass
class Call:
    """One stage call of a star step (times in ns on the coordinator's clock, sizes in bytes)."""

    reply: Any
    t_in: int  # the worker started computing
    t_out: int  # the worker finished computing
    enc: int  # coordinator: building the request
    dec: int  # coordinator: decoding the reply (last stage only; relayed bytes are not decoded)
    w_dec: int  # worker: request bytes -> tensors
    w_enc: int  # worker: output -> bytes
    req_bytes: int
    rep_bytes: int
    rtt: int  # the call's round trip minus the worker's compute


def star_trace(prefill: bool, start: int, done: int, calls: Sequence[Call], peers: Sequence[str]) -> StepTrace:
    """A step in which the coordinator called each stage in turn and relayed outputs."""
    if not calls:
        raise ExecutorError("star_trace: a step with no stage calls has no trace")
    tr = StepTrace(prefill=prefill, step_ms=(done - start) / 1e6)
    tr.compute_ms = [(c.t_out - c.t_in) / 1e6 for c in calls]
    ready = start
    for k, c in enumerate(calls):
        prev = calls[k - 1] if k else None
        tr.transit_ms.append((c.t_in - ready) / 1e6)
        tr.bytes.append(c.req_bytes + (prev.rep_bytes if prev else 0))
        tr.serialize_ms.append((c.enc + c.w_dec + (prev.w_enc if prev else 0)) / 1e6)
        ready = c.t_out
    last = calls[-1]
    tr.transit_ms.append((done - last.t_out) / 1e6)
    tr.bytes.append(last.rep_bytes)
    tr.serialize_ms.append((last.w_enc + last.dec) / 1e6)
    tr.rtt_ms = {peer: c.rtt / 1e6 for peer, c in zip(peers, calls)}
    return tr


def ring_trace(prefill: bool, start: int, done: int, t_in: Sequence[int], t_out: Sequence[int],
               sent: Sequence[int]) -> StepTrace:  # fmt: skip
    """A step that went round the ring; ``sent[k]`` is what hop ``k`` carried (``len(t_in) + 1`` hops)."""
    tr = StepTrace(prefill=prefill, step_ms=(done - start) / 1e6)
    tr.compute_ms = [(b - a) / 1e6 for a, b in zip(t_in, t_out)]
    tr.transit_ms = [(b - a) / 1e6 for a, b in zip([start, *t_out], [*t_in, done])]
    tr.bytes = list(sent)
    tr.serialize_ms = [0.0] * len(tr.transit_ms)  # raw tensors: nothing is serialized
    tr.rtt_ms = {"ring": (done - start) / 1e6 - sum(tr.compute_ms)}
    return tr


def ring_offsets(sent: int, back: int, stamps: Sequence[int]) -> list[int]:
    """Clock offsets of the stages of a ring from one ping: ``stamps[k]`` is stage ``k``'s clock as it passed.

    With ``S`` stages the ping made ``S + 1`` hops; assuming they took equally long,
    stage ``k`` saw it at ``sent + (k + 1) / (S + 1) * (back - sent)`` on the
    coordinator's clock. The error is at most the ring's round trip, against the
    hours that separate the monotonic clocks of two machines.
    """
    hops = len(stamps) + 1
    return [stamp - (sent + (k + 1) * (back - sent) // hops) for k, stamp in enumerate(stamps)]
