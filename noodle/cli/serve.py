"""``noodle serve --model DIR``: the coordinator as a service, with an OpenAI-compatible API.

Several ``--model NAME=DIR`` serve several models at once on the local executor, each with its own engine,
stages and metrics; a request's ``model`` picks one (:mod:`noodle.cli.serve_models`, :mod:`noodle.serve.multiplan`).

Plans (a plan file, a spec solved now, or this machine alone), loads the stages on the
chosen backend, and serves ``/v1/completions``, ``/v1/chat/completions``, ``/metrics`` and
a status page with uvicorn. The first SIGTERM/SIGINT drains (new requests get 503,
in-flight ones finish within ``--drain-timeout``), then the pipeline and the executor
close; a second signal stops at once.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import typer

from noodle.cli.checks import check_float, check_int, check_threads, read_token_file
from noodle.cli.output import stderr_console
from noodle.cli.serve_models import check_several, parse_models
from noodle.errors import ModelError, SpecError
from noodle.extras import require_exec
from noodle.serve.guard import LOCAL_HOSTS, MAX_REQUEST_BYTES, allowed_hosts
from noodle.serve.limits import HEADER_TIMEOUT_S, MAX_CONNECTIONS

__all__ = ["register", "load_tokenizer", "bind_socket"]

log = logging.getLogger(__name__)


def load_tokenizer(model: Path, chat_template: str | None, *, config: Any = None) -> Any:
    """The model folder's tokenizer (required: the API speaks text), with an optional chat template.

    ``config``: the model's transformers config when the caller has it (``ModelCard.hf_config``): config.json is
    then not read again."""
    from transformers import AutoTokenizer

    try:
        extra = {} if config is None else {"config": config}
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model}: no usable tokenizer ({str(exc).splitlines()[0][:200]}); the API needs one to "
                         "read and write text (`noodle model init` saves one)") from None  # fmt: skip
    if chat_template is not None:
        path = Path(chat_template)
        try:
            tok.chat_template = path.read_text() if path.is_file() else chat_template
        except OSError as exc:
            raise SpecError(f"--chat-template: cannot read {path} ({exc.strerror})") from None
    return tok


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SpecError(f"--host: cannot resolve {host!r} ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: a streamed chunk goes out at once instead of waiting
    # ~40 ms for the client's delayed ACK of the previous one (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise SpecError(f"--port: cannot listen on {host}:{port} ({exc.strerror}); pick another port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check_flags(backend: str, port: int, concurrency: int, max_queue: int, request_timeout: float,
                 threads: int, drain_timeout: float) -> None:  # fmt: skip
    from noodle.executors import EXECUTORS

    if backend not in EXECUTORS:
        raise SpecError(f"--backend: unknown executor {backend!r}; valid names: {', '.join(EXECUTORS.names())}")
    if not hasattr(EXECUTORS.get(backend), "pipeline"):
        raise SpecError(f"--backend: {backend} has no pipelined engine yet, so it cannot serve many requests at "
                        "once; use --backend local")  # fmt: skip
    check_int("--port", port, ge=0, le=65535)
    check_int("--concurrency", concurrency, ge=1, le=4096)
    check_int("--max-queue", max_queue, ge=1, le=2**20)
    check_float("--request-timeout", request_timeout, gt=0, le=1e6)
    check_float("--drain-timeout", drain_timeout, ge=0, le=1e6)
    check_threads("--threads", threads)


def _origins(given: list[str]) -> frozenset[str]:
    """``--allow-origin`` values: ``*`` or ``scheme://host[:port]``, as browsers send ``Origin``."""
    out = set()
    for origin in given:
        origin = origin.strip().rstrip("/")
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise SpecError(f"--allow-origin: {origin!r} is not an origin; give scheme://host[:port] "
                            "(https://chat.example) or *")  # fmt: skip
        out.add(origin.lower())
    return frozenset(out)


def _check_batching(batching: str, max_batch_tokens: int) -> None:
    from noodle.executors.batching import BATCHING_MODES

    if batching not in BATCHING_MODES:
        raise SpecError(f"--batching: must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")
    check_int("--max-batch-tokens", max_batch_tokens, ge=1, le=1 << 20)


