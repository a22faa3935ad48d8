"""Coverage-guided fuzzing of every decoder of untrusted bytes, with atheris.

Each target of tests/faults/fuzz/targets.py runs in a process of its own
(``python -m tests.faults.fuzz``) for its share of ``BLOCKREPL_FUZZ_S``
seconds (30 in all by default), seeded from tests/faults/corpus/ and the
product's encoders. libFuzzer writes its corpus and any crashing input into
the test's temporary folder. The test fails when a target finds an input that
raises an undeclared error or breaks a target's property, takes longer than
``-timeout`` (a hang), or passes its memory bound or ``-rss_limit_mb``; it
prints the input and the bytes to keep in tests/faults/corpus/. Then every
input the run kept is replayed here with tracemalloc on, each held to its
memory bound.

Without atheris the fuzzing test skips, except under CI=true on a platform
atheris has wheels for (CPython 3.11-3.13 on Linux x86_64), where it fails. The
seeds are checked with or without it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.conftest import missing_peer
from tests.faults.fuzz.inputs import (
    HRL_LAYOUT,
    UNDO_LAYOUT,
    parse_file,
    parse_stream,
    reseal_batches,
    seal_file,
    unseal_file,
)
from tests.faults.fuzz.targets import KEYRING, ROOT, TARGETS, Target, check_one

#: Seconds of fuzzing in all, shared by the targets.
FUZZ_S = float(os.environ.get("BLOCKREPL_FUZZ_S", "30"))
PER_TARGET_S = max(1, round(FUZZ_S / len(TARGETS)))
#: libFuzzer's -timeout: an input that takes longer is a hang. The slowest
#: inputs (a 64 MiB zstd plaintext, decoded) take well under a second.
HANG_S = 5
#: libFuzzer's -rss_limit_mb: the interpreter and a 64 MiB HRL plaintext with
#: its records fit several times over.
RSS_LIMIT_MB = 1024
#: Seconds a run may take beyond its fuzzing: start-up, seeds, the last input.
SLACK_S = 90
#: Files libFuzzer names after what an input did.
ARTIFACTS = ("crash-*", "timeout-*", "oom-*", "leak-*")
#: Bytes of a crashing input the failure message shows.
SHOWN_BYTES = 1024


def _atheris_has_wheels_here() -> bool:
    """Where atheris installs as a wheel: the marker of the fuzz extra in pyproject.toml."""
    return (
        platform.python_implementation() == "CPython"
        and sys.platform == "linux"
        and platform.machine() == "x86_64"
        and sys.version_info < (3, 14)
    )


def _require_atheris() -> None:
    if importlib.util.find_spec("atheris") is not None:
        return
    if _atheris_has_wheels_here():
        missing_peer("atheris is not installed (./scripts/test installs it: .[fuzz])")
    pytest.skip(
        f"atheris has no wheel for {platform.python_implementation()} "
        f"{platform.python_version()} on {sys.platform} {platform.machine()}"
    )


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_passes_its_target(name: str) -> None:
    """The seeds (the kept corpus among them) decode or fail as declared, in bounded memory."""
    target = TARGETS[name]
    seeds = list(target.seeds())
    assert seeds, f"{name} has no seeds"
    _replay(target, seeds)


def test_the_harness_seals_as_the_writers_do() -> None:
    """Sealing by the harness gives a writer's bytes back: RESEAL inputs reach past the checks."""
    for name, layout in (("hrl", HRL_LAYOUT), ("undo", UNDO_LAYOUT)):
        sealed = [
            parse_stream(seed).body if name == "hrl" else parse_file(seed).body
            for seed in TARGETS[name].seeds()
        ]
        opened = [(body, unseal_file(body, layout, KEYRING)) for body in sealed]
        whole = [(body, plain) for body, plain in opened if plain is not None]
        assert len(whole) >= 2, f"{name}: fewer than two seeds authenticate"
        for body, plain in whole:
            assert seal_file(plain, layout, KEYRING) == body
    batch_seeds = [parse_stream(seed) for seed in TARGETS["batch"].seeds()]
    bodies = [seed.body for seed in batch_seeds if not seed.reseal]
    assert any(reseal_batches(body) == body and len(body) > 300 for body in bodies)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_finds_no_crash_hang_or_overrun(name: str, tmp_path: Path) -> None:
    _require_atheris()
    target = TARGETS[name]
    command = [
        sys.executable, "-m", "tests.faults.fuzz", name, str(tmp_path),
        f"-max_total_time={PER_TARGET_S}", f"-timeout={HANG_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1",
    ]  # fmt: skip
    started = time.monotonic()
    try:
        run = subprocess.run(
            command, check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, errors="replace", timeout=PER_TARGET_S + SLACK_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name}: the fuzzer did not stop within {PER_TARGET_S + SLACK_S} s:\n{exc}")
    log = run.stderr + run.stdout
    found = sorted(path for pattern in ARTIFACTS for path in tmp_path.glob(pattern))
    if run.returncode != 0 or found:
        pytest.fail(_report(target, run.returncode, found, log))
    figures = _figures(log)
    assert figures["runs"] > 0, f"{name}: no input ran\n{log[-3000:]}"
    kept = sorted(path for folder in ("corpus", "seeds") for path in (tmp_path / folder).iterdir())
    _replay(target, [path.read_bytes() for path in kept])
    strays = [path.name for pattern in ARTIFACTS for path in ROOT.glob(pattern)]
    assert not strays, f"libFuzzer wrote into the repository: {strays}"
    print(
        f"\n{name}: {figures['runs']} inputs in {figures['seconds']} s "
        f"({time.monotonic() - started:.0f} s with start-up and replay), cov {figures['cov']} "
        f"ft {figures['ft']}, corpus {figures['corpus']} inputs ({len(kept)} replayed traced), "
        f"peak rss {figures['rss_mb']} MB, 0 crashes"
    )


