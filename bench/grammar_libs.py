"""Per-token cost of a JSON-schema mask from xgrammar, llguidance and outlines-core (issue 19, item 2).

Not part of noodle: run it in a scratch environment that has the three libraries
(``pip install xgrammar llguidance outlines-core`` beside transformers), on one thread:

    python bench/grammar_libs.py --tokenizer out/models/smollm2 --out bench/results/grammar_libs.json

For each library: the time to read the vocabulary (once per server) and to compile the schema
(once per request, unless cached), then, walking a
fixed valid answer token by token (SmolLM2's tokenization of it), the time to compute the
allowed-token mask over the whole vocabulary, to apply it to a logits row, and to advance the
matcher. Each walk is repeated ``--repeats`` times; the table gives the median and p90 per token.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = ('{"name":"Ada Lovelace","age":36,"email":"ada@example.org","tags":["math","poetry","engines"],'
          '"address":{"city":"London","zip":"W1"}}')  # fmt: skip


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_xgrammar(tok: Any, ids: list[int], vocab: int, repeats: int) -> dict[str, Any]:
    import xgrammar as xgr

    info, prep_s = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, compile_s = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                      separators=(",", ":")))  # fmt: skip
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def walk() -> tuple[list[float], list[float], list[float]]:
        m = xgr.GrammarMatcher(compiled)
        fill, apply, adv = [], [], []
        logits = torch.zeros(1, vocab)
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            t1 = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits, mask)
            t2 = time.perf_counter()
            assert m.accept_token(t), f"xgrammar refused token {t}"
            t3 = time.perf_counter()
            fill.append(t1 - t0), apply.append(t2 - t1), adv.append(t3 - t2)
        return fill, apply, adv

    return {"tokenizer_s": prep_s, "compile_s": compile_s, **_walks(walk, repeats)}


def bench_llguidance(tok: Any, ids: list[int], vocab: int, repeats: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok, prep_s = _timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab))

    def compile_() -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                                 defaults={"whitespace_flexible": False})  # fmt: skip
        m = llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily: the first matcher pays
        assert not m.is_error(), m.get_error()
        return grammar

    grammar, compile_s = _timed(compile_)
    mask = llt.allocate_token_bitmask(1, lltok.vocab_size)

    def walk() -> tuple[list[float], list[float], list[float]]:
        m = llguidance.LLMatcher(lltok, grammar)
        fill, apply, adv = [], [], []
        logits = torch.zeros(1, vocab)
        for t in ids:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(m, mask, 0)
            t1 = time.perf_counter()
            llt.apply_token_bitmask_inplace(logits, mask)
            t2 = time.perf_counter()
            assert m.consume_token(t), f"llguidance refused token {t}: {m.get_error()}"
            t3 = time.perf_counter()
            fill.append(t1 - t0), apply.append(t2 - t1), adv.append(t3 - t2)
        return fill, apply, adv

    return {"tokenizer_s": prep_s, "compile_s": compile_s, **_walks(walk, repeats)}


def bench_outlines(tok: Any, ids: list[int], vocab: int, repeats: int) -> dict[str, Any]:
    import outlines_core.kernels.torch as okt
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    def vocabulary() -> Any:
        chars = {ch: b for b, ch in bytes_to_unicode().items()}
        pieces: dict[bytes, list[int]] = {}
        for piece, i in tok.get_vocab().items():
            if i == tok.eos_token_id or i in tok.all_special_ids:
                continue
            pieces.setdefault(bytes(chars[c] for c in piece) if all(c in chars for c in piece) else piece.encode(),
                              []).append(i)  # fmt: skip
        return Vocabulary(tok.eos_token_id, pieces)

    voc, prep_s = _timed(vocabulary)
    index, compile_s = _timed(lambda: Index(build_regex_from_schema(json.dumps(SCHEMA), None), voc))
    mask = okt.allocate_token_bitmask(vocab)

    def walk() -> tuple[list[float], list[float], list[float]]:
        g = Guide(index)
        fill, apply, adv = [], [], []
        logits = torch.zeros(1, vocab)
        for t in ids:
            t0 = time.perf_counter()
            okt.fill_next_token_bitmask(g, mask)
            t1 = time.perf_counter()
            okt.apply_token_bitmask_inplace(logits, mask)
            t2 = time.perf_counter()
            if t != tok.eos_token_id:  # outlines-core ends in the final state: EOS is allowed, not advanced over
                g.advance(t, return_tokens=False)
            t3 = time.perf_counter()
            fill.append(t1 - t0), apply.append(t2 - t1), adv.append(t3 - t2)
        return fill, apply, adv

    return {"tokenizer_s": prep_s, "compile_s": compile_s, **_walks(walk, repeats)}


def _walks(walk: Callable[[], tuple[list[float], list[float], list[float]]], repeats: int) -> dict[str, Any]:
    fill: list[float] = []
    apply: list[float] = []
    adv: list[float] = []
    first = walk()[0][0]  # warm-up; its first mask pays for what a library compiles lazily
    for _ in range(repeats):
        f, a, d = walk()
        fill += f
        apply += a
        adv += d
    total = np.array(fill) + np.array(apply) + np.array(adv)
    ms = lambda xs, q: float(np.percentile(np.array(xs) * 1e3, q))  # noqa: E731
    return {"first_mask_ms": first * 1e3, "mask_ms_p50": ms(fill, 50), "mask_ms_p90": ms(fill, 90), "apply_ms_p50": ms(apply, 50),
            "advance_ms_p50": ms(adv, 50), "token_ms_p50": ms(total, 50), "token_ms_p90": ms(total, 90),
            "token_ms_max": ms(total, 100)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="out/models/smollm2")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = int(AutoConfig.from_pretrained(args.tokenizer).vocab_size)
    ids = list(tok(ANSWER, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    rows: dict[str, Any] = {}
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance), ("outlines-core", bench_outlines)):
        rows[name] = fn(tok, ids, vocab, args.repeats)
    print(f"{len(ids)} tokens x {args.repeats} walks, vocabulary {vocab}, 1 thread")
    print(f"{'library':<14}{'vocab s':>8}{'compile s':>10}{'1st mask':>9}{'mask p50':>10}{'mask p90':>10}{'apply p50':>10}{'advance':>9}"
          f"{'token p50':>10}{'token p90':>10}{'max':>8}  (ms)")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:<14}{r['tokenizer_s']:>8.3f}{r['compile_s']:>10.3f}{r['first_mask_ms']:>9.3f}{r['mask_ms_p50']:>10.3f}{r['mask_ms_p90']:>10.3f}"
              f"{r['apply_ms_p50']:>10.3f}{r['advance_ms_p50']:>9.3f}{r['token_ms_p50']:>10.3f}"
              f"{r['token_ms_p90']:>10.3f}{r['token_ms_max']:>8.2f}")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from importlib.metadata import version

        libs = ("xgrammar", "llguidance", "outlines-core", "torch", "transformers")
        meta = {"tokens": len(ids), "repeats": args.repeats, "vocab": vocab, "schema": SCHEMA, "answer": ANSWER,
                "versions": {lib: version(lib) for lib in libs}, "cpu_threads": 1}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
