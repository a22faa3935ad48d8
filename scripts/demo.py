"""The demo's steps, run by scripts/demo with .venv's Python (see there).

It drives the product through the commands an administrator types
(``blockrepl``, ``processserver``, ``mastertarget``, ``qemu-img``,
``qemu-io``) and reads what they print; it imports nothing of blockrepl.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import FrameType

BIN = Path(sys.executable).parent
DISK = "demo-vm-disk0"
MACHINE = "demo-vm"
MiB = 2**20
#: The sample disk, and the data it starts with (the initial sync sends it).
SIZE = 256 * MiB
DATA = 64 * MiB
#: Seconds of writes through the export while replication runs.
WRITE_S = 12.0
#: Seconds any one wait may take before the demo fails.
WAIT_S = 120.0


class DemoError(Exception):
    """A step failed: the message says which and why."""


def say(text: str) -> None:
    print(text, flush=True)


def step(number: int, text: str) -> None:
    say(f"\n==> [{number}/8] {text}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.checks: list[tuple[str, bool]] = []
        self.ports = {name: free_port() for name in ("mt", "mt_metrics", "ps", "ps_metrics", "nbd")}
        self.pki = root / "pki"
        self.keys = root / "data-keys.toml"
        self.source = root / "source.raw"
        self.agent = root / "agent.toml"
        self.mt_config = root / "mastertarget.toml"
        self.started = time.monotonic()

    # --- running things --------------------------------------------------------------------

    def run(self, *args: str | Path, show: bool = True, quiet: bool = False) -> str:
        command = [str(a) for a in args]
        if show:
            say("    $ " + " ".join(Path(command[0]).name if i == 0 else a
                                   for i, a in enumerate(command)))  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=WAIT_S, check=False
        )
        if result.returncode != 0:
            raise DemoError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr.strip()}"
            )
        if not quiet:
            for line in result.stdout.strip().splitlines():
                say(f"    {line}")
        return result.stdout

    def spawn(self, name: str, *args: str | Path) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        # A session of its own: Ctrl-C reaches the demo alone, which stops
        # the daemons in order (the capture first) and says so.
        process = subprocess.Popen(
            [str(a) for a in args], stdout=log, stderr=log, start_new_session=True
        )
        self.processes.append((name, process))
        return process

    def stop_all(self) -> None:
        """SIGTERM to every process started, newest first; SIGKILL to any that lingers."""
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    say(f"    {name} did not stop within 60 s: killed")
                    process.kill()
                    process.wait()
        self.processes.clear()

    def wait_for(self, what: str, check: object, timeout: float = WAIT_S) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            for name, process in self.processes:
                if process.poll() is not None:
                    log = (self.root / f"{name}.log").read_text()[-2000:]
                    raise DemoError(f"{name} exited with {process.returncode} while {what}:\n{log}")
            if time.monotonic() > deadline:
                raise DemoError(f"not {what} after {timeout:g} s")
            time.sleep(0.1)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, ok))
        if not ok:
            raise DemoError(f"check failed: {what}")

    # --- the steps ----------------------------------------------------------------------------

    def certificates(self) -> None:
        step(1, f"certificates and keys in {self.root}")
        self.run(BIN / "blockrepl", "certs", "init", "--dir", self.pki)
        for machine in ("ps01", MACHINE):
            self.run(BIN / "blockrepl", "certs", "issue", "--dir", self.pki, "--machine", machine)
        self.run(BIN / "blockrepl", "keys", "init", "--file", self.keys)

    def daemons(self) -> None:
        p = self.ports
        step(
            2, f"a master target on 127.0.0.1:{p['mt']} and a process server on 127.0.0.1:{p['ps']}"
        )
        mt, ps = self.root / "mt", self.root / "ps"
        (mt / "retention").mkdir(parents=True)
        ps.mkdir()
        self.mt_config.write_text(f"""\
process_servers = ["ps01"]
key_file = "{self.keys}"
cache_dir = "{mt / "cache"}"
admin_socket = "{mt / "admin.sock"}"
[listen]
host = "127.0.0.1"
port = {p["mt"]}
[tls]
ca_file = "{self.pki / "ca.pem"}"
cert_file = "{self.pki / "mastertarget.pem"}"
key_file = "{self.pki / "mastertarget.key"}"
[metrics]
port = {p["mt_metrics"]}
[retention]
dir = "{mt / "retention"}"
allow_shared_volume = true   # the demo keeps everything in one folder
[[disks]]
id = "{DISK}"
target = "{mt / (DISK + ".raw")}"
create = true
size_bytes = {SIZE}
""")
        ps_config = ps / "processserver.toml"
        ps_config.write_text(f"""\
