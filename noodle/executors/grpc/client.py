"""The coordinator's side of one worker: channel, token, clock offset, per-session streams, deadlines.

A :class:`WorkerClient` owns one channel to one worker address. A
:class:`ForwardStream` is one bidirectional ``ForwardStream`` call (one per
stage session): a request goes in, the reply to it comes out, in order. The sync
gRPC API has no per-message deadline on a stream, so a :class:`Watchdog` thread
cancels a stream whose reply is overdue; the caller then sees
:class:`WorkerGone` like for a dead connection.

:func:`translate` sorts a ``grpc.RpcError`` into "the worker may be gone, retry
or fail over" (:class:`WorkerGone`; :class:`StageLost` when the worker answers but
no longer has the session or stage, as after a restart: reload and replay) and
"the worker answered no" (an :class:`~noodle.errors.ExecutorError`; a worker's own
failure carries its error id, the traceback stays in the worker's log).

A worker closes a stream idle for its ``--stream-idle-timeout`` (60 s by default), so
a :class:`ForwardStream` unused for ``REOPEN_IDLE_S`` opens a fresh call before its next
request; sessions live apart from streams and are kept.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

from noodle.errors import ExecutorError, SpecError
from noodle.executors.grpc import stage_service_pb2 as pb
from noodle.executors.grpc import stage_service_pb2_grpc as pb_grpc
from noodle.executors.grpc.worker import DEFAULT_MAX_MESSAGE_BYTES, ERROR_ID_KEY
from noodle.plandoc import PlanDoc, StageDoc

__all__ = [
    "WorkerGone", "StageLost", "WorkerClient", "REOPEN_IDLE_S", "step_timeout", "STEP_TIMEOUT_FLOOR_S", "STEP_TIMEOUT_FACTOR", "ForwardStream", "Watchdog", "translate", "parse_workers", "parse_address",
    "resolve_addresses", "parse_spares", "check_message_size",
]  # fmt: skip

# Codes that say "no answer" rather than "the worker refused": retry, then fail over.
_GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
_END = object()
REOPEN_IDLE_S = 20.0


class WorkerGone(Exception):
    """A worker did not answer (connection lost, deadline passed); the call may be retried elsewhere."""


class StageLost(WorkerGone):
    """A worker answers but no longer has the session or stage (it restarted, or reaped it): reload, replay."""


def parse_address(text: str, *, field: str) -> str:
    """``host:port`` with a numeric port, checked."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"{field}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return f"{host}:{int(port)}"


