"""Assemble a server from a model folder and a plan: executor, pipeline opener, limits, runtime, app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noodle.executors import EXECUTORS
from noodle.executors.kvbudget import max_positions
from noodle.executors.slicing import read_config
from noodle.plandoc import PlanDoc
from noodle.serve.app import ServeApp
from noodle.serve.runtime import Limits, Runtime

__all__ = ["build_server"]


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
) -> ServeApp:
    """A :class:`ServeApp` whose stages load when the app starts (``/readyz`` turns 200 then).

    The executor is built (and the plan checked against the model) now, so bad input fails
    before the server listens; entering it and starting the pipeline happen on start-up.
    """
    config = read_config(model_dir)
    executor = EXECUTORS.get(backend)(plan, model_dir, emulate=emulate, **(backend_options or {}))
    eos = executor.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    def opener() -> tuple[Any, Any]:
        executor.__enter__()
        try:
            return executor, executor.pipeline(concurrency=concurrency, max_queue=max_queue)
        except BaseException:
            executor.__exit__(None, None, None)
            raise

    context = max_positions(config) or 2048
    limits = Limits(prompt_tokens=context - 1, context_tokens=context, vocab_size=int(config.vocab_size))
    runtime = Runtime(opener, tokenizer, limits, eos_ids=eos_ids, request_timeout_s=request_timeout_s)
    return ServeApp(runtime, plan, model_id=model_id or Path(model_dir).resolve().name, backend=backend,
                    emulate=emulate, api_key=api_key, drain_timeout_s=drain_timeout_s)  # fmt: skip