key_file = "{self.keys}"
cache_dir = "{ps / "cache"}"
host = "127.0.0.1"
port = {p["ps"]}
[tls]
ca_file = "{self.pki / "ca.pem"}"
cert_file = "{self.pki / "processserver.pem"}"
key_file = "{self.pki / "processserver.key"}"
[master_target]
url = "https://127.0.0.1:{p["mt"]}"
[master_target.tls]
ca_file = "{self.pki / "ca.pem"}"
cert_file = "{self.pki / "machine-ps01.pem"}"
key_file = "{self.pki / "machine-ps01.key"}"
[metrics]
port = {p["ps_metrics"]}
[[machines]]
id = "{MACHINE}"
disks = ["{DISK}"]
""")
        say(f"    $ mastertarget serve --config {self.mt_config}")
        self.spawn("mastertarget", BIN / "mastertarget", "serve", "--config", self.mt_config)
        say(f"    $ processserver serve --config {ps_config}")
        self.spawn("processserver", BIN / "processserver", "serve", "--config", ps_config)
        for name in ("mt_metrics", "ps_metrics"):
            url = f"http://127.0.0.1:{p[name]}/readyz"
            self.wait_for(f"waiting for {url}", lambda u=url: _answers(u))
        say("    both ready (/readyz)")

    def sample_disk(self) -> None:
        step(3, f"a sample source disk: {SIZE // MiB} MiB raw image, {DATA // MiB} MiB of data")
        self.run("qemu-img", "create", "-q", "-f", "raw", self.source, str(SIZE))
        rng = random.Random(2026)
        with self.source.open("r+b") as disk:
            for offset in range(0, DATA, 4 * MiB):
                disk.seek(offset * 2)  # data in every other 4 MiB, holes between
                disk.write(rng.randbytes(4 * MiB))
        self.agent.write_text(f"""\