def parse_workers(text: str, *, field: str = "--workers") -> dict[str, str]:
    """``node=host:port,node2=host:port`` -> ``{node: address}``."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        node, sep, addr = part.partition("=")
        if not sep or not node.strip():
            raise SpecError(f"{field}: {part!r} is not NODE=HOST:PORT (e.g. desktop-gpu=127.0.0.1:50051)")
        if node.strip() in out:
            raise SpecError(f"{field}: node {node.strip()!r} is given twice")
        out[node.strip()] = parse_address(addr, field=f"{field} {node.strip()}")
    return out


def resolve_addresses(plan: PlanDoc, workers: Mapping[str, str] | str | None) -> dict[str, str]:
    """Stage node -> ``host:port``: ``workers`` first, then the plan's ``address``.

    Environment variables (``NOODLE_WORKERS``) are read by the CLI, not here.

    Nodes in ``workers`` that the plan does not use are ignored.
    """
    if workers is None:
        workers = ""
    if isinstance(workers, str):
        given = parse_workers(workers)
    else:
        given = {k: parse_address(v, field=f"--workers {k}") for k, v in workers.items()}
    plan_nodes = {n.id: n for n in plan.nodes}
    out: dict[str, str] = {}
    missing = []
    for st in plan.stages:
        if st.node in given:
            out[st.node] = given[st.node]
            continue
        doc = plan_nodes.get(st.node)
        if doc is None or doc.address is None:
            missing.append(st.node)
        else:
            out[st.node] = parse_address(doc.address, field=f"plan: nodes.{st.node}.address")
    if missing:
        raise SpecError(
            f"--workers: no address for node(s) {', '.join(dict.fromkeys(missing))}; give --workers "
            f"{missing[0]}=HOST:PORT,... or an `address:` for each node in the plan"
        )
    return out


def parse_spares(spares: Sequence[str] | str | None) -> list[str]:
    """Spare worker addresses from a list or ``"host:port,host:port"`` (``None``: none)."""
    if spares is None:
        spares = ""
    if isinstance(spares, str):
        spares = [s for s in spares.split(",") if s.strip()]
    return [parse_address(s, field="--spare") for s in spares]


def check_message_size(plan: PlanDoc, hidden: int, max_message_bytes: int) -> None:
    """Refuse a workload whose prefill activations would not fit one gRPC message."""
    w = plan.workload
    batch, prompt = w.get("batch_size", 1), w.get("prompt_tokens", 0)
    need = batch * prompt * hidden * 4 + 1024
    if need > max_message_bytes:
        raise SpecError(
            f"workload: a prefill of {batch} x {prompt} tokens x {hidden} hidden is {need / 2**20:.0f} MiB per message, "
            f"over the {max_message_bytes / 2**20:.0f} MiB gRPC message limit; raise max_message_bytes (and the "
            "workers' --max-message-mb; a worker's own limit is --max-batch sequences at the model's full length) or shorten the prompts"
        )


STEP_TIMEOUT_FLOOR_S = 2.0
STEP_TIMEOUT_FACTOR = 20.0


def step_timeout(doc: StageDoc, data: pb.Tensor, planned_batch: int) -> float:
    """Seconds stage ``doc`` may take for a step on ``data``, from the plan's predicted step time.

    ``max(STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_FACTOR x expected_latency_ms x work)``, where ``work`` is
    the step's new tokens (1 for a decode, the prompt for a prefill) times how many planned batches
    its batch holds (at least 1). A hung worker is then found in seconds, not after a fixed minute.
    """
    shape = list(data.shape)
    batch = shape[0] if shape else 1
    tokens = shape[1] if len(shape) > 1 else 1
    work = max(1, tokens) * max(1.0, batch / max(1, planned_batch))
    return max(STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_FACTOR * max(doc.expected_latency_ms, 0.0) / 1e3 * work)


def translate(exc: grpc.RpcError, where: str) -> Exception:
    """:class:`WorkerGone` for a lost worker (:class:`StageLost` for a lost session or stage), else an
    :class:`ExecutorError` with the worker's message (and its error id when the worker failed)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    if code == grpc.StatusCode.NOT_FOUND:
        return StageLost(f"{where}: NOT_FOUND: {details}")
    if code in _GONE or (code == grpc.StatusCode.INTERNAL and ERROR_ID_KEY not in trailing):
        return WorkerGone(f"{where}: {code.name}: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ExecutorError(f"{where}: refused: {details}; give the worker's token with --token or NOODLE_TOKEN")
    return ExecutorError(f"{where}: {code.name}: {details}")


class Watchdog:
    """Cancels streams whose reply is overdue (the sync API has no per-message deadline)."""

    def __init__(self, tick_s: float = 0.02) -> None:
        self._streams: set[ForwardStream] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tick = tick_s
        self._thread = threading.Thread(target=self._loop, name="noodle-grpc-watchdog", daemon=True)
        self._thread.start()

    def watch(self, stream: ForwardStream) -> None:
        with self._lock:
            self._streams.add(stream)

    def forget(self, stream: ForwardStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _loop(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._streams if 0 < s.deadline < now]
            for s in late:
                s.expire()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class ForwardStream:
    """One ``ForwardStream`` call: :meth:`call` sends a request and returns its reply."""

    def __init__(self, client: WorkerClient, watchdog: Watchdog, where: str) -> None:
        self._client = client
        self._where = where
        self._watchdog = watchdog
        self.deadline = 0.0
        self.expired = False
        self._open()
        watchdog.watch(self)

    def _open(self) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        requests: Iterator[pb.ForwardRequest] = iter(self._q.get, _END)  # type: ignore[arg-type]
        self._call = self._client.stub.ForwardStream(requests, metadata=self._client.metadata)
        self._used = time.monotonic()

    def call(self, request: pb.ForwardRequest, timeout_s: float) -> pb.ForwardReply:
        if time.monotonic() - self._used > REOPEN_IDLE_S:  # the worker may have closed it as idle
            self._q.put(_END)
            self._call.cancel()
            self._open()
        self.deadline = time.monotonic() + timeout_s
        self._q.put(request)
        try:
            reply: pb.ForwardReply = next(self._call)
        except grpc.RpcError as exc:
            if self.expired:
                raise WorkerGone(f"{self._where}: no reply within {timeout_s:g} s (hung or overloaded)") from None
            raise translate(exc, self._where) from None
        except StopIteration:
            raise WorkerGone(f"{self._where}: the worker ended the stream") from None
        finally:
            self.deadline = 0.0
            self._used = time.monotonic()
        return reply

    def expire(self) -> None:
        self.expired = True
        self._call.cancel()

    def close(self) -> None:
        self._watchdog.forget(self)
        self._q.put(_END)
        self._call.cancel()


class WorkerClient:
    """A channel to one worker, with its token and an estimate of its clock's offset.

    Args:
        address: ``host:port``.
        token: sent as ``authorization: Bearer <token>`` on every call.
        tls_ca: PEM file of the CA (or self-signed certificate) to trust; enables TLS.
        tls_server_name: name to check the certificate against, when it is not ``host``.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls_ca is not None:
            try:
                ca = Path(tls_ca).read_bytes()
            except OSError as exc:
                raise SpecError(f"--tls-ca: cannot read {tls_ca} ({exc.strerror})") from None
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.StageServiceStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.clock_offset_ns = 0
        self.ping_ms: float | None = None

    def health(self, timeout_s: float) -> pb.HealthReply:
        """One health check; raises :class:`WorkerGone` or :class:`ExecutorError`."""
        try:
            return self.stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise translate(exc, f"worker {self.address}: Health") from None

    def connect(self, timeout_s: float, *, within_s: float, backoff_s: float = 0.1) -> pb.HealthReply:
        """Health checks with exponential backoff (capped at 1 s) until one answers or ``within_s`` passes.

        A worker still starting, or a lossy network, is waited for; a refusal (wrong token) is not.
        """
        deadline = time.monotonic() + within_s
        delay = backoff_s
        while True:
            try:
                return self.health(min(timeout_s, max(deadline - time.monotonic(), 0.05)))
            except WorkerGone:
                if time.monotonic() + delay >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def sync_clock(self, timeout_s: float, rounds: int = 5, *, within_s: float = 0.0) -> None:
        """Estimate the worker's monotonic-clock offset from the fastest of ``rounds`` pings.

        With ``within_s`` the first ping is retried with backoff for that long (:meth:`connect`) and a
        later ping that is lost is skipped.
        """
        if rounds < 1:
            raise ExecutorError(f"worker {self.address}: clock sync needs at least one round, got {rounds}")
        samples: list[tuple[int, int]] = []  # (round trip, offset)
        if within_s > 0:
            self.connect(timeout_s, within_s=within_s)
        lost: WorkerGone | None = None
        for _ in range(rounds):
            t0 = time.monotonic_ns()
            try:
                reply = self.health(timeout_s)
            except WorkerGone as exc:
                if within_s <= 0:
                    raise
                lost = exc
                continue
            t1 = time.monotonic_ns()
            samples.append((t1 - t0, reply.clock_ns - (t0 + t1) // 2))
        if not samples and lost is not None:
            raise lost
        rtt, offset = min(samples, key=lambda sample: sample[0])  # the first fastest, as before
        self.ping_ms = rtt / 1e6
        self.clock_offset_ns = offset

    def alive(self, timeout_s: float) -> bool:
        try:
            self.health(timeout_s)
        except (WorkerGone, ExecutorError):
            return False
        return True

    def unary(self, method: str, request: object, timeout_s: float, what: str) -> object:
        """Call a unary method by name; errors translated (see :func:`translate`)."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise translate(exc, f"{what} ({self.address}): {method}") from None

    def close(self) -> None:
        self.channel.close()
