"""Serving the stage service: the call gate, TLS, limits, and a bounded run-until-signalled loop.

:func:`serve` starts a :class:`~noodle.executors.grpc.worker.StageServicer` on a
port (plaintext or TLS) behind its :class:`~noodle.executors.grpc.gate.CallGate`
(token, call caps, time bounds, all decided before a request body is read);
:func:`run_forever` is what ``noodle worker`` runs. The largest request gRPC
accepts is sized from the model (:func:`~noodle.executors.grpc.worker.message_limit`),
so an oversized body is refused by gRPC before the worker allocates for it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from noodle.errors import SpecError
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.worker import DEFAULT_MAX_MESSAGE_BYTES, StageServicer, WorkerConfig

__all__ = ["serve", "run_forever", "STOP_GRACE_S", "STOP_WAIT_S"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0  # calls in progress may finish this long after SIGTERM
STOP_WAIT_S = 3.0  # then the server has this long to end them before the process exits anyway
_SPARE_THREADS = 16  # beyond the call cap: Health and quick refusals always find a thread
_SPARE_CALLS = 64  # beyond the call cap: calls gRPC queues before refusing outright


def serve(config: WorkerConfig) -> tuple[grpc.Server, StageServicer, int]:
    """Start a worker; returns ``(server, servicer, bound port)``. Stop it with ``server.stop(grace)``.

    Raises:
        SpecError: a setting is refused (see :meth:`WorkerConfig.check`) or the port cannot be bound.
        ModelError: the model folder cannot be used.
    """
    server, servicer, port, _ = _start(config)
    return server, servicer, port


def _start(config: WorkerConfig) -> tuple[grpc.Server, StageServicer, int, futures.ThreadPoolExecutor]:
    config.check()
    servicer = StageServicer(config)
    cap = servicer.limits.max_calls
    options = [
        ("grpc.max_receive_message_length", servicer.max_message_bytes),
        ("grpc.max_send_message_length", max(servicer.max_message_bytes, config.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES)),
        ("grpc.so_reuseport", 0),
    ]
    pool = futures.ThreadPoolExecutor(max_workers=cap + _SPARE_THREADS, thread_name_prefix="noodle-worker")
    server = grpc.server(
        pool,
        interceptors=[servicer.gate],
        options=options,
        maximum_concurrent_rpcs=cap + _SPARE_CALLS,
    )
    pb_grpc.add_StageServiceServicer_to_server(servicer, server)
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            creds = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except OSError as exc:
        raise SpecError(f"--tls-cert/--tls-key: cannot read ({exc.strerror}: {exc.filename})") from None
    except RuntimeError as exc:
        raise SpecError(f"--port: cannot listen on {address} ({exc})") from None
    if port == 0:
        raise SpecError(f"--port: cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    return server, servicer, port, pool


def run_forever(config: WorkerConfig, on_started: Callable[[int], None] | None = None,
                on_stopping: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (main thread only); the first stdout line says where it listens.

    Stopping is bounded: calls get ``STOP_GRACE_S`` to finish, the server ``STOP_WAIT_S`` more to end
    them; a handler thread still stuck after that (a caller that never sends) does not keep the
    process alive: it exits without waiting for it. ``on_started(port)`` runs once it listens
    (``noodle worker --join`` registers with its coordinator there); ``on_stopping()`` runs on the signal while
    the server still serves (a joined worker leaves its cluster there, so the steps in flight finish).
    """
    server, servicer, port, pool = _start(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    auth = "token required" if config.token else "no token"
    tls = "TLS" if config.tls_cert else "plaintext"
    mib = servicer.max_message_bytes / 2**20
    print(f"noodle worker: serving grpc on {config.host}:{port} ({config.model_dir}, {auth}, {tls}, "
          f"requests up to {mib:.1f} MiB)", flush=True)  # fmt: skip
    if servicer.throttle.enabled:
        print(f"noodle worker: {servicer.throttle.describe()}", flush=True)
    if on_started is not None:
        on_started(port)
    try:
        stop.wait()
        if on_stopping is not None:
            on_stopping()
    finally:
        done = server.stop(grace=STOP_GRACE_S).wait(timeout=STOP_GRACE_S + STOP_WAIT_S)
        servicer.close()
    joiner = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True}, daemon=True)
    joiner.start()
    joiner.join(timeout=1.0)
    print("noodle worker: stopped", file=sys.stderr, flush=True)
    if not done or joiner.is_alive():
        # concurrent.futures joins its threads at exit: one stuck in a call would hold the process forever
        log.warning("calls still in progress at exit; not waiting for them")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
