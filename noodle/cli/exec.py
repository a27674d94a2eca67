"""``noodle exec plan.json --model DIR``: run a plan's stages and report what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from noodle.cli.checks import (
    MAX_SEED,
    check_float,
    check_int,
    check_positions,
    check_threads,
)
from noodle.cli.output import stderr_console, stdout_console
from noodle.errors import ModelError, SpecError
from noodle.extras import require_exec
from noodle.plandoc import load_plan

if TYPE_CHECKING:  # noodle.executors imports torch: only `exec` itself loads it
    from noodle.executors import RunReport

__all__ = ["register", "render_report", "read_prompts", "encode_text"]

FORMATS = ("table", "json")
BACKENDS_HELP = "executor: local, torchrpc or grpc"  # noodle.executors.EXECUTORS; checked when the command runs
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _tokenizer(model: Path) -> Any | None:
    if not any((model / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model}: tokenizer files present but unreadable ({str(exc).splitlines()[0]})") from None


def _parse_ids(text: str, where: str) -> list[int]:
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise SpecError(f"{where}: expected comma-separated token ids like 1,2,3, got {text.strip()!r}") from None
    if not ids:
        raise SpecError(f"{where}: no token ids")
    return ids


def encode_text(tokenizer: Any, text: str, *, chat: bool = True) -> list[int]:
    """Token ids of ``text``; with ``chat`` and a tokenizer that has a chat template, as one user turn."""
    if chat and getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def read_prompts(
    prompt: str | None,
    prompt_ids: str | None,
    batch: Path | None,
    tokenizer: Any | None,
    vocab_size: int,
    batch_ids: Path | None = None,
    chat: bool = True,
) -> list[list[int]]:
    """Token ids of every prompt given on the command line, checked against the vocabulary.

    Text prompts go through the tokenizer's chat template when it has one and ``chat`` is on.
    """
    flags = (("--prompt", prompt), ("--prompt-ids", prompt_ids), ("--batch", batch), ("--batch-ids", batch_ids))
    given = [name for name, v in flags if v is not None]
    if len(given) != 1:
        raise SpecError(
            "exec: give exactly one of --prompt TEXT, --prompt-ids 1,2,3, --batch prompts.txt or --batch-ids ids.txt"
            + (f" (got {', '.join(given)})" if given else "")
        )
    prompts: list[tuple[str, list[int]]] = []
    if prompt is not None:
        if tokenizer is None:
            raise SpecError("--prompt: the model folder has no tokenizer; pass token ids with --prompt-ids 1,2,3")
        prompts.append(("--prompt", encode_text(tokenizer, prompt, chat=chat)))
    elif prompt_ids is not None:
        prompts.append(("--prompt-ids", _parse_ids(prompt_ids, "--prompt-ids")))
    else:
        path = batch if batch is not None else batch_ids
        if path is None:  # the exactly-one check above rules this out
            raise SpecError("exec: give one of --prompt, --prompt-ids, --batch or --batch-ids")
        try:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise SpecError(f"{path}: cannot read prompts ({exc.strerror})") from None
        if not lines:
            raise SpecError(f"{path}: no prompts (one per line)")
        as_text = batch is not None and tokenizer is not None
        for i, line in enumerate(lines, 1):
            where = f"{path}: line {i}"
            ids = encode_text(tokenizer, line, chat=chat) if as_text else _parse_ids(line, where)
            prompts.append((where, ids))
    for where, ids in prompts:
        if not ids:
            raise SpecError(f"{where}: the prompt encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise SpecError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [ids for _, ids in prompts]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0f}%"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_report(report: RunReport, console: Console) -> None:
    """Per-stage measured times and bytes beside the plan's predictions (times in ms)."""
    title = f"run report ({report.backend}{', emulated' if report.emulated else ''}): ms per decode step"
    table = Table(title=title, caption="planned: the plan's expected_latency_ms; measured: p50 + hop")
    cols = ("#", "node", "units", "prefill", "p50", "p95", "hop", "out/step", "planned", "measured", "error")
    for col in cols:
        table.add_column(col, justify="left" if col in ("#", "node", "units") else "right")
    for s in report.stages:
        table.add_row(
            str(s.stage_id), s.node, f"[{s.start},{s.end})", f"{s.prefill_ms:.1f}", f"{s.decode_ms_p50:.2f}",
            f"{s.decode_ms_p95:.2f}", f"{s.hop_ms_p50:.2f}", _bytes(s.bytes_out_per_decode),
            "n/a" if s.predicted_latency_ms is None else f"{s.predicted_latency_ms:.2f}",
            f"{s.measured_latency_ms:.2f}", _pct(s.latency_error_pct),
        )  # fmt: skip
    console.print(table)
    console.print(
        "units: " + "; ".join(f"{s.stage_id} {s.units}" for s in report.stages)
        + " | bytes handed on: " + ", ".join(_bytes(s.bytes_out) for s in report.stages),
        style="dim", highlight=False,
    )  # fmt: skip
    planned = report.predicted_token_latency_ms
    if report.concurrency is not None:
        pred = report.predicted_tokens_per_s
        share = report.throughput_of_plan
        how = (f"{report.batching} batching" if report.batching in ("continuous", "exact")
               else f"micro-batch {report.micro_batch}")  # fmt: skip
        console.print(
            f"{report.requests} requests, up to {report.concurrency} in flight (peak {report.peak_in_flight}; {how}"
            f"{f', prefill chunks of {report.prefill_chunk}' if report.prefill_chunk else ''}) | "
            f"{report.tokens_per_s:.1f} tokens/s"
            f"{'' if report.steady_tokens_per_s is None else f' ({report.steady_tokens_per_s:.1f} while full)'}"
            f", plan {'n/a' if pred is None else f'{pred:.1f}'}"
            f"{'' if share is None else f' ({share:.0%} of plan)'} | time to first token p50 "
            f"{report.ttft_ms_p50 or 0:.1f} ms, p95 {report.ttft_ms_p95 or 0:.1f} | inter-token p50 "
            f"{report.itl_ms_p50 or 0:.2f} ms, p95 {report.itl_ms_p95 or 0:.2f} | busy "
            + ", ".join(f"{s.node} {s.busy_fraction:.0%}" for s in report.stages if s.busy_fraction is not None)
            + f" | {report.wall_s:.2f} s",
            highlight=False,
        )
        return
    console.print(
        f"batch {report.batch_size}, prompt {report.prompt_tokens} tokens, {report.new_tokens} new | "
        f"prefill {report.prefill_ms:.1f} ms | token latency p50 {report.decode_ms_p50:.2f} ms "
        f"(p95 {report.decode_ms_p95:.2f}; planned {'n/a' if planned is None else f'{planned:.2f}'}, "
        f"error {_pct(report.token_latency_error_pct)}) | {report.decode_tokens_per_s:.1f} decode tokens/s, "
        f"{report.tokens_per_s:.1f} tokens/s overall, {report.wall_s:.2f} s",
        highlight=False,
    )


