"""Run one fuzz target under atheris::

    .venv/bin/python -m tests.faults.fuzz TARGET WORKDIR [libFuzzer flags]

WORKDIR receives everything the run writes: ``seeds/`` (the target's seeds),
``corpus/`` (the inputs libFuzzer adds), ``scratch/`` (the files the targets
write) and any ``crash-*``, ``timeout-*`` or ``oom-*`` input; the working
directory is WORKDIR too, so nothing lands in the repository. For example,
ten minutes on the batch decoder::

    .venv/bin/python -m tests.faults.fuzz batch /tmp/fuzz-batch -max_total_time=600 -timeout=5
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path

import atheris

#: Every how many inputs one runs with tracemalloc, whose peak check_one holds
#: to the target's bound. Tracing makes an input about five times slower:
#: tracing them all would leave a short run a fifth of the inputs. (The test
#: replays every input the run kept with tracing on.)
TRACE_EVERY = 8
#: The product's packages: instrumented, so that libFuzzer sees their coverage.
PRODUCT = ["protocol", "runtime", "agent", "processserver", "mastertarget"]

USAGE = "usage: python -m tests.faults.fuzz TARGET WORKDIR [libFuzzer flags]"


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(USAGE)
    name, workdir, flags = argv[1], Path(argv[2]).absolute(), argv[3:]
    # A damaged file is logged as a warning by the code under test: not wanted
    # per input. Set here, in the fuzzing process only, never at import: the
    # test suite imports the targets too, and its logging tests need the level.
    logging.getLogger("blockrepl").setLevel(logging.CRITICAL)
    # Comparisons inside str methods guide the fuzzer too. (Not atheris's
    # "RegEx" hook: its pattern proxy breaks json, which passes match() a position.)
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=PRODUCT):
        targets = importlib.import_module("tests.faults.fuzz.targets")
    if name not in targets.TARGETS:
        sys.exit(f"{USAGE}\nno target {name!r}; targets: {', '.join(targets.TARGETS)}")
    target = targets.TARGETS[name]
    for folder in ("seeds", "corpus", "scratch"):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    tempfile.tempdir = str(workdir / "scratch")
    seeds = list(target.seeds())
    for index, seed in enumerate(seeds):
        (workdir / "seeds" / f"seed-{index:03d}").write_bytes(seed)
        # Once before tracing: first calls fill caches (regexes, type hints)
        # that no input should be charged for. A seed that fails fails again
        # under libFuzzer, which reports it.
        with contextlib.suppress(Exception):
            targets.check_one(target, seed)
    inputs = itertools.count()

    def one_input(data: bytes) -> None:
        if next(inputs) % TRACE_EVERY:
            targets.check_one(target, data)
            return
        tracemalloc.start()
        try:
            targets.check_one(target, data)
        finally:
            tracemalloc.stop()

    atheris.Setup([argv[0], f"-artifact_prefix={workdir}/", *flags, "corpus", "seeds"], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
