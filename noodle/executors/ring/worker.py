"""The rank side of the ring: join the world, load one stage, serve it until ``SHUTDOWN``.

:func:`run_worker` is what ``noodle worker --backend torchrpc`` and the processes the
coordinator spawns run. A worker takes each message from the previous rank, does what its
:class:`~noodle.executors.ring.wire.RingHeader` asks (``LOAD`` its units; ``STEP`` a session,
or a packed step of many sequences named by their chunk table, each sequence ``s<id>``;
``END`` a session or one sequence; ``PING``), writes its own slot (arrival and departure on
its monotonic clock, KV-cache bytes, bytes sent on) and passes the message on, so the
coordinator learns every stage's compute time and every hop's transit from the one message
that comes back. A stage that fails (a malformed chunk table included) turns the message into
an ``ERROR`` carrying its traceback and the rest of the ring passes it on: the coordinator
re-raises it, and the ring stays in step.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from noodle.errors import ExecutorError, SpecError
from noodle.executors.devices import make_stage, parse_device, warm_up
from noodle.executors.messages import SeqChunk, StageInput
from noodle.executors.ring.transport import Ring, open_ring, payload_bytes, short_error, world_from_env
from noodle.executors.ring.wire import Flag, Op, RingHeader, StepSlot, WireChunk, units_hash
from noodle.executors.slicing import unit_names_of

__all__ = ["run_worker"]


def _report_lost(ring: Ring, text: str) -> None:
    head = ring.header(Op.ERROR, rank=ring.prev, lost=True)  # a peer was lost, not a stage error
    try:  # the next rank may be gone or have given up too: do not wait for it long
        ring.send_error(head, text, ring.next, timeout_s=5.0)
    except RuntimeError:
        pass


def _stage_input(head: RingHeader, data: torch.Tensor, mask: torch.Tensor | None,
                 chunks: tuple[WireChunk, ...]) -> StageInput:  # fmt: skip
    """The :class:`StageInput` a ``STEP`` carries: one session's step, or a packed step of many sequences."""
    flags = head.flags
    if not chunks:
        return StageInput(f"s{head.session}", data, mask, bool(flags & Flag.PREFILL), bool(flags & Flag.ALL_LOGITS))
    seqs = tuple(SeqChunk(f"s{c.seq}", c.tokens, c.start, c.logits) for c in chunks)
    return StageInput(f"b{head.session}", data, None, seqs=seqs, exact=bool(flags & Flag.EXACT))


def _parent_watch(parent: int) -> None:
    """Exit when the spawning coordinator is gone (spawned workers only)."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(3)
        except PermissionError:
            pass


def run_worker(model_dir: str | Path, *, device: str = "cpu", backend: str = "gloo", timeout_s: float = 1800.0,
               host: str | None = None, threads: int = 0, join: tuple[str, int, int, int] | None = None,
               parent_pid: int | None = None) -> int:  # fmt: skip
    """Join the world, serve one stage until ``SHUTDOWN``; returns an exit code.

    ``join`` is ``(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)``, read from the environment
    when not given; ``parent_pid`` makes a spawned worker exit when its coordinator is gone.
    """
    if threads:
        torch.set_num_threads(threads)
    if parent_pid:
        threading.Thread(target=_parent_watch, args=(parent_pid,), daemon=True).start()
    addr, port, rank, world = join or world_from_env()
    if rank == 0:
        raise SpecError("torchrpc worker: RANK 0 is the coordinator (`noodle exec --backend torchrpc`); workers are 1..N")
    dev = parse_device(device, field="--device")
    comm = dev if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # workers are never the store's master, under torchrun (agent store) or not
    tcp = dist.TCPStore(addr, port, world, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    store = dist.PrefixStore("noodle", tcp)
    units = unit_names_of(model_dir)
    store.set(f"ready/{rank}", str(os.getpid()))
    inline = int(store.get("inline_bytes"))  # set by the coordinator: one decode step of the planned batch
    ring = open_ring(store, rank, world, backend, timeout_s, host, comm, inline)
    k = rank - 1
    stage = None
    while True:
        try:
            head, buf = ring.recv(ring.prev)
        except RuntimeError as exc:  # the previous rank is gone: say so downstream if we can, then leave
            _report_lost(ring, f"rank {rank} lost its connection to rank {ring.prev} ({short_error(exc)})")
            return 4
        except SpecError as exc:  # a header this worker cannot read: the ring is out of step
            ring.send_error(ring.header(Op.ERROR, rank=rank), f"rank {rank} (stage {k}): {exc}", ring.next)
            continue
        if head.op == Op.ERROR:
            ring.forward_error(head, buf, ring.prev, ring.next)
            continue
        if head.op == Op.SHUTDOWN:
            ring.send(head, ring.next)
            return 0
        try:
            if head.op == Op.STEP:
                try:
                    data, mask, chunks = ring.recv_data(head, buf, ring.prev)
                except RuntimeError as exc:  # the previous rank went away in the middle of the message
                    _report_lost(ring, f"rank {rank} lost its connection to rank {ring.prev} ({short_error(exc)})")
                    return 4
                if stage is None:
                    raise ExecutorError(f"rank {rank}: a step arrived before its stage was loaded")
                flags = head.flags
                msg = _stage_input(head, data, mask, chunks)
                t_in = time.monotonic_ns()
                out = stage.step(msg)
                result = out.data
                if flags & Flag.TOP1 and out.is_logits:
                    result = result[:, -1, :].argmax(dim=-1)
                elif out.is_logits:
                    flags |= Flag.LOGITS
                kv_bytes = sum(stage.cache_bytes(c.seq) for c in msg.seqs) if chunks else stage.cache_bytes(msg.session)
                t_out = time.monotonic_ns()
                nxt = ring.next
                size = ring.msg_bytes + payload_bytes(ring, result, mask if nxt != 0 else None, len(chunks))
                head = replace(head, flags=flags).with_slot(k, StepSlot(t_in, t_out, kv_bytes, size))
                ring.send_data(head, result if comm.type == "cuda" else result.cpu(), mask, nxt, chunks)
            elif head.op == Op.END:
                if stage is not None:
                    stage.end_session(f"s{head.session}")
                ring.send(head, ring.next)
            elif head.op == Op.PING:
                held = sum(stage.cache_bytes(s) for s in stage.sessions()) if stage is not None else 0
                ring.send(head.with_slot(k, StepSlot(t_in=time.monotonic_ns(), kv_bytes=held)), ring.next)
            elif head.op == Op.LOAD:
                if head.units_hash != units_hash(units):
                    raise SpecError(
                        f"rank {rank}: the model at {model_dir} has other units than the plan "
                        f"({len(units)} units); start the worker with the plan's model folder"
                    )
                want = head.load_slot(k)
                stage_dev = dev if want.device < 0 else parse_device(f"cuda:{want.device}", field="plan device")
                stage = make_stage(model_dir, want.start, want.end, name=f"rank{rank}", device=stage_dev,
                                   format=want.format_name)  # fmt: skip
                warm_up(stage)
                ring.send(head.with_slot(k, replace(want, param_bytes=stage.param_bytes())), ring.next)
            else:
                raise ExecutorError(f"rank {rank}: unexpected operation {head.op.name} in a header")
        except Exception:  # noqa: BLE001 - travels to the coordinator with its traceback
            try:
                ring.send_error(replace(head, rank=rank), f"rank {rank} (stage {k}):\n{traceback.format_exc()}", ring.next)
            except RuntimeError:  # the next rank is gone (it failed our send too): its successor reports it
                return 4
