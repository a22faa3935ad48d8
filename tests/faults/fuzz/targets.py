"""The fuzz targets, by name: every decoder that reads bytes someone else wrote.

harness.py says what each target checks for any input; protocol_targets.py,
agent_targets.py and operator_targets.py hold the targets themselves.
"""

from __future__ import annotations

from typing import Final

from tests.faults.fuzz.agent_targets import CAPTURE_STATE, CAPTURE_WIRE, GROUP, JOURNAL
from tests.faults.fuzz.harness import CORPUS, KEYRING, ROOT, Target, check_one, corpus_files
from tests.faults.fuzz.operator_targets import CONFIG, POINT_SPEC
from tests.faults.fuzz.protocol_targets import BATCH, HRL, RECORDS, UNDO

TARGETS: Final = {
    target.name: target
    for target in (
        BATCH, HRL, UNDO, RECORDS, JOURNAL, CAPTURE_WIRE, CAPTURE_STATE, GROUP, POINT_SPEC, CONFIG
    )
}  # fmt: skip

__all__ = ["CORPUS", "KEYRING", "ROOT", "TARGETS", "Target", "check_one", "corpus_files"]
