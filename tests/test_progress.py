"""noodle.progress: progress lines in logs."""

def test_progress_off_a_terminal_is_a_log_line_with_what_is_left(caplog):
    from noodle.progress import progress_bar

    with caplog.at_level("INFO", logger="noodle.progress"):
        with progress_bar(True, "m: profile", 3, every_s=0.0) as advance:
            for _ in range(3):
                advance()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("m: profile: 1/3, about ") and lines[1].startswith("m: profile: 2/3")
