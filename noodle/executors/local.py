"""``local``: the reference executor. Every stage of the plan runs in this process.

Stages hand their :class:`~noodle.executors.messages.StageOutput` on as Python
objects (no copy), so what ``local`` measures is the stages' own compute. With
``emulate=True`` it stretches each stage to its planned node (the stage's
measured time divided by the node's ``compute_score``, this machine counting as
1.0) and sleeps each hop for the planned link's latency plus the bytes actually
handed on at its bandwidth.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from noodle.errors import ExecutorError
from noodle.executors.batching import DEFAULT_MAX_BATCH_TOKENS, make_pipeline
from noodle.executors.base import ClosesOnExit, RunReport, RunResult, StageReport, check_formats, check_plan, check_workload, percentile
from noodle.executors.devices import make_stage, stage_devices
from noodle.executors.generation import Sampling, generate, new_session_id, token_ids_of
from noodle.executors.kvbudget import kv_capacity_tokens, max_positions
from noodle.executors.messages import StageInput, StageOutput
from noodle.executors.scheduler import Pipeline
from noodle.executors.slicing import read_config, unit_names_of, weight_index
from noodle.executors.stage import StageRunner
from noodle.plandoc import PlanDoc, StageDoc
from noodle.types import Link

__all__ = ["LocalExecutor", "LocalLane"]


class LocalLane:
    """A stage of this process as a pipeline lane; with ``emulate`` it takes its planned time.

    Emulated, a decode step lasts the plan's ``compute_ms`` for the stage; a prefill (or a
    prefill chunk) lasts ``compute_ms`` times the ratio of its measured time to a decode
    step's measured time on this machine (both taken under the same load, so the load
    cancels); then the hop lasts the planned link's latency plus the bytes handed on at its
    bandwidth. Both are measured from the step's start, so this machine's own speed drops
    out. A step already slower than planned is not shortened (the stats show the overshoot).
    A packed step (continuous batching) is scaled like a prefill: by its measured time over a
    one-sequence decode step's.
    """

    packed_steps = True  # takes continuous batching's packed steps (noodle.executors.batching)

    def __init__(self, stage: StageRunner, doc: StageDoc, *, score: float, hop_ms: Callable[[int], float], emulate: bool,
                 last: bool, decode_ref_s: float | None = None) -> None:  # fmt: skip
        self.stage = stage
        self.doc = doc
        self.name = doc.node
        self.score = score
        self._hop_ms = hop_ms
        self.emulate = emulate
        self.last = last
        self.last_hop_ms = 0.0
        self._decode_dt: deque[float] = deque([decode_ref_s] if decode_ref_s else [], maxlen=64)

    def _planned_s(self, msg: StageInput, dt: float) -> float:
        planned = self.doc.compute_ms / 1e3
        if not msg.prefill and msg.new_tokens == 1 and not msg.seqs:
            self._decode_dt.append(dt)
            return planned
        if self._decode_dt:
            return planned * dt / float(np.median(self._decode_dt))
        return dt / self.score if 0 < self.score < 1.0 else dt

    def run(self, msg: StageInput) -> StageOutput:
        t0 = time.perf_counter()
        out = self.stage.step(msg)
        if not self.emulate:
            return out
        compute_s = self._planned_s(msg, time.perf_counter() - t0)
        sent = 8 * msg.batch_size if self.last else out.nbytes()
        self.last_hop_ms = self._hop_ms(sent)
        wait = t0 + compute_s + self.last_hop_ms / 1e3 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return out

    def end(self, session: str) -> None:
        self.stage.end_session(session)


class LocalExecutor(ClosesOnExit):
    """Runs every stage of ``plan`` in this process.

    Args:
        plan: the plan document (``noodle.plandoc.load_plan``).
        model_dir: the model folder the plan was made for.
        emulate: sleep to stretch stages and hops to the plan's nodes and links.
        log: where to say that it is emulating (the ``noodle.executors.local`` logger by default).
    """

    name = "local"

    def __init__(
        self,
        plan: PlanDoc,
        model_dir: str | Path,
        *,
        emulate: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.model_dir = Path(model_dir)
        self.emulate = emulate
        self._log = log or logging.getLogger(__name__).info
        self.stages: list[StageRunner] = []
        self._decode_ref: list[float] = []
        config = read_config(self.model_dir)
        self.config = config
        weight_index(self.model_dir)  # no weights -> ModelError now, not mid-load
        check_plan(plan, unit_names_of(self.model_dir))
        self._devices, self._device_note = stage_devices([s.device for s in plan.stages])
        check_formats(plan, "local", devices=[d.type for d in self._devices])
        self.eos_token_id, self.pad_token_id = token_ids_of(config)
        self._scores = {n.id: n.compute_score for n in plan.nodes}
        self._links = {frozenset((ln.a, ln.b)): Link(ln.bandwidth_gbps, ln.latency_ms) for ln in plan.links}

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> LocalExecutor:
        if not self.stages:
            if self._device_note:
                self._log(f"noodle: {self._device_note}")
            self.stages = [make_stage(self.model_dir, s.start, s.end, name=s.node, device=dev, format=s.format)
                           for s, dev in zip(self.plan.stages, self._devices)]  # fmt: skip
            self._warm_up()
            if self.emulate:
                self._log(self._emulation_note())
        return self

    def close(self) -> None:
        self.stages = []

    def _warm_up(self) -> None:
        # The first call through a module pays one-off costs (allocator, kernel selection);
        # keep them out of the first prefill's measured time. Emulating, also time a decode step
        # per stage: emulation scales prefills by their measured prefill/decode ratio.
        x = StageInput("warm-up", torch.tensor([[self.pad_token_id]]), None, prefill=True)
        d = StageInput("warm-up", torch.tensor([[self.pad_token_id]]), None, prefill=False)
        self._decode_ref = []
        for stage in self.stages:
            y = stage.step(x)
            if self.emulate:
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    e = stage.step(d)
                    best = min(best, time.perf_counter() - t0)
                self._decode_ref.append(best)
                d = e.next_input(prefill=False)
            stage.end_session("warm-up")
            x = y.next_input(prefill=True)

    # -- emulation -----------------------------------------------------------------------------
    def _emulation_note(self) -> str:
        parts = [f"{s.node} {s.compute_ms:.2f} ms" for s in self.plan.stages]
        faster = [n for n, sc in self._scores.items() if sc > 1.0]
        note = f"; nodes faster than this one ({', '.join(faster)}) cannot beat this machine's speed" if faster else ""
        return (
            "emulating the plan's cluster by sleeping: each decode step lasts its stage's planned compute "
            f"({', '.join(parts)}), prefill its measured time / compute_score; hops sleep their link's "
            f"latency + bytes/bandwidth{note}"
        )

    def _hop_ms(self, i: int, nbytes: int) -> float:
        stages = self.plan.stages
        a = stages[i].node
        b = stages[(i + 1) % len(stages)].node
        link = self._links.get(frozenset((a, b)))
        if link is not None:
            return link.transfer_ms(nbytes)
        return 0.0 if a == b else stages[i].hop_ms

    def _lanes(self) -> list[LocalLane]:
        n = len(self.stages)
        refs: list[float | None] = list(self._decode_ref) or [None] * n  # timed only when emulating
        return [
            LocalLane(stage, doc, score=self._scores.get(doc.node, 1.0), hop_ms=partial(self._hop_ms, i),
                      emulate=self.emulate, last=i == n - 1, decode_ref_s=ref)  # fmt: skip
            for i, (stage, doc, ref) in enumerate(zip(self.stages, self.plan.stages, refs))
        ]

    # -- pipelined --------------------------------------------------------------------------------
    def pipeline(self, *, concurrency: int = 1, micro_batch: int = 1, prefill_chunk: int = 0, max_queue: int = 256,
                 batching: str = "groups", max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> Pipeline:
        """The pipelined engine over this executor's stages (call ``start()``); see :func:`make_pipeline`."""
        if not self.stages:
            raise ExecutorError("local executor: use it as a context manager (`with LocalExecutor(...) as ex:`)")
        lanes = self._lanes()
        elems = [torch.finfo(torch.bfloat16 if s.format == "bfloat16" else s.io_dtype).bits // 8 for s in self.stages]
        caps = kv_capacity_tokens(self.plan, self.config, [s.param_bytes() for s in self.stages],
                                  [len(s.layers) for s in self.stages], elems)  # fmt: skip
        return make_pipeline(
            lanes, batching=batching, max_batch_tokens=max_batch_tokens,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, concurrency=concurrency,
            micro_batch=micro_batch, prefill_chunk=prefill_chunk, max_queue=max_queue, kv_capacity_tokens=caps,
            max_context=max_positions(self.config), planned_ms=[d.expected_latency_ms for d in self.plan.stages],
        )  # fmt: skip

    # -- running -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        keep_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> RunResult:
        """Generate up to ``max_new_tokens`` for each prompt; see :class:`~noodle.executors.base.Executor`."""
        if not self.stages:
            raise ExecutorError("local executor: use it as a context manager (`with LocalExecutor(...) as ex:`)")
        check_workload(self.plan, prompts, max_new_tokens)
        n = len(self.stages)
        compute: list[list[float]] = [[] for _ in range(n)]
        hops: list[list[float]] = [[] for _ in range(n)]
        nbytes: list[list[int]] = [[] for _ in range(n)]
        steps: list[float] = []
        session = new_session_id("local")
        lanes = self._lanes()

        def forward(msg: StageInput) -> torch.Tensor:
            t_step = time.perf_counter()
            x = msg
            for i, lane in enumerate(lanes):
                t0 = time.perf_counter()
                out = lane.run(x)  # emulated: the planned compute, then the planned hop
                hop = lane.last_hop_ms if self.emulate else 0.0
                compute[i].append((time.perf_counter() - t0) * 1e3 - hop)
                nbytes[i].append(out.nbytes() if i < n - 1 else 8 * msg.batch_size)  # last: token ids back
                hops[i].append(hop)
                x = out.next_input(prefill=msg.prefill, all_logits=msg.all_logits)
            steps.append((time.perf_counter() - t_step) * 1e3)
            if on_step is not None:
                on_step(len(steps))
            return out.data[:, -1, :].cpu()

        t0 = time.perf_counter()
        try:
            gen = generate(
                forward,
                prompts,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                session=session,
                keep_logits=keep_logits,
            )
        finally:
            kv = [stage.cache_bytes(session) for stage in self.stages]
            for stage in self.stages:
                stage.end_session(session)
        wall = time.perf_counter() - t0
        report = self._report(prompts, gen.steps, wall, steps, compute, hops, nbytes, kv)
        return RunResult(tokens=gen.tokens, report=report, logits=tuple(gen.logits))

    def _report(
        self,
        prompts: Sequence[Sequence[int]],
        n_steps: int,
        wall: float,
        steps: list[float],
        compute: list[list[float]],
        hops: list[list[float]],
        nbytes: list[list[int]],
        kv: list[int],
    ) -> RunReport:
        batch = len(prompts)
        decode = steps[1:]
        stage_reports = []
        for i, (stage, doc) in enumerate(zip(self.stages, self.plan.stages)):
            dec = compute[i][1:]
            stage_reports.append(
                StageReport(
                    stage_id=doc.stage_id,
                    node=doc.node,
                    start=doc.start,
                    end=doc.end,
                    units=f"{stage.units[0]}..{stage.units[-1]}" if len(stage.units) > 1 else stage.units[0],
                    param_bytes=stage.param_bytes(),
                    kv_cache_bytes=kv[i],
                    prefill_ms=compute[i][0] if compute[i] else 0.0,
                    decode_ms_p50=percentile(dec, 50),
                    decode_ms_p95=percentile(dec, 95),
                    hop_ms_p50=percentile(hops[i][1:], 50),
                    bytes_out=sum(nbytes[i]),
                    bytes_out_per_decode=nbytes[i][-1] if len(nbytes[i]) > 1 else 0,
                    predicted_compute_ms=doc.compute_ms,
                    predicted_latency_ms=doc.expected_latency_ms,
                )
            )
        decode_s = sum(decode) / 1e3
        return RunReport(
            backend=self.name,
            emulated=self.emulate,
            batch_size=batch,
            prompt_tokens=max(len(p) for p in prompts),
            new_tokens=n_steps,
            wall_s=wall,
            prefill_ms=steps[0] if steps else 0.0,
            decode_ms_p50=percentile(decode, 50),
            decode_ms_p95=percentile(decode, 95),
            tokens_per_s=batch * n_steps / wall if wall > 0 else 0.0,
            decode_tokens_per_s=batch * len(decode) / decode_s if decode_s > 0 else 0.0,
            stages=tuple(stage_reports),
            predicted_token_latency_ms=self.plan.predicted.token_latency_ms,
        )
