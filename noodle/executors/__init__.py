"""Executors run a plan's stages and return tokens plus a measured RunReport.

``local`` (every stage in this process) is the reference; every other executor
must produce the same tokens on the same plan (``tests/executors/conformance.py``).
"""

from noodle.errors import ExecutorError
from noodle.executors.base import (
    Executor,
    ExecutorFactory,
    RunReport,
    RunResult,
    StageReport,
    check_formats,
    check_plan,
    check_workload,
)
from noodle.executors.generation import Generation, Sampling, generate, left_pad
from noodle.executors.messages import StageInput, StageOutput
from noodle.executors.stage import StageRunner
from noodle.registry import Registry


def _local() -> ExecutorFactory:
    from noodle.executors.local import LocalExecutor

    return LocalExecutor


def _torchrpc() -> ExecutorFactory:
    from noodle.executors.ring.coordinator import TorchRpcExecutor

    return TorchRpcExecutor


def _grpc() -> ExecutorFactory:
    from noodle.executors.grpc.coordinator import GrpcExecutor

    return GrpcExecutor


# Ordered: ``local`` (the reference) first. Factories load their module (and its heavy imports) on first use.
EXECUTORS: Registry[ExecutorFactory] = Registry("executor", error=ExecutorError)
EXECUTORS.register("local", _local)
EXECUTORS.register("torchrpc", _torchrpc)
EXECUTORS.register("grpc", _grpc)

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorFactory",
    "RunReport",
    "RunResult",
    "StageReport",
    "check_formats",
    "check_plan",
    "check_workload",
    "Generation",
    "Sampling",
    "generate",
    "left_pad",
    "StageInput",
    "StageOutput",
    "StageRunner",
]
