"""The stage runner's fixed work per step, which the hook-timed unit table misses.

:func:`~noodle.profile.unitcosts.measure_unit_costs` times each unit by hooks inside one
whole-model forward. A served stage does more per step than its units: it builds the
attention masks and position ids, grows its KV cache, slices the last position and, on the
worker, counts the cache bytes (what the worker's reply times as compute: ``t_out_ns -
t_in_ns``). That work hardly depends on how many units the stage holds, so it is one
constant per node and step, ``step_overhead_ms``, which every stage on the node pays.

:func:`measure_step_overhead` measures it honestly: it runs the worker's own stage runner
(:func:`~noodle.executors.devices.make_stage`, the one ``LoadStage`` builds) on short unit
ranges that each hold one decoder block, on the same workload as the unit table (a
``prompt_tokens`` prefill, then ``decode_tokens`` decode steps at batch 1, ``repeats`` times
after a warm-up), and takes per range::

    decode overhead  = median(runner decode step) - sum of the range's hook-timed decode ms
    prefill overhead = median(runner prefill)     - sum of the range's prefill ms/token * prompt_tokens

The result is the median over the ranges (the first stage ``[0, 2)``, a middle block
``[1, 2)`` and the last stage ``[n-2, n)``: the first embeds, the last runs the head and picks
the top token), floored at 0 (a negative difference is timing noise).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from noodle.executors.devices import make_stage, parse_device, warm_up
from noodle.executors.messages import StageInput

__all__ = ["measure_step_overhead", "overhead_ranges"]


def overhead_ranges(n: int) -> list[tuple[int, int]]:
    """The unit ranges timed for ``n`` units (embed, blocks, head): first, a middle block, last; distinct."""
    if n < 3:
        return [(0, n)]
    return list(dict.fromkeys([(0, 2), (1, 2), (n - 2, n)]))


def _time_range(model_dir: Path, start: int, end: int, device: str, prompt_tokens: int, decode_tokens: int,
                repeats: int) -> tuple[float, float]:  # fmt: skip
    """(median decode step ms, median prefill ms) of the stage runner on units ``[start, end)``."""
    dev = parse_device(device, field="--device")
    stage = make_stage(model_dir, start, end, name=f"overhead[{start},{end})", device=dev)
    warm_up(stage)
    hidden = int(stage.config.hidden_size)
    gen = torch.Generator().manual_seed(0)

    def data(tokens: int) -> torch.Tensor:
        if stage.is_first:
            return torch.randint(0, int(stage.config.vocab_size), (1, tokens), generator=gen)
        return torch.randn(1, tokens, hidden, generator=gen)

    def step(msg: StageInput) -> float:
        t0 = time.perf_counter()
        out = stage.step(msg)
        if out.is_logits:  # the worker sends the top token of the last position
            out.data[:, -1, :].argmax(dim=-1)
        stage.cache_bytes(msg.session)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) * 1e3

    decode, prefill = [], []
    for r in range(repeats + 1):  # the first repeat warms up
        session = f"overhead-{r}"
        p = step(StageInput(session, data(prompt_tokens), None, prefill=True))
        d = [step(StageInput(session, data(1), None, prefill=False)) for _ in range(decode_tokens)]
        stage.end_session(session)
        if r:
            prefill.append(p)
            decode.extend(d)
    return statistics.median(decode), statistics.median(prefill)


def measure_step_overhead(model_dir: Path, costs: dict[str, Any], device: str = "cpu", *, decode_tokens: int = 8,
                          repeats: int = 4) -> dict[str, float]:  # fmt: skip
    """``{"decode_ms", "prefill_ms"}``: the stage runner's time per step beyond ``costs``' units (module docstring).

    Args:
        model_dir: the model folder the worker serves.
        costs: :func:`~noodle.profile.unitcosts.measure_unit_costs`'s report for this device (its ``batch_size``
            and ``prompt_tokens`` are the workload timed here).
        device: the worker's device.
    """
    units = costs["units"]
    b = str(costs["batch_size"])
    prompt = int(costs["prompt_tokens"])
    decode_over, prefill_over = [], []
    for start, end in overhead_ranges(len(units)):
        d, p = _time_range(Path(model_dir), start, end, device, prompt, decode_tokens, repeats)
        decode_over.append(d - sum(float(u["decode_ms"][b]) for u in units[start:end]))
        prefill_over.append(p - prompt * sum(float(u["prefill_ms_per_token"]) for u in units[start:end]))
    return {"decode_ms": max(0.0, statistics.median(decode_over)), "prefill_ms": max(0.0, statistics.median(prefill_over))}
