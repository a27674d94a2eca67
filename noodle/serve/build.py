"""Assemble a server from a model folder and a plan: executor, pipeline opener, limits, runtime, app."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noodle.executors import EXECUTORS
from noodle.models.card import ModelCard, read_card
from noodle.plandoc import PlanDoc
from noodle.serve.app import ModelEntry, ServeApp
from noodle.serve.guard import LOCAL_HOSTS, MAX_REQUEST_BYTES
from noodle.serve.runtime import Limits, Runtime

__all__ = ["build_runtime", "build_server", "build_multi_server", "build_cluster_server"]


def build_server(
    model_dir: Path,
    plan: PlanDoc,
    tokenizer: Any,
    *,
    backend: str = "local",
    backend_options: dict[str, Any] | None = None,
    emulate: bool = False,
    concurrency: int = 8,
    max_queue: int = 64,
    request_timeout_s: float = 300.0,
    drain_timeout_s: float = 30.0,
    api_key: str | None = None,
    model_id: str | None = None,
    batching: str = "auto",
    max_batch_tokens: int = 256,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    hosts: frozenset[str] | None = LOCAL_HOSTS,
    origins: frozenset[str] = frozenset(),
) -> ServeApp:
    """A :class:`ServeApp` whose stages load when the app starts (``/readyz`` turns 200 then).

    The executor is built (and the plan checked against the model) now, so bad input fails
    before the server listens; entering it and starting the pipeline happen on start-up.
    ``batching``: the engine's mode (:func:`noodle.executors.batching.make_pipeline`; ``auto`` batches
    every running sequence in one step per stage where the backend's stages take packed steps).
    """
    runtime = build_runtime(model_dir, plan, tokenizer, backend=backend, backend_options=backend_options,
                            emulate=emulate, concurrency=concurrency, max_queue=max_queue,
                            request_timeout_s=request_timeout_s, batching=batching,
                            max_batch_tokens=max_batch_tokens)  # fmt: skip
    return ServeApp(runtime, plan, model_id=model_id or Path(model_dir).resolve().name, backend=backend,
                    emulate=emulate, api_key=api_key, drain_timeout_s=drain_timeout_s,
                    max_request_bytes=max_request_bytes, hosts=hosts, origins=origins)  # fmt: skip


def build_runtime(model_dir: Path, plan: PlanDoc, tokenizer: Any, *, backend: str = "local",
                  backend_options: dict[str, Any] | None = None, emulate: bool = False, concurrency: int = 8,
                  max_queue: int = 64, request_timeout_s: float = 300.0, batching: str = "auto",
                  max_batch_tokens: int = 256) -> Runtime:  # fmt: skip
    """One model's :class:`Runtime`: its executor is built (the plan checked) now, entered when the app starts."""
    executor = EXECUTORS.get(backend)(plan, model_dir, emulate=emulate, **(backend_options or {}))

    def opener() -> tuple[Any, Any]:
        executor.__enter__()
        try:
            return executor, executor.pipeline(concurrency=concurrency, max_queue=max_queue, batching=batching,
                                               max_batch_tokens=max_batch_tokens)
        except BaseException:
            executor.__exit__(None, None, None)
            raise

    limits, eos_ids = _model_limits(read_card(model_dir))
    return Runtime(opener, tokenizer, limits, eos_ids=eos_ids, request_timeout_s=request_timeout_s)


def build_multi_server(
    models: Sequence[tuple[str, Path, PlanDoc, Any]],
    *,
    concurrency: int = 8,
    max_queue: int = 64,
    request_timeout_s: float = 300.0,
    drain_timeout_s: float = 30.0,
    api_key: str | None = None,
    batching: str = "auto",
    max_batch_tokens: int = 256,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    hosts: frozenset[str] | None = LOCAL_HOSTS,
    origins: frozenset[str] = frozenset(),
) -> ServeApp:
    """A :class:`ServeApp` of several models (``(model_id, folder, plan, tokenizer)``), each on its own ``local``
    executor, engine and scheduler in this process; ``concurrency`` and ``max_queue`` hold for each model."""
    entries = [ModelEntry(name, build_runtime(folder, plan, tok, concurrency=concurrency, max_queue=max_queue,
                                              request_timeout_s=request_timeout_s, batching=batching,
                                              max_batch_tokens=max_batch_tokens), plan)
               for name, folder, plan, tok in models]  # fmt: skip
    first = entries[0]
    return ServeApp(first.runtime, first.plan, model_id=first.model_id, backend="local", api_key=api_key,
                    drain_timeout_s=drain_timeout_s, max_request_bytes=max_request_bytes, hosts=hosts,
                    origins=origins, more_models=entries[1:])  # fmt: skip


