"""The ``noodle`` entry point: exit codes of usage errors, --version, ``python -m noodle``, Ctrl-C, start-up imports."""

from __future__ import annotations

import json

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from noodle.cli import main as cli_main
from noodle.cli.main import app, main, package_version

ROOT = Path(__file__).resolve().parents[2]


def _commands(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf command path registered on the app, e.g. ('bench', 'solvers')."""
    found = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        sub = getattr(cmd, "commands", None)
        found.extend(_commands(cmd, path) if sub else [path])
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _no_traceback(capsys: pytest.CaptureFixture[str]) -> str:
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "Traceback" not in text, text
    return text


def test_every_command_is_found():
    assert {("solve",), ("exec",), ("profile",), ("worker",), ("plot",), ("model", "init"), ("bench", "solvers")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_unknown_flag_is_a_usage_error(path, capsys):
    assert main([*path, "--no-such-flag"]) == 2
    text = _no_traceback(capsys)
    assert "--no-such-flag" in text and "Usage: noodle " + " ".join(path) in text


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_of_every_command_exits_0(path, capsys):
    assert main([*path, "--help"]) == 0
    assert "Usage" in _no_traceback(capsys)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["solve"], "Missing argument"),
        (["solve", "--bogus"], "--bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["exec", "plan.json", "--model", "m", "-n", "ten"], "'--max-new-tokens'"),
        (["exec", "plan.json", "--model", "m", "--temperature", "warm"], "--temperature"),
        (["worker", "--token"], "'--token' requires an argument"),
        (["solve", "spec.yaml", "--time-limit"], "'--time-limit' requires an argument"),
        (["model"], "Usage"),
        (["bench", "frob"], "No such command 'frob'"),
    ],
)
def test_usage_errors_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in _no_traceback(capsys)


def test_version_comes_from_package_metadata(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    out = _no_traceback(capsys)
    assert out.strip() == f"noodle {version('noodle')}" == f"noodle {package_version()}"


def test_python_dash_m_noodle():
    run = subprocess.run([sys.executable, "-m", "noodle", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("noodle ")
    bad = subprocess.run([sys.executable, "-m", "noodle", "solve", "--bogus"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--bogus" in bad.stderr


def test_ctrl_c_during_exec_exits_130(monkeypatch, capsys):
    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("noodle.cli.exec.load_plan", interrupt)
    assert main(["exec", "plan.json", "--model", "m", "--prompt-ids", "1"]) == 130
    assert _no_traceback(capsys).strip().endswith("noodle: interrupted")


def test_parser_errors_are_recognised_by_shape_not_class(capsys):
    class ForeignUsageError(Exception):  # what any click copy's UsageError looks like
        exit_code = 2

        def show(self) -> None:
            print("Error: from another click", file=sys.stderr)

    class Abort(RuntimeError):
        pass

    assert cli_main._parser_exit(ForeignUsageError()) == 2
    assert cli_main._parser_exit(Abort()) == 130
    assert cli_main._parser_exit(ValueError("a bug")) is None
    assert "from another click" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(*_a, **_k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("noodle.cli.solve.load_joint_spec", bug)
    with pytest.raises(ZeroDivisionError):
        main(["solve", "spec.yaml"])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["solve", str(ROOT / "specs" / "inline-pins.yaml"), "-f", "json"],
                                  ["solve", str(ROOT / "specs" / "per-node-profiles.yaml"), "-f", "json"]])
def test_planning_does_not_import_torch_or_transformers(argv):
    code = (
        "import sys\nfrom noodle.cli.main import main\n"
        f"rc = main({argv!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'grpc', 'safetensors') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, (rc, heavy)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_importing_the_cli_does_not_import_torch():
    code = "import noodle.cli.main, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "plan.json", "--model", "m", "--prompt-ids", "1"],
        ["profile", "--preset", "gpt2-tiny"],
        ["worker", "--model", "m"],
        ["serve", "--model", "m"],
        ["model", "init", "--preset", "gpt2-tiny", "--out", "x"],
        ["solve", "{gemma}"],  # an hf_config of a family paramcount does not know: counted by building it
    ],
)
def test_execution_commands_without_the_exec_extra(monkeypatch, capsys, argv, tmp_path):
    import importlib.util

    if "{gemma}" in argv:
        (tmp_path / "gemma.json").write_text(json.dumps({"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 4,
                                                           "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 300}))
        spec = (ROOT / "specs" / "gpt2-home-lab.yaml").read_text().replace("models/gpt2-small.json", str(tmp_path / "gemma.json"))
        assert str(tmp_path / "gemma.json") in spec
        (tmp_path / "spec.yaml").write_text(spec)
        argv = [a.replace("{gemma}", str(tmp_path / "spec.yaml")) for a in argv]

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(argv) == 4
    err = _no_traceback(capsys).strip()
    assert err.startswith("noodle: error: ") and "pip install 'noodle[exec]'" in err and "torch" in err


@pytest.mark.parametrize("argv", [["exec", "plan.json", "--model", "m", "--prompt-ids", "1"], ["worker", "--model", "m"]])
def test_transformers_older_than_tested_is_refused_in_one_line(monkeypatch, capsys, argv):
    """5.16 and older crash inside staged execution: refused at start, naming the tested range."""
    import importlib.metadata

    from noodle.extras import tested_span

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.13.0" if name == "transformers" else real(name))
    assert main(argv) == 4
    err = _no_traceback(capsys).strip()
    assert err.startswith("noodle: error: transformers 5.13.0 is older than noodle is tested on"), err
    assert f"({tested_span()})" in err and len(err.splitlines()) == 1


def test_transformers_versions_judged_against_the_tested_range():
    from noodle.errors import DependencyMissing
    from noodle.extras import TESTED_TRANSFORMERS, check_transformers, tested_span

    floor, newest = TESTED_TRANSFORMERS
    assert check_transformers(floor) is None and check_transformers(newest) is None
    assert check_transformers(newest.rsplit(".", 1)[0] + ".9") is None  # a patch release of the newest minor
    major, minor = (int(x) for x in newest.split(".")[:2])
    warning = check_transformers(f"{major}.{minor + 1}.0.dev0")
    assert warning and warning.startswith(f"transformers {major}.{minor + 1}.0.dev0 is newer") and f"({tested_span()})" in warning
    with pytest.raises(DependencyMissing, match=f"transformers 5.16.2 is older .*{tested_span()}"):
        check_transformers("5.16.2")


def test_planning_works_without_the_exec_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["solve", str(ROOT / "specs" / "inline-pins.yaml"), "-f", "json"]) == 0


def test_every_cli_import_of_the_bench_package_is_preceded_by_use_bench():
    """`noodle bench ...` imports `bench.*` from the source checkout: each import needs the path set first."""
    import re
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[2] / "noodle" / "cli").glob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+from bench\.", line):
                before = "\n".join(lines[max(0, i - 3) : i])
                assert "use_bench()" in before, f"{path.name}:{i + 1}: import of bench without use_bench()"
