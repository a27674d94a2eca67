"""The engine on one CPU node, side by side: ``noodle serve`` vs transformers ``generate()`` vs llama.cpp.

Same machine, same torch/llama.cpp threads, same chat prompts, one run, contenders interleaved per
level (each warmed at the measured shapes first):

* ``noodle serve`` over HTTP (streaming chat completions, a one-stage plan of the whole model), with
  continuous batching (the serving default) and with the grouped engine it replaces (``--batching groups``,
  one sequence per step), at 1/4/8/16 concurrent streams;
* transformers' own ``generate()`` on the same prompts as left-padded batches of the same size (greedy,
  tokens counted up to each row's end of sequence);
* llama.cpp through ``llama-cpp-python`` on the same GGUF (when installed): its high-level API generates
  one sequence at a time, so every level is the same requests one after another.

Every level serves the same ``--requests`` chat prompts (the same work, so levels compare): N streams
take the next prompt from one shared list as soon as their last answer ends (a closed loop with N
clients, as serving benchmarks drive a server); ``generate()`` takes them N at a time as one batch.
Output tokens/s = completion tokens / wall time of the level; TTFT per request.
* ``--formats int8,int4``: noodle serve with the stage in that weight format, for the same-bits
  comparison with llama.cpp's Q4_1 / Q8_0.

``--check`` also runs the exactness check: ``--check-prompts`` chat prompts x ``--new-tokens`` greedy
tokens through noodle serve (continuous batching, 8 streams, the official ``openai`` client) vs
``generate()`` on each prompt alone: how many texts are identical.

Writes bench/results/engine.{json,md,png}.

    python bench/engine.py --model out/models/smollm2 --gguf ~/.cache/noodle/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.servebench import launch_serve  # noqa: E402

HERE = Path(__file__).parent
QUESTIONS = [
    "What is the capital of France?", "Explain how a bicycle works.", "Write a short poem about the sea.",
    "Give me three tips for learning a new language.", "Why is the sky blue?", "Name three colors.",
    "What is 17 times 3?", "Describe a cat in one sentence.", "How do plants make food?",
    "What is a prime number?", "Suggest a name for a pet turtle.", "Why do we have seasons?",
    "Translate 'good morning' into Spanish.", "What does a compiler do?", "List four planets.",
    "How many legs does a spider have?", "What is the boiling point of water?", "Tell me a fun fact about owls.",
    "What is photosynthesis?", "Give an example of a mammal that flies.", "What is the largest ocean?",
    "How does a rainbow form?", "What is gravity?", "Write a haiku about autumn.", "What is a noun?",
    "Why is exercise healthy?", "What language is spoken in Brazil?", "How do bees make honey?",
    "What is the opposite of cold?", "Name a famous painter.", "What is 100 divided by 4?", "What are clouds made of?",
]  # fmt: skip


def one_stage_plan(model: Path, fmt: str, memory_gb: float) -> Any:
    """The whole model as one stage on this machine, in weight format ``fmt``."""
    from noodle.executors.slicing import unit_names_of
    from noodle.plandoc import NodeDoc, PlanDoc, Predicted, SolverInfo, StageDoc

    units = unit_names_of(model)
    stage = StageDoc(stage_id=0, node="this-cpu", device="cpu", layers=units, start=0, end=len(units), compute_ms=1.0,
                     hop_ms=0.0, expected_latency_ms=1.0, memory_required_mb=1.0, memory_available_mb=memory_gb * 1024,
                     rationale="bench: the whole model on this CPU", format=fmt)  # fmt: skip
    return PlanDoc(name="engine-bench", objective="latency", objective_ms=1.0, cost_model="none",
                   solver=SolverInfo(name="hand", status="baseline", solve_time_s=0.0),
                   predicted=Predicted(token_latency_ms=1.0, bottleneck_ms=1.0, tokens_per_s=1e3), stages=[stage],
                   units=units, workload={"prompt_tokens": 64, "max_new_tokens": 64, "batch_size": 16},
                   nodes=[NodeDoc(id="this-cpu", device="cpu", memory_gb=memory_gb, compute_score=1.0)])  # fmt: skip


# -- noodle serve over HTTP ----------------------------------------------------------------------------
async def _chat(client: httpx.AsyncClient, question: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            choices = chunk.get("choices") or []
            delta = (choices[0].get("delta") or {}) if choices else {}
            if first is None and "content" in delta and "role" not in delta:  # the role chunk comes before any token
                first = time.perf_counter()
    return {"tokens": tokens, "ttft_s": (first or time.perf_counter()) - t0}


def questions(n: int) -> list[str]:
    """The first ``n`` prompts every contender answers at every level."""
    return [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else " Answer briefly.") for i in range(n)]


async def _level(base: str, streams: int, requests: int, max_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    todo = list(reversed(questions(requests)))
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=900) as client:
        t0 = time.perf_counter()

        async def stream() -> list[dict[str, Any]]:
            got = []
            while todo:
                got.append(await _chat(client, todo.pop(), max_tokens))
            return got

        done = [r for rs in await asyncio.gather(*(stream() for _ in range(streams))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in done)
    ttft = sorted(r["ttft_s"] for r in done)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_ms_p50": 1e3 * statistics.median(ttft),
            "ttft_ms_max": 1e3 * ttft[-1]}  # fmt: skip


def serve_levels(model: Path, plan: Path, batching: str, levels: list[int], requests: int, max_tokens: int,
                 threads: int) -> dict[int, dict[str, Any]]:  # fmt: skip
    args = ["--model", str(model), "--plan", str(plan), "--batching", batching, "--concurrency", str(max(levels)),
            "--max-queue", "1024", "--threads", str(threads), "--served-model-name", "m"]  # fmt: skip
    out: dict[int, dict[str, Any]] = {}
    with launch_serve(args) as (base, _proc):
        asyncio.run(_level(base, max(levels), max(levels), 8))  # warm-up at the largest batch
        for n in levels:
            out[n] = asyncio.run(_level(base, n, requests, max_tokens))
            print(f"  noodle serve {batching}: {n} streams {out[n]['tokens_per_s']:.1f} tokens/s", flush=True)
    return out


# -- transformers generate() ---------------------------------------------------------------------------
def generate_levels(model: Path, levels: list[int], requests: int, max_tokens: int) -> dict[int, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos = lm.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)

    def run(questions: list[str], new: int) -> tuple[int, list[list[int]]]:
        prompts = [ids_of(tok, q) for q in questions]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        rows = []
        for row in out[:, width:].tolist():
            k = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            rows.append(row[:k])
        return sum(map(len, rows)), rows

    res: dict[int, dict[str, Any]] = {}
    run(questions(max(levels)), 8)  # warm-up at the largest batch
    qs = questions(requests)
    for n in levels:
        t0 = time.perf_counter()
        tokens = sum(run(qs[i : i + n], max_tokens)[0] for i in range(0, len(qs), n))
        wall = time.perf_counter() - t0
        res[n] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
        print(f"  generate(): batch {n} {res[n]['tokens_per_s']:.1f} tokens/s", flush=True)
    return res


def ids_of(tok: Any, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


# -- llama.cpp -----------------------------------------------------------------------------------------
def llamacpp_levels(gguf: Path, levels: list[int], requests: int, max_tokens: int, threads: int) -> dict[int, dict[str, Any]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  llama.cpp: llama-cpp-python is not installed; skipped", flush=True)
        return None
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)

    def one(q: str, new: int) -> int:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": q}], max_tokens=new, temperature=0.0)
        return int(out["usage"]["completion_tokens"])

    one(QUESTIONS[0], 8)
    res: dict[int, dict[str, Any]] = {}
    for n in levels:
        t0 = time.perf_counter()
        tokens = sum(one(q, max_tokens) for q in questions(requests))
        wall = time.perf_counter() - t0
        res[n] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
        print(f"  llama.cpp ({gguf.name}): {n} streams' requests one after another {res[n]['tokens_per_s']:.1f} tokens/s", flush=True)
    return res


# -- exactness ---------------------------------------------------------------------------------------------
def exactness(model: Path, plan: Path, prompts: int, new: int, threads: int) -> dict[str, Any]:
    """noodle serve (continuous, 8 streams, the openai client) vs generate() alone: identical texts."""
    import torch
    from openai import AsyncOpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asked = questions(prompts)
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    want = []
    for q in asked:
        ids = torch.tensor([ids_of(tok, q)])
        with torch.inference_mode():
            out = lm.generate(input_ids=ids, max_new_tokens=new, do_sample=False)
        want.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    args = ["--model", str(model), "--plan", str(plan), "--batching", "continuous", "--concurrency", "8",
            "--threads", str(threads), "--served-model-name", "m"]  # fmt: skip
    with launch_serve(args) as (base, _proc):
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none")

        async def ask(q: str, sem: asyncio.Semaphore) -> str:
            async with sem:
                r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                         max_tokens=new, temperature=0)  # fmt: skip
                return r.choices[0].message.content or ""

        async def all_of() -> list[str]:
            sem = asyncio.Semaphore(8)
            return list(await asyncio.gather(*(ask(q, sem) for q in asked)))

        got = asyncio.run(all_of())
    same = [g.strip() == w.strip() for g, w in zip(got, want)]
    differ = [{"prompt": q, "noodle": g, "generate": w} for q, g, w, s in zip(asked, got, want, same) if not s]
    print(f"  exactness: {sum(same)} of {len(same)} texts identical to generate() alone", flush=True)
    return {"prompts": len(same), "identical": sum(same), "new_tokens": new, "differ": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("out/models/smollm2"))
    ap.add_argument("--gguf", type=Path, default=Path.home() / ".cache/noodle/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="chat prompts served at every level")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every contender; the median is kept")
    ap.add_argument("--formats", default="", help="extra noodle weight formats to serve (int8,int4)")
    ap.add_argument("--no-groups", action="store_true", help="skip the grouped engine (the 'before' figure)")
    ap.add_argument("--check", action="store_true", help="also run the exactness check")
    ap.add_argument("--check-prompts", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    levels = [int(x) for x in a.levels.split(",")]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="noodle-engine-") as tmp:
        plans = {}
        for fmt in ["float32", *[f for f in a.formats.split(",") if f]]:
            plans[fmt] = Path(tmp) / f"plan-{fmt}.json"
            plans[fmt].write_text(json.dumps(one_stage_plan(a.model, fmt, 16.0).as_dict()))
        print(f"engine bench: {a.model}, threads {a.threads}, levels {levels}, {a.requests} requests x {a.new_tokens} tokens at most, "
              f"{a.repeats} interleaved repeat(s)")  # fmt: skip
        runs: dict[str, list[dict[int, dict[str, Any]]]] = {}
        for rep in range(a.repeats):
            print(f"repeat {rep + 1} of {a.repeats}", flush=True)
            runs.setdefault("noodle continuous float32", []).append(
                serve_levels(a.model, plans["float32"], "continuous", levels, a.requests, a.new_tokens, a.threads))
            runs.setdefault("generate() float32", []).append(generate_levels(a.model, levels, a.requests, a.new_tokens))
            if not a.no_groups:
                runs.setdefault("noodle groups float32 (before)", []).append(
                    serve_levels(a.model, plans["float32"], "groups", levels, a.requests, a.new_tokens, a.threads))
            for fmt in plans:
                if fmt != "float32":
                    runs.setdefault(f"noodle continuous {fmt}", []).append(
                        serve_levels(a.model, plans[fmt], "continuous", levels, a.requests, a.new_tokens, a.threads))
            if a.gguf.is_file():
                cpp = llamacpp_levels(a.gguf, levels, a.requests, a.new_tokens, a.threads)
                if cpp is not None:
                    runs.setdefault(f"llama.cpp {a.gguf.stem.split('.')[-1]} (serial)", []).append(cpp)
        results = {name: {n: median_run(rs, n) for n in levels} for name, rs in runs.items()}
        load.append(os.getloadavg()[0])
        check = exactness(a.model, plans["float32"], a.check_prompts, a.new_tokens, a.threads) if a.check else None
    load.append(os.getloadavg()[0])
    write(a, levels, results, check, load)


def median_run(runs: list[dict[int, dict[str, Any]]], n: int) -> dict[str, Any]:
    """Of the repeats at level ``n``, the one with the median tokens/s (all of them kept under ``repeats``)."""
    ordered = sorted((r[n] for r in runs), key=lambda x: x["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats": [round(x["tokens_per_s"], 2) for x in (r[n] for r in runs)]}


def write(a: argparse.Namespace, levels: list[int], results: dict[str, Any], check: dict[str, Any] | None,
          load: list[float]) -> None:  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(a.model), "threads": a.threads, "requests": a.requests, "new_tokens": a.new_tokens,
            "cpus": os.cpu_count(), "loadavg": load, "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    doc = {"meta": meta, "results": {k: {str(n): v for n, v in r.items()} for k, r in results.items()}, "exactness": check}
    (a.out / "engine.json").write_text(json.dumps(doc, indent=2) + "\n")
    gen = results["generate() float32"]
    cont = results["noodle continuous float32"]
    lines = ["| contender | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in levels) + " |",
             "|---|" + "---|" * len(levels)]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[n]['tokens_per_s']:.1f}" for n in levels) + " |")
    lines.append("| noodle continuous / generate() | " + " | ".join(
        f"{cont[n]['tokens_per_s'] / gen[n]['tokens_per_s']:.2f}x" for n in levels) + " |")  # fmt: skip
    lines.append("| noodle continuous / its 1 stream | " + " | ".join(
        f"{cont[n]['tokens_per_s'] / cont[levels[0]]['tokens_per_s']:.2f}x" for n in levels) + " |")  # fmt: skip
    lines.append("| noodle continuous TTFT p50 / max (ms) | " + " | ".join(
        f"{cont[n]['ttft_ms_p50']:.0f} / {cont[n]['ttft_ms_max']:.0f}" for n in levels) + " |")  # fmt: skip
    text = (f"Output tokens/s, {a.model.name}, {a.threads} thread(s), the same {a.requests} chat requests x {a.new_tokens} tokens at most at every level, "
            f"load average {load[0]:.1f} -> {load[-1]:.1f}\n\n" + "\n".join(lines) + "\n")  # fmt: skip
    if check:
        text += f"\nExactness: {check['identical']} of {check['prompts']} chat prompts x {check['new_tokens']} greedy tokens identical to generate() alone.\n"
    (a.out / "engine.md").write_text(text)
    print(text)
    plot(results, levels, a.out / "engine.png", meta)


def plot(results: dict[str, Any], levels: list[int], path: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        ax.plot(levels, [r[n]["tokens_per_s"] for n in levels], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("concurrent streams (generate(): batch size)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"one CPU node, {meta['threads']} thread(s), {Path(meta['model']).name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
