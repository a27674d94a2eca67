"""Executors run a plan's stages and return tokens plus a measured RunReport.

``local`` (every stage in this process) is the reference; every other executor
must produce the same tokens on the same plan (``tests/executors/conformance.py``).
"""

from noodle.executors.base import (
    EXECUTORS,
    Executor,
    ExecutorFactory,
    RunReport,
    RunResult,
    StageReport,
    check_plan,
    check_workload,
)
from noodle.executors.generation import Generation, Sampling, generate, left_pad
from noodle.executors.messages import StageInput, StageOutput, decode, encode
from noodle.executors.stage import Stage

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorFactory",
    "RunReport",
    "RunResult",
    "StageReport",
    "check_plan",
    "check_workload",
    "Generation",
    "Sampling",
    "generate",
    "left_pad",
    "StageInput",
    "StageOutput",
    "encode",
    "decode",
    "Stage",
]
