"""``noodle serve --cluster``: plan over the workers that joined, and re-plan on leave, join and trouble.

:class:`ClusterController` owns the :class:`~noodle.serve.registry.ClusterRegistry` and the
:class:`~noodle.serve.switching.SwitchingPipeline` the runtime serves from. Its opener (what
:class:`~noodle.serve.runtime.Runtime` calls at start-up) waits for ``min_workers`` joined
workers, solves their spec (:func:`~noodle.serve.registry.cluster_spec`) and opens a grpc
executor on the plan; joined workers the plan leaves out are the executor's spares.

A background thread then watches the registry (every ``tick_s``):

* a node the plan uses died (missed heartbeats), or a request failed beyond the executor's
  own failover: re-plan over the live nodes at once;
* the set of nodes changed otherwise (a join), or a stage drifted: solve again, and switch
  only when :func:`~noodle.serve.migration.weigh` says it pays: the new plan's predicted
  tokens/s beats the current layout's (re-evaluated with the fresh figures) by more than
  ``gain_threshold`` (default 10 %), and the extra tokens over ``horizon_s`` pay for moving the
  units that change node (their bytes over the link, plus the hold the last switch measured).
  A join is weighed once the last re-plan is ``cooldown_s`` old (hysteresis: a change that does
  not pay is recorded once and not re-examined until the nodes change again).

Every re-plan is an entry in :attr:`ClusterController.replans` and an event on the status page
with its reason, before/after predicted tokens/s and how long requests were held.

The engine runs ``batching`` (``auto``: continuous batching where the workers take packed steps, as
every current worker does); under continuous batching the plan is priced for ``streams = concurrency``
(the batched pipeline's tokens/s, :mod:`noodle.graph.costmodel`), under ``groups``/``exact`` for
``concurrency`` groups of one sequence. Drift compares each stage's steps at the plan's step batch
(:mod:`noodle.serve.drift`).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from noodle.errors import ExecutorError, NoodleError
from noodle.models.card import ModelCard, read_card
from noodle.plandoc import PlanDoc, plan_document
from noodle.serve.drift import PredictionWatch, StageError, StageWindow, fresh_window
from noodle.serve.metrics import predicted_tps
from noodle.serve.migration import Verdict, layout_under, switch_cost, weigh
from noodle.serve.planning import plans_streams
from noodle.serve.registry import PLAN_BATCH, ClusterRegistry, WorkerRecord, cluster_spec, table_ms
from noodle.serve.switching import LivePlan, SwitchingPipeline

__all__ = ["ClusterController", "predicted_tps", "plan_layout"]

log = logging.getLogger(__name__)
CONNECT_S = 2.0  # how long a re-plan's executor retries a worker's first health check
CLOSE_S = 5.0  # how long close() waits for the watcher, the link prober and the join verifier together


def plan_layout(plan: PlanDoc | None) -> str:
    if plan is None:
        return "none"
    return ", ".join(f"{s.node}[{s.start}:{s.end})" for s in plan.stages)


def change_reason(changes: list[str], alive: int) -> str:
    """A re-plan's reason from the registry's changes: ``nodes changed: 4 live (w4 joined)``, or ``links
    re-measured: ...`` when only links moved."""
    links = [c for c in changes if c.startswith("link ")]
    if changes and len(links) == len(changes):
        shown = ", ".join(c.removeprefix("link ").removesuffix(" measured") for c in links[-3:])
        return f"links re-measured: {shown}" + (f" (+{len(links) - 3} more)" if len(links) > 3 else "")
    nodes = [c for c in changes if not c.startswith("link ")]
    return f"nodes changed: {alive} live" + (f" ({', '.join(nodes[-4:])})" if nodes else "")


class ClusterController:
    """Plans and re-plans ``noodle serve`` over joined workers (see the module docstring)."""

    def __init__(self, registry: ClusterRegistry, model: Path | ModelCard, events: Any, *, token: str | None,
                 concurrency: int = 8, max_queue: int = 64, min_workers: int = 1, gain_threshold: float = 0.10,
                 cooldown_s: float = 5.0, drain_s: float = 10.0, tick_s: float = 0.25,
                 solve_time_limit_s: float = 5.0, drift_threshold: float = 0.15, horizon_s: float = 120.0,
                 batching: str = "auto", max_batch_tokens: int = 256) -> None:  # fmt: skip
        self.registry = registry
        self.card = model if isinstance(model, ModelCard) else read_card(model)  # the folder is read once
        self.model_dir = self.card.folder
        self.events = events
        self.token = token
        self.concurrency = concurrency
        self.batching = batching
        self.max_batch_tokens = max_batch_tokens
        self.continuous = plans_streams(batching)  # plans for streams = concurrency
        self.units: tuple[Any, ...] | None = None  # the model's units (batch curves) of the last problem built
        self.min_workers = min_workers
        self.gain_threshold = gain_threshold
        self.cooldown_s = cooldown_s
        self.drain_s = drain_s
        self.tick_s = tick_s
        self.solve_time_limit_s = solve_time_limit_s
        self.horizon_s = horizon_s
        self.plan = LivePlan()
        self.pipeline = SwitchingPipeline(max_queue=max_queue, on_trouble=self._on_trouble)
        self.replans: list[dict[str, Any]] = []
        self.on_plan = lambda plan: None  # the app refreshes what it shows
        self._trouble: str | None = None
        self._considered = -1
        self._last_switch = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.drift = PredictionWatch(threshold=drift_threshold)
        self._drift_checked = 0.0
        self.prober: Any = None  # a noodle.serve.linkprobe.LinkProber, closed with the controller
        self.verifier: Any = None  # a noodle.serve.verify.JoinVerifier (None: joins are planned as claimed)
        self._fed: tuple[Any, dict[int, int]] = (None, {})  # (executor, decode steps already fed per stage)

    # -- start-up (the runtime's opener) ------------------------------------------------------------
    def opener(self) -> tuple[Any, Any]:
        """Wait for ``min_workers``, plan, open; then start watching. Returns (executor, pipeline) for the runtime."""
        announced = False
        while self.registry.alive_count() < self.min_workers:
            if not announced:
                self.events.add("info", f"waiting for {self.min_workers} worker(s) to join (`noodle worker --join`)")
                announced = True
            if self._stop.wait(0.1):
                raise ExecutorError("the server stopped before enough workers joined")
        while True:
            self.registry.reap()
            try:
                self._replan("start", force=True)
                self.registry.take_changes()  # the joins the first plan already covers
                break
            except NoodleError as exc:
                self.events.add("warning", f"first plan failed ({exc}); retrying")
                if self._stop.wait(1.0):
                    raise
        self._thread = threading.Thread(target=self._loop, name="noodle-cluster", daemon=True)
        self._thread.start()
        return self.pipeline, self.pipeline

    def unavailable(self) -> tuple[str, int] | None:
        """Why requests cannot be served now (no live worker), with the seconds to retry after; None: they can."""
        if self.registry.alive_count() > 0:
            return None
        return (f"no live worker: all {len(self.registry.records())} joined worker(s) missed heartbeats; requests "
                "are refused until one joins (`noodle worker --join`)", max(1, round(self.registry.heartbeat_s * 2)))

    def close(self) -> None:
        """Stop waiting for workers (the opener raises), the watcher thread, the link prober and the join
        verifier; idempotent."""
        self._stop.set()
        # the helpers close side by side, on daemon threads: a probe stuck on a worker that hangs holds none of it
        closers = [threading.Thread(target=h.close, daemon=True) for h in (self.prober, self.verifier) if h is not None]
        for c in closers:
            c.start()
        deadline = time.monotonic() + CLOSE_S
        for t in [*closers, *([self._thread] if self._thread is not None else [])]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- planning -----------------------------------------------------------------------------------
    def problem(self, records: list[WorkerRecord]) -> Any:
        """The planning problem the live records make (their measured figures, as ``noodle cluster export
        --links relay``: the grpc executor this coordinator runs relays every hop through itself)."""
        from noodle.spec import parse_spec

        data = cluster_spec(records, self.card, concurrency=self.concurrency, continuous=self.continuous,
                            time_limit_s=self.solve_time_limit_s, links=self.registry.links.measurements(mode="relay"))
        spec = parse_spec(data, source="noodle serve --cluster")
        # the spec names the card's config.json; its object is passed along, so a re-plan reads no file
        problem = spec.to_problem(self.model_dir, source="noodle serve --cluster", hf_config=self.card.config)
        self.units = problem.units
        return problem

    def solve(self, records: list[WorkerRecord]) -> PlanDoc:
        from noodle.solvers import solve

        problem = self.problem(records)
        result = solve(problem, solver="auto", time_limit_s=self.solve_time_limit_s)
        return plan_document(problem, result)

    def _open(self, plan: PlanDoc, records: list[WorkerRecord]) -> tuple[Any, Any]:
        from noodle.executors.grpc.coordinator import GrpcExecutor

        used = {s.node for s in plan.stages}
        workers = {r.id: r.address for r in records}
        spares = [r.address for r in records if r.id not in used]
        ex = GrpcExecutor(plan, self.card, workers=workers, spares=spares, token=self.token,
                          log=lambda line: self.events.add("warning", line))  # fmt: skip
        ex.policy = dataclasses.replace(ex.policy, connect_s=CONNECT_S)  # they answered a heartbeat just now
        ex.__enter__()
        try:
            pipe = ex.pipeline(concurrency=self.concurrency, max_queue=self.pipeline.max_queue, batching=self.batching,
                               max_batch_tokens=self.max_batch_tokens)  # fmt: skip
        except BaseException:
            ex.__exit__(None, None, None)
            raise
        if self.continuous and pipe.batching != "continuous":
            self.events.add("warning", f"the plan is priced for continuous batching of {self.concurrency} streams, "
                                       f"but the workers step {pipe.batching} (a worker without packed steps): "
                                       "its predicted tokens/s is optimistic")  # fmt: skip
        return ex, pipe

    def _replan(self, reason: str, *, force: bool = False, plan: PlanDoc | None = None,
                t_cause: float | None = None) -> bool:  # fmt: skip
        version = self.registry.version
        records = self.registry.records(alive_only=True)
        if not records:
            failed = self.pipeline.fail_waiting(f"no live worker is left to finish this request ({reason}); retry "
                                                "when a worker has joined (`noodle worker --join`)")  # fmt: skip
            self.events.add("warning", f"re-plan ({reason}): no live worker; {failed} waiting request(s) ended with "
                                       "an error, new ones are refused (503) until a worker joins")  # fmt: skip
            return False
        before = self.plan.current
        t0 = time.time()
        new = plan or self.solve(records)
        verdict = None if force or before is None else self._weigh(records, before, new)
        if verdict is not None and not verdict.switch:
            self.events.add("info", f"{reason}: {verdict.why}: keeping {plan_layout(before)}")
            return False
        times = self.pipeline.switch_to(lambda: self._open(new, records), drain_s=self.drain_s)
        done = time.time()
        self.plan.current = new
        self.drift.reset()
        self._last_switch = time.monotonic()
        self._considered = version
        entry = {"t": done, "reason": reason, "before_tps": predicted_tps(before), "after_tps": predicted_tps(new),
                 "before": plan_layout(before), "after": plan_layout(new), "seconds": done - t0,
                 "since_cause_s": None if t_cause is None else done - t_cause, **times}  # fmt: skip
        if verdict is not None:
            entry.update(current_tps=verdict.current_tps, moved_units=len(verdict.cost.moved_units),
                         moved_bytes=verdict.cost.moved_bytes, move_estimate_s=verdict.cost.seconds)  # fmt: skip
        self.replans.append(entry)
        self.on_plan(new)
        self.events.add("info" if reason == "start" else "warning",
                        f"re-plan ({reason}): {entry['before_tps']:.1f} -> {entry['after_tps']:.1f} predicted tokens/s; "
                        f"{entry['before']} -> {entry['after']}; serving again after {entry['seconds']:.2f} s "
                        f"(drain {times['drain_s']:.2f}, close {times['close_s']:.2f}, open {times['open_s']:.2f})")  # fmt: skip
        return True

    def _weigh(self, records: list[WorkerRecord], before: PlanDoc, new: PlanDoc) -> Verdict:
        """Does switching from ``before`` to ``new`` pay? (:mod:`noodle.serve.migration`, fresh figures for both.)"""
        problem = self.problem(records)
        current = layout_under(problem, before)
        last = self.replans[-1] if self.replans else {}
        hold_s = float(last.get("drain_s", 0.0) + last.get("close_s", 0.0) + last.get("open_s", 1.0))
        cost = switch_cost(before, new, [u.param_bytes for u in problem.units],
                           bandwidth_gbps=problem.cluster.default_link.bandwidth_gbps, hold_s=hold_s)  # fmt: skip
        return weigh(predicted_tps(current), predicted_tps(new), cost, threshold=self.gain_threshold,
                     horizon_s=self.horizon_s)  # fmt: skip

    def _probe(self) -> None:
        """Mark dead every live node whose gRPC port refuses a connection (faster than missed heartbeats)."""
        for r in self.registry.records(alive_only=True):
            host, _, port = r.address.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                    pass
            except OSError as exc:
                self.registry.mark_dead(r.id)
                self.events.add("warning", f"node {r.id} does not answer at {r.address} ({exc.strerror or exc}): "
                                           "declared dead")  # fmt: skip

    def _on_trouble(self, text: str) -> None:
        self._trouble = text
        self.registry.changed.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.registry.changed.wait(self.tick_s)
            self.registry.changed.clear()
            if self._stop.is_set():
                return
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - the watcher must survive a failed re-plan; it retries
                self.events.add("warning", f"re-plan failed: {type(exc).__name__}: {exc}; retrying")
                self._trouble = self._trouble or str(exc)
                self._stop.wait(1.0)

    def _tick(self) -> None:
        dead = self.registry.reap()
        for nid in dead:
            self.events.add("warning", f"node {nid} missed heartbeats for {self.registry.heartbeat_timeout_s:g} s: "
                                       "declared dead")  # fmt: skip
        current = self.plan.current
        alive = {r.id for r in self.registry.records(alive_only=True)}
        lost = sorted({s.node for s in current.stages} - alive) if current is not None else []
        if self._trouble is not None and not lost:
            self._probe()
            alive = {r.id for r in self.registry.records(alive_only=True)}
            lost = sorted({s.node for s in current.stages} - alive) if current is not None else []
        if lost or self._trouble is not None:
            reason = f"node {', '.join(lost)} left" if lost else f"requests failed: {self._trouble}"
            cause = min((r.last_heartbeat for r in self.registry.records() if r.id in lost), default=None)
            self._trouble = None
            self._replan(reason, force=True, t_cause=cause)
            return
        if self.registry.version != self._considered and time.monotonic() - self._last_switch >= self.cooldown_s:
            self._considered = self.registry.version
            newest = max(self.registry.records(alive_only=True), key=lambda r: r.joined_at, default=None)
            self._replan(change_reason(self.registry.take_changes(), len(alive)),
                         t_cause=newest.joined_at if newest else None)  # fmt: skip
            return
        if time.monotonic() - self._drift_checked >= 1.0 and self.plan.current is not None:
            self._drift_checked = time.monotonic()
            self._feedback(self.plan.current)

    def _windows(self, plan: PlanDoc) -> list[StageWindow]:
        """Each stage's fresh window of decode steps: the median of its worker's own compute time (ms), each step
        brought to the plan's step batch along the node's join-time batch curve (see :mod:`noodle.serve.drift`)."""
        ex = self.pipeline.executor
        if self._fed[0] is not ex:
            self._fed = (ex, {})
        seen = self._fed[1]
        lanes = list(getattr(ex, "_lanes", ()) or ())[-len(plan.stages):]
        recs = {r.id: r for r in self.registry.records()}
        ref = plan.predicted.step_batch or PLAN_BATCH
        out = []
        for i, (stage, lane) in enumerate(zip(plan.stages, lanes)):
            total = int(getattr(lane, "decode_steps", 0))
            window = fresh_window(list(getattr(lane, "decode_log", ())), total, seen.get(i, 0), self.drift.min_steps)
            rec = recs.get(stage.node)
            if window is None or rec is None:
                continue
            seen[i] = total
            tables = {b: table_ms(rec, stage.start, stage.end, b, self.units) for b in {ref, *(b for _, b in window)}}
            at_ref = [ms * tables[ref] / tables[b] if tables[b] > 0 else ms for ms, b in window]
            out.append(StageWindow(i, stage.node, stage.start, stage.end, statistics.median(at_ref),
                                   float(stage.compute_ms), tables[ref], ref))  # fmt: skip
        return out

    def _feedback(self, plan: PlanDoc) -> None:
        """Feed the stages' measured compute into the cost table; re-solve when a prediction stays off."""
        updates, drifted = self.drift.observe(self._windows(plan), self.registry.factors())
        for (node, start, end), factor in updates.items():
            self.registry.correct(node, start, end, factor)
        if drifted and self.registry.version == self._considered:  # a change of nodes is weighed first, as itself
            self._drift(plan, max(drifted, key=lambda e: abs(e.error)))

    def _repriced(self, plan: PlanDoc) -> PlanDoc:
        """``plan``'s layout with its predictions under the corrected costs (the layout is kept as it is)."""
        return layout_under(self.problem(self.registry.records(alive_only=True)), plan) or plan

    def _drift(self, current: PlanDoc, err: StageError) -> None:
        """A stage of ``current`` (the plan served) computes off its prediction: re-solve with the corrected costs.

        Switch when the layout changes and the new plan beats the served layout, re-priced with the same
        corrections, by more than ``gain_threshold``; otherwise keep the layout with corrected predictions.
        """
        reason = (f"drift: stage {err.index} on {err.node} computes in {err.measured_ms:.3f} ms, predicted "
                  f"{err.predicted_ms:.3f} ms ({err.error:+.0%})")  # fmt: skip
        new = self.solve(self.registry.records(alive_only=True))
        if plan_layout(new) != plan_layout(current) and self._replan(reason, plan=new):
            return  # switched: the move paid (see _weigh)
        kept = self._repriced(current)
        self.events.add("info", f"{reason}; the corrected costs keep {plan_layout(kept)} "
                                f"({predicted_tps(kept):.1f} predicted tokens/s): predictions corrected")  # fmt: skip
        self.plan.current = kept
        self.on_plan(kept)

    # -- what the status page and /metrics show -----------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.time()
        stage_of: dict[str, list[str]] = {}
        for s in self.plan.stages:
            stage_of.setdefault(s.node, []).append(f"{s.stage_id}: units [{s.start}, {s.end})")
        nodes = []
        for r in self.registry.records():
            d = r.as_dict(now)
            d["stages"] = stage_of.get(r.id, [])
            nodes.append(d)
        return {"nodes": nodes, "plan": plan_layout(self.plan.current), "predicted_tps": predicted_tps(self.plan.current),
                "heartbeat_timeout_s": self.registry.heartbeat_timeout_s, "replans": list(self.replans),
                "requeued": self.pipeline.requeued, "links": self.registry.links.rows(now),
                "prediction": [e.as_dict() for _, e in sorted(self.drift.errors.items())]}  # fmt: skip