def _replay(target: Target, inputs: list[bytes]) -> None:
    """Each input once as is, then again with tracemalloc on and its memory bound held."""
    for data in inputs:
        _check_or_fail(target, data)
    tracemalloc.start()
    try:
        for data in inputs:
            _check_or_fail(target, data)
    finally:
        tracemalloc.stop()


def _check_or_fail(target: Target, data: bytes) -> None:
    try:
        check_one(target, data)
    except Exception as exc:
        pytest.fail(f"{target.name}: {type(exc).__name__}: {exc}\n{_show(target, data)}")


def _report(target: Target, returncode: int, found: list[Path], log: str) -> str:
    lines = [f"{target.name}: the fuzzer exited with {returncode}"]
    for path in found:
        lines += [f"{path.name} ({path.stat().st_size} bytes):", _show(target, path.read_bytes())]
    start = max(log.rfind("=== Uncaught Python exception"), log.rfind("==ERROR"), 0)
    lines += ["", log[start:][-6000:]]
    return "\n".join(lines)


def _show(target: Target, data: bytes) -> str:
    """The input, and what to keep of it in tests/faults/corpus/ once the bug is fixed."""
    kept = target.kept(data)
    where = f"tests/faults/corpus/{target.corpus}/NAME.bin"
    return (
        f"input ({len(data)} bytes): {data[:SHOWN_BYTES].hex()}"
        f"{' ...' if len(data) > SHOWN_BYTES else ''}\n"
        f"keep as {where} ({len(kept)} bytes): {kept[:SHOWN_BYTES].hex()}"
        f"{' ...' if len(kept) > SHOWN_BYTES else ''}"
    )


def _figures(log: str) -> dict[str, int]:
    """What libFuzzer printed last: inputs run, seconds, coverage, corpus, memory."""
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    status = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", log)
    rss = re.search(r"stat::peak_rss_mb:\s+(\d+)", log)
    cov, ft, corpus = status[-1] if status else ("0", "0", "0")
    return {
        "runs": int(done.group(1)) if done else 0,
        "seconds": int(done.group(2)) if done else 0,
        "cov": int(cov),
        "ft": int(ft),
        "corpus": int(corpus),
        "rss_mb": int(rss.group(1)) if rss else 0,
    }
