#!/usr/bin/env python3
"""A kernel file system on the capture's export under a database: RPO, and every tag whole.

The way a Linux data disk is protected (docs/operations.md): ``blockrepl agent
capture`` exports a source image over NBD on loopback, nbdfuse makes the
export a file, a loop device makes that a block device, and the kernel's ext4
is made and mounted on it. A real master target and process server on
loopback take the stream. On the mounted volume a SQLite database in
``synchronous=FULL`` mode (every commit fsyncs its journal and the database)
takes ``--commits`` small transactions a second for ``--seconds``, and every
``--tag-every`` seconds ``blockrepl agent tag --app`` takes an app-consistent
tag, the volume frozen with ``fsfreeze`` around it.

Then every tag is recovered (``mastertarget recover --point tag:NAME``) and
checked with tools nobody here wrote: ``e2fsck -fn`` finds the volume clean,
the kernel mounts it, and SQLite opens the database, finds it whole
(``PRAGMA integrity_check``) and holds at least the rows committed before the
tag was asked for and at most those committed when it was done.

Figures: ``fs_rpo_p99_s``/``fs_rpo_max_s`` (every 0.1 s: how long ago the
capture journaled the oldest seq the master target has not applied; 0 when
it applied all), ``fs_drain_s`` (from the load stopping until the master
target applied everything), ``fs_commits_per_s``, ``fs_tags`` and
``fs_tags_whole``; and, beside it, ``fs_bare_commits_per_s``: the same
writer on the same kind of volume over ``nbdkit file`` of a plain image
(nbdfuse and a loop device too, nothing replicated). Between the two,
``fs_paused_commits_per_s``: the writer on the capture's export again for
:data:`PAUSED_S` with the process server and the master target stopped
(SIGSTOP; the capture still journals every write, its sender waits): the
capture's own per-write cost, apart from the replication's work on the
same cores. Needs root (a loop device, a FUSE mount), nbdkit with its
Python plugin, nbdfuse, losetup, mkfs.ext4, e2fsck and fsfreeze.
Run: ``.venv/bin/python benchmarks/fs_bench.py [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.deploy import Deployment, default_dir, deploy, free_port
from benchmarks.sitemetrics import percentile

MACHINE: Final = "vm01"
DISK: Final = "vm01-disk0"
#: The volume: room for the database, the journal and ext4's own.
DISK_BYTES: Final = 256 * 2**20
BLOCKREPL: Final = Path(sys.executable).parent / "blockrepl"
MASTERTARGET: Final = Path(sys.executable).parent / "mastertarget"
#: The peers the phase drives; missing ones are named in the error.
PEERS: Final = ("nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fsfreeze", "mount")
#: Seconds between looks at the capture's and the master target's positions.
SAMPLE_S: Final = 0.1
#: Seconds the capture, nbdfuse or a settle may take.
START_TIMEOUT_S: Final = 30.0
SETTLE_TIMEOUT_S: Final = 300.0
#: Transactions a second: a busy small database.
DEFAULT_COMMITS_PER_S: Final = 100.0
#: Seconds between app-consistent tags.
DEFAULT_TAG_EVERY_S: Final = 5.0
#: Seconds the peer (the same volume on a bare NBD export) runs the writer.
BARE_S: Final = 10.0
#: Seconds the writer runs with the process server and the master target stopped.
PAUSED_S: Final = 5.0
#: A row's payload: a database row of a few KiB.
MIN_ROW_BYTES: Final = 512
MAX_ROW_BYTES: Final = 4096


class PhaseError(SystemExit):
    """The phase could not run or a check failed: the message says which."""


@dataclass
class Volume:
    """The capture's export as a mounted ext4 volume."""

    exported: Path
    mount: Path
    fuse: subprocess.Popen[bytes]
    loop: str = ""

    def close(self) -> None:
        _run("umount", self.mount, check=False)
        if self.loop:
            _run("losetup", "--detach", self.loop, check=False)
        _run("umount", self.exported, check=False)  # nbdfuse exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.fuse.wait(timeout=60)


@dataclass
class Writer:
    """The database: one small transaction after another, each fsynced."""

    path: Path
    rate: float
    seed: int
    committed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the phase
            self.error = exc

    def _run(self) -> None:
        rng = random.Random(self.seed)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body BLOB)")
            interval = 1.0 / self.rate
            next_at = time.monotonic()
            while not self.stop.is_set():
                next_at = max(next_at + interval, time.monotonic() - 1.0)
                body = rng.randbytes(rng.randrange(MIN_ROW_BYTES, MAX_ROW_BYTES))
                db.execute("BEGIN")
                db.execute("INSERT INTO rows (body) VALUES (?)", (body,))
                db.execute("COMMIT")
                self.committed += 1
                time.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            db.close()