class ClusterCollector(Collector):
    """``noodle_cluster_nodes{state}``, ``noodle_replans_total{reason}``, ``noodle_replan_seconds``, stage errors (the
    plan's rate is the server's ``noodle_plan_predicted_tokens_per_second``, :mod:`noodle.serve.metrics`)."""

    def __init__(self, ctl: ClusterController) -> None:
        self._ctl = ctl

    def collect(self) -> Iterator[Any]:
        recs = self._ctl.registry.records()
        nodes = GaugeMetricFamily("noodle_cluster_nodes", "joined workers by state", labels=["state"])
        nodes.add_metric(["alive"], float(sum(r.alive for r in recs)))
        nodes.add_metric(["dead"], float(sum(not r.alive for r in recs)))
        yield nodes
        replans = CounterMetricFamily("noodle_replans", "plans switched to, by cause", labels=["reason"])
        counts: dict[str, int] = {}
        for e in self._ctl.replans:
            kind = e["reason"].split(" ")[0] if not e["reason"].startswith("node ") else "leave"
            counts[kind] = counts.get(kind, 0) + 1
        for kind, n in counts.items():
            replans.add_metric([kind], float(n))
        yield replans
        last = GaugeMetricFamily("noodle_replan_seconds", "how long the last re-plan held requests")
        last.add_metric([], float(self._ctl.replans[-1]["seconds"]) if self._ctl.replans else 0.0)
        yield last
        err = GaugeMetricFamily("noodle_stage_prediction_error", "measured / predicted stage compute - 1, last window",
                                labels=["stage", "node"])  # fmt: skip
        for i, stage_err in sorted(self._ctl.drift.errors.items()):
            err.add_metric([str(i), stage_err.node], stage_err.error)
        yield err
