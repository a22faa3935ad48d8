"""The group round over real mutual TLS on loopback, in one process: a member's
listener and the coordinator, with machines that have no disks (the captures'
part is proven end to end in tests/e2e/test_groups.py), and the messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from agent.config import AgentConfig, load
from agent.errors import GroupRoundAbortedError
from agent.group.coordinator import GroupCoordinator
from agent.group.messages import MAX_LINE_BYTES, RoundSpec, encode, parse_request
from agent.group.metrics import GroupMetrics
from agent.group.server import REFUSAL_LOG_BURST, REFUSAL_LOG_EVERY_S, GroupMemberServer
from protocol.errors import MalformedError
from runtime.config import TlsFiles
from runtime.errors import ConfigError
from runtime.metrics import new_registry
from runtime.tls import client_context
from tests.conftest import Deployment, group_certificates, require_binary
from tests.faults.daemons import free_port

TIMEOUT_S = 10.0
#: Connections that each send nothing, an empty line or one byte: a quarter
#: of them from a machine that is not the coordinator.
EMPTY_REQUESTS = 600
TAG_ID = "ab" * 16


def _config(deployment: Deployment, root: Path, machine: str, ports: dict[str, int],
            disks: tuple[str, ...] = (), extra: str = "") -> AgentConfig:  # fmt: skip
    pki = deployment.pki
    members = "".join(
        f'[[group.members]]\nmachine = "{m}"\naddress = "127.0.0.1:{port}"\n'
        for m, port in ports.items()
    )
    path = root / f"{machine}.toml"
    path.write_text(
        f'process_servers = ["https://127.0.0.1:9"]\nstate_dir = "{root / machine}"\n'
        f"disks = [{', '.join(f'{{id = {json.dumps(d)}}}' for d in disks)}]\n"
        f'[tls]\nca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "machine-vm01.pem"}"\n'
        f'key_file = "{pki / "machine-vm01.key"}"\n'
        f'[group]\nid = "erp"\nmachine = "{machine}"\ncoordinator = "vm01"\n{extra}\n'
        f'[group.tls]\nca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / f"group-{machine}.pem"}"\n'
        f'key_file = "{pki / f"group-{machine}.key"}"\n{members}'
    )
    return load(path)


@pytest.fixture
async def site(
    deployment: Deployment, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, int], Callable[..., AgentConfig], list[GroupMemberServer]]]:
    """Ports for vm01 (the coordinator) and db01, a config maker, and the
    member servers started (closed at the end)."""
    group_certificates(deployment.pki, "vm01", "db01", "intruder")
    ports = {"vm01": free_port(), "db01": free_port()}
    servers: list[GroupMemberServer] = []

    def config(machine: str, disks: tuple[str, ...] = (), extra: str = "") -> AgentConfig:
        return _config(deployment, tmp_path, machine, ports, disks, extra)

    yield ports, config, servers
    for server in servers:
        await server.close()


async def _member(servers: list[GroupMemberServer], config: AgentConfig,
                  outcomes: list[str] | None = None) -> GroupMemberServer:  # fmt: skip
    server = GroupMemberServer(
        config, done=lambda outcome, _: outcomes.append(outcome) if outcomes is not None else None
    )
    await server.start()
    servers.append(server)
    return server


async def _raw(deployment: Deployment, machine: str, port: int) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:  # fmt: skip
    """A TLS connection to a member with ``machine``'s group certificate."""
    files = TlsFiles(
        ca_file=deployment.pki / "ca.pem", cert_file=deployment.pki / f"group-{machine}.pem",
        key_file=deployment.pki / f"group-{machine}.key",
    )  # fmt: skip
    context = client_context(files, check_hostname=False)
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=""), TIMEOUT_S
    )


async def _ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: dict[str, object]
) -> dict[str, object]:
    writer.write(encode(message))
    await writer.drain()
    answer: dict[str, object] = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT_S))
    return answer


def _prepare(barrier_max_s: float = 0.5) -> dict[str, object]:
    return RoundSpec("erp", "crash", "r1", TAG_ID, 1, barrier_max_s).prepare()


