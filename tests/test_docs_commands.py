"""Every fenced command in README.md and docs/*.md runs as written, in order, in a fresh folder.

The folder stands in for a clone after ``make demo``/``make demo-gpt2``, with tiny models instead of the real ones
(SmolLM2 and GPT-2 small take minutes to fetch, build and profile on two cores): ``out/models/gpt2`` is a 4-block,
64-wide GPT-2 with GPT-2's vocabulary, ``out/models/smollm2`` the ``llama-tiny`` preset with a chat template,
``out/profile/gpt2`` a short profile of the former and ``out/plan.json`` its plan on ``specs/gpt2-profiled.yaml``;
the spec's GPT-2 config (``specs/models/gpt2-small.json``) is the tiny model's, so the shipped specs plan the model
the commands run. The few rewrites of the commands themselves are listed in ``REWRITES``, each with its reason.
A block that needs what no test machine has (a CUDA device, Kubernetes, other machines, a download) carries
``<!-- docs-test: skip (why) -->`` on the line before its fence; the skipped blocks are printed with their reason.
Long-running commands (``noodle serve``, ``noodle worker``, anything ending in ``&``) start in the background, are
waited on until they answer, and are stopped at the end of their page. Rows of the README's command table are
parsed by the real CLI (``--help`` appended), so an unknown flag fails there too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from noodle.cli.main import main as noodle_main
from tests.serve.servers import CHAT_TEMPLATE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "console", "sh", "shell"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->\s*$")
TRAILING_COMMENT = re.compile(r"\s+# .*$")
OPTIONAL = re.compile(r" \[--[^\]]*\]")  # doc notation for an optional flag: `[--device cuda]`
# GPT-2's vocabulary (the docs' token ids are GPT-2's), 4 blocks 64 wide.
TINY_GPT2 = '{"model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 1024, "vocab_size": 50257}'
# (doc text, what the test runs, why): sizes only, never a flag or a path the reader would type differently.
REWRITES = [
    ("--preset gpt2 ", "--config tiny-gpt2.json ", "GPT-2 small takes minutes to build and profile on two cores"),
    ("--out runs/profile/gpt2 ", "--out runs/profile/gpt2 --time-budget 5 --module-iterations 0 ",
     "the default measures for about a minute"),
]
CMD_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Block:
    """One fenced shell block: where it is, its commands, and the skip reason if it is marked."""

    page: str
    line: int
    commands: tuple[str, ...]
    skip: str | None


def _commands(lang: str, body: str) -> list[str]:
    lines = body.splitlines()
    if lang == "console":  # `$ cmd` lines (with their continuations); the rest is output
        keep, cont = [], False
        for ln in lines:
            if ln.startswith("$ ") or cont:
                keep.append(ln[2:] if ln.startswith("$ ") else ln)
                cont = ln.rstrip().endswith("\\")
        lines = keep
    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        ln = TRAILING_COMMENT.sub("", OPTIONAL.sub("", ln)).strip()
        if ln and not ln.startswith("#"):
            out.append(ln)
    return out


def blocks(page: Path) -> list[Block]:
    """The shell blocks of one page, in order."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) not in SHELL_LANGS:
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        mark = SKIP.search(before[-1]) if before else None
        found.append(Block(page.relative_to(ROOT).as_posix(), text[: m.start()].count("\n") + 1,
                           tuple(_commands(m.group(1), m.group(2))), mark.group(1) if mark else None))
    return found


def _run_noodle(args: list[str]) -> None:
    assert noodle_main(args) == 0, f"fixture step failed: noodle {' '.join(args)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder that looks like a clone after `make demo` and `make demo-gpt2`, with tiny models."""
    work = tmp_path_factory.mktemp("docs")
    for name in ("specs", "protos", "deploy", "bench/results"):
        shutil.copytree(ROOT / name, work / name)
    (work / "noodle" / "executors" / "grpc").mkdir(parents=True)  # where the protoc line writes
    (work / ".venv").symlink_to(sys.prefix)
    (work / "tiny-gpt2.json").write_text(TINY_GPT2)
    os.chdir(work)
    try:
        _run_noodle(["-q", "model", "init", "--config", "tiny-gpt2.json", "--out", "out/models/gpt2"])
        _run_noodle(["-q", "model", "init", "--preset", "llama-tiny", "--out", "out/models/smollm2"])
        (work / "out/models/smollm2/chat_template.jinja").write_text(CHAT_TEMPLATE)  # SmolLM2 comes with one
        shutil.copy(work / "out/models/gpt2/config.json", work / "specs/models/gpt2-small.json")
        _run_noodle(["-q", "profile", "--model", "out/models/gpt2", "--out", "out/profile/gpt2", "--iterations", "2",
                     "--warmup", "1", "--module-iterations", "0", "--threads", "1"])
        _run_noodle(["-q", "solve", "specs/gpt2-profiled.yaml", "--out", "out/plan.json", "--format", "json"])
    finally:
        os.chdir(ROOT)
    return work


def _port_of(cmd: str) -> int:
    m = re.search(r"--port[ =](\d+)", cmd)
    if m:
        return int(m.group(1))
    return 8000 if " serve" in cmd else 50051


