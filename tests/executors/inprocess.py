"""An in-process gRPC worker and a channel to it, for the worker tests."""

from __future__ import annotations

from pathlib import Path

import grpc

from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.server import serve
from noodle.executors.grpc.worker import WorkerConfig


class Server:
    """``serve(WorkerConfig(model_dir=model, port=0, **kw))`` on 127.0.0.1 with a stub; ``close()`` stops both."""

    def __init__(self, model: Path, **kw: object) -> None:
        self.server, self.servicer, self.port = serve(WorkerConfig(model_dir=model, port=0, **kw))  # type: ignore[arg-type]
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.StageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)
        self.servicer.close()
