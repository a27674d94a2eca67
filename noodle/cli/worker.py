"""``noodle worker``: serve pipeline stages to a coordinator (gRPC) or join a torch.distributed ring.

gRPC (default)::

    NOODLE_TOKEN=... noodle worker --port 50051 --model PATH [--host 0.0.0.0] [--tls-cert C --tls-key K]

torch.distributed (rank >= 1 of a world whose rank 0 is ``noodle exec --backend torchrpc``)::

    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 WORLD_SIZE=4 RANK=2 noodle worker --backend torchrpc --model PATH

The first line on stdout says where the worker listens (``--port 0`` picks a free port).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from noodle.cli.checks import check_float, check_int, check_threads, read_token_file
from noodle.errors import ExecutorError, SpecError
from noodle.extras import require_exec

__all__ = ["register", "worker_cmd"]

BACKENDS = ("grpc", "torchrpc")


def worker_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="model folder (this machine's copy); only asked-for stages are loaded"),
    backend: str = typer.Option("grpc", "--backend", "-b", help="grpc | torchrpc"),
    host: str = typer.Option("127.0.0.1", "--host", help="grpc: address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(50051, "--port", "-p", help="grpc: TCP port (0 picks a free one)"),
    token: str | None = typer.Option(None, "--token", envvar="NOODLE_TOKEN", show_envvar=True,
                                     help="grpc: shared token every call must carry (prefer the env var: flags show in ps)"),
    token_file: Path | None = typer.Option(None, "--token-file", help="grpc: read the token from this file (a mounted secret)"),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="grpc: PEM certificate chain (turns TLS on)"),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="grpc: PEM private key of --tls-cert"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N: where this worker's stages run"),
    max_sessions: int = typer.Option(16, "--max-sessions", help="grpc: open sessions at most (one per generation and stage)"),
    max_stages: int = typer.Option(4, "--max-stages", help="grpc: stages held at most (idle ones are dropped first)"),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", help="grpc: close sessions idle this many seconds"),
    max_batch: int = typer.Option(8, "--max-batch", help="grpc: sequences per step at most (sizes the message limit)"),
    max_seqs: int = typer.Option(64, "--max-seqs", help="grpc: live sequences per packed session (continuous batching)"),
    max_step_tokens: int = typer.Option(0, "--max-step-tokens",
                                        help="grpc: tokens per packed step (0: as many as fit the message limit)"),
    max_message_mb: int = typer.Option(0, "--max-message-mb",
                                       help="grpc: largest request in MiB (0: a --max-batch prefill at the model's full length)"),
    stream_idle_timeout: float = typer.Option(60.0, "--stream-idle-timeout", help="grpc: close streams idle this many seconds"),
    max_calls_per_caller: int = typer.Option(0, "--max-calls-per-caller",
                                             help="grpc: calls in progress per caller address (0: --max-sessions + 4)"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)"),
    insecure: bool = typer.Option(False, "--insecure", help="grpc: allow a non-loopback --host without a token"),
    timeout: float = typer.Option(1800.0, "--timeout", help="torchrpc: seconds a rank waits for its peers"),
    connect_timeout: float = typer.Option(60.0, "--connect-timeout",
                                          help="torchrpc: seconds to wait for the coordinator (rank 0) to listen"),
    dist_backend: str = typer.Option("gloo", "--dist-backend", envvar="NOODLE_DIST_BACKEND",
                                     help="torchrpc: gloo, or nccl when every rank has a GPU (same on every rank)"),
    join: str | None = typer.Option(None, "--join", envvar="NOODLE_JOIN",
                                    help="grpc: register with this coordinator (`noodle serve --cluster` URL) and send heartbeats"),
    name: str | None = typer.Option(None, "--name", help="--join: this node's id (default: hostname-port)"),
    advertise: str | None = typer.Option(None, "--advertise",
                                         help="--join: host:port the coordinator reaches this worker at (default: --host:port)"),
    cache_dir: Path = typer.Option(Path("~/.cache/noodle"), "--cache-dir", help="--join: where measured costs are cached"),
    join_timeout: float = typer.Option(60.0, "--join-timeout", help="--join: seconds to retry an unreachable coordinator"),
    ready_file: Path | None = typer.Option(None, "--ready-file",
                                           help="--join: create this file once joined, remove it on leaving (for a "
                                                "readiness probe: `test -f FILE`)"),
    leave_timeout: float = typer.Option(20.0, "--leave-timeout",
                                        help="--join: on SIGTERM, keep serving until the coordinator re-planned without "
                                             "this worker, at most this many seconds (0: stop at once)"),
    emulate_slowdown: float = typer.Option(1.0, "--emulate-slowdown",
                                           help="grpc, tests and demos only: emulate throttling, each stage step takes FACTOR x its compute time"),
    slowdown_after_s: float = typer.Option(0.0, "--slowdown-after-s",
                                           help="--emulate-slowdown: start this many seconds after the first stage step"),
) -> None:
    """Serve stages of a model to a coordinator (`noodle exec --backend grpc|torchrpc`)."""
    require_exec("noodle worker")
    if backend not in BACKENDS:
        raise SpecError(f"--backend: {backend!r}; workers speak {', '.join(BACKENDS)}")
    check_threads("--threads", threads)
    check_int("--port", port, ge=0, le=65535)
    token = read_token_file(token, token_file)
    check_float("--timeout", timeout, gt=0, le=1e6)
    check_float("--idle-timeout", idle_timeout, gt=0, le=1e7)
    check_float("--connect-timeout", connect_timeout, gt=0, le=1e6)
    from noodle.models.resolve import resolve_model

    model = resolve_model(model)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if backend == "torchrpc" and emulate_slowdown != 1.0:
        raise SpecError("--emulate-slowdown: grpc workers only; drop it with --backend torchrpc")
    if backend == "torchrpc":
        from noodle.executors.ring.transport import world_from_env
        from noodle.executors.ring.worker import run_worker

        addr, master_port, rank, world = world_from_env()
        _wait_for_coordinator(addr, master_port, connect_timeout)
        print(f"noodle worker: torchrpc rank {rank} of {world} ({dist_backend}, device {device})", flush=True)
        import torch.distributed as dist

        try:
            code = run_worker(model, device=device, backend=dist_backend, timeout_s=timeout, threads=threads)
        except dist.DistError as exc:  # the coordinator went away or never formed the world
            raise ExecutorError(f"torchrpc worker: rank {rank}: {str(exc).splitlines()[0]}") from None
        raise typer.Exit(code)
    check_int("--max-message-mb", max_message_mb, ge=0, le=2047)  # 0: sized from the model; gRPC's limits are signed 32-bit
    check_int("--max-sessions", max_sessions, ge=1, le=100_000)
    check_int("--max-stages", max_stages, ge=1, le=100_000)
    check_int("--max-batch", max_batch, ge=1, le=65_536)
    check_int("--max-seqs", max_seqs, ge=1, le=65_536)
    check_int("--max-step-tokens", max_step_tokens, ge=0, le=1 << 24)
    check_int("--max-calls-per-caller", max_calls_per_caller, ge=0, le=100_000)
    check_float("--stream-idle-timeout", stream_idle_timeout, gt=0, le=1e7)
    check_float("--emulate-slowdown", emulate_slowdown, ge=1, le=1000)
    check_float("--slowdown-after-s", slowdown_after_s, ge=0, le=1e6)
    check_float("--leave-timeout", leave_timeout, ge=0, le=600)
    from noodle.executors.grpc.server import run_forever
    from noodle.executors.grpc.worker import WorkerConfig

    limit = max_message_mb * 2**20
    config = WorkerConfig(
        model_dir=model, host=host, port=port, token=token, tls_cert=tls_cert, tls_key=tls_key, device=device,
        max_sessions=max_sessions, max_stages=max_stages, idle_timeout_s=idle_timeout, max_message_bytes=limit,
        max_tensor_bytes=min(limit or 2**31, 256 * 2**20), max_batch=max_batch, stream_idle_s=stream_idle_timeout,
        max_seqs=max_seqs, max_step_tokens=max_step_tokens,
        max_calls_per_peer=max_calls_per_caller, insecure=insecure, emulate_slowdown=emulate_slowdown,
        slowdown_after_s=slowdown_after_s,
    )  # fmt: skip
    if ready_file is not None and join is None:
        raise SpecError("--ready-file: needs --join (the file says the coordinator accepted this worker)")
    if ready_file is not None and not ready_file.parent.is_dir():
        raise SpecError(f"--ready-file: {ready_file.parent} is not a folder")
    if join is None:
        raise typer.Exit(run_forever(config))
    slow_from_start = emulate_slowdown if slowdown_after_s == 0 else 1.0  # measures itself slowed (see slowed_report)
    make_joiner = _joiner(join, token, name, advertise, host, model, device, cache_dir, join_timeout, slow_from_start,
                          ready_file)
    joined: list[Any] = []

    def leave() -> None:
        if joined and not _JOIN_FAILED:
            if leave_timeout > 0:
                print("noodle worker: stopping: leaving the cluster first (--leave-timeout "
                      f"{leave_timeout:g} s)", file=sys.stderr, flush=True)  # fmt: skip
            print(f"noodle worker: {joined[0].leave(leave_timeout)}", file=sys.stderr, flush=True)

    code = run_forever(config, on_started=lambda bound: joined.append(make_joiner(bound).start()), on_stopping=leave)
    raise typer.Exit(1 if _JOIN_FAILED else code)


_JOIN_FAILED: list[str] = []


def _joiner(url: str, token: str | None, name: str | None, advertise: str | None, host: str, model: Path,
            device: str, cache_dir: Path, join_timeout: float, slowdown: float = 1.0,
            ready_file: Path | None = None) -> Callable[[int], Any]:  # fmt: skip
    """Checks the --join flags now; returns ``port -> Joiner`` to start once the gRPC server listens.

    ``slowdown``: the ``--emulate-slowdown`` factor when it applies from the first step; the join report's
    unit times are multiplied by it (:func:`~noodle.serve.joining.slowed_report`).
    """
    import os
    import signal
    import socket

    from noodle.serve.joining import Joiner, self_report, slowed_report

    if not url.startswith(("http://", "https://")):
        raise SpecError(f"--join: {url!r} is not an http(s) URL, e.g. http://10.0.0.1:8000")
    if not token:
        raise SpecError("--join: needs --token (or NOODLE_TOKEN, or --token-file), the coordinator's `noodle serve --cluster --token`")
    check_float("--join-timeout", join_timeout, gt=0, le=1e6)
    if advertise is not None and (":" not in advertise or not advertise.rsplit(":", 1)[1].isdigit()):
        raise SpecError(f"--advertise: {advertise!r} is not host:port")

    def fail(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        _JOIN_FAILED.append(line)
        os.kill(os.getpid(), signal.SIGTERM)

    def make(port: int) -> Any:
        address = advertise or f"{'0.0.0.0' if host in ('0.0.0.0', '::', '') else host}:{port}"  # coordinator fills it in
        node = name or f"{socket.gethostname()}-{port}"
        report = lambda: slowed_report(self_report(model, device, cache_dir), slowdown)  # noqa: E731
        return Joiner(url, token, node, address, report, give_up_s=join_timeout, ready_file=ready_file,
                      on_fail=fail)  # fmt: skip

    return make


def _wait_for_coordinator(addr: str, port: int, timeout_s: float) -> None:
    """Wait until something listens on MASTER_ADDR:MASTER_PORT, or refuse in one line after ``timeout_s``."""
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise SpecError(
                    f"MASTER_ADDR/MASTER_PORT: no coordinator listens on {addr}:{port} after {timeout_s:g} s "
                    f"({exc.strerror or exc}); start rank 0 (`noodle exec --backend torchrpc`) first, "
                    "or raise --connect-timeout"
                ) from None
        time.sleep(0.2)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker_cmd)