async def test_a_round_commits_over_tls_and_is_counted(site) -> None:  # type: ignore[no-untyped-def]
    _, config, servers = site
    outcomes: list[str] = []
    await _member(servers, config("db01"), outcomes)
    registry = new_registry()
    coordinator = GroupCoordinator(config("vm01"), GroupMetrics(registry))
    report = await coordinator.round("r1", app=False)
    assert (report.group, report.kind, report.members) == ("erp", "crash", {"vm01": [], "db01": []})
    assert outcomes == ["committed"]

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"group": "erp", **labels})

    assert value("blockrepl_agent_group_rounds_started_total") == 1
    assert value("blockrepl_agent_group_rounds_total", result="committed") == 1
    assert value("blockrepl_agent_group_barrier_hold_seconds_count") == 1  # its own machine
    checked = subprocess.run(
        [require_binary("promtool"), "check", "metrics"], input=generate_latest(registry),
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_member_down_or_without_its_captures_aborts_the_round(site) -> None:  # type: ignore[no-untyped-def]
    _, config, servers = site
    registry = new_registry()
    coordinator = GroupCoordinator(config("vm01"), GroupMetrics(registry))
    with pytest.raises(
        GroupRoundAbortedError, match=r"db01 at 127\.0\.0\.1:\d+ cannot be reached"
    ) as down:
        await coordinator.round("r1", app=False)
    assert down.value.reason == "unreachable"
    outcomes: list[str] = []
    await _member(servers, config("db01", disks=("db01-d0",)), outcomes)
    with pytest.raises(GroupRoundAbortedError, match="its capture is not running") as refused:
        await coordinator.round("r2", app=False)
    assert refused.value.reason == "refused"
    assert outcomes == ["aborted"]
    for reason in ("unreachable", "refused"):
        count = registry.get_sample_value(
            "blockrepl_agent_group_round_aborts_total", {"group": "erp", "reason": reason}
        )
        assert count == 1


async def test_only_the_coordinator_runs_rounds_one_at_a_time_in_order(
    site, deployment: Deployment  # type: ignore[no-untyped-def]
) -> None:  # fmt: skip
    ports, config, servers = site
    await _member(servers, config("db01"))
    port = ports["db01"]
    reader, writer = await _raw(deployment, "intruder", port)
    answer = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT_S))
    assert answer["error"] == "forbidden"
    writer.close()

    reader, writer = await _raw(deployment, "vm01", port)
    assert (await _ask(reader, writer, {"op": "hold"}))["error"] == "out-of-order"
    writer.close()
    reader, writer = await _raw(deployment, "vm01", port)
    wrong = {**_prepare(), "group": "crm"}
    assert (await _ask(reader, writer, wrong))["error"] == "wrong-group"
    writer.close()

    reader, writer = await _raw(deployment, "vm01", port)
    prepared = await _ask(reader, writer, _prepare())
    assert prepared == {"ok": True, "machine": "db01", "disks": []}
    second_reader, second_writer = await _raw(deployment, "vm01", port)
    assert (await _ask(second_reader, second_writer, _prepare()))["error"] == "busy"
    second_writer.close()
    assert (await _ask(reader, writer, {"op": "hold"}))["ok"] is True
    assert (await _ask(reader, writer, {"op": "tag"}))["ok"] is True
    resumed = await _ask(reader, writer, {"op": "resume", "outcome": "committed"})
    assert resumed["ok"] is True
    writer.close()


async def test_a_member_releases_when_its_barrier_bound_passes(
    site, deployment: Deployment  # type: ignore[no-untyped-def]
) -> None:  # fmt: skip
    ports, config, servers = site
    outcomes: list[str] = []
    await _member(servers, config("db01"), outcomes)
    reader, writer = await _raw(deployment, "vm01", ports["db01"])
    assert (await _ask(reader, writer, _prepare(barrier_max_s=0.2)))["ok"] is True
    assert (await _ask(reader, writer, {"op": "hold"}))["ok"] is True
    await asyncio.sleep(0.4)
    late = await _ask(reader, writer, {"op": "tag"})
    assert late["error"] == "expired"
    assert "barrier bound of 0.2 s passed" in str(late["message"])
    writer.close()
    await asyncio.sleep(0.1)
    assert outcomes == ["aborted"]


