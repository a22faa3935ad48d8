"""How HRL files are named where they wait: the process server's cache and
the master target's inbox use one scheme, so that names sort in stream order::

    GGGGGGGGGGGGGGGGGGGG-FFFFFFFFFFFFFFFFFFFF-LLLLLLLLLLLLLLLLLLLL.hrl
    generation           first seq            last seq

Twenty digits each: 2**63 has nineteen.
"""

from __future__ import annotations

import re
from typing import Final

HRL_NAME: Final = re.compile(r"(\d{20})-(\d{20})-(\d{20})\.hrl")


def hrl_file_name(generation: int, first_seq: int, last_seq: int) -> str:
    """The name of the HRL file holding seqs ``first_seq .. last_seq`` of ``generation``."""
    return f"{generation:020d}-{first_seq:020d}-{last_seq:020d}.hrl"


def parse_hrl_file_name(name: str) -> tuple[int, int, int] | None:
    """``(generation, first_seq, last_seq)`` of an HRL file name, or None for another name."""
    match = HRL_NAME.fullmatch(name)
    if match is None:
        return None
    generation, first, last = (int(g) for g in match.groups())
    return generation, first, last