def _model_limits(card: ModelCard) -> tuple[Limits, list[int]]:
    """The request limits of the model's context and vocabulary, and its end-of-sequence ids."""
    from noodle.errors import ModelError

    if card.vocab_size is None:
        raise ModelError(f"{card.config_path}: vocab_size: missing; the server bounds token ids with it")
    context = card.context_tokens or 2048
    limits = Limits(prompt_tokens=context - 1, context_tokens=context, vocab_size=card.vocab_size)
    return limits, list(card.eos_ids)


def build_cluster_server(
    model_dir: Path | ModelCard,
    tokenizer: Any,
    *,
    token: str | None,
    min_workers: int = 1,
    gain_threshold: float = 0.10,
    heartbeat_timeout_s: float = 5.0,
    drift_threshold: float = 0.15,
    horizon_s: float = 120.0,
    drain_s: float = 10.0,
    concurrency: int = 8,
    max_queue: int = 64,
    request_timeout_s: float = 300.0,
    drain_timeout_s: float = 30.0,
    api_key: str | None = None,
    model_id: str | None = None,
    probe_interval_s: float = 60.0,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    hosts: frozenset[str] | None = LOCAL_HOSTS,
    origins: frozenset[str] = frozenset(),
    batching: str = "auto",
    max_batch_tokens: int = 256,
    verify_factor: float = 8.0,
) -> ServeApp:
    """A :class:`ServeApp` over workers that join it (``noodle worker --join``); see :mod:`noodle.serve.controller`.

    ``probe_interval_s``: seconds between rounds of link probes (:mod:`noodle.serve.linkprobe`); 0: none.
    ``batching``: the engine's mode, which the plans are priced for (continuous: ``streams = concurrency``).
    ``verify_factor``: how far a stage step timed on a joining worker may be off its table before the table is
    scaled (:mod:`noodle.serve.verify`).
    ``model_dir``: the model folder, or its card (:func:`noodle.models.card.read_card`) when the caller read it
    already: the folder's config is read once and every part below takes the card.
    """
    from noodle.serve.controller import ClusterController
    from noodle.serve.linkprobe import LinkProber, probe_sizes
    from noodle.serve.registry import ClusterRegistry
    from noodle.serve.verify import JoinVerifier

    card = model_dir if isinstance(model_dir, ModelCard) else read_card(model_dir)
    limits, eos_ids = _model_limits(card)
    registry = ClusterRegistry(heartbeat_s=max(0.2, heartbeat_timeout_s / 4), heartbeat_timeout_s=heartbeat_timeout_s,
                               model_hash=card.model_hash, unit_names=card.unit_names,
                               weights_sha256=card.weights_sha256)  # fmt: skip
    holder: dict[str, ClusterController] = {}
    runtime = Runtime(lambda: holder["ctl"].opener(), tokenizer, limits, eos_ids=eos_ids,
                      request_timeout_s=request_timeout_s)  # fmt: skip
    ctl = ClusterController(registry, card, runtime.events, token=token, concurrency=concurrency,
                            max_queue=max_queue, min_workers=min_workers, gain_threshold=gain_threshold,
                            drain_s=drain_s, drift_threshold=drift_threshold, horizon_s=horizon_s,
                            batching=batching, max_batch_tokens=max_batch_tokens)  # fmt: skip
    holder["ctl"] = ctl
    runtime.unavailable = ctl.unavailable
    ctl.prober = LinkProber(registry, probe_sizes(card), token=token, events=runtime.events,
                            interval_s=probe_interval_s)  # fmt: skip
    ctl.prober.start()
    ctl.verifier = JoinVerifier(registry, card, runtime.events, token=token,
                                factor=verify_factor).start()
    return ServeApp(runtime, ctl.plan, model_id=model_id or card.folder.name,
                    backend="grpc", api_key=api_key, drain_timeout_s=drain_timeout_s, cluster=ctl,
                    cluster_token=token, max_request_bytes=max_request_bytes, hosts=hosts,
                    origins=origins)  # fmt: skip