async def test_only_the_coordinator_may_coordinate(site) -> None:  # type: ignore[no-untyped-def]
    _, config, _ = site
    with pytest.raises(ConfigError, match="it is vm01"):
        GroupCoordinator(config("db01"))


# --- the messages --------------------------------------------------------------------------


def test_a_prepare_round_trips_and_bad_ones_are_named() -> None:
    request = parse_request(encode(_prepare()))
    assert request.spec == RoundSpec("erp", "crash", "r1", TAG_ID, 1, 0.5)
    assert parse_request(b'{"op": "resume", "outcome": "aborted"}\n').outcome == "aborted"
    for bad, message in [
        ({**_prepare(), "version": 2}, "version 1"),
        ({**_prepare(), "kind": "group"}, "kind crash or app"),
        ({**_prepare(), "tag_id": "ab"}, "32 hex digits"),
        ({**_prepare(), "group": "a/b"}, "group id"),
        ({**_prepare(), "time_ns": True}, "time_ns as an integer"),
        ({**_prepare(), "barrier_max_s": 0}, "barrier_max_s"),
        ({**_prepare(), "name": 5}, "as strings"),
        ({"op": "resume", "outcome": "maybe"}, "committed or aborted"),
        ({"op": "reboot"}, "expected op"),
    ]:
        with pytest.raises(MalformedError, match=message):
            parse_request(encode(bad))
    for line in (b"", b"[]\n", b"\xff\n", b"{" * 10, b" " * (MAX_LINE_BYTES + 1)):
        with pytest.raises(MalformedError):
            parse_request(line)


#: Any JSON value a field might hold.
JSON_VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=200)
    | st.builds(
        lambda field, value: encode({**_prepare(), field: value}),
        st.sampled_from(sorted(_prepare())), JSON_VALUES,
    )
)  # fmt: skip
def test_any_line_is_a_request_or_a_malformed_error(line: bytes) -> None:
    with contextlib.suppress(MalformedError):
        parse_request(line)


async def test_a_member_refuses_a_peer_without_a_certificate(site) -> None:  # type: ignore[no-untyped-def]
    ports, config, servers = site
    await _member(servers, config("db01"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    answer = b""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", ports["db01"], ssl=context), TIMEOUT_S
        )
        writer.write(encode(_prepare()))
        answer = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
    except (ssl.SSLError, ConnectionError):
        pass
    assert answer == b""


async def test_thousands_of_empty_and_one_byte_requests_leave_the_member_serving(
    site,
    deployment: Deployment,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    ports, config, servers = site
    outcomes: list[str] = []
    await _member(servers, config("db01"), outcomes)
    answers: dict[str, int] = {}
    began = asyncio.get_running_loop().time()
    with caplog.at_level(logging.INFO, logger="blockrepl.agent.group"):
        for n in range(EMPTY_REQUESTS):
            machine = "intruder" if n % 4 == 0 else "vm01"
            reader, writer = await _raw(deployment, machine, ports["db01"])
            line = (b"", b"\n", b"\r\n", bytes([n % 256]) + b"\n")[n // 4 % 4]
            writer.write(line)
            await writer.drain()
            if line or machine == "intruder":
                answer = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT_S))
                answers[str(answer["error"])] = answers.get(str(answer["error"]), 0) + 1
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
    elapsed_s = asyncio.get_running_loop().time() - began
    # The intruder is refused whatever it sends; the coordinator's empty and
    # one-byte lines are malformed; a connection that sent nothing gets no answer.
    lines_sent = sum(1 for n in range(EMPTY_REQUESTS) if n % 4 and n // 4 % 4)
    assert answers == {"forbidden": EMPTY_REQUESTS // 4, "malformed": lines_sent}
    lines = [r for r in caplog.records if r.name == "blockrepl.agent.group"]
    print(f"{answers} in {elapsed_s:.1f} s, {len(lines)} log lines")
    assert len(lines) <= REFUSAL_LOG_BURST + elapsed_s / REFUSAL_LOG_EVERY_S + 1, len(lines)
    coordinator = GroupCoordinator(config("vm01"), GroupMetrics(new_registry()))
    report = await coordinator.round("after", app=False)
    assert report.members == {"vm01": [], "db01": []}
    assert outcomes == ["committed"]
