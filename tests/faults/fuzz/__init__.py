"""Coverage-guided fuzzing of every decoder of untrusted bytes, with atheris.

``targets.py`` names one target per decoder; ``protocol_targets.py``,
``agent_targets.py`` and ``operator_targets.py`` say what each feeds its
decoder, which errors it may raise (its declared ones) and what else must
hold; ``harness.py`` what every target checks; ``inputs.py`` the input
formats and the harness's own sealing, which fixes checksums and GCM tags so
that the fuzzer reaches the checks behind them. ``__main__.py`` runs
one target under atheris (libFuzzer)::

    .venv/bin/python -m tests.faults.fuzz TARGET WORKDIR [libFuzzer flags]

``tests/faults/test_atheris.py`` runs every target that way, seeded from
``tests/faults/corpus/``, and fails on any crash, hang or memory overrun.
"""
