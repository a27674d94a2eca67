"""Weight formats on the real model (SmolLM2-135M-Instruct): decode speed, greedy agreement, perplexity.

Each format loads the whole model as one noodle StageRunner (the code path every executor uses) and
runs on this CPU with ``--threads`` torch threads:

* decode speed: median ms per greedy decode step while generating, and the speed-up over float32;
* greedy-token agreement with float32, two ways, over ``--new-tokens`` tokens from each of the
  prompts (>= 200 tokens in all): *teacher-forced* (the format predicts each next token of
  float32's greedy continuation; the figure the planner's accuracy budget reads) and *free-running*
  (the format's own greedy continuation, position by position, which diverges for good after the
  first different token);
* perplexity on bench/data/calibration.txt (a few paragraphs shipped in the repo), and its
  relative increase over float32.

int8 and int4 are weight-only, on torch's own CPU kernels (see noodle/models/quant.py).

Writes bench/results/quant.{json,csv,png}; the JSON is also the ``accuracy.measured`` file of
specs/smollm2-quantized.yaml.

    python bench/quant.py --model out/models/smollm2 [--threads 1] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from noodle.executors.messages import StageInput
from noodle.executors.slicing import unit_names_of
from noodle.executors.stage import StageRunner

PROMPTS = [
    "What is the capital of France?",
    "Explain in a few sentences how a bicycle works.",
    "Write a short poem about the sea.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
]
HERE = Path(__file__).parent


def load(model: Path, fmt: str) -> StageRunner:
    n = len(unit_names_of(model))
    return StageRunner(model, 0, n, name=fmt, format=fmt)


def generate(stage: StageRunner, ids: list[int], new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the wall time of each decode step (ms)."""
    out = stage.step(StageInput("g", torch.tensor([ids]), None, prefill=True)).data
    tok = int(out[0, -1].argmax())
    toks, times = [tok], []
    for _ in range(new - 1):
        t = time.perf_counter()
        out = stage.step(StageInput("g", torch.tensor([[tok]]), None, prefill=False)).data
        times.append((time.perf_counter() - t) * 1e3)
        tok = int(out[0, -1].argmax())
        toks.append(tok)
    stage.end_session("g")
    return toks, times


def forced_top1(stage: StageRunner, ids: list[int], cont: list[int]) -> list[int]:
    """The format's next-token argmax at every position of ``ids + cont`` (teacher forcing)."""
    seq = torch.tensor([ids + cont[:-1]])
    logits = stage.step(StageInput("f", seq, None, prefill=True, all_logits=True)).data
    stage.end_session("f")
    return logits[0, len(ids) - 1 :].argmax(-1).tolist()


def perplexity(stage: StageRunner, ids: list[int], chunk: int = 512) -> float:
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, chunk):
        piece = ids[s : s + chunk + 1]
        logits = stage.step(StageInput("p", torch.tensor([piece[:-1]]), None, prefill=True, all_logits=True)).data
        stage.end_session("p")
        logp = torch.log_softmax(logits[0].double(), -1)
        tgt = torch.tensor(piece[1:])
        nll -= float(logp[torch.arange(len(tgt)), tgt].sum())
        count += len(tgt)
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("out/models/smollm2"))
    ap.add_argument("--formats", default="float32,bfloat16,int8,int4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--text", type=Path, default=HERE / "data" / "calibration.txt")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p in PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    text_ids = tok(args.text.read_text(encoding="utf-8"))["input_ids"]
    fmts = [f for f in args.formats.split(",") if f]
    rows: dict[str, dict[str, Any]] = {}
    ref_conts: list[list[int]] = []
    for fmt in fmts:
        stage = load(args.model, fmt)
        stage.step(StageInput("w", torch.tensor([prompts[0]]), None, prefill=True))  # warm-up
        stage.end_session("w")
        conts, times = [], []
        for ids in prompts:
            c, t = generate(stage, ids, args.new_tokens)
            conts.append(c)
            times += t
        if fmt == "float32":
            ref_conts = conts
        forced = free = total = 0
        for ids, mine, ref in zip(prompts, conts, ref_conts):
            top1 = forced_top1(stage, ids, ref)
            forced += sum(a == b for a, b in zip(top1, ref))
            free += sum(a == b for a, b in zip(mine, ref))
            total += len(ref)
        rows[fmt] = {
            "decode_ms": statistics.median(times), "token_agreement": forced / total,
            "free_running_agreement": free / total, "tokens_compared": total,
            "perplexity": perplexity(stage, text_ids), "param_mib": stage.param_bytes() / 2**20,
            "sample": tok.decode(conts[0], skip_special_tokens=True)[:160],
        }
        print(f"{fmt:15s} {rows[fmt]['decode_ms']:7.2f} ms/token  agreement {rows[fmt]['token_agreement']:.3f} "
              f"(free {rows[fmt]['free_running_agreement']:.3f})  ppl {rows[fmt]['perplexity']:.3f}", flush=True)
        del stage
    base = rows["float32"]
    for fmt, r in rows.items():
        r["speedup"] = base["decode_ms"] / r["decode_ms"]
        r["perplexity_increase"] = r["perplexity"] / base["perplexity"] - 1
        r["runs_on"] = {"float32": "cpu: torch float32", "bfloat16": "cpu: torch bfloat16",
                        "int8": "cpu: aten._weight_int8pack_mm (int8 per channel, bf16 activations)",
                        "int4": "cpu: aten._weight_int4pack_mm_for_cpu (int4 groups of 64, bf16 activations)",
                        }.get(fmt, fmt)
    doc = {"model": str(args.model), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "prompts": PROMPTS, "new_tokens_per_prompt": args.new_tokens,
           "text": str(args.text.relative_to(HERE.parent)) if args.text.is_relative_to(HERE.parent) else str(args.text),
           "text_tokens": len(text_ids), "formats": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant.json").write_text(json.dumps(doc, indent=2) + "\n")
    keys = ["decode_ms", "speedup", "token_agreement", "free_running_agreement", "perplexity", "perplexity_increase",
            "param_mib", "runs_on"]
    with (args.out / "quant.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["format", *keys])
        for fmt, r in rows.items():
            w.writerow([fmt, *[round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys]])
    _plot(rows, args.out / "quant.png", args.threads)


def _plot(rows: dict[str, dict[str, Any]], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("speedup", "token_agreement", "perplexity"),
                              (f"decode speed-up over float32 (CPU, {threads} thread)",
                               "greedy-token agreement (teacher-forced)", "perplexity (calibration.txt)")):
        vals = [rows[n][key] for n in names]
        ax.bar(names, vals, color=["#777", "#4a90d9", "#e07b39", "#9b59b6"][: len(names)])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: weight formats per stage", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