process_servers = ["https://127.0.0.1:{self.ports["ps"]}"]
state_dir = "{self.root / "agent"}"
[tls]
ca_file = "{self.pki / "ca.pem"}"
cert_file = "{self.pki / f"machine-{MACHINE}.pem"}"
key_file = "{self.pki / f"machine-{MACHINE}.key"}"
[tags]
# The demo's "application" is the page cache: sync(1) flushes it before the tag.
quiesce = ["sync"]
unquiesce = ["true"]
[logging]
level = "warning"
[[disks]]
id = "{DISK}"
source = "{self.source}"
""")

    def initial_sync(self) -> dict[str, object]:
        step(4, "initial sync: the master target's disk becomes a copy of the source")
        out = self.run(BIN / "blockrepl", "agent", "sync", "--config", self.agent, "--disk", DISK,
                       "--json", quiet=True)  # fmt: skip
        report: dict[str, object] = json.loads(out)
        say(f"    sent {_mib(report['data_bytes'])} of data and "
            f"{_mib(report['zero_bytes'])} as zeros in {report['elapsed_s']} s")  # fmt: skip
        return report

    def capture(self) -> None:
        url = f"nbd://127.0.0.1:{self.ports['nbd']}"
        step(5, f"live capture: the disk exported at {url}")
        say(f"    $ blockrepl agent capture --config {self.agent} --disk {DISK} "
            f"--listen 127.0.0.1:{self.ports['nbd']}")  # fmt: skip
        listen = f"127.0.0.1:{self.ports['nbd']}"
        self.spawn("capture", BIN / "blockrepl", "agent", "capture", "--config", self.agent,
                   "--disk", DISK, "--listen", listen, "--json")  # fmt: skip
        control = self.root / "agent" / "capture" / f"{DISK}.sock"
        self.wait_for("starting the capture", control.exists)
        say("    listening")

    def write_while_replicating(self) -> None:
        step(6, f"writing through the export with qemu-io for {WRITE_S:g} s while it replicates")
        url = f"nbd://127.0.0.1:{self.ports['nbd']}"
        rng = random.Random(7)
        deadline = time.monotonic() + WRITE_S
        last_report = 0.0
        while time.monotonic() < deadline:
            commands = []
            for _ in range(40):
                length = rng.choice([4096, 65536, 256 * 1024, MiB])
                offset = rng.randrange(0, (SIZE - length) // 4096) * 4096
                if rng.random() < 0.1:
                    commands += ["-c", f"write -z {offset} {length}"]
                else:
                    commands += ["-c", f"write -P {rng.randrange(1, 256)} {offset} {length}"]
            subprocess.run(["qemu-io", "-f", "raw", "-t", "none", url, *commands],
                           capture_output=True, check=True, timeout=WAIT_S)  # fmt: skip
            if time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                self.progress()

    def progress(self) -> None:
        status = self.status()
        stats = status["stats"]
        assert isinstance(stats, dict)
        say(
            f"    {time.monotonic() - self.started:5.1f} s  written through the export "
            f"{_mib(stats['data_bytes'] + stats['zero_bytes'])}, journaled seq "
            f"{status['end_seq']}, at the master target {status['shipped_seq']}, "
            f"journal {_mib(status['journal_bytes'] or 0)}, RPO {self.rpo():.1f} s"
        )

    def status(self) -> dict[str, object]:
        out = self.run(BIN / "blockrepl", "agent", "status", "--config", self.agent, "--json",
                       show=False, quiet=True)  # fmt: skip
        status: dict[str, object] = json.loads(out)["disks"][DISK]
        if "error" in status:
            raise DemoError(f"the capture does not answer: {status['error']}")
        return status

    def rpo(self) -> float:
        url = f"http://127.0.0.1:{self.ports['mt_metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("blockrepl_mastertarget_rpo_seconds{") and DISK in line:
                    return float(line.rsplit(" ", 1)[1])
        raise DemoError("the master target reports no RPO for the disk")

    def settle(self) -> dict[str, object]:
        """Until the master target holds and applied everything the capture journaled."""

        def done() -> bool:
            status = self.status()
            return (status["journal_bytes"] == 0 and status["shipped_seq"] == status["end_seq"]
                    and not status["window_open"] and status["pending_regions"] == 0)  # fmt: skip

        self.wait_for("delivering everything to the master target", done)
        status = self.status()
        self.wait_for("applying everything", lambda: self._applied(status))
        return status

    def _applied(self, status: dict[str, object]) -> bool:
        out = self.run(BIN / "mastertarget", "points", "--config", self.mt_config, "--disk", DISK,
                       "--json", "--limit", "1", show=False, quiet=True)  # fmt: skip
        points = json.loads(out)["points"]
        newest = (points[0]["generation"], points[0]["seq"]) if points else (0, 0)
        return bool(newest >= (status["generation"], status["end_seq"]))

    def tag(self) -> Path:
        step(7, "an app-consistent tag (quiesce, hold the writes, tag, release, unquiesce)")
        at_tag = self.root / "source-at-tag.raw"
        shutil.copyfile(self.source, at_tag)  # no write runs now: the disk as the tag sees it
        self.run(BIN / "blockrepl", "agent", "tag", "--config", self.agent, "--name", "demo-app",
                 "--app")  # fmt: skip
        say("    more writes after the tag:")
        url = f"nbd://127.0.0.1:{self.ports['nbd']}"
        self.run("qemu-io", "-f", "raw", "-t", "none", url, "-c", "write -P 0x42 8M 4M",
                 "-c", "write -z 100M 16M", "-c", "discard 200M 8M")  # fmt: skip
        return at_tag

    def recover(self, at_tag: Path) -> None:
        step(8, "recovering the disk at the tag and at latest, and comparing")
        for point, output, expected in (
            ("tag:demo-app", self.root / "recovered-at-tag.raw", at_tag),
            ("latest", self.root / "recovered-latest.raw", self.source),
        ):
            self.run(BIN / "mastertarget", "recover", "--config", self.mt_config, "--disk", DISK,
                     "--point", point, "--output", output)  # fmt: skip
            say(f"    $ qemu-img compare {output.name} {expected.name}")
            result = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(output), str(expected)],
                capture_output=True, text=True, timeout=WAIT_S, check=False,
            )  # fmt: skip
            say("    " + (result.stdout.strip() or result.stderr.strip()))
            self.check(f"the disk recovered at {point} equals the source then",
                       result.returncode == 0)  # fmt: skip

    def summary(self, synced: dict[str, object], final: dict[str, object]) -> None:
        stats = final["stats"]
        assert isinstance(stats, dict)
        replicated = (
            int(str(synced["data_bytes"])) + stats["data_bytes"] + stats["resync_data_bytes"]
        )
        elapsed = time.monotonic() - self.started
        out = self.run(BIN / "mastertarget", "points", "--config", self.mt_config, "--disk", DISK,
                       "--json", show=False, quiet=True)  # fmt: skip
        listing = json.loads(out)
        app = sum(1 for p in listing["points"] if p["kind"] == "app")
        passed = sum(ok for _, ok in self.checks)
        say("\n== summary")
        say(f"   replicated {replicated / MiB:.1f} MiB of data in {elapsed:.1f} s "
            f"({replicated / MiB / elapsed:.1f} MiB/s), zeros and trims besides")  # fmt: skip
        say(f"   RPO now {self.rpo():.1f} s; {listing['window']['points']} recovery points "
            f"({app} app-consistent)")  # fmt: skip
        say(f"   {passed} of {len(self.checks)} checks passed")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _mib(value: object) -> str:
    return f"{int(str(value)) / MiB:.1f} MiB"


def _interrupted(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)
    for tool in ("qemu-img", "qemu-io", "nbdkit"):
        if shutil.which(tool) is None:
            say(f"demo: {tool} is missing: run as root on Debian, or install qemu-utils, "
                "nbdkit and nbdkit-plugin-python")  # fmt: skip
            return 1
    root = Path(tempfile.mkdtemp(prefix="blockrepl-demo."))
    demo = Demo(root)
    ok = False
    try:
        demo.certificates()
        demo.daemons()
        demo.sample_disk()
        synced = demo.initial_sync()
        demo.capture()
        demo.write_while_replicating()
        say("    waiting for the master target to hold everything:")
        demo.settle()
        demo.progress()
        at_tag = demo.tag()
        final = demo.settle()
        demo.recover(at_tag)
        demo.summary(synced, final)
        ok = True
    except DemoError as exc:
        say(f"\ndemo: FAILED: {exc}")
    except KeyboardInterrupt:
        say("\ndemo: interrupted")
    finally:
        demo.stop_all()
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"demo: logs and files kept in {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
