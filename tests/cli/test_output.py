"""The CLI's log handler: plain lines on a pipe, libraries quiet without -v."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from noodle.cli.output import setup_logging


def test_piped_logs_are_plain_lines_without_padding(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    logging.getLogger("noodle.serve.runtime").info("stages loaded and pipeline started in 0.7 s")
    logging.getLogger("noodle.x").debug("not shown without -v")
    err = capsys.readouterr().err
    assert err == "stages loaded and pipeline started in 0.7 s\n"


def test_verbose_shows_level_and_logger(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(verbose=1)
    logging.getLogger("noodle.x").debug("detail")
    assert capsys.readouterr().err == "DEBUG noodle.x: detail\n"
    setup_logging()


def test_without_verbose_library_bars_and_advice_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(key, raising=False)
    with warnings.catch_warnings():
        setup_logging()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            setup_logging()  # filters go first in the list, ahead of "default"
            warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="transformers.generation")
            warnings.warn_explicit("ours", FutureWarning, "y.py", 1, module="noodle.spec")
        assert [str(w.message) for w in seen] == ["ours"]
