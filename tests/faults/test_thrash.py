"""The thrash test: live capture through a storm of kill -9.

qemu-io writes random data through ``blockrepl agent capture`` while a
driver SIGKILLs one daemon every few seconds — the capture (nbdkit goes with
it), the process server or the master target — and starts it again after a
short random delay. Every few seconds the writer pauses between two writes,
the test copies the source, tags it (``blockrepl agent tag``) and lets the
writer go on: the copy is the disk at the tag.

After the storm the writes stop and everything settles. Then:

- the target equals the source (``qemu-img compare``), byte for byte: no
  acknowledged write was lost;
- the writes as the test logged them, replayed on the first image, equal the
  source: the log is the source's history, write by write;
- a last tag, taken once all is settled, is consistent: every resync window
  closed;
- every tag listed as a recovery point recovers equal to its copy, and the
  listed tags are exactly those the agent called consistent (a tag inside a
  resync window is never offered; one outside it is never lost);
- a seeded sample of the other listed points (file ends) each recovers to the
  source as it was after a number of the logged writes: exactly the number
  its seq says where the stream holds one record per write, else one between
  those of the tags around it.

Choices are seeded; the seed is printed (``BLOCKREPL_THRASH_SEED`` replays
them, timing aside). ``BLOCKREPL_THRASH_S`` sets the storm's length: 60 s by
default.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.limits import MiB
from tests.conftest import Deployment
from tests.e2e.capture import CaptureProcess, random_writes, require_capture_peers
from tests.e2e.conftest import (
    BLOCKREPL,
    DISK,
    Site,
    build_site,
    make_source,
    start,
    wait_listening,
)

SIZE = 32 * MiB
STORM_S = float(os.environ.get("BLOCKREPL_THRASH_S", "60"))
#: Seconds between two kills, and from a kill to the restart.
KILL_EVERY_S = (1.5, 4.5)
RESTART_AFTER_S = (0.2, 3.0)
#: Seconds between two tags.
TAG_EVERY_S = (1.5, 4.0)
#: Writes per qemu-io run, of these lengths; every 7th zeroes its range.
#: Between runs the writer rests a moment: the daemons share two cores with
#: it, and a master target that falls far behind keeps every resync waiting.
WRITES_PER_RUN = 16
LENGTHS = (512, 4096, 65536, 200 * 1024)
ZEROS_EVERY = 7
REST_S = 0.2
#: Seconds a kill of the capture waits for writes in flight (the writer rests between runs).
BUSY_WAIT_S = 1.0
#: Bounds of every wait: the test fails rather than hang.
RUN_TIMEOUT_S = 60.0
PAUSE_TIMEOUT_S = 60.0
GONE_TIMEOUT_S = 30.0
TAG_TIMEOUT_S = 60.0
#: File-end points recovered and checked against the write log.
FILE_POINTS_CHECKED = 8
#: Compare granule of the search of a file-end point's prefix.
GRANULE = 64 * 1024
KINDS = ("capture", "processserver", "mastertarget")


@dataclass(frozen=True)
class Written:
    """One write the source took: a fill byte over a range, or the bytes found there."""

    offset: int
    length: int
    fill: int = 0
    data: bytes | None = None

    @classmethod
    def parse(cls, command: str) -> Written:
        """From a qemu-io command of :func:`random_writes`."""
        words = command.split()
        if words[1] == "-z":
            return cls(int(words[2]), int(words[3]))
        return cls(int(words[3]), int(words[4]), fill=int(words[2]))

    def apply(self, image: bytearray) -> None:
        end = self.offset + self.length
        image[self.offset : end] = (
            self.data if self.data is not None else bytes([self.fill]) * self.length
        )


@dataclass
class Capture:
    """What the writer and the driver share about the capture's life."""

    process: CaptureProcess
    up: threading.Event = field(default_factory=threading.Event)
    #: kills so far; grows once the killed capture and its nbdkit are gone
    kills: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_killed_after(self, kills: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.kills > kills, timeout)


