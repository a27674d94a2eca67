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

__all__ = ["DeviceStageRunner", "parse_device", "make_stage", "warm_up", "gpu_indices", "is_gpu", "stage_devices", "ring_backend"]


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

    def __init__(self, folder: str | Path, start: int, end: int, *, name: str = "", device: torch.device,
                 format: str = "float32") -> None:  # fmt: skip
        super().__init__(folder, start, end, name=name, format=format, device=device.type)
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
               device: torch.device | None = None, format: str = "float32") -> StageRunner:  # fmt: skip
    """A :class:`StageRunner` on the CPU, or a :class:`DeviceStageRunner` on an accelerator, in weight ``format``."""
    if device is None or device.type == "cpu":
        return StageRunner(folder, start, end, name=name, format=format)
    return DeviceStageRunner(folder, start, end, name=name, device=device, format=format)


def is_gpu(device: str) -> bool:
    """Whether a plan node's device names a GPU (``gpu``, ``cuda``, ``cuda:N``, ``desktop-gpu``...)."""
    return any(word in device.lower() for word in ("gpu", "cuda"))


def stage_devices(devices: list[str]) -> tuple[list[torch.device], str | None]:
    """The torch device of each stage of one process, and a note when a plan's GPU stage runs on the CPU.

    GPU stages take the CUDA devices round robin (several stages share a GPU when there are fewer GPUs
    than GPU stages); ``mps`` runs on Apple's GPU where torch has it; everything else on the CPU.
    """
    idx = gpu_indices(devices)
    out: list[torch.device] = []
    cpu_instead: list[str] = []
    for dev, k in zip(devices, idx):
        if k >= 0:
            out.append(torch.device("cuda", k))
        elif dev.lower() == "mps" and torch.backends.mps.is_available():
            out.append(torch.device("mps"))
        else:
            if is_gpu(dev) or dev.lower() == "mps":
                cpu_instead.append(dev)
            out.append(torch.device("cpu"))
    note = (f"the plan's {', '.join(sorted(set(cpu_instead)))} stage(s) run on this machine's CPU: it has no "
            f"{'CUDA' if any(is_gpu(d) for d in cpu_instead) else 'MPS'} device") if cpu_instead else None  # fmt: skip
    return out, note


def warm_up(stage: StageRunner) -> None:
    """One throw-away prefill step, so the first real step does not pay one-off costs (as ``local`` does)."""
    if stage.is_first:
        data = torch.zeros(1, 1, dtype=torch.long)
    else:
        data = torch.zeros(1, 1, int(stage.config.hidden_size), dtype=stage.io_dtype)
    stage.step(StageInput("warm-up", data, None, prefill=True))
    stage.end_session("warm-up")


def gpu_indices(devices: list[str], *, reserve_first: bool = False) -> list[int]:
    """CUDA index per stage for plan nodes whose device says gpu/cuda, round robin; -1 for the rest or without CUDA.

    ``reserve_first``: leave GPU 0 to another rank (the ring's coordinator) when there are GPUs enough for
    every GPU stage besides it.
    """
    if not torch.cuda.is_available():
        return [-1] * len(devices)
    count, out = torch.cuda.device_count(), []
    k = 1 if reserve_first and count > sum(1 for d in devices if is_gpu(d)) else 0
    for dev in devices:
        named = dev.lower().removeprefix("cuda:")
        if dev.lower().startswith("cuda:") and named.isdigit() and int(named) < count:
            out.append(int(named))  # the plan names the GPU
        elif is_gpu(dev):
            out.append(k % count)
            k += 1
        else:
            out.append(-1)
    return out


def ring_backend(requested: str, gpus: list[int], *, nccl_available: bool) -> tuple[str, str]:
    """The torch.distributed backend of a spawned ring and why: NCCL needs one distinct GPU per rank.

    ``gpus`` is each stage's CUDA index (-1: CPU) from :func:`gpu_indices`; the coordinator's rank
    communicates from GPU 0. ``auto`` takes NCCL only when every stage has a GPU of its own, apart from
    the coordinator's; otherwise (one GPU for two stages, or a stage on the coordinator's GPU) Gloo,
    which moves activations through host memory, instead of failing in NCCL at the first send.
    """
    on_gpu = [g for g in gpus if g >= 0]
    ranks = [0, *on_gpu]
    if requested != "auto":
        if requested == "nccl" and not nccl_available:
            raise SpecError("torchrpc backend: nccl asked for, but this torch has no NCCL; use the backend auto or gloo")
        if requested == "nccl" and (len(on_gpu) < len(gpus) or len(set(ranks)) < len(ranks)):
            raise SpecError(f"torchrpc backend: nccl needs one distinct GPU per rank; the coordinator and {len(gpus)} "
                            f"stage(s) ({len(gpus) - len(on_gpu)} on the CPU) have {len(set(ranks))} GPU(s) between "
                            "them; use the backend auto or gloo")  # fmt: skip
        return requested, f"{requested}, as asked"
    if not on_gpu or len(on_gpu) < len(gpus):
        return "gloo", "gloo: not every stage is on a GPU"
    if not nccl_available:
        return "gloo", "gloo: this torch has no NCCL"
    if len(set(ranks)) < len(ranks):
        return "gloo", (f"gloo: the coordinator and {len(on_gpu)} GPU stage(s) share {len(set(ranks))} GPU(s) and NCCL "
                        "needs one GPU per rank; activations go through host memory")  # fmt: skip
    return "nccl", f"nccl: the coordinator and {len(on_gpu)} stage(s) on {len(ranks)} distinct GPUs"
