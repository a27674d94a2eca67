"""Stages on an accelerator: a :class:`~noodle.executors.stage.StageRunner` whose weights and state live on a device.

:class:`StageRunner` loads weights on the CPU and builds its masks and position ids on
the CPU. :class:`DeviceStageRunner` moves the slice to ``device`` after loading and
builds those tensors there; inputs arriving on the CPU (from the network) are
moved in, outputs stay on the device until the transport takes them (the gRPC
wire copies to the CPU; NCCL sends from the device). On ``cpu`` it is a plain
:class:`StageRunner`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from noodle.errors import SpecError
from noodle.executors.messages import StageInput, StageOutput
from noodle.executors.stage import Session, StageRunner

__all__ = ["DeviceStageRunner", "parse_device", "make_stage", "warm_up", "gpu_indices"]


def parse_device(text: str | None, *, field: str = "device") -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (empty means cpu), checked against this machine."""
    text = (text or "cpu").strip()
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise SpecError(f"{field}: {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise SpecError(f"{field}: {text!r}: stages run on cpu or cuda devices")
    if not torch.cuda.is_available():
        raise SpecError(f"{field}: {text!r} asked for, but this machine has no CUDA device")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise SpecError(f"{field}: {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


class DeviceStageRunner(StageRunner):
    """A :class:`StageRunner` whose modules, KV caches, masks and positions live on ``device``."""

    def __init__(self, folder: str | Path, start: int, end: int, *, name: str = "", device: torch.device) -> None:
        super().__init__(folder, start, end, name=name)
        self.device = device
        for mod in self.slice.modules():
            mod.to(device)

    def _grow_mask(self, state: Session, new: torch.Tensor | None, batch: int, tokens: int) -> None:  # type: ignore[override]
        if new is None and state.mask is None:
            return
        dev = self.device
        new = torch.ones(batch, tokens, dtype=torch.long, device=dev) if new is None else new.to(dev, torch.long)
        if state.mask is None:
            state.mask = torch.cat([torch.ones(batch, state.seen, dtype=torch.long, device=dev), new], dim=1)
        else:
            state.mask = torch.cat([state.mask, new], dim=1)

    def _positions(self, state: Session, batch: int, tokens: int) -> torch.Tensor:
        if state.mask is None:
            return torch.arange(state.seen, state.seen + tokens, device=self.device).unsqueeze(0)
        return super()._positions(state, batch, tokens)

    def step(self, msg: StageInput) -> StageOutput:
        mask = msg.attention_mask
        msg = replace(msg, data=msg.data.to(self.device), attention_mask=None if mask is None else mask.to(self.device))
        return super().step(msg)


def make_stage(folder: str | Path, start: int, end: int, *, name: str = "",
               device: torch.device | None = None) -> StageRunner:  # fmt: skip
    """A :class:`StageRunner` on the CPU, or a :class:`DeviceStageRunner` on an accelerator."""
    if device is None or device.type == "cpu":
        return StageRunner(folder, start, end, name=name)
    return DeviceStageRunner(folder, start, end, name=name, device=device)


def warm_up(stage: StageRunner) -> None:
    """One throw-away prefill step, so the first real step does not pay one-off costs (as ``local`` does)."""
    if stage.is_first:
        data = torch.zeros(1, 1, dtype=torch.long)
    else:
        dtype = next((p.dtype for m in stage.slice.modules() for p in m.parameters()), torch.float32)
        data = torch.zeros(1, 1, int(stage.config.hidden_size), dtype=dtype)
    stage.step(StageInput("warm-up", data, None, prefill=True))
    stage.end_session("warm-up")


def gpu_indices(devices: list[str]) -> list[int]:
    """CUDA index per stage for plan nodes whose device says gpu/cuda, round robin; -1 for the rest or without CUDA."""
    if not torch.cuda.is_available():
        return [-1] * len(devices)
    count, k, out = torch.cuda.device_count(), 0, []
    for dev in devices:
        if any(word in dev.lower() for word in ("gpu", "cuda")):
            out.append(k % count)
            k += 1
        else:
            out.append(-1)
    return out
