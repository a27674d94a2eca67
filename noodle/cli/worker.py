"""``noodle worker``: serve pipeline stages to a coordinator (gRPC) or join a torch.distributed ring.

gRPC (default)::

    NOODLE_TOKEN=... noodle worker --port 50051 --model PATH [--host 0.0.0.0] [--tls-cert C --tls-key K]

torch.distributed (rank >= 1 of a world whose rank 0 is ``noodle exec --backend torchrpc``)::

    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 WORLD_SIZE=4 RANK=2 noodle worker --backend torchrpc --model PATH

The first line on stdout says where the worker listens (``--port 0`` picks a free port).
"""

from __future__ import annotations

from pathlib import Path

import typer

from noodle.errors import SpecError

__all__ = ["register", "worker_cmd"]

BACKENDS = ("grpc", "torchrpc")


def worker_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="model folder (this machine's copy); only asked-for stages are loaded"),
    backend: str = typer.Option("grpc", "--backend", "-b", help="grpc | torchrpc"),
    host: str = typer.Option("127.0.0.1", "--host", help="grpc: address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(50051, "--port", "-p", help="grpc: TCP port (0 picks a free one)"),
    token: str | None = typer.Option(None, "--token", envvar="NOODLE_TOKEN", show_envvar=True,
                                     help="grpc: shared token every call must carry (prefer the env var: flags show in ps)"),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="grpc: PEM certificate chain (turns TLS on)"),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="grpc: PEM private key of --tls-cert"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N: where this worker's stages run"),
    max_sessions: int = typer.Option(16, "--max-sessions", help="grpc: open sessions at most (one per generation and stage)"),
    max_stages: int = typer.Option(4, "--max-stages", help="grpc: stages held at most (idle ones are dropped first)"),
    idle_timeout: float = typer.Option(600.0, "--idle-timeout", help="grpc: close sessions idle this many seconds"),
    max_message_mb: int = typer.Option(512, "--max-message-mb", help="grpc: largest message in MiB (long prompts need more)"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)"),
    insecure: bool = typer.Option(False, "--insecure", help="grpc: allow a non-loopback --host without a token"),
    timeout: float = typer.Option(1800.0, "--timeout", help="torchrpc: seconds a rank waits for its peers"),
    dist_backend: str = typer.Option("gloo", "--dist-backend", envvar="NOODLE_DIST_BACKEND",
                                     help="torchrpc: gloo, or nccl when every rank has a GPU (same on every rank)"),
) -> None:
    """Serve stages of a model to a coordinator (`noodle exec --backend grpc|torchrpc`)."""
    if backend not in BACKENDS:
        raise SpecError(f"--backend: {backend!r}; workers speak {', '.join(BACKENDS)}")
    from noodle.models.resolve import resolve_model

    model = resolve_model(model)
    if threads < 0:
        raise SpecError(f"--threads: must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if backend == "torchrpc":
        from noodle.executors.torchdist import run_worker, world_from_env

        _, _, rank, world = world_from_env()
        print(f"noodle worker: torchrpc rank {rank} of {world} ({dist_backend}, device {device})", flush=True)
        code = run_worker(model, device=device, backend=dist_backend, timeout_s=timeout, threads=threads)
        raise typer.Exit(code)
    if max_message_mb < 1:
        raise SpecError(f"--max-message-mb: must be >= 1, got {max_message_mb}")
    from noodle.executors.grpc.server import run_forever
    from noodle.executors.grpc.worker import WorkerConfig

    limit = max_message_mb * 2**20
    config = WorkerConfig(
        model_dir=model, host=host, port=port, token=token, tls_cert=tls_cert, tls_key=tls_key, device=device,
        max_sessions=max_sessions, max_stages=max_stages, idle_timeout_s=idle_timeout, max_message_bytes=limit,
        max_tensor_bytes=min(limit, 256 * 2**20), insecure=insecure,
    )  # fmt: skip
    raise typer.Exit(run_forever(config))


def register(app: typer.Typer) -> None:
    app.command("worker")(worker_cmd)
