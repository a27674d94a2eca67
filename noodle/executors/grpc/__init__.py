"""The gRPC backend: ``noodle worker`` serves stages, :class:`GrpcExecutor` coordinates them.

Modules: ``stage_service_pb2*`` (generated from ``protos/stage_service.proto``;
regenerate with the command at the top of that file), :mod:`.wire` (tensors as
raw bytes), :mod:`.worker` (the service), :mod:`.edge` (what it checks in a step),
:mod:`.server` (token, TLS, serving), :mod:`.client` (channels, streams, deadlines),
:mod:`.coordinator` (the executor), :mod:`.lanes` (its pipeline lanes) and :mod:`.seqlog`
(what a lane records of packed steps for replay). Importing this package imports
nothing heavy; import the submodules you need.
"""

__all__: list[str] = []
