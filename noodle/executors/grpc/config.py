"""How a gRPC worker serves: :class:`WorkerConfig` (every limit, checked) and the model-sized message limit."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noodle.errors import SpecError
from noodle.executors.codec import DEFAULT_MAX_TENSOR_BYTES
from noodle.executors.grpc.throttle import check_slowdown
from noodle.executors.kvbudget import max_positions

__all__ = ["WorkerConfig", "message_limit", "step_token_limit", "DEFAULT_MAX_MESSAGE_BYTES"]

DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20  # what a coordinator accepts; workers size theirs from the model
_SLACK_BYTES = 64 * 2**10


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker serves. See the module docstring for what each limit refuses."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "cpu"
    max_sessions: int = 16
    max_stages: int = 4
    idle_timeout_s: float = 60.0
    evict_idle_s: float = 10.0
    max_message_bytes: int = 0  # 0: sized from the model (see message_limit)
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_batch: int = 8
    max_seqs: int = 64  # live sequences of one packed session (continuous batching)
    max_step_tokens: int = 0  # tokens of one packed step; 0: as many as a tensor under the limit holds
    max_calls: int = 0  # 0: 2 x max_sessions + 8
    max_calls_per_peer: int = 0  # 0: max_sessions + 4
    body_timeout_s: float = 30.0
    stream_idle_s: float = 60.0
    insecure: bool = False
    emulate_slowdown: float = 1.0  # test/demo knob: see noodle.executors.grpc.throttle
    slowdown_after_s: float = 0.0

    def check(self) -> None:
        """Refuse settings that cannot work or that would expose the worker."""
        if not 0 <= self.port <= 65535:
            raise SpecError(f"--port: {self.port} is not a TCP port (0-65535; 0 picks a free one)")
        if self.max_sessions < 1:
            raise SpecError(f"--max-sessions: must be >= 1, got {self.max_sessions}")
        if self.max_stages < 1:
            raise SpecError(f"--max-stages: must be >= 1, got {self.max_stages}")
        for flag, value in (("--idle-timeout", self.idle_timeout_s), ("--stream-idle-timeout", self.stream_idle_s),
                            ("--body-timeout", self.body_timeout_s)):  # fmt: skip
            if not value > 0 or value == float("inf"):
                raise SpecError(f"{flag}: must be a finite number of seconds > 0, got {value}")
        if not self.evict_idle_s >= 0:
            raise SpecError(f"evict_idle_s: must be >= 0 seconds, got {self.evict_idle_s}")
        for flag, n in (("--max-batch", self.max_batch), ("--max-message-mb", self.max_message_bytes),
                        ("--max-calls", self.max_calls), ("--max-calls-per-caller", self.max_calls_per_peer),
                        ("--max-seqs", self.max_seqs), ("--max-step-tokens", self.max_step_tokens)):  # fmt: skip
            low = 1 if flag in ("--max-batch", "--max-seqs") else 0
            if n < low:
                raise SpecError(f"{flag}: must be >= {low}, got {n}")
        check_slowdown(self.emulate_slowdown, self.slowdown_after_s)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SpecError("--tls-cert/--tls-key: give both (certificate chain and private key) or neither")
        if self.token is not None and not self.token.strip():
            raise SpecError("--token: empty token; give a long random string or leave it unset")
        if self.token is None and not self.insecure and not _is_loopback(self.host):
            raise SpecError(
                f"--host: {self.host} is reachable from other machines and no --token (or NOODLE_TOKEN) is set; "
                "anyone who can reach the port could run the model: set a token, or pass --insecure on a trusted network"
            )
        if self.max_message_bytes and self.max_tensor_bytes > self.max_message_bytes:
            raise SpecError(
                f"max tensor bytes {self.max_tensor_bytes} exceed the message limit {self.max_message_bytes}"
            )

    @property
    def calls_limit(self) -> int:
        return self.max_calls or 2 * self.max_sessions + 8

    @property
    def calls_per_peer_limit(self) -> int:
        return min(self.max_calls_per_peer or self.max_sessions + 4, self.calls_limit)


def message_limit(model_config: Any, max_batch: int, cap: int = 0) -> int:
    """Bytes of the largest request a worker takes: a prefill of ``max_batch`` sequences at the model's
    full length (hidden states in float32, or float64 for a float64 model, plus the int64 mask), plus slack;
    at most ``cap`` when given, and at most gRPC's 2 GiB.
    """
    positions = max_positions(model_config) or 4096
    hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd", 0) or 4096)
    dtype = str(getattr(model_config, "dtype", None) or "")
    item = 8 if "float64" in dtype else 4
    need = max_batch * positions * (hidden * item + 8) + _SLACK_BYTES
    if cap:
        need = min(need, cap)
    return min(need, 2**31 - 1)


def step_token_limit(model_config: Any, max_bytes: int) -> int:
    """Tokens of a packed step whose hidden states (float32, or float64 for a float64 model) fit ``max_bytes``."""
    hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd", 0) or 4096)
    item = 8 if "float64" in str(getattr(model_config, "dtype", None) or "") else 4
    return max(1, (max_bytes - _SLACK_BYTES) // (hidden * item))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
