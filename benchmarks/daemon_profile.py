"""Where the daemons spend their CPU under load: py-spy samples each one from
outside (no change to the daemon, a few per cent of a core to py-spy) and
the stacks are summed per function.

``run.py --profile-daemons`` records the full phase's measured window; the
table it prints (and docs/performance.md keeps) has, for each daemon, the
functions with the most samples at the top of the stack ("self": where the
time went, C code counted to the Python function that called it) and the
project's functions that hold the most beneath them ("total": which path
it took). Shares are of the samples in which a thread was not idle: pool
threads waiting for work are left out (:data:`IDLE`); a thread waiting for
the GIL still counts, at the function that wants it, so the shares are of
time spent, not strictly of CPU. ``Runner.run`` as "self" is the event
loop's own C code (uvloop: polling, its transports). A function is
``name (file)``, the path cut to the project or the library it lies in.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Samples per second: py-spy's default, light enough to leave the figures
#: of the phase it watches within their run-to-run spread.
RATE_HZ: Final = 100
#: Entries of each list kept.
TOP: Final = 12
#: A frame of py-spy's raw (collapsed) output: ``name (path:line)``.
FRAME: Final = re.compile(r"^(?P<name>.*?) \((?P<path>[^():]+)(?::\d+)?\)$")
#: Stacks whose innermost Python frame only waits: a pool's worker thread
#: blocked on its queue. py-spy cannot tell a thread blocked in C from one
#: running C code, so these are left out by name; what is left is time a
#: thread worked or waited for the GIL.
IDLE: Final = frozenset({"_worker (concurrent/futures/thread.py)"})
#: The project's own packages: the "total" column lists only their
#: functions, the paths the work took through the daemon's code.
PACKAGES: Final = ("protocol/", "runtime/", "processserver/", "mastertarget/", "agent/")
#: The daemons' entry points: under every sample of the main thread, they
#: tell nothing of where the work went.
ENTRIES: Final = ("processserver/cli.py", "mastertarget/cli.py", "runtime/command.py",
                  "runtime/service.py")  # fmt: skip
#: How py-spy names the thread or process a stack is of, before its frames.
WHO: Final = ("thread (", "process ")
#: Where a frame's file is named from: the project's folder, and the
#: libraries' (the interpreter's own and the installed ones).
PROJECT: Final = str(Path(__file__).resolve().parent.parent) + "/"
ROOTS: Final = ("/site-packages/", f"/lib/python{sys.version_info[0]}.{sys.version_info[1]}/")


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """One daemon's samples, summed."""

    samples: int
    #: (function, share of samples) with the function at the top of the stack
    self_top: list[tuple[str, float]]
    #: (function of the project, share of samples) with it anywhere in the stack
    total_top: list[tuple[str, float]]

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "self": [[name, share] for name, share in self.self_top],
            "total": [[name, share] for name, share in self.total_top],
        }


def _py_spy() -> str | None:
    """py-spy beside this interpreter (the bench extras install it), or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return _py_spy() is not None


async def record(pid: int, seconds: float, output: Path) -> None:
    """Sample process ``pid`` (and its threads) for ``seconds`` into ``output``.

    Raises:
        RuntimeError: py-spy failed (not allowed to attach, the process ended).
    """
    py_spy = _py_spy()
    if py_spy is None:
        raise RuntimeError("expected py-spy beside the interpreter or on the PATH, found neither")
    proc = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(RATE_HZ), "--format", "raw", "--output", str(output), "--nonblocking",
        "--threads", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(
            f"expected py-spy to record process {pid}, it exited with {proc.returncode}: "
            f"{err.decode(errors='replace').strip()[-500:]}"
        )


def _function(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["path"].removeprefix(PROJECT)
    for root in ROOTS:
        if root in path:
            path = path.rsplit(root, 1)[1]
            break
    return f"{match['name']} ({path})"


def summarize(text: str, top: int = TOP) -> ProfileSummary:
    """Sum py-spy's raw output: one ``frame;frame;...;frame COUNT`` line per stack,
    the outermost frame first (a thread's name before it with ``--threads``)."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if "(" in f and not f.startswith(WHO)]
        if not frames:
            continue
        if frames[-1] in IDLE:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            where = name.split(" (", 1)[1]
            if where.startswith(PACKAGES) and not where.startswith(ENTRIES):
                anywhere[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / samples, 3)) for name, n in counter.most_common(top)]

    if not samples:
        return ProfileSummary(0, [], [])
    return ProfileSummary(samples, shares(own), shares(anywhere))


async def profile_daemons(
    pids: dict[str, int], seconds: float, folder: Path
) -> dict[str, ProfileSummary]:
    """Record every daemon in ``pids`` at once for ``seconds``; their summaries by name.
    The raw stacks stay in ``folder`` (NAME.pyspy.txt) for a flame graph."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs = {name: folder / f"{name}.pyspy.txt" for name in pids}
    await asyncio.gather(*(record(pid, seconds, outputs[name]) for name, pid in pids.items()))
    return {name: summarize(path.read_text()) for name, path in outputs.items()}


def profile_table(summaries: dict[str, ProfileSummary], top: int = 8) -> str:
    """Markdown: each daemon's functions by self share, then by total share."""
    lines: list[str] = []
    for name, summary in summaries.items():
        lines += [
            f"{name}: {summary.samples} samples at {RATE_HZ} Hz",
            "",
            "| self | function | total | function |",
            "|---|---|---|---|",
        ]
        pairs = itertools.zip_longest(
            summary.self_top[:top], summary.total_top[:top], fillvalue=("", 0.0)
        )
        for (left, left_share), (right, right_share) in pairs:
            lines.append(f"| {left_share:.1%} | `{left}` | {right_share:.1%} | `{right}` |")
        lines.append("")
    return "\n".join(lines)
