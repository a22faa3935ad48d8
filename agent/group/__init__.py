"""Consistency groups: machines that fail over to one moment (docs/groups.md).

- :mod:`agent.group.messages`: the round's messages on the group port (sans-IO);
- :mod:`agent.group.member`: a machine's part of a round, on its disks' captures;
- :mod:`agent.group.server`: a member's listener for its coordinator;
- :mod:`agent.group.coordinator`: the rounds, run by one member of the group;
- :mod:`agent.group.service`: ``blockrepl agent group``, and its metrics.
"""
