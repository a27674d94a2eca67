"""Serving the stage service: token check, TLS, limits, and the run-until-signalled loop.

:func:`serve` starts a :class:`~noodle.executors.grpc.worker.StageServicer` on a
port (plaintext or TLS) behind :class:`TokenAuth` when a token is set;
:func:`run_forever` is what ``noodle worker`` runs.
"""

from __future__ import annotations

import hmac
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from noodle.errors import SpecError
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.worker import StageServicer, WorkerConfig

__all__ = ["TokenAuth", "serve", "run_forever"]


class TokenAuth(grpc.ServerInterceptor):
    """Refuse every call whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        handler = continuation(details)
        if hmac.compare_digest(got_b, self._want) or handler is None:
            return handler

        def deny(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (authorization: Bearer <token>)")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def serve(config: WorkerConfig) -> tuple[grpc.Server, StageServicer, int]:
    """Start a worker; returns ``(server, servicer, bound port)``. Stop it with ``server.stop(grace)``.

    Raises:
        SpecError: a setting is refused (see :meth:`WorkerConfig.check`) or the port cannot be bound.
        ModelError: the model folder cannot be used.
    """
    config.check()
    servicer = StageServicer(config)
    interceptors = [TokenAuth(config.token)] if config.token else []
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_sessions + 4, thread_name_prefix="noodle-worker"),
        interceptors=interceptors,
        options=options,
        maximum_concurrent_rpcs=config.max_sessions + 4,
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
    return server, servicer, port


def run_forever(config: WorkerConfig) -> int:
    """Serve until SIGTERM/SIGINT (main thread only); the first stdout line says where it listens."""
    server, servicer, port = serve(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    auth = "token required" if config.token else "no token"
    tls = "TLS" if config.tls_cert else "plaintext"
    print(f"noodle worker: serving grpc on {config.host}:{port} ({config.model_dir}, {auth}, {tls})", flush=True)
    try:
        stop.wait()
    finally:
        server.stop(grace=2).wait()
        servicer.close()
    print("noodle worker: stopped", file=sys.stderr, flush=True)
    return 0