class Writer:
    """Random writes through the export, run after run, logged as the source took them."""

    def __init__(self, capture: Capture, rng: random.Random) -> None:
        self.capture = capture
        self.rng = rng
        self.log: list[Written] = []
        self.issued = 0
        self.acked = 0
        #: runs cut short by a kill of the capture
        self.cut = 0
        self.failure: BaseException | None = None
        self._cond = threading.Condition()
        self._pause = False
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="thrash-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def pause(self) -> None:
        """Return once no write is in flight, and none starts until :meth:`resume`."""
        with self._cond:
            self._pause = True
            paused = self._cond.wait_for(lambda: not self._busy, PAUSE_TIMEOUT_S)
        assert paused, f"the writer did not pause within {PAUSE_TIMEOUT_S} s"

    def wait_busy(self, timeout: float) -> None:
        """Until a run of writes is under way (or ``timeout``: it may be paused)."""
        with self._cond:
            self._cond.wait_for(lambda: self._busy, timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(RUN_TIMEOUT_S + GONE_TIMEOUT_S)
        assert not self._thread.is_alive(), "the writer did not stop"
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    # Counted before the capture is seen up: a kill from now on counts above it.
                    kills = self.capture.kills
                    if self._pause or not self.capture.up.is_set():
                        self._cond.wait(0.05)
                        continue
                    self._busy = True
                    self._cond.notify_all()
                try:
                    self._one_run(kills)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                time.sleep(REST_S)
        except BaseException as exc:
            self.failure = exc

    def _one_run(self, kills: int) -> None:
        commands = random_writes(
            self.rng, SIZE, WRITES_PER_RUN, zeros_every=ZEROS_EVERY, lengths=LENGTHS
        )
        qemu_io = self.capture.process.qemu_io_background(*commands)
        try:
            output, _ = qemu_io.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            qemu_io.kill()
            qemu_io.communicate()
            raise AssertionError(f"{len(commands)} writes took over {RUN_TIMEOUT_S} s") from None
        answered = _answered(output)
        self.log += [Written.parse(command) for command in commands[:answered]]
        self.acked += answered
        self.issued += answered
        if answered == len(commands) and qemu_io.returncode == 0:
            return
        # Only a kill of the capture may cut a run short; the write in flight
        # then may or may not have reached the source: once the capture and
        # its nbdkit are gone, the source says which.
        assert self.capture.wait_killed_after(kills, GONE_TIMEOUT_S), (
            f"writes failed while the capture ran:\n{output}"
        )
        if "can't open device" in output:
            return  # it was gone before the first write
        self.cut += 1
        self.issued += 1
        cut = Written.parse(commands[answered])
        with self.capture.process.source.open("rb") as source:
            source.seek(cut.offset)
            self.log.append(Written(cut.offset, cut.length, data=source.read(cut.length)))


def _answered(output: str) -> int:
    """How many of a qemu-io run's writes were answered (the first ones: it stops at a failure)."""
    answered, failed = 0, False
    for line in output.splitlines():
        if line.startswith("wrote "):
            assert not failed, f"a write was answered after one failed:\n{output}"
            answered += 1
        elif "failed" in line:
            failed = True
    return answered


@dataclass(frozen=True)
class Anchor:
    """A stream position where the test knows how many logged writes the source had taken."""

    position: tuple[int, int]
    writes: int
    #: a tag: its record follows the writes
    tag: bool = False

    def one_record_per_write_to(self, later: Anchor) -> bool:
        """Whether the stream holds the logged writes (and ``later``'s tag) up to ``later``."""
        (generation, seq), (later_generation, later_seq) = self.position, later.position
        records = later.writes - self.writes + (1 if later.tag and later != self else 0)
        return generation == later_generation and later_seq - seq == records


@dataclass
class TagTaken:
    name: str
    #: the writes the source had taken at the tag
    writes: int
    copy: Path
    #: the agent's answer; None if the round was abandoned
    report: dict[str, Any] | None = None
    error: str = ""


class Storm:
    """Kills, restarts and tags, on the test's thread."""

    def __init__(
        self, site: Site, capture: Capture, writer: Writer, rng: random.Random, root: Path
    ) -> None:
        self.site = site
        self.capture = capture
        self.writer = writer
        self.rng = rng
        self.root = root
        self.kills: Counter[str] = Counter()
        self.tags: list[TagTaken] = []
        #: kind -> when it starts again
        self.down: dict[str, float] = {}
        self.started = time.monotonic()

    def event(self, what: str) -> None:
        """Print what happened, and when (pytest shows it when the test fails)."""
        print(f"{time.monotonic() - self.started:6.2f} s  {what}")

    def run(self, seconds: float) -> None:
        self.started = started = time.monotonic()
        end = started + seconds
        next_kill = started + self.rng.uniform(*KILL_EVERY_S)
        next_tag = started + self.rng.uniform(*TAG_EVERY_S)
        while (now := time.monotonic()) < end:
            for kind, when in sorted(self.down.items(), key=lambda item: item[1]):
                if when <= now:
                    self.restart(kind)
            assert self.writer.failure is None, self.writer.failure
            if now >= next_kill:
                up = [kind for kind in KINDS if kind not in self.down]
                if up:  # a random one of those killed least so far: every kind has its turn
                    fewest = min(self.kills[kind] for kind in up)
                    kind = self.rng.choice([k for k in up if self.kills[k] == fewest])
                    self.kill(kind)
                    self.down[kind] = time.monotonic() + self.rng.uniform(*RESTART_AFTER_S)
                next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY_S)
            if now >= next_tag:
                if "capture" not in self.down:
                    self.tag()
                next_tag = time.monotonic() + self.rng.uniform(*TAG_EVERY_S)
            time.sleep(0.02)
        for kind in list(self.down):
            self.restart(kind)

    def kill(self, kind: str) -> None:
        self.event(f"kill -9 {kind}")
        self.kills[kind] += 1
        if kind == "processserver":
            self.site.process_servers[0].kill()
        elif kind == "mastertarget":
            self.site.mt.kill()
        else:
            self._kill_capture()

    def _kill_capture(self) -> None:
        """SIGKILL the capture, in the middle of a run of writes when there is one;
        return once it and its nbdkit are gone."""
        self.writer.wait_busy(BUSY_WAIT_S)
        time.sleep(self.rng.uniform(0.0, 0.1))
        process = self.capture.process
        self.capture.up.clear()
        pidfile = self.site.state_dir / "capture" / f"{DISK}.pid"
        nbdkit = int(pidfile.read_text())
        process.kill()
        _until(f"nbdkit ({nbdkit}) exited", lambda: _gone(nbdkit))
        _until("the export's port closed", lambda: _port_closed(process.port))
        with self.capture.changed:
            self.capture.kills += 1
            self.capture.changed.notify_all()

    def restart(self, kind: str) -> None:
        self.event(f"start {kind}")
        del self.down[kind]
        if kind == "processserver":
            daemon = self.site.process_servers[0]
            daemon.start()
            wait_listening(self.site.ps_ports[0], daemon)
        elif kind == "mastertarget":
            self.site.mt.start()
            wait_listening(self.site.mt_port, self.site.mt)
        else:
            process = self.capture.process
            process.start()
            _until("the capture's control socket answers", lambda: _answers(process))
            self.capture.up.set()

    def tag(self) -> None:
        name = f"t{len(self.tags) + 1:03d}"
        self.writer.pause()
        try:
            copy = self.root / f"{name}.raw"
            shutil.copyfile(self.capture.process.source, copy)
            taken = TagTaken(name, len(self.writer.log), copy)
            self.tags.append(taken)
            result = subprocess.run(
                [str(BLOCKREPL), "agent", "tag", "--config", str(self.site.agent_config),
                 "--name", name, "--json"],
                capture_output=True, text=True, timeout=TAG_TIMEOUT_S, check=False,
            )  # fmt: skip
        finally:
            self.writer.resume()
        if result.returncode == 0:
            taken.report = json.loads(result.stdout)
            disk = taken.report["disks"][0]
            self.event(
                f"tag {name} at {disk['generation']}/{disk['seq']} after write {taken.writes}"
                + ("" if disk["consistent"] else ", inside a resync")
            )
        else:
            taken.error = f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
            self.event(f"tag {name} abandoned: {taken.error}")