def _argv(command: tuple[str | Path, ...]) -> list[str]:
    """``command`` with its program found on the PATH (or as given, if a path)."""
    program = str(command[0])
    found = program if "/" in program else shutil.which(program)
    if found is None:
        raise PhaseError(f"expected {program} on the PATH, found none")
    return [found, *(str(c) for c in command[1:])]


def _start(*command: str | Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_argv(command), **kwargs)  # noqa: S603 - a peer, our arguments


def _run(*command: str | Path, timeout: float = 120.0, check: bool = True) -> str:
    """Run a peer to its end; its output. With ``check``, a failure is a PhaseError."""
    done = subprocess.run(  # noqa: S603 - a peer from the PATH, our arguments
        _argv(command), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise PhaseError(
            f"expected {Path(str(command[0])).name} to succeed, it exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def _agent_config(dep: Deployment, root: Path, mount: Path, state_dir: Path) -> Path:
    tls = dep.client_tls(MACHINE)
    path = root / "agent.toml"
    path.write_text(
        "\n".join(
            [
                f'process_servers = ["https://127.0.0.1:{dep.ps_port}"]',
                f'state_dir = "{state_dir}"',
                "[tls]",
                f'ca_file = "{tls.ca_file}"',
                f'cert_file = "{tls.cert_file}"',
                f'key_file = "{tls.key_file}"',
                "[tags]",
                f'quiesce = ["fsfreeze -f {mount}"]',
                f'unquiesce = ["fsfreeze -u {mount}"]',
                "[logging]",
                'level = "warning"',
                "[[disks]]",
                f'id = "{DISK}"',
            ]
        )
        + "\n"
    )
    return path


class Capture:
    """``blockrepl agent capture`` of the source, and its control socket."""

    def __init__(self, config: Path, state_dir: Path, root: Path, source: Path) -> None:
        self.port = free_port()
        self.control = state_dir / "capture" / f"{DISK}.sock"
        self.log = root / "capture.log"
        with self.log.open("ab") as log:
            self.proc = _start(
                BLOCKREPL, "agent", "capture", "--config", config, "--disk", DISK,
                "--source", source, "--listen", f"127.0.0.1:{self.port}", "--json",
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise PhaseError(f"the capture did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0 and self.control.exists()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.control))
            sock.sendall(b'{"op": "status"}\n')
            answer = b""
            while not answer.endswith(b"\n"):
                piece = sock.recv(65536)
                if not piece:
                    raise PhaseError("the capture's control socket closed")
                answer += piece
        status: dict[str, Any] = json.loads(answer)["status"]
        return status

    def settle(self) -> dict[str, Any]:
        """Until nothing waits to be sent or resynced."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            s = self.status()
            if (
                s["mode"] == "journaling" and s["pending_regions"] == 0
                and not s["window_open"] and s["journal_bytes"] == 0
                and s["shipped_seq"] == s["end_seq"]
            ):  # fmt: skip
                return s
            if time.monotonic() > deadline:
                raise PhaseError(f"the capture did not settle in {SETTLE_TIMEOUT_S} s: {s}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Applied:
    """The master target's applied position of the disk, over one kept connection."""

    def __init__(self, dep: Deployment) -> None:
        import http.client  # noqa: PLC0415 - only here

        from runtime.tls import client_context  # noqa: PLC0415

        context = client_context(dep.client_tls("ps01"))
        self._http = http.client.HTTPSConnection("127.0.0.1", dep.mt_port, context=context)

    def seq(self) -> int:
        self._http.request("GET", f"/v1/disks/{DISK}/state")
        return int(json.loads(self._http.getresponse().read())["applied_seq"])

    def close(self) -> None:
        self._http.close()


def _mount_volume(url: str, root: Path) -> Volume:
    """ext4 made and mounted on the NBD export at ``url``, under ``root``."""
    exported, mount = root / "fuse", root / "mnt"
    exported.mkdir()
    mount.mkdir()
    fuse = _start("nbdfuse", exported / "disk", url)
    volume = Volume(exported, mount, fuse)
    try:
        _wait_for_export(fuse, exported / "disk")
        volume.loop = _run("losetup", "--find", "--show", exported / "disk").strip()
        _run("mkfs.ext4", "-q", volume.loop)
        _run("mount", volume.loop, mount)
    except BaseException:
        volume.close()
        raise
    return volume


def _wait_for_export(fuse: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if fuse.poll() is not None or time.monotonic() > deadline:
            raise PhaseError("nbdfuse did not show the capture's export as a file")
        time.sleep(0.05)


@dataclass
class TagTaken:
    name: str
    #: rows committed before the tag was asked for, and once it was done
    rows_before: int
    rows_after: int


def _load(
    config: Path, capture: Capture, applied: Applied, writer: Writer, *, seconds: float,
    tag_every: float,
) -> tuple[list[float], list[TagTaken], float]:  # fmt: skip
    """Run the writer for ``seconds``, tagging; the RPO samples, the tags, and
    the seconds from the load's end until everything was applied."""
    thread = threading.Thread(target=writer.run, name="database")
    #: (time, the capture's end seq then), in order
    seen: list[tuple[float, int]] = []
    samples: list[float] = []
    tags: list[TagTaken] = []
    started = time.monotonic()
    next_tag = started + tag_every
    tagger: threading.Thread | None = None
    thread.start()
    try:
        while time.monotonic() - started < seconds:
            if time.monotonic() >= next_tag and (tagger is None or not tagger.is_alive()):
                tagger = threading.Thread(target=_tag, args=(config, writer, tags), name="tag")
                tagger.start()
                next_tag += tag_every
            samples.append(_sample(capture, applied, seen))
            time.sleep(SAMPLE_S)
    finally:
        writer.stop.set()
        thread.join()
        if tagger is not None:
            tagger.join()
    if writer.error is not None:
        raise PhaseError(f"the database's writer failed: {writer.error}")
    stopped = time.monotonic()
    end = capture.settle()["end_seq"]
    while applied.seq() < end:
        samples.append(_sample(capture, applied, seen))
        if time.monotonic() - stopped > SETTLE_TIMEOUT_S:
            raise PhaseError(f"the master target did not apply seq {end} in time")
        time.sleep(SAMPLE_S)
    return samples, tags, time.monotonic() - stopped


def _sample(capture: Capture, applied: Applied, seen: list[tuple[float, int]]) -> float:
    """The RPO now: since the last look before the oldest seq not applied was journaled."""
    now = time.monotonic()
    seen.append((now, int(capture.status()["end_seq"])))
    done = applied.seq()
    if seen[-1][1] <= done:
        return 0.0
    before = next((seen[i - 1][0] for i in range(1, len(seen)) if seen[i][1] > done), seen[0][0])
    return now - before


def _tag(config: Path, writer: Writer, tags: list[TagTaken]) -> None:
    name = f"fs-{len(tags) + 1}"
    before = writer.committed
    _run(BLOCKREPL, "agent", "tag", "--config", config, "--name", name, "--app", timeout=60)
    tags.append(TagTaken(name, before, writer.committed))


def _check_tag(dep: Deployment, root: Path, tag: TagTaken) -> dict[str, Any]:
    """Recover ``tag`` and check it with e2fsck, the kernel and SQLite."""
    image = root / f"{tag.name}.raw"
    _run(MASTERTARGET, "recover", "--config", dep.mt.config, "--disk", DISK, "--point",
         f"tag:{tag.name}", "--output", image, "--json", timeout=300)  # fmt: skip
    _run("e2fsck", "-fn", image)
    mount = root / f"{tag.name}.mnt"
    mount.mkdir()
    copy = root / f"{tag.name}.db"
    _run("mount", "-o", "ro,loop", image, mount)
    try:
        shutil.copyfile(mount / "db.sqlite", copy)
        journal = mount / "db.sqlite-journal"
        if journal.exists():  # a transaction the freeze caught: SQLite rolls it back
            shutil.copyfile(journal, copy.with_name(copy.name + "-journal"))
    finally:
        _run("umount", mount)
    db = sqlite3.connect(copy)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = int(db.execute("SELECT count(*) FROM rows").fetchone()[0])
    finally:
        db.close()
    image.unlink()
    whole = integrity == "ok" and tag.rows_before <= rows <= tag.rows_after
    return {
        "name": tag.name, "integrity": integrity, "rows": rows, "rows_before": tag.rows_before,
        "rows_after": tag.rows_after, "whole": whole,
    }  # fmt: skip


def bare_commits_per_s(root: Path, *, commits: float, seconds: float, seed: int) -> float:
    """The peer: the same writer on ext4 on the same path (nbdfuse, a loop device)
    to ``nbdkit file`` of a plain image, nothing replicated: what the capture
    costs a database's commits is the difference."""
    image = root / "bare.raw"
    with image.open("wb") as file:
        file.truncate(DISK_BYTES)
    port = free_port()
    server = _start("nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", f"file={image}")
    try:
        _wait_listening(port, server)
        bare = root / "bare"
        bare.mkdir()
        volume = _mount_volume(f"nbd://127.0.0.1:{port}", bare)
        try:
            return _commits_per_s(
                Writer(volume.mount / "db.sqlite", commits, seed), seconds, "on the peer"
            )
        finally:
            volume.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
        image.unlink()


def _commits_per_s(writer: Writer, seconds: float, where: str) -> float:
    """Run ``writer`` for ``seconds`` on a thread of its own; its commits a second.

    Raises:
        PhaseError: the writer failed (``where`` says which run).
    """
    thread = threading.Thread(target=writer.run, name="database")
    thread.start()
    try:
        time.sleep(seconds)
    finally:
        writer.stop.set()
        thread.join()
    if writer.error is not None:
        raise PhaseError(f"the database's writer failed {where}: {writer.error}")
    return writer.committed / seconds


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise PhaseError(f"expected nbdkit to listen on port {port}, it did not")
        time.sleep(0.05)


def missing_peers() -> list[str]:
    """What the phase needs and this machine lacks (root among them)."""
    missing = [peer for peer in PEERS if shutil.which(peer) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def measure(
    root: Path, *, commits: float, seconds: float, tag_every: float, seed: int
) -> dict[str, Any]:
    """The phase under ``root``: figures by name (see the module's text).

    Raises:
        PhaseError: a peer is missing, a step failed, or a tag is not whole.
    """
    if missing := missing_peers():
        raise PhaseError(f"the file-system phase needs {', '.join(missing)}")
    dep = deploy(root, {MACHINE: DISK}, disk_bytes=DISK_BYTES,
                 cache_high_bytes=1 << 30, cache_low_bytes=1 << 29)  # fmt: skip
    source = root / "source.raw"
    with source.open("wb") as file:
        file.truncate(DISK_BYTES)
    mount = root / "mnt"
    # The capture's control socket lives in the state folder: a short path (a
    # Unix socket's name holds 107 bytes), whatever ``root`` is.
    state_dir = Path(tempfile.mkdtemp(prefix="br-fs-state-"))
    config = _agent_config(dep, root, mount, state_dir)
    with _site(dep), _removed(state_dir):
        capture = Capture(config, state_dir, root, source)
        applied = Applied(dep)
        try:
            capture.settle()  # the initial sync of the empty disk
            volume = _mount_volume(capture.url, root)
            try:
                capture.settle()  # mkfs's writes
                writer = Writer(mount / "db.sqlite", commits, seed)
                samples, tags, drain_s = _load(
                    config, capture, applied, writer, seconds=seconds, tag_every=tag_every
                )
                paused = _paused_commits_per_s(dep, mount, commits, seed)
            finally:
                volume.close()
            capture.settle()
        finally:
            applied.close()
            capture.stop()
        checks = [_check_tag(dep, root, tag) for tag in tags]
    bare = bare_commits_per_s(root, commits=commits, seconds=min(seconds, BARE_S), seed=seed)
    return {
        "fs_rpo_p50_s": _round(percentile(samples, 50)),
        "fs_rpo_p99_s": _round(percentile(samples, 99)),
        "fs_rpo_max_s": _round(max(samples, default=0.0)),
        "fs_drain_s": _round(drain_s),
        "fs_commits_per_s": round(writer.committed / seconds, 1),
        "fs_paused_commits_per_s": round(paused, 1),
        "fs_bare_commits_per_s": round(bare, 1),
        "fs_tags": len(tags),
        "fs_tags_whole": sum(1 for c in checks if c["whole"]),
        "tags": checks,
        "seconds": seconds,
    }


def _paused_commits_per_s(dep: Deployment, mount: Path, commits: float, seed: int) -> float:
    """Commits a second on the capture's export while the process server and
    the master target are stopped; they run again before this returns."""
    daemons = [d.proc for d in (dep.ps, dep.mt) if d.proc is not None]
    for proc in daemons:
        proc.send_signal(signal.SIGSTOP)
    try:
        writer = Writer(mount / "paused.sqlite", commits, seed + 1)
        return _commits_per_s(writer, PAUSED_S, "with replication paused")
    finally:
        for proc in daemons:
            proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def _removed(folder: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _site(dep: Deployment) -> Iterator[None]:
    try:
        dep.mt.start()
        dep.ps.start()
        dep.mt.wait_healthy()
        dep.ps.wait_healthy()
        yield
    finally:
        dep.ps.stop()
        dep.mt.stop()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.dir) if args.dir else default_dir()
    root = Path(tempfile.mkdtemp(prefix="br-fs-", dir=base))
    try:
        return measure(
            root, commits=args.commits, seconds=args.seconds, tag_every=args.tag_every,
            seed=args.seed,
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="15 s of load")
    parser.add_argument(
        "--commits", type=float, default=DEFAULT_COMMITS_PER_S, help="transactions a second"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of load (60)")
    parser.add_argument(
        "--tag-every", type=float, default=DEFAULT_TAG_EVERY_S, help="seconds between tags"
    )
    parser.add_argument("--dir", help="where the files go (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 15.0
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if key != "tags":
            print(f"{key:<20}{value!s:>10}")
    for check in result["tags"]:
        print(f"tag {check['name']}: {check}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
