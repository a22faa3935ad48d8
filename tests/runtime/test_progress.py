"""The progress line: what it says, and that only a terminal gets it."""

from __future__ import annotations

import io
import os
import pty

from runtime.progress import ProgressLine, copy_progress, human_bytes, human_duration


def test_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30, 3 * 2**50)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 GiB", "3072.0 TiB",
    ]  # fmt: skip
    assert [human_duration(s) for s in (0.4, 59, 61, 3599, 7322)] == [
        "0s", "59s", "1m01s", "59m59s", "2h02m",
    ]  # fmt: skip


def test_the_line_shows_done_sent_rate_and_eta() -> None:
    line = ProgressLine(total=100 * 2**20, stream=io.StringIO())
    line._history = [(10.0, 0), (12.0, 20 * 2**20)]  # 10 MiB/s over the window
    text = line.render(20 * 2**20, 3 * 2**20)
    assert text == " 20.0%  compared 20.0 MiB of 100.0 MiB, sent 3.0 MiB  10.0 MiB/s  ETA 8s"
    waiting = line.render(100 * 2**20, 3 * 2**20, phase="waiting for the master target")
    assert waiting.endswith("sent 3.0 MiB  waiting for the master target")


def test_nothing_is_drawn_unless_on_a_terminal() -> None:
    captured = io.StringIO()
    line = ProgressLine(total=10, stream=captured)
    line.update(5, 1, force=True)
    line.finish()
    assert captured.getvalue() == ""
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        line = ProgressLine(total=10, stream=terminal)
        line.update(5, 1, force=True)
        line.finish()
    drawn = _read_all(leader)
    assert "50.0%  compared 5 B of 10 B, sent 1 B" in drawn
    assert drawn.endswith("\r")  # erased for the summary line


def _read_all(leader: int) -> str:
    """Everything written to the terminal: the line and its erasing may come
    in separate reads; a pty whose other end is closed ends with EIO."""
    out = b""
    while True:
        try:
            piece = os.read(leader, 4096)
        except OSError:
            break
        if not piece:
            break
        out += piece
    os.close(leader)
    return out.decode()


def test_a_copy_reports_done_of_total_on_a_terminal_only() -> None:
    assert copy_progress("copied", io.StringIO()) is None  # not a terminal: nothing to do
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        show = copy_progress("copied", terminal)
        assert show is not None
        show(0, 8 * 2**20)
        show(8 * 2**20, 8 * 2**20)
    drawn = _read_all(leader)
    assert "100.0%  copied 8.0 MiB of 8.0 MiB" in drawn
    assert "sent" not in drawn
    assert drawn.endswith("\r")  # erased for the summary line