def serve_cmd(
    model: list[str] = typer.Option(..., "--model", "-m", metavar="DIR|NAME=DIR", help="model folder (config, weights, tokenizer), or "
                                    "NAME=FOLDER; repeat to serve several models (local executor)"),
    plan: Path | None = typer.Option(None, "--plan", help="serve this plan (from `noodle solve`; several models: "
                                     "a joint plan)"),
    spec: Path | None = typer.Option(None, "--spec", help="solve this spec at start-up and serve its plan"),
    backend: str = typer.Option("local", "--backend", "-b", help="executor: local, torchrpc or grpc"),
    workers: str | None = typer.Option(None, "--workers", envvar="NOODLE_WORKERS", help="grpc: node=host:port,..."),
    token: str | None = typer.Option(None, "--token", envvar="NOODLE_TOKEN", help="grpc: the workers' shared token"),
    token_file: Path | None = typer.Option(None, "--token-file", help="read the token from this file (a mounted secret)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", "-p", help="port to listen on (0: a free one)"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="NOODLE_API_KEY", help="require Authorization: Bearer KEY on /v1"),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="model id in the API (default: the folder name)"),
    chat_template: str | None = typer.Option(None, "--chat-template", help="Jinja chat template (file or text) when the tokenizer has none"),
    emulate: bool = typer.Option(False, "--emulate", help="sleep to stretch stages and hops to the plan's nodes and links"),
    concurrency: int = typer.Option(8, "--concurrency", help="sequences generated at once"),
    batching: str = typer.Option("auto", "--batching", help="auto, continuous (every running sequence in one step per "
                                 "stage), exact (one forward per sequence: generate()'s tokens) or groups"),
    max_batch_tokens: int = typer.Option(256, "--max-batch-tokens", help="tokens one batched step may carry "
                                         "(decode tokens first, prefill chunks fill the rest)"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests that may wait; more get 429"),
    max_request_bytes: int = typer.Option(MAX_REQUEST_BYTES, "--max-request-bytes",
                                          help="largest body /v1/completions and /v1/chat/completions take; more: 413"),
    allow_host: list[str] = typer.Option([], "--allow-host", help="also answer to this Host name (repeat; * : any); "
                                         "127.0.0.1, localhost and --host always"),
    allow_origin: list[str] = typer.Option([], "--allow-origin", help="let pages from this origin call the API "
                                           "(https://chat.example; repeat; * : any); others get 403"),
    max_connections: int = typer.Option(MAX_CONNECTIONS, "--max-connections", help="connections held at once (cut to "
                                        "the open-file limit); past it the longest idle one is closed"),
    header_timeout: float = typer.Option(HEADER_TIMEOUT_S, "--header-timeout",
                                         help="seconds a connection gets to send a request's headers"),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="seconds a request may run"),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="seconds in-flight requests get on SIGTERM"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)"),
    cluster: bool = typer.Option(False, "--cluster", help="plan over workers that join (`noodle worker --join URL --token T`); grpc"),
    min_workers: int = typer.Option(1, "--min-workers", help="--cluster: workers to wait for before the first plan"),
    replan_threshold: float = typer.Option(0.10, "--replan-threshold", help="--cluster: predicted gain a join must bring to re-plan"),
    heartbeat_timeout: float = typer.Option(5.0, "--heartbeat-timeout", help="--cluster: seconds without a heartbeat before a worker is dead"),
    probe_interval: float = typer.Option(60.0, "--probe-interval", help="--cluster: seconds between link probes of every pair (joins are probed at once); 0: off"),
    drift_threshold: float = typer.Option(0.15, "--drift-threshold",
                                          help="--cluster: re-plan when a stage's measured compute strays this far from its prediction"),
    replan_horizon: float = typer.Option(120.0, "--replan-horizon-s",
                                         help="--cluster: a switch must pay for moving its units within this many seconds"),
    verify_factor: float = typer.Option(8.0, "--verify-factor",
                                        help="--cluster: a joining worker's unit table is scaled when a stage step timed "
                                             "on it is off by more than this factor"),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)."""
    require_exec("noodle serve")
    from noodle.cli.network import backend_options
    from noodle.cli.solve import render_table
    from noodle.executors import check_plan
    from noodle.executors.slicing import unit_names_of
    from noodle.serve.build import build_server
    from noodle.serve.planning import resolve_plan

    _check_flags(backend, port, concurrency, max_queue, request_timeout, threads, drain_timeout)
    token = read_token_file(token, token_file)
    _check_batching(batching, max_batch_tokens)
    check_int("--max-request-bytes", max_request_bytes, ge=1024, le=1 << 30)
    check_int("--max-connections", max_connections, ge=16, le=1 << 20)
    check_float("--header-timeout", header_timeout, gt=0, le=3600)
    edge = _Edge(allowed_hosts(host, tuple(allow_host)), _origins(allow_origin), max_connections, header_timeout)
    given = parse_models(model)
    if len(given) > 1:
        several = check_several(given, served_model_name=served_model_name, backend=backend, cluster=cluster,
                                emulate=emulate, workers=workers)  # fmt: skip
        _serve_several(several, plan=plan, spec=spec, host=host, port=port, chat_template=chat_template,
                       threads=threads, edge=edge, concurrency=concurrency, batching=batching,
                       build={"max_queue": max_queue, "request_timeout_s": request_timeout,
                              "drain_timeout_s": drain_timeout, "api_key": api_key,
                              "max_batch_tokens": max_batch_tokens, "max_request_bytes": max_request_bytes,
                              "hosts": edge.hosts, "origins": edge.origins})  # fmt: skip
        return
    name, model_dir = given[0]
    if name is not None:
        if served_model_name is not None:
            raise SpecError(f"--served-model-name: --model {name}=... names the model already; give one of them")
        served_model_name = name
    if cluster:
        _serve_cluster(model_dir, token=token, host=host, port=port, api_key=api_key, served_model_name=served_model_name,
                       chat_template=chat_template, concurrency=concurrency, max_queue=max_queue,
                       request_timeout=request_timeout, drain_timeout=drain_timeout, threads=threads,
                       max_request_bytes=max_request_bytes, edge=edge, min_workers=min_workers, replan_threshold=replan_threshold,
                       heartbeat_timeout=heartbeat_timeout, probe_interval=probe_interval, drift_threshold=drift_threshold, replan_horizon=replan_horizon, batching=batching,
                       verify_factor=verify_factor,
                       max_batch_tokens=max_batch_tokens, conflicting={"--plan": plan, "--spec": spec,
                       "--workers": workers, "--emulate": emulate or None})  # fmt: skip
        return
    if threads:
        import torch

        torch.set_num_threads(threads)
    err = stderr_console()
    tokenizer = load_tokenizer(model_dir, chat_template)
    with err.status("planning"):
        doc, source = resolve_plan(model_dir, plan=plan, spec=spec, concurrency=concurrency, batching=batching)
    check_plan(doc, unit_names_of(model_dir), where=str(plan or spec or "plan"))
    err.print(f"plan: {source}", highlight=False)
    render_table(doc, err)
    options = backend_options(backend, workers=workers, spare=None, token=token, tls_ca=None, step_timeout=None)
    served = build_server(model_dir, doc, tokenizer, backend=backend, backend_options=options, emulate=emulate,
                          concurrency=concurrency, max_queue=max_queue, request_timeout_s=request_timeout,
                          drain_timeout_s=drain_timeout, api_key=api_key, model_id=served_model_name,
                          batching=batching, max_batch_tokens=max_batch_tokens,
                          max_request_bytes=max_request_bytes, hosts=edge.hosts, origins=edge.origins)  # fmt: skip
    model_id = served.model.model_id
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    print(f"noodle serve: {model_id!r} ({backend}{', emulated' if emulate else ''}) on http://{host}:{bound}/v1 "
          f"- status page http://{host}:{bound}/ - loading stages...", file=sys.stderr, flush=True)  # fmt: skip
    _run(served, sock, edge)
    err.print("noodle serve: stopped", highlight=False)


def _serve_several(models: list[tuple[str, Path]], *, plan: Path | None, spec: Path | None, host: str, port: int,
                   chat_template: str | None, threads: int, edge: _Edge, concurrency: int, batching: str,
                   build: dict[str, Any]) -> None:  # fmt: skip
    """Several ``--model``: one plan for all (a joint plan, a ``models:`` spec, or this machine), one local engine
    per model."""
    from noodle.cli.solve import render_table
    from noodle.serve.build import build_multi_server
    from noodle.serve.multiplan import plan_models

    if threads:
        import torch

        torch.set_num_threads(threads)
    err = stderr_console()
    tokenizers = {name: load_tokenizer(folder, chat_template) for name, folder in models}
    with err.status("planning"):
        plans, source = plan_models(models, plan=plan, spec=spec, concurrency=concurrency, batching=batching)
    err.print(f"plans: {source}", highlight=False)
    for name, doc in plans.items():
        err.print(f"model {name}:", highlight=False)
        render_table(doc, err)
    served = build_multi_server([(name, folder, plans[name], tokenizers[name]) for name, folder in models],
                                concurrency=concurrency, batching=batching, **build)  # fmt: skip
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    print(f"noodle serve: {', '.join(repr(name) for name, _ in models)} (local) on http://{host}:{bound}/v1 - status "
          f"page http://{host}:{bound}/ - loading stages...", file=sys.stderr, flush=True)  # fmt: skip
    _run(served, sock, edge)
    err.print("noodle serve: stopped", highlight=False)


def _serve_cluster(model: Path, *, token: str | None, host: str, port: int, api_key: str | None,
                   served_model_name: str | None, chat_template: str | None, concurrency: int, max_queue: int,
                   request_timeout: float, drain_timeout: float, threads: int, min_workers: int,
                   replan_threshold: float, heartbeat_timeout: float, conflicting: dict[str, Any],
                   probe_interval: float = 60.0, drift_threshold: float = 0.15,
                   replan_horizon: float = 120.0, max_request_bytes: int = MAX_REQUEST_BYTES,
                   edge: _Edge | None = None,
                   batching: str = "auto", max_batch_tokens: int = 256, verify_factor: float = 8.0) -> None:  # fmt: skip
    """``--cluster``: serve over workers that join; see docs/cluster.md."""
    from noodle.models.card import read_card
    from noodle.serve.build import build_cluster_server

    edge = edge or _Edge()
    given = [flag for flag, value in conflicting.items() if value]
    if given:
        raise SpecError(f"--cluster: plans over the workers that join; drop {', '.join(given)}")
    if not token:
        raise SpecError("--cluster: needs --token (or NOODLE_TOKEN): workers join with it and the coordinator calls "
                        "them with it; start workers with `noodle worker --join URL --token T`")  # fmt: skip
    check_int("--min-workers", min_workers, ge=1, le=10_000)
    check_float("--replan-threshold", replan_threshold, ge=0, le=100)
    check_float("--heartbeat-timeout", heartbeat_timeout, gt=0.1, le=3600)
    if probe_interval != 0 and not 1 <= probe_interval <= 86_400:  # NaN fails too
        raise SpecError(f"--probe-interval: must be 0 (no link probes) or 1 to 86400 seconds, got {probe_interval:g}")
    check_float("--drift-threshold", drift_threshold, gt=0, le=100)
    check_float("--replan-horizon-s", replan_horizon, gt=0, le=1e7)
    check_float("--verify-factor", verify_factor, ge=1.5, le=1e6)
    if threads:
        import torch

        torch.set_num_threads(threads)
    card = read_card(model)  # the folder's config is read here, once; everything below takes the card
    tokenizer = load_tokenizer(model, chat_template, config=card.hf_config)
    served = build_cluster_server(card, tokenizer, token=token, min_workers=min_workers,
                                  gain_threshold=replan_threshold, heartbeat_timeout_s=heartbeat_timeout,
                                  drift_threshold=drift_threshold,
                                  horizon_s=replan_horizon,
                                  concurrency=concurrency, max_queue=max_queue, request_timeout_s=request_timeout,
                                  drain_timeout_s=drain_timeout, api_key=api_key, model_id=served_model_name,
                                  probe_interval_s=probe_interval, max_request_bytes=max_request_bytes,
                                  batching=batching, max_batch_tokens=max_batch_tokens, verify_factor=verify_factor,
                                  hosts=edge.hosts, origins=edge.origins)  # fmt: skip
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    print(f"noodle serve: {served.model.model_id!r} (cluster) on http://{host}:{bound}/v1 - status page "
          f"http://{host}:{bound}/ - workers join with `noodle worker --join http://{host}:{bound} --token ...`; "
          f"waiting for {min_workers}", file=sys.stderr, flush=True)  # fmt: skip
    _run(served, sock, edge)
    stderr_console().print("noodle serve: stopped", highlight=False)


@dataclass(frozen=True)
class _Edge:
    """The HTTP edge's flags: the hosts and origins it answers, and its connection limits."""

    hosts: frozenset[str] | None = LOCAL_HOSTS
    origins: frozenset[str] = frozenset()
    max_connections: int = MAX_CONNECTIONS
    header_timeout_s: float = HEADER_TIMEOUT_S


def _run(served: Any, sock: socket.socket, edge: _Edge) -> None:
    import uvicorn

    from noodle.serve.limits import connection_budget, raise_nofile, uvicorn_config

    max_connections, header_timeout_s = edge.max_connections, edge.header_timeout_s
    nofile = raise_nofile()
    held = connection_budget(max_connections, nofile)
    if held < max_connections:
        log.warning("--max-connections %d: the open-file limit is %d, so at most %d connections are held",
                    max_connections, nofile, held)  # fmt: skip
    log.info("edge limits: %d connections, %d open files, %g s for headers", held, nofile, header_timeout_s)

    class _DrainingServer(uvicorn.Server):
        """First signal: drain (503 for new requests), then exit; a second signal: exit now."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if served.runtime.state in ("loading", "ready") and not self.should_exit:
                served.begin_drain()
                return
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # exit 0 after a requested shutdown, not by the signal

    server = _DrainingServer(uvicorn_config(served.app, max_connections=held, header_timeout_s=header_timeout_s))

    def drained() -> None:
        server.should_exit = True

    served.on_drained = drained
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
