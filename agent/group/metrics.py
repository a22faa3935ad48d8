"""The agent's Prometheus metrics of consistency groups, on a registry of its own.

Names follow the daemons' (mastertarget/metrics.py): the ``blockrepl_agent_``
prefix, base units, ``_total`` for counters; a ``group`` label, ids being
safe label values by construction.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

PREFIX: Final = "blockrepl_agent"
#: How long a round held writes: milliseconds on a LAN, the barrier bound
#: (0.5 s by default, 5 s at most) when a member is slow.
HOLD_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class GroupMetrics:
    """Every series of ``blockrepl agent group``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        group = ["group"]
        self.started = Counter(
            f"{PREFIX}_group_rounds_started",
            "Group rounds this coordinator started.",
            group,
            registry=registry,
        )
        self.rounds = Counter(
            f"{PREFIX}_group_rounds",
            "Group rounds this coordinator ended, by result: committed (every disk of every "
            "member tagged) or aborted.",
            ["group", "result"],
            registry=registry,
        )
        self.aborts = Counter(
            f"{PREFIX}_group_round_aborts",
            "Aborted group rounds by reason: unreachable, refused, quiesce-failed, "
            "prepare-timeout, barrier-timeout, tag-timeout, member-lost.",
            ["group", "reason"],
            registry=registry,
        )
        self.held = Histogram(
            f"{PREFIX}_group_barrier_hold_seconds",
            "How long a group round held this machine's writes at the barrier.",
            group,
            buckets=HOLD_BUCKETS,
            registry=registry,
        )
        self.member_rounds = Counter(
            f"{PREFIX}_group_member_rounds",
            "Group rounds this machine took part in, by result (aborted also when the "
            "coordinator went away mid-round).",
            ["group", "result"],
            registry=registry,
        )