def _until(what: str, check: Callable[[], bool], timeout: float = GONE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    """The process ended (a zombie nobody reaped counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _answers(process: CaptureProcess) -> bool:
    try:
        process.status()
    except OSError:
        return False
    return True


def _image(first: bytes, writes: list[Written]) -> bytearray:
    image = bytearray(first)
    for write in writes:
        write.apply(image)
    return image


def _prefix(base: bytearray, writes: list[Written], recovered: bytes) -> int | None:
    """The k for which ``base`` with ``writes[:k]`` applied equals ``recovered``, if any.

    Tracks the granules that differ as the writes are applied one by one:
    each write re-compares only the granules it touched.
    """
    image = bytearray(base)
    view, other = memoryview(image), memoryview(recovered)

    def differs(granule: int) -> bool:
        start = granule * GRANULE
        return view[start : start + GRANULE] != other[start : start + GRANULE]

    differing = {g for g in range(len(image) // GRANULE) if differs(g)}
    if not differing:
        return 0
    for k, write in enumerate(writes, start=1):
        write.apply(image)
        first, last = write.offset // GRANULE, (write.offset + write.length - 1) // GRANULE
        for granule in range(first, last + 1):
            if differs(granule):
                differing.add(granule)
            else:
                differing.discard(granule)
        if not differing:
            return k
    return None


def _differing_bytes(one: Path, other: Path) -> int:
    left, right = one.read_bytes(), other.read_bytes()
    if left == right:
        return 0
    return sum(a != b for a, b in zip(left, right, strict=False)) + abs(len(left) - len(right))


#: The errors of the capture plugin (a traceback in nbdkit's log) when the
#: agent it talks to was killed: the write in flight gets EIO.
AGENT_GONE = ("LinkBrokenError", "BrokenPipeError", "ConnectionResetError")


def _tracebacks(log: Path) -> list[str]:
    """The exception lines of the tracebacks in a log, but for :data:`AGENT_GONE`."""
    lines = log.read_text(errors="replace").splitlines()
    found = []
    for index, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            after = (text for text in lines[index + 1 :] if not text.startswith("  "))
            error = next(after, "(cut short)").strip()
            if not error.startswith(AGENT_GONE):
                found.append(error)
    return found


def _log_lines(path: Path, text: str) -> int:
    return sum(text in line for line in path.read_text(errors="replace").splitlines())


def test_thrash(deployment: Deployment, tmp_path: Path) -> None:
    require_capture_peers()
    seed = int(os.environ.get("BLOCKREPL_THRASH_SEED", random.randrange(2**32)))
    print(f"thrash: seed {seed} (BLOCKREPL_THRASH_SEED={seed} replays it), storm {STORM_S:g} s")
    rng = random.Random(seed)
    site = build_site(
        deployment, tmp_path / "site", size=SIZE, sync={"region_bytes": 4 * MiB},
        agent_tables={"capture": {"hold_max_s": 10}},
    )  # fmt: skip
    source = tmp_path / "source.raw"
    make_source(source, SIZE, [(0, random.Random(seed).randbytes(SIZE))])
    first = source.read_bytes()
    start(site)
    capture = Capture(CaptureProcess(site, source))
    capture.process.start()
    initial = capture.process.settle()
    capture.up.set()
    writer = Writer(capture, random.Random(seed + 1))
    storm = Storm(site, capture, writer, rng, tmp_path / "tags")
    storm.root.mkdir()
    started = time.monotonic()
    writer.start()
    try:
        storm.run(STORM_S)
    finally:
        writer.stop()
    stormed = time.monotonic()
    capture.process.settle()
    settled_s = time.monotonic() - stormed
    storm.tag()
    last = storm.tags[-1]
    assert last.report is not None, last.error
    assert last.report["disks"][0]["consistent"] is True, "a resync window stayed open"
    settled = capture.process.settle()
    assert site.mt_state()["resync_open"] is False
    stop_status, report = capture.process.stop()

    # No acknowledged write was lost, and the log is the source's history.
    site.assert_identical(source, site.target)
    differing = _differing_bytes(source, site.target)
    assert differing == 0
    assert _image(first, writer.log) == source.read_bytes(), "the write log is not the source's"
    assert stop_status == 0
    assert report["clean_stop"] is True, report

    points = site.points(limit=100_000)
    output = tmp_path / "recovered.raw"
    tagged = _check_tags(site, storm.tags, points, output)
    writes_at = {tag.name: tag.writes for tag in storm.tags}
    ends = [Anchor((initial["generation"], initial["end_seq"]), 0),
            Anchor((settled["generation"], settled["end_seq"]), len(writer.log))]  # fmt: skip
    tags = [Anchor(position, writes_at[name], tag=True) for name, position in tagged.items()]
    by_position = {anchor.position: anchor for anchor in ends + tags}  # a tag's over an end's
    anchors = sorted(by_position.values(), key=_at)
    file_ends = [p for p in points if not p["name"]]
    sample = rng.sample(file_ends, min(FILE_POINTS_CHECKED, len(file_ends)))
    checked = _check_file_ends(site, sample, anchors, first, writer.log, output)

    for daemon_log in (site.mt.log, site.process_servers[0].log, capture.process.log):
        errors = _tracebacks(daemon_log)
        assert not errors, f"{daemon_log.name} holds tracebacks of {errors}"
    capture_log = capture.process.log
    taken = [t for t in storm.tags if t.report]
    figures = {
        "seed": seed,
        "storm_s": STORM_S,
        "kills": dict(storm.kills),
        "writes_issued": writer.issued,
        "writes_acknowledged": writer.acked,
        "runs_cut_by_kills": writer.cut,
        "tags_taken": len(taken),
        "last_tag": last.name,
        "tags_abandoned": [t.error for t in storm.tags if not t.report],
        "tags_inside_a_resync": len(taken) - len(tagged),
        "points_listed": len(points),
        "tag_points_verified": len(tagged),
        "file_points_verified": dict(checked),
        "resync_passes": _log_lines(capture_log, "resync pass over"),
        "unclean_restarts": _log_lines(capture_log, "the last stop was not clean"),
        "generations": settled["generation"],
        "bytes_differing": differing,
        "settle_s": round(settled_s, 1),
        "verify_s": round(time.monotonic() - stormed - settled_s, 1),
        "total_s": round(time.monotonic() - started, 1),
    }
    print("thrash: " + json.dumps(figures))
    assert sum(storm.kills.values()) >= max(len(KINDS), STORM_S // KILL_EVERY_S[1]), storm.kills
    assert set(storm.kills) == set(KINDS), f"every kind takes its turn: {storm.kills}"
    assert tagged, figures
    assert checked, figures


def _check_tags(
    site: Site, tags: list[TagTaken], points: list[dict[str, Any]], output: Path
) -> dict[str, tuple[int, int]]:
    """Every tag listed recovers equal to its copy; the listed tags are those the
    agent called consistent. Returns their positions, by name."""
    listed = {p["name"]: (p["generation"], p["seq"]) for p in points if p["name"]}
    taken = {tag.name: tag for tag in tags}
    consistent = {t.name for t in tags if t.report and t.report["disks"][0]["consistent"]}
    assert set(listed) <= set(taken), f"points of tags never taken: {set(listed) - set(taken)}"
    assert set(listed) == consistent, (
        f"listed but called inconsistent: {sorted(set(listed) - consistent)}; "
        f"called consistent but not listed: {sorted(consistent - set(listed))}"
    )
    for name in sorted(listed):
        answer = site.recover(f"tag:{name}", output)
        assert answer["point"]["name"] == name
        try:
            site.assert_identical(taken[name].copy, output)
        except AssertionError as exc:
            raise AssertionError(
                f"recovered at tag {name}, the disk is not its copy: {exc}"
            ) from None
        output.unlink()
    return listed


def _check_file_ends(
    site: Site,
    points: list[dict[str, Any]],
    anchors: list[Anchor],
    first: bytes,
    log: list[Written],
    output: Path,
) -> Counter[str]:
    """Each point recovers to the source after some number k of the logged writes.

    Between the anchors A and B around the point, if the stream holds one
    record per logged write (a tag is one more), the point at seq s is the
    source after exactly k = A.writes + (s - A.seq) writes (``exact``).
    Otherwise (a resync went between them) k may be any from A.writes to
    B.writes (``bracketed``).

    Returns:
        How many points were checked each way.
    """
    checked: Counter[str] = Counter()
    for point in points:
        answer = site.recover(point["time"], output)
        at = (answer["point"]["generation"], answer["point"]["seq"])
        outside = f"point {at} is outside {anchors[0].position}..{anchors[-1].position}"
        low = max((a for a in anchors if a.position <= at), key=_at, default=None)
        high = min((a for a in anchors if a.position >= at), key=_at, default=None)
        assert low is not None, outside
        assert high is not None, outside
        recovered = output.read_bytes()
        output.unlink()
        if low.one_record_per_write_to(high):
            k = low.writes + at[1] - low.position[1]
            assert _image(first, log[:k]) == recovered, (
                f"the point at {at} ({point['time']}) is not the source after write {k}"
            )
            checked["exact"] += 1
            continue
        found = _prefix(_image(first, log[: low.writes]), log[low.writes : high.writes], recovered)
        assert found is not None, (
            f"the point at {at} ({point['time']}) is not the source after any of "
            f"writes {low.writes}..{high.writes}"
        )
        checked["bracketed"] += 1
    return checked


def _at(anchor: Anchor) -> tuple[int, int]:
    return anchor.position
