"""A Hypothesis state machine drives a real process server through generation
and seq transitions — next, duplicate, gap, overlap, stale, a new generation,
restarts — and checks every answer and the cache against a model.

The model is the rule of docs/protocol.md written out plainly: the process
server holds one gapless stream per generation, takes exactly the batch that
starts right after what it holds (or seq 1 of a newer generation, through a
batch or ``POST generation``), acknowledges what it holds, and refuses the
rest naming what it expects.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import aiohttp
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from processserver import config as ps_config
from processserver.daemon import ProcessServer
from protocol.hrl import open_hrl
from protocol.records import Write
from tests.conftest import Deployment
from tests.processserver.test_api import _body, write_ps_config

DISK = "vm01-d1"


class ProcessServerMachine(RuleBasedStateMachine):
    def __init__(self, deployment: Deployment) -> None:
        super().__init__()
        self.deployment = deployment
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp(prefix="seq-machine-"))
        self.config = write_ps_config(deployment, self.root)
        # The model: the generation held, and the payload of each seq held in it.
        self.generation = 0
        self.held: list[bytes] = []
        self.ps: ProcessServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self._start()

    # --- plumbing ---------------------------------------------------------------------

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def _start(self) -> None:
        async def start() -> None:
            self.ps = await ProcessServer.start(
                ps_config.load(self.config), data_port=0, metrics_port=0
            )
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.deployment.client_tls("vm01"))
            )

        self._run(start())

    def _stop(self) -> None:
        async def stop() -> None:
            assert self.session is not None
            assert self.ps is not None
            await self.session.close()
            await self.ps.close()

        self._run(stop())

    def _url(self, what: str) -> str:
        assert self.ps is not None
        return f"https://127.0.0.1:{self.ps.port}/v1/disks/{DISK}/{what}"

    def _request(self, method: str, what: str, **kwargs: object) -> tuple[int, dict]:  # type: ignore[type-arg]
        async def go() -> tuple[int, dict]:  # type: ignore[type-arg]
            assert self.session is not None
            async with self.session.request(method, self._url(what), **kwargs) as response:  # type: ignore[arg-type]
                return response.status, await response.json()

        return self._run(go())  # type: ignore[no-any-return]

    def teardown(self) -> None:
        try:
            self._stop()
            # The cache holds exactly the model's stream: every file of the
            # current generation, in order, with its payload.
            files = sorted((self.root / "cache" / "disks" / DISK).glob("*.hrl"))
            opened = [open_hrl(f.read_bytes(), self.deployment.keyring) for f in files]
            current = [h for h in opened if h.header.generation == self.generation]
            data = [bytes(r.data) for h in current for r in h.records if isinstance(r, Write)]
            assert data == self.held
            seqs = [h.header.first_seq for h in current]
            assert seqs == sorted(seqs)
        finally:
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)

    # --- rules ------------------------------------------------------------------------

    @rule(
        generation_step=st.sampled_from([-1, 0, 0, 0, 1]),
        start_step=st.integers(min_value=-3, max_value=2),
        count=st.integers(min_value=1, max_value=3),
        tag=st.binary(min_size=1, max_size=8),
    )
    def post(self, generation_step: int, start_step: int, count: int, tag: bytes) -> None:
        generation = max(1, self.generation + generation_step)
        held = len(self.held) if generation == self.generation else 0
        first = max(1, held + 1 + start_step)
        payloads = [tag + bytes([n]) for n in range(count)]
        records = [Write(4096 * n, p) for n, p in enumerate(payloads)]
        status, answer = self._request(
            "POST", "batches", data=_body(DISK, first, records, generation)
        )
        last = first + count - 1
        if generation < self.generation:
            assert (status, answer["error"]) == (409, "stale-generation"), answer
            assert answer["current_generation"] == self.generation
        elif generation > self.generation:
            if first == 1:
                assert status == 200, answer
                self.generation, self.held = generation, payloads
            else:
                assert (status, answer["error"], answer["expected_seq"]) == (409, "gap", 1)
        elif last <= held:
            assert status == 200, answer  # a duplicate: acknowledged, nothing stored
        elif first == held + 1:
            assert status == 200, answer
            self.held += payloads
        else:
            expected_error = "gap" if first > held + 1 else "overlap"
            assert (status, answer["error"]) == (409, expected_error), answer
            assert answer["expected_seq"] == held + 1

    @rule(step=st.sampled_from([0, 1, 2]))
    def new_generation(self, step: int) -> None:
        wanted = self.generation + step
        status, answer = self._request("POST", "generation", json={"generation": wanted})
        if wanted > self.generation:
            assert status == 200, answer
            self.generation, self.held = wanted, []
        else:
            assert (status, answer["error"]) == (409, "stale-generation"), answer

    @rule()
    def restart(self) -> None:
        self._stop()
        self._start()

    @invariant()
    def position_is_the_models(self) -> None:
        status, state = self._request("GET", "state")
        assert status == 200
        assert (state["generation"], state["acked_seq"]) == (self.generation, len(self.held))


def test_generation_and_seq_transitions_follow_the_model(deployment: Deployment) -> None:
    run_state_machine_as_test(
        lambda: ProcessServerMachine(deployment),
        settings=settings(max_examples=12, stateful_step_count=25, deadline=None),
    )
