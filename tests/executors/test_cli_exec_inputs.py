"""``noodle exec`` and ``noodle profile`` on hostile inputs: broken weights, long prompts, bad numbers -> one line, exit 2."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noodle.cli.checks import max_threads
from noodle.cli.main import main
from noodle.plandoc import dump_plan

from .conformance import plan_for


def _one_line(capsys: pytest.CaptureFixture[str], rc: int, *needles: str) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert rc == 2, err
    assert "Traceback" not in cap.out + cap.err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("noodle: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def gpt2(tiny_models, tmp_path) -> tuple[Path, str]:
    """A copy of the tiny GPT-2 folder (free to break) and a 2-stage plan for it."""
    model = tmp_path / "gpt2"
    shutil.copytree(tiny_models["gpt2"], model)
    plan = tmp_path / "plan.json"
    plan.write_text(dump_plan(plan_for(model, [0, 3, 6], prompt_tokens=512, max_new_tokens=512)))
    return model, str(plan)


def _exec(model: Path, plan: str, *extra: str) -> int:
    return main(["exec", plan, "--model", str(model), "--prompt-ids", "1,2,3", "-n", "2", *extra])


def _profile(model: Path, tmp_path: Path, *extra: str) -> int:
    out = tmp_path / "prof"
    return main(["profile", "--model", str(model), "--out", str(out), "-n", "1", "--warmup", "0",
                 "--prompt-tokens", "4", "--decode-tokens", "1", "--no-dashboard", "--module-iterations", "0", *extra])


def _header(file: Path) -> tuple[int, dict]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def _rewrite(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _breakers(file: Path) -> dict:
    raw = file.read_bytes()
    n, header = _header(file)
    data = raw[8 + n :]
    first = next(k for k in header if k != "__metadata__")

    def shift_offsets():
        header[first]["data_offsets"][1] += 4
        _rewrite(file, header, data)

    def bad_shape():
        header[first]["shape"] = [3, 3, 3]
        _rewrite(file, header, data)

    return {
        "empty": lambda: file.write_bytes(b""),
        "4-bytes": lambda: file.write_bytes(raw[:4]),
        "header-cut": lambda: file.write_bytes(raw[: 8 + n // 2]),
        "data-cut": lambda: file.write_bytes(raw[: len(raw) // 2]),
        "last-byte-cut": lambda: file.write_bytes(raw[:-1]),
        "garbage": lambda: file.write_bytes(bytes(range(256)) * 64),
        "header-not-json": lambda: file.write_bytes((16).to_bytes(8, "little") + b"\xff" * 16 + data),
        "offsets-past-end": shift_offsets,
        "shape-vs-bytes": bad_shape,
    }


BREAKS = ["empty", "4-bytes", "header-cut", "data-cut", "last-byte-cut", "garbage", "header-not-json",
          "offsets-past-end", "shape-vs-bytes"]


@pytest.mark.parametrize("how", BREAKS)
def test_broken_safetensors_at_exec(gpt2, capsys, how):
    model, plan = gpt2
    _breakers(model / "model.safetensors")[how]()
    _one_line(capsys, _exec(model, plan), "model.safetensors", "safetensors")


@pytest.mark.parametrize("how", ["empty", "header-cut", "data-cut", "garbage", "shape-vs-bytes"])
def test_broken_safetensors_at_profile(gpt2, tmp_path, capsys, how):
    model, _ = gpt2
    _breakers(model / "model.safetensors")[how]()
    _one_line(capsys, _profile(model, tmp_path), "model.safetensors")


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(gpt2, tmp_path, capsys, target):
    model, plan = gpt2
    (tmp_path / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    _, header = _header(model / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map[next(iter(weight_map))] = target
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _one_line(capsys, _exec(model, plan), "weight_map", "outside the model folder")
    _one_line(capsys, _profile(model, tmp_path), "weight_map", "outside the model folder")


def test_prompt_longer_than_the_model_positions(gpt2, capsys):
    model, plan = gpt2  # the plan allows 512 + 512; the tiny model has fewer positions
    positions = json.loads((model / "config.json").read_text())["n_positions"]
    ids = ",".join(["1"] * (positions + 1))
    rc = main(["exec", plan, "--model", str(model), "--prompt-ids", ids, "-n", "1"])
    _one_line(capsys, rc, f"{positions + 1} prompt", f"has {positions}", "max_position_embeddings")
    rc = main(["exec", plan, "--model", str(model), "--prompt-ids", "1,2", "-n", str(positions)])
    _one_line(capsys, rc, "--max-new-tokens", f"= {positions + 2} positions")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "nan"], "--top-p"),
        (["--top-k", str(10**30)], "--top-k"),
        (["--seed", str(10**30)], "--seed"),
        (["--threads", "100000"], "--threads"),
        (["--threads", "-1"], "--threads"),
        (["--step-timeout", "nan"], "--step-timeout"),
        (["--backend", "grpc", "--step-timeout", "inf"], "--step-timeout"),
    ],
)
def test_bad_numbers_at_exec(gpt2, capsys, flags, needle):
    model, plan = gpt2
    _one_line(capsys, _exec(model, plan, *flags), needle)


def test_threads_bound_is_documented_number(gpt2, capsys):
    model, plan = gpt2
    line = _one_line(capsys, _exec(model, plan, "--threads", str(max_threads() + 1)), f"[0, {max_threads()}]")
    assert max_threads() <= 1024 and "CPUs" in line


def test_profile_out_is_an_existing_file(gpt2, tmp_path, capsys):
    model, _ = gpt2
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    rc = main(["profile", "--model", str(model), "--out", str(target)])
    _one_line(capsys, rc, "--out", "taken.txt", "existing file")
    assert target.read_text() == "keep me"


def test_profile_out_unwritable(gpt2, tmp_path, capsys):
    model, _ = gpt2
    (tmp_path / "file").write_text("")
    rc = main(["profile", "--model", str(model), "--out", str(tmp_path / "file" / "sub")])
    _one_line(capsys, rc, "--out", "cannot write")


@pytest.mark.parametrize(
    "flags, needle",
    [(["--threads", "100000"], "--threads"), (["--seed", str(10**30)], "--seed"), (["--iterations", str(10**30)], "--iterations")],
)
def test_bad_numbers_at_profile(gpt2, tmp_path, capsys, flags, needle):
    model, _ = gpt2
    _one_line(capsys, _profile(model, tmp_path, *flags), needle)


def test_worker_torchrpc_without_a_coordinator(tiny_models, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    rc = main(["worker", "--backend", "torchrpc", "--model", str(tiny_models["gpt2"]), "--connect-timeout", "1"])
    assert time.monotonic() - started < 15
    _one_line(capsys, rc, "MASTER_ADDR/MASTER_PORT", f"127.0.0.1:{port}", "--connect-timeout")


RUNNER = """
import sys
from noodle.cli.main import main
sys.stderr.write("READY\\n"); sys.stderr.flush()
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigint_during_exec_exits_130(gpt2, tmp_path):
    model, _ = gpt2
    for name in ("config.json", "generation_config.json"):  # no end-of-sequence token: all 60 steps run (~24 s)
        cfg = json.loads((model / name).read_text())
        cfg["eos_token_id"] = None
        (model / name).write_text(json.dumps(cfg))
    plan = tmp_path / "slow.json"  # emulated: every stage sleeps 200 ms a step, so the run is still going
    plan.write_text(dump_plan(plan_for(model, [0, 3, 6], compute_ms=200.0, prompt_tokens=8, max_new_tokens=64)))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, "exec", str(plan), "--model", str(model), "--prompt-ids", "1,2", "-n", "60",
         "--emulate", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().strip() == "READY"
    assert proc.stderr.readline().startswith("emulating")  # printed once the stages are loaded
    time.sleep(2.0)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("noodle: interrupted")