def exec_cmd(
    plan: Path = typer.Argument(..., help="plan file written by `noodle solve` (JSON or YAML)"),
    model: Path = typer.Option(..., "--model", "-m", help="model folder the plan was made for (or a HF cache snapshot / cached repo id)"),
    backend: str = typer.Option("local", "--backend", "-b", help=BACKENDS_HELP),
    prompt: str | None = typer.Option(None, "--prompt", help="prompt text (needs a tokenizer in the model folder)"),
    prompt_ids: str | None = typer.Option(None, "--prompt-ids", help="prompt token ids, e.g. 1,2,3"),
    batch: Path | None = typer.Option(None, "--batch", help="file with one prompt per line (text, or ids without a tokenizer)"),
    batch_ids: Path | None = typer.Option(None, "--batch-ids", help="file with one prompt per line as token ids, e.g. 1,2,3"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="text prompts as a user turn through the tokenizer's chat template, when it has one"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="tokens to generate per prompt"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy (the default); > 0 samples"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="sample within this probability mass (1.0: all)"),
    seed: int = typer.Option(0, "--seed", help="seed of the sampler"),
    fmt: str = typer.Option("table", "--format", "-f", help="stdout format: table | json"),
    emulate: bool = typer.Option(False, "--emulate", help="sleep to stretch stages and hops to the plan's nodes and links"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)"),
    workers: str | None = typer.Option(None, "--workers", envvar="NOODLE_WORKERS", help="grpc: node=host:port,... (default: each plan node's address)"),
    spare: str | None = typer.Option(None, "--spare", envvar="NOODLE_SPARE", help="grpc: host:port,... of idle workers to move a dead node's stage to"),
    token: str | None = typer.Option(None, "--token", envvar="NOODLE_TOKEN", help="grpc: the workers' shared token"),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", envvar="NOODLE_TLS_CA", help="grpc: certificate to trust; turns TLS on"),
    step_timeout: float | None = typer.Option(None, "--step-timeout", help="grpc/torchrpc: seconds a stage may take per step (default 60)"),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", help="pipeline the prompts: up to N sequences in flight, each prompt its own request"),
    micro_batch: int = typer.Option(1, "--micro-batch", help="with --concurrency: prompts per group (1 keeps each one exact on its own)"),
    prefill_chunk: int = typer.Option(0, "--prefill-chunk", help="with --concurrency: prefill prompts in chunks of N tokens (0: whole)"),
    batching: str = typer.Option("auto", "--batching", help="with --concurrency: auto, continuous (every running sequence "
                                 "in one step per stage), exact (one forward per sequence) or groups (--micro-batch)"),
    max_batch_tokens: int = typer.Option(256, "--max-batch-tokens", help="with --concurrency: tokens one batched step carries"),
) -> None:
    """Run a plan's stages on a model and report measured vs planned latency per stage."""
    require_exec("noodle exec")
    from noodle.cli.network import backend_options, render_network
    from noodle.cli.profile import quiet_transformers
    from noodle.executors import EXECUTORS, Sampling, check_formats, check_plan, check_workload

    quiet_transformers()  # stage loading goes through transformers' weight conversion and its progress bars

    if fmt not in FORMATS:
        raise SpecError(f"--format: {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    if backend not in EXECUTORS:
        raise SpecError(f"--backend: unknown executor {backend!r}; valid names: {', '.join(EXECUTORS.names())}")
    if max_new_tokens < 1:
        raise SpecError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    check_threads("--threads", threads)
    check_float("--temperature", temperature, ge=0, le=1e4)
    check_float("--top-p", top_p, gt=0, le=1)
    check_int("--top-k", top_k, ge=0, le=2**31 - 1)
    check_int("--seed", seed, ge=0, le=MAX_SEED)
    check_int("--max-new-tokens", max_new_tokens, ge=1, le=2**24)
    if step_timeout is not None:
        check_float("--step-timeout", step_timeout, le=1e6)  # > 0: backend_options, for the backends that use it
    if concurrency is not None:
        check_int("--concurrency", concurrency, ge=1, le=4096)
    check_int("--micro-batch", micro_batch, ge=1, le=4096)
    check_int("--prefill-chunk", prefill_chunk, ge=0, le=2**24)
    if concurrency is None and (micro_batch != 1 or prefill_chunk):
        raise SpecError("--micro-batch and --prefill-chunk need --concurrency N (the pipelined engine)")
    from noodle.executors.batching import BATCHING_MODES

    if batching not in BATCHING_MODES:
        raise SpecError(f"--batching: must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")
    check_int("--max-batch-tokens", max_batch_tokens, ge=1, le=1 << 20)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    doc = load_plan(plan)
    from noodle.executors.slicing import read_config, unit_names_of
    from noodle.models.resolve import resolve_model
    from noodle.models.weights import weight_files

    model = resolve_model(model)
    config = read_config(model)
    check_plan(doc, unit_names_of(model), where=str(plan))
    check_formats(doc, backend, where=str(plan))
    weight_files(model)  # truncated or garbage safetensors, an index pointing outside the folder: one line
    tokenizer = _tokenizer(model)
    prompts = read_prompts(prompt, prompt_ids, batch, tokenizer, int(config.vocab_size), batch_ids, chat=chat)
    longest = max(len(p) for p in prompts)
    check_positions(config, longest, max_new_tokens, where=f"the model in {model}", flags="prompt + --max-new-tokens")
    if threads:
        import torch

        torch.set_num_threads(threads)
    err = stderr_console()
    options = backend_options(backend, workers=workers, spare=spare, token=token, tls_ca=tls_ca, step_timeout=step_timeout)
    executor = EXECUTORS.get(backend)(doc, model, emulate=emulate, **options)
    # Pipelined, each prompt is its own sequence: the plan's batch size bounds a group, not the file.
    check_workload(doc, prompts if concurrency is None else [max(prompts, key=len)], max_new_tokens, where=str(plan))
    with err.status(f"loading {len(doc.stages)} stage(s) of {model} ({backend})"):
        executor.__enter__()
    try:
        progress = Progress(
            TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        )  # fmt: skip
        with progress:
            if concurrency is None:
                task = progress.add_task("tokens", total=max_new_tokens)
                result = executor.generate(
                    prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                    on_step=lambda n: progress.update(task, completed=n),
                )  # fmt: skip
            else:
                from noodle.executors.concurrent import run_concurrent

                task = progress.add_task("requests", total=len(prompts))
                result = run_concurrent(
                    executor, prompts, max_new_tokens=max_new_tokens, sampling=sampling, concurrency=concurrency,
                    micro_batch=micro_batch, prefill_chunk=prefill_chunk, batching=batching,
                    max_batch_tokens=max_batch_tokens, on_done=lambda n: progress.update(task, completed=n),
                )  # fmt: skip
    finally:
        executor.__exit__(None, None, None)
    if fmt == "json":
        sys.stdout.write(json.dumps({"tokens": result.tokens, "report": result.report.as_dict()}) + "\n")
        return
    out = stdout_console()
    for i, toks in enumerate(result.tokens):
        line = f"[{i}] tokens: {toks}"
        if tokenizer is not None:
            line += f"\n    text: {tokenizer.decode(toks, skip_special_tokens=True)!r}"
        out.print(line, highlight=False)
    render_report(result.report, out)
    render_network(result.report, out)


def register(app: typer.Typer) -> None:
    app.command("exec")(exec_cmd)