def _wait_ready(proc: subprocess.Popen, cmd: str, deadline_s: float) -> None:
    port, end = _port_of(cmd), time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
            raise AssertionError(f"background command exited with {proc.returncode}: {cmd}\n{err}")
        try:
            if " serve" in cmd:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready after {deadline_s:.0f} s: {cmd}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _rewrite(cmd: str) -> str:
    for old, new, why in REWRITES:
        if old in cmd + " ":
            print(f"  rewrite {old.strip()!r} -> {new.strip()!r} ({why})")
            cmd = (cmd + " ").replace(old, new).rstrip()
    return cmd


def _run_page(page: Path, work: Path, env: dict[str, str], skipped: list[str]) -> int:
    procs: list[subprocess.Popen] = []
    ran = 0
    try:
        for block in blocks(page):
            where = f"{block.page}:{block.line}"
            if block.skip:
                skipped.append(f"{where}: {block.skip}")
                continue
            for cmd in block.commands:
                cmd = _rewrite(cmd)
                print(f"$ {cmd}    [{where}]")
                long_running = cmd.endswith("&") or re.search(r"\bnoodle (serve|worker)\b", cmd)
                if long_running:
                    with socket.socket() as probe:  # someone else's server there would answer in its stead
                        taken = probe.connect_ex(("127.0.0.1", _port_of(cmd))) == 0
                    assert not taken, f"{where}: port {_port_of(cmd)} is taken on this machine; free it to run `{cmd}`"
                    proc = subprocess.Popen(["bash", "-c", cmd.rstrip("&").strip()], cwd=work, env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
                    procs.append(proc)
                    _wait_ready(proc, cmd, 150)
                elif cmd.startswith("export "):
                    out = subprocess.run(["bash", "-c", f"{cmd} && env -0"], cwd=work, env=env, capture_output=True,
                                         timeout=30, check=True).stdout.decode()
                    env.clear()
                    env.update(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)
                else:
                    res = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True,
                                         timeout=CMD_TIMEOUT_S)
                    assert res.returncode == 0, (
                        f"{where}: `{cmd}` exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
                    )
                    if cmd.startswith("curl "):  # `curl -s` exits 0 on an HTTP error: the body says
                        assert '"error"' not in res.stdout and res.stdout.strip(), f"{where}: `{cmd}`: {res.stdout}"
                ran += 1
    finally:
        _stop(procs)
    return ran


def test_every_fenced_command_runs(world: Path) -> None:
    """Each page's shell blocks run in order in the fresh folder; marked blocks are counted and printed."""
    # the repo's noodle first on the path: the folder holds a bare noodle/executors/grpc for the protoc line,
    # which a spawned worker (cwd on its path) would otherwise import as a namespace package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "NOODLE_CACHE": str(world / "cache")}
    skipped: list[str] = []
    ran = sum(_run_page(page, world, env, skipped) for page in PAGES)
    print(f"\n{ran} commands ran; {len(skipped)} blocks skipped:")
    for line in skipped:
        print(f"  skip {line}")
    assert ran >= 20  # the pages hold that many runnable commands; a parser that finds none must fail


def _table_commands() -> list[str]:
    """The `noodle ...` commands in the first column of the README's command table."""
    cmds = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| `noodle "):
            continue
        cell = line.split(" | ")[0][2:].replace("\\|", "|")
        for part in re.findall(r"`(noodle [^`]*)`", cell):
            cmds.extend(_variants(part))
    return cmds


def _variants(cmd: str) -> list[str]:
    """One command line per alternative in doc notation: `[--a x | --b y]`, `a|b|c`, and `... | kubectl`."""
    group = re.search(r" \[([^\]]*)\]", cmd)
    if group:
        rest = cmd[: group.start()] + "{}" + cmd[group.end():]
        return [v for alt in ["", *(" " + a.strip() for a in group.group(1).split(" | "))]
                for v in _variants(rest.format(alt))]
    cmd = cmd.split(" | ")[0].split(" > ")[0]
    words = shlex.split(cmd)
    for i, w in enumerate(words):
        if "|" in w and not w.startswith("-"):
            return [v for alt in w.split("|") for v in _variants(shlex.join([*words[:i], alt, *words[i + 1:]]))]
    return [cmd]


def test_table_rows_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """Every `noodle ...` in the README's command table is accepted by the real CLI parser."""
    cmds = _table_commands()
    assert len(cmds) >= 14
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        code = noodle_main([*argv, "--help"])
        err = capsys.readouterr().err
        assert code == 0, f"README table: `{cmd}` does not parse: {err.strip()[-400:]}"


def test_unknown_flag_fails_the_row_check(capsys: pytest.CaptureFixture[str]) -> None:
    """The row check is not vacuous: a drifted flag is refused by the same call."""
    assert noodle_main(["exec", "plan.json", "--no-such-flag", "1", "--help"]) != 0
    assert "--no-such-flag" in capsys.readouterr().err


def test_skip_marker_and_console_parsing() -> None:
    """A marked block is skipped with its reason; console blocks keep only their `$` lines."""
    page = ROOT / "README.md"
    assert all(b.commands for b in blocks(page) if not b.skip)
    assert _commands("console", "$ noodle solve a.yaml \\\n    --out p.json\nplan written\n") == [
        "noodle solve a.yaml --out p.json"]
    assert _commands("bash", "noodle serve --cluster [--min-workers 3]  # x\n# only a comment\n") == [
        "noodle serve --cluster"]
