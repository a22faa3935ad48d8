"""Recovering a consistency group: every disk at its own GROUP point of one round.

One piece for both ways in: the admin socket while the daemon runs
(mastertarget/admin.py, each member copied through its replica's history)
and ``mastertarget recover --group`` on the retention volume when it does not
(mastertarget/cli.py, each member's target opened in turn). The group point
is chosen from the catalog (mastertarget/groups.py), one output file per disk
goes into one folder, and if a member fails the members already written are
renamed ``*.incomplete``: the folder never holds a group that looks whole.

Blocking: where an event loop runs, call it on an executor thread, with the
history of every member kept (``DiskHistory.keeping_history``) until it
returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mastertarget.admin_answers import group_points, group_recover_answer
from mastertarget.config import GroupConfig
from mastertarget.groups import select_group_point
from mastertarget.points import RecoveryPoint
from mastertarget.pointspec import PointSpec
from mastertarget.recovery import OutputFormat, RecoverResult, group_outputs, set_aside
from mastertarget.state import StateStore
from protocol.admin_api import GroupRecoverAnswer

#: Writes one member disk as it was at its point into a new file (blocking).
RecoverMember = Callable[[RecoveryPoint, Path], RecoverResult]


def recover_group(
    store: StateStore,
    group: GroupConfig,
    spec: PointSpec,
    *,
    directory: Path,
    output_format: OutputFormat,
    recover_member: RecoverMember,
) -> GroupRecoverAnswer:
    """Write every disk of ``group`` at the group point ``spec`` names into ``directory``.

    Args:
        store: the catalog the group's points are read from.
        recover_member: writes one member (its own GROUP point of the round)
            into the file given; called once per disk, in the group's order.

    Raises:
        PointNotFoundError, PointSpecError: no group point matches.
        DiskExistsError: an output is there already (nothing was written).
        ProtocolError, DurabilityError, DiskError: a member failed; the ones
            written before it were renamed ``*.incomplete``.
    """
    started = time.monotonic()
    point = select_group_point(spec, group.id, group_points(store, group))
    outputs = group_outputs(list(group.disks), directory, output_format)
    results: list[RecoverResult] = []
    try:
        for member in point.members:
            results.append(recover_member(member, outputs[member.disk_id]))
    except BaseException:
        set_aside([outputs[r.point.disk_id] for r in results])
        raise
    return group_recover_answer(point, outputs, results, time.monotonic() - started)
