"""Seeded mutation fuzzing of every user input of `solve`, `plot`, `exec` and `profile`.

Hundreds of malformed specs, plans, flags and model folders go through the CLI entry
(`noodle.cli.main.main(argv)`, in-process), a handful through `python -m noodle`. Each must
end with a documented exit code (0 when the mutation left the input valid; 2 bad input;
3 infeasible; 4 solver unavailable), no traceback, and within a time bound.
Set NOODLE_FUZZ_SEED to explore other cases; the default seed is what CI runs.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from noodle.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("NOODLE_FUZZ_SEED", "20261127"))
ALLOWED = {0, 2, 3, 4}
PER_CASE_S = 20.0
N_SPECS = 130
N_EXEC = 120

BAD_VALUES: list[Any] = [
    float("inf"), float("-inf"), float("nan"), 10**30, -(10**30), -1, 0, 1e-320, "1e400", ".inf", "abc", "",
    None, True, [], {}, [1, 2], {"a": 1}, "x" * 10_000, 2**63, 1.5, "\u202e\u0000",
]


# ---- mutations of a parsed document and of its bytes ----------------------------------------------


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple) -> Any:
    if not path:
        return {}
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


def mutate_doc(rng: random.Random, base: Any) -> Any:
    doc = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        op = rng.random()
        if op < 0.55:
            doc = _set(doc, path, rng.choice(BAD_VALUES))
        elif op < 0.7 and path:
            doc = _delete(doc, path)
        elif op < 0.8:
            doc = _set(doc, path, {"unknown_key": 1})
        elif op < 0.9 and path and isinstance(path[-1], str):
            doc = _set(doc, path, copy.deepcopy(rng.choice([v for p in paths[1:] for v in [p]]) and 7))
        else:
            doc = _set(doc, path, rng.choice(["node-x", "block.99", "embed", "lm_head", "laptop-igpu"]))
    return doc


def mutate_bytes(rng: random.Random, text: bytes) -> bytes:
    op = rng.randrange(7)
    cut = rng.randrange(len(text))
    if op == 0:
        return text[:cut]  # truncated
    if op == 1:
        return text[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + text[cut:]
    if op == 2:
        depth = rng.choice([70, 1_000, 10_000])
        return text[:cut] + b"[" * depth + b"]" * depth + text[cut:]
    if op == 3:  # a line twice: duplicate keys
        lines = text.splitlines(keepends=True)
        i = rng.randrange(len(lines))
        return b"".join([*lines[: i + 1], lines[i], *lines[i + 1 :]])
    if op == 4:
        return b"\xff\xfe" + text
    if op == 5:
        return text.replace(b": ", b": &a ", 1).replace(b"\n", b"\nzz: *a\n", 1)
    return text[:cut] + b"\t{[}]: - ? !!python/object:os.system\n" + text[cut:]


# ---- the harness ------------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    rc = main(argv)  # an exception escaping here fails the test with its traceback
    took = time.perf_counter() - started
    cap = capsys.readouterr()
    return rc, cap.out + cap.err, took


def _check(case: str, rc: int, text: str, took: float) -> None:
    assert "Traceback" not in text, f"{case}: {text[-2000:]}"
    assert rc in ALLOWED, f"{case}: exit {rc}: {text[-600:]}"
    assert took < PER_CASE_S, f"{case}: took {took:.1f} s"
    if rc != 0:
        assert "noodle: error:" in text or "Usage:" in text, f"{case}: {text[-600:]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from noodle.models import init_model

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return init_model("gpt2-tiny", tmp_path_factory.mktemp("fuzz") / "gpt2", seed=0, tokenizer=False)


@pytest.fixture(scope="module")
def plan_doc(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from noodle.executors.slicing import unit_names_of
    from tests.executors.conformance import plan_for

    assert unit_names_of(model_dir)[0] == "embed"
    return plan_for(model_dir, [0, 2, 6], prompt_tokens=16, max_new_tokens=8, batch_size=2).as_dict()


def test_malformed_specs(tmp_path, capsys):
    rng = random.Random(SEED)
    text = (ROOT / "specs" / "inline-pins.yaml").read_bytes()
    base = yaml.safe_load(text)
    base["solver"]["time_limit_s"] = 2
    codes: dict[int, int] = {}
    for i in range(N_SPECS):
        path = tmp_path / f"spec{i}.yaml"
        if i % 3 == 2:
            data = mutate_bytes(rng, text)
        else:
            data = yaml.safe_dump(mutate_doc(rng, base), allow_unicode=True).encode()
        path.write_bytes(data)
        rc, out, took = _run(["solve", str(path), "-f", "json", "--time-limit", "2"], capsys)
        _check(f"spec {i} ({data[:120]!r})", rc, out, took)
        codes[rc] = codes.get(rc, 0) + 1
    assert codes.get(2, 0) >= N_SPECS // 2, codes  # most mutations are caught as bad input


def _broken_folders(rng: random.Random, model_dir: Path, root: Path) -> list[tuple[str, Path]]:
    weights = (model_dir / "model.safetensors").read_bytes()
    config = (model_dir / "config.json").read_bytes()
    cases: list[tuple[str, Callable[[Path], None]]] = [
        ("weights-cut", lambda d: (d / "model.safetensors").write_bytes(weights[: rng.randrange(len(weights))])),
        ("weights-noise", lambda d: (d / "model.safetensors").write_bytes(os.urandom(rng.randint(0, 5000)))),
        ("weights-flip-header", lambda d: (d / "model.safetensors").write_bytes(
            weights[:8] + weights[8:60].replace(b"F32", b"F64") + weights[60:])),
        ("weights-gone", lambda d: (d / "model.safetensors").unlink()),
        ("weights-dir", lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir())),
        ("config-cut", lambda d: (d / "config.json").write_bytes(config[: rng.randrange(len(config))])),
        ("config-bytes", lambda d: (d / "config.json").write_bytes(b"\xff" + config)),
        ("config-list", lambda d: (d / "config.json").write_text("[1, 2]")),
        ("config-deep", lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)),
        ("config-type", lambda d: (d / "config.json").write_text(json.dumps({**json.loads(config), "n_layer": "four"}))),
        ("index-escape", lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"transformer.wte.weight": "../../etc/x.safetensors"}}))),
        ("index-garbage", lambda d: (d / "model.safetensors.index.json").write_bytes(os.urandom(64))),
        ("index-not-map", lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}')),
    ]
    out = []
    for i, (name, breaker) in enumerate(cases * 2):
        folder = root / f"m{i}"
        shutil.copytree(model_dir, folder)
        breaker(folder)
        out.append((name, folder))
    return out


def test_bad_exec_and_profile_inputs(model_dir, plan_doc, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    good_plan = tmp_path / "good.json"
    good_plan.write_text(json.dumps(plan_doc))
    cases: list[tuple[str, list[str]]] = []
    # mutated plans
    plan_text = json.dumps(plan_doc, indent=1).encode()
    for i in range(50):
        path = tmp_path / f"plan{i}.json"
        if i % 3 == 2:
            path.write_bytes(mutate_bytes(rng, plan_text))
        else:
            path.write_text(json.dumps(mutate_doc(rng, plan_doc)))
        cases.append((f"plan {i}", ["exec", str(path), "--model", str(model_dir), "--prompt-ids", "1,2,3", "-n", "2"]))
    # bad flags
    flag_values = {
        "-n": ["0", "-5", "ten", str(10**30), "100000", ""], "--temperature": ["nan", "inf", "-1", "1e400", "x"],
        "--top-p": ["nan", "0", "2", "-inf"], "--top-k": ["-1", str(10**30)], "--seed": ["-1", str(10**30)],
        "--threads": ["100000", "-1", str(2**40)], "--backend": ["warp", "", "grpc"], "--format": ["xml"],
        "--prompt-ids": ["", ",", "1,,x", "-1", str(10**30), "1," * 3000], "--step-timeout": ["nan", "-1", "inf"],
    }
    for i in range(40):
        flag = rng.choice(sorted(flag_values))
        value = rng.choice(flag_values[flag])
        argv = ["exec", str(good_plan), "--model", str(model_dir), "--prompt-ids", "1,2", "-n", "2"]
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        if flag == "--backend" and value == "grpc":
            argv += ["--workers", "node0=127.0.0.1:1,node1=127.0.0.1:1", "--step-timeout", "nan"]
        cases.append((f"flag {flag}={value[:20]!r}", argv))
    # broken model folders, at exec and at profile
    for name, folder in _broken_folders(rng, model_dir, tmp_path / "models"):
        cases.append((f"exec {name}", ["exec", str(good_plan), "--model", str(folder), "--prompt-ids", "1,2", "-n", "2"]))
        cases.append((f"profile {name}", ["profile", "--model", str(folder), "--out", str(tmp_path / "prof" / name),
                                         "-n", "1", "--warmup", "0", "--prompt-tokens", "4", "--decode-tokens", "1",
                                         "--no-dashboard", "--module-iterations", "0"]))
    # profile flags
    for value in ["0", "-1", str(10**30), "nan", "100000000"]:
        cases.append((f"profile --prompt-tokens {value}", ["profile", "--model", str(model_dir), "--prompt-tokens", value,
                                                          "--out", str(tmp_path / "p2")]))
    assert len(cases) >= 100
    codes: dict[int, int] = {}
    for case, argv in cases:
        rc, out, took = _run(argv, capsys)
        _check(case, rc, out, took)
        codes[rc] = codes.get(rc, 0) + 1
    assert codes.get(2, 0) >= len(cases) // 2, codes


@pytest.mark.parametrize(
    "argv",
    [
        ["solve", "{tmp}/deep.yaml"],
        ["solve", "{tmp}/bad-utf8.yaml"],
        ["solve", "--time-limit", "nan", "specs/inline-pins.yaml"],
        ["exec", "{tmp}/deep.yaml", "--model", "{tmp}", "--prompt-ids", "1"],
        ["frobnicate", "--now"],
    ],
)
def test_a_few_through_a_subprocess(tmp_path, argv):
    (tmp_path / "deep.yaml").write_text("[" * 10_000 + "]" * 10_000)
    (tmp_path / "bad-utf8.yaml").write_bytes(b"name: \xff\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    run = subprocess.run([sys.executable, "-m", "noodle", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
