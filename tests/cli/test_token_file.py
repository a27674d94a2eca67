"""``--token-file``: the cluster token from a file (a mounted Kubernetes Secret), refused in one line when unusable."""

from __future__ import annotations

from pathlib import Path

import pytest

from noodle.cli.checks import MAX_TOKEN_BYTES, read_token_file
from noodle.cli.main import main
from noodle.errors import SpecError


def test_the_file_wins_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret-token\n")
    assert read_token_file(None, path) == "s3cret-token"
    assert read_token_file("from-flag", None) == "from-flag"
    assert read_token_file(None, None) is None


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read"),
        (b"\n \n", "is empty"),
        (b"two words", "character 4 of the token is not printable ASCII"),
        (b"caf\xc3\xa9", "not printable ASCII"),
        (b"x" * (MAX_TOKEN_BYTES + 1), f"over {MAX_TOKEN_BYTES} bytes"),
    ],
)
def test_unusable_files_are_one_line(tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError, match="--token-file") as info:
        read_token_file(None, path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_token_and_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("abc")
    with pytest.raises(SpecError, match="not both"):
        read_token_file("abc", path)


@pytest.mark.parametrize("command", [["serve", "--cluster"], ["worker", "--join", "http://127.0.0.1:9"]])
def test_commands_refuse_a_missing_file_in_one_line(command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.delenv("NOODLE_TOKEN", raising=False)
    code = main([*command, "--model", str(tmp_path), "--token-file", str(tmp_path / "absent")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("noodle: error: --token-file: cannot read") and "\n" not in err
