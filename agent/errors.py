"""The agent's branch of the error tree (rooted in :mod:`protocol.errors`).

Exit codes follow sysexits(3), as the rest of ``blockrepl`` does, so a
script or a timer unit can tell "try again later" (75, 69) from "fix the
setup" (65, 66, 77, 78).
"""

from __future__ import annotations

from typing import Final

from protocol.errors import BlockreplError


class AgentError(BlockreplError):
    """Something the agent cannot do; the message says what and why."""

    code = "agent"
    exit_code = 1


class SourceError(AgentError):
    """The source disk cannot be opened or read, or is not what the target is."""

    code = "source"
    exit_code = 66  # EX_NOINPUT


class SourceChangedError(SourceError):
    """A batch must be sent again, but the source no longer reads as it did.

    Batches of a sync are kept in the journal by reference to the source
    (docs/protocol.md, "Agent journal"): sending one again reads the source
    again and checks the payload digest, so a resend is exact or refused.
    """

    code = "source-changed"
    exit_code = 75  # EX_TEMPFAIL: a new generation and a new pass fix it


class TargetMismatchError(AgentError):
    """The master target's disk cannot be made equal to the source (a different size)."""

    code = "target-mismatch"
    exit_code = 65  # EX_DATAERR


class JournalError(AgentError):
    """A journal entry on the source side is unreadable, corrupt or out of place."""

    code = "journal"
    exit_code = 74  # EX_IOERR


class DiskBusyError(AgentError):
    """Another agent process works on the same disk."""

    code = "busy"
    exit_code = 75  # EX_TEMPFAIL


class ProcessServerUnavailableError(AgentError):
    """No process server answered, or none made progress, for longer than allowed.

    Also raised for one failed exchange with one process server (a refused
    connection, a timeout, a 5xx): the sender then retries, backs off and
    moves to the next process server; only when all of them stay silent
    for ``give_up_after_s`` does the error reach the operator.

    Args:
        retry_after_s: the server asked to be left alone this long (503).
    """

    code = "process-server-unavailable"
    exit_code = 69  # EX_UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RefusedError(AgentError):
    """A process server refused a request for a reason retrying cannot fix.

    403 (this machine may not write the disk), 404 (the master target does not
    replicate it), 400 or 413 (the request broke the protocol: a version
    mismatch or a bug). ``status`` and ``server_code`` are the answer's.
    """

    code = "refused"
    exit_code = 77  # EX_NOPERM

    def __init__(self, message: str, *, status: int, server_code: str) -> None:
        super().__init__(message, details={"status": status, "server_error": server_code})
        self.status = status
        self.server_code = server_code


class StreamBrokenError(AgentError):
    """The disk's stream cannot go on in its generation: a new one must start.

    Raised when the process server has moved to a newer generation, marks
    the disk ``resync_required``, or holds seqs this agent never journaled
    (its state was lost or restored from an old backup). A sync then starts
    a newer generation and compares the whole disk again.
    """

    code = "stream-broken"
    exit_code = 75  # EX_TEMPFAIL


#: The ``details`` of a StreamBrokenError raised because the process server
#: holds seqs this agent's journal does not reach (it was lost, or restored
#: from an old backup): everything the master target received is still good.
JOURNAL_BEHIND: Final = {"cause": "journal-behind"}


class CaptureError(AgentError):
    """Live capture cannot run: nbdkit or its plugin failed, or broke the capture socket."""

    code = "capture"
    exit_code = 71  # EX_OSERR: a program it needs failed; a restart may mend it


class TagError(AgentError):
    """A tag round was abandoned: a disk did not answer in time, or quiescing failed.

    No disk keeps a tag of an abandoned round unless ``details["tagged"]``
    lists it (a disk failed after others inserted theirs).
    """

    code = "tag"
    exit_code = 75  # EX_TEMPFAIL: the next round may succeed


class GroupRoundAbortedError(TagError):
    """A consistency group round aborted: every member resumed its writes. A
    disk that got the round's tag keeps it, but the master target lists a
    group point only where every disk of the group has it.

    Args:
        reason: why, for the metrics (``unreachable``, ``refused``,
            ``quiesce-failed``, ``prepare-timeout``, ``barrier-timeout``,
            ``tag-timeout``, ``member-lost``).
    """

    code = "group-round-aborted"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, details={"reason": reason})
        self.reason = reason


class GroupRefusalError(AgentError):
    """One step of a group round refused, by a member or its own disks; the
    code is sent to the coordinator as the answer's ``error``."""

    code = "group-refused"
    exit_code = 75  # EX_TEMPFAIL

    def __init__(self, message: str, *, wire_code: str) -> None:
        super().__init__(message, details={"wire_code": wire_code})
        self.wire_code = wire_code
