"""A real Prometheus scrapes both real daemons while an agent stand-in streams
through them: the RPO and throughput series come back through its HTTP API,
every alert rule of systemd/alerts.yml evaluates without error on the real
series, and promtool accepts both endpoints' output and the rule files."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import aiohttp

from protocol.batch import encode_batch
from protocol.records import Write
from tests.conftest import Deployment, require_binary
from tests.faults.daemons import free_port

from .running import (
    Ports,
    mt_config_text,
    ps_config_text,
    start_daemon,
    wait_ready,
    wait_until,
)

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
#: Scrape and rule evaluation every second: the test waits seconds, not minutes.
SCRAPE_INTERVAL = "1s"
#: Seconds Prometheus gets to start, and the test to see every series it waits for.
PROMETHEUS_TIMEOUT_S = 60.0
BATCH_BYTES = 64 * 1024


def prometheus_config(ps: Ports, mt: Ports) -> str:
    return f"""
global:
  scrape_interval: {SCRAPE_INTERVAL}
  scrape_timeout: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
rule_files:
  - {SYSTEMD / "alerts.yml"}
scrape_configs:
  - job_name: blockrepl-processserver
    static_configs:
      - targets: ["127.0.0.1:{ps.metrics}"]
  - job_name: blockrepl-mastertarget
    static_configs:
      - targets: ["127.0.0.1:{mt.metrics}"]
"""


class PrometheusApi:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def ready(self) -> bool:
        try:
            async with self.session.get(f"{self.base}/-/ready") as answer:
                return answer.status == 200
        except aiohttp.ClientError:
            return False

    async def get(self, path: str, **params: str) -> object | None:
        """The ``data`` of an API answer, or None while Prometheus does not answer."""
        try:
            async with self.session.get(f"{self.base}{path}", params=params) as answer:
                if answer.status != 200:
                    return None
                body = await answer.json()
        except aiohttp.ClientError:
            return None
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, object]]:
        data = await self.get("/api/v1/query", query=promql)
        assert isinstance(data, dict)
        result = data["result"]
        assert isinstance(result, list)
        return result


async def test_prometheus_reads_rpo_and_throughput_from_both_daemons(
    deployment: Deployment, tmp_path: Path
) -> None:
    prometheus = require_binary("prometheus")
    promtool = require_binary("promtool")
    mt_ports, ps_ports = Ports(), Ports()
    mt_root, ps_root = tmp_path / "mt", tmp_path / "ps"
    mt_config, ps_config = mt_root / "mastertarget.toml", ps_root / "processserver.toml"
    mt_root.mkdir()
    ps_root.mkdir()
    mt_config.write_text(mt_config_text(deployment, mt_root, mt_ports, size_bytes=16 * 2**20))
    ps_config.write_text(
        ps_config_text(deployment, ps_root, ps_ports, master_target_port=mt_ports.data)
    )
    mt = start_daemon("mastertarget.cli", mt_config, tmp_path / "mt.log")
    ps = start_daemon("processserver.cli", ps_config, tmp_path / "ps.log")
    await wait_ready(mt, mt_ports)
    await wait_ready(ps, ps_ports)

    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(prometheus_config(ps_ports, mt_ports))
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [
                prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    agent_tls = aiohttp.TCPConnector(ssl=deployment.client_tls("vm01"))
    try:
        async with (
            aiohttp.ClientSession() as plain,
            aiohttp.ClientSession(connector=agent_tls) as agent,
        ):
            api = PrometheusApi(plain, prom_port)
            sent = [0]

            async def send_one() -> None:
                """One more batch through both daemons: the counters keep moving."""
                seq = sent[0] + 1
                offset = (seq % 200) * BATCH_BYTES
                now = time.time_ns()  # the RPO counts from the capture time
                body = encode_batch(
                    disk_id="vm01-d0", generation=1, first_seq=seq,
                    records=[Write(offset, b"p" * BATCH_BYTES)],
                    first_capture_ns=now, last_capture_ns=now,
                )  # fmt: skip
                url = f"https://127.0.0.1:{ps_ports.data}/v1/disks/vm01-d0/batches"
                async with agent.post(url, data=body) as answer:
                    assert answer.status == 200, await answer.text()
                sent[0] = seq

            async def series(promql: str) -> list[dict[str, object]] | None:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                await send_one()
                if not await api.ready():
                    return None
                result = await api.query(promql)
                return result or None

            up = await wait_until(
                lambda: series('sum(up{job=~"blockrepl-.*"}) == 2'),
                "both daemons up in Prometheus", PROMETHEUS_TIMEOUT_S,
            )  # fmt: skip
            assert up
            rpo = await wait_until(
                lambda: series('blockrepl_mastertarget_rpo_seconds{disk="vm01-d0"} < 900'),
                "the RPO of vm01-d0 in Prometheus", PROMETHEUS_TIMEOUT_S,
            )  # fmt: skip
            assert rpo[0]["metric"]["job"] == "blockrepl-mastertarget"  # type: ignore[index]
            for promql in (
                'rate(blockrepl_processserver_in_bytes_total{disk="vm01-d0"}[5s]) > 0',
                'rate(blockrepl_processserver_out_bytes_total{disk="vm01-d0"}[5s]) > 0',
                'rate(blockrepl_mastertarget_applied_bytes_total{disk="vm01-d0"}[5s]) > 0',
            ):
                throughput = await wait_until(
                    lambda promql=promql: series(promql), promql, PROMETHEUS_TIMEOUT_S
                )
                assert float(throughput[0]["value"][1]) > 0  # type: ignore[index]

            async def rules_evaluated() -> list[dict[str, object]] | None:
                data = await api.get("/api/v1/rules")
                assert isinstance(data, dict)
                rules = [rule for group in data["groups"] for rule in group["rules"]]
                if any(rule["health"] == "unknown" for rule in rules):
                    return None
                return rules

            rules = await wait_until(rules_evaluated, "every rule evaluated", PROMETHEUS_TIMEOUT_S)
            assert len(rules) == 18
            broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
            assert broken == {}
            firing = await api.query('ALERTS{alertstate="firing"}')
            assert firing == [], firing  # a healthy deployment raises nothing

            # Every query of the dashboard runs (an error fails the assert in query).
            dashboard = json.loads((SYSTEMD / "grafana-dashboard.json").read_text())
            exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
            for expr in exprs:
                promql = expr.replace("$__rate_interval", "5s").replace("$disk", ".*")
                await api.query(promql)
            rpo_panel = await api.query(exprs[0].replace("$disk", ".*"))
            assert rpo_panel, "the dashboard's RPO panel shows nothing"

            for ports in (ps_ports, mt_ports):
                async with plain.get(f"{ports.metrics_url}/metrics") as answer:
                    text = await answer.read()
                check = subprocess.run(
                    [promtool, "check", "metrics"], input=text, capture_output=True,
                    timeout=60, check=False,
                )  # fmt: skip
                assert check.returncode == 0, check.stdout + check.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        for daemon in (ps, mt):
            daemon.kill_if_running()


def test_promtool_checks_and_tests_the_rules_and_the_example_config() -> None:
    promtool = require_binary("promtool")
    for command in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
        ["check", "config", "prometheus.yml"],
    ):
        result = subprocess.run(
            [promtool, *command], cwd=SYSTEMD, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, (
            f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
        )
    tested = (SYSTEMD / "alerts_test.yml").read_text()
    names = [
        line.split("alert:")[1].strip()
        for line in (SYSTEMD / "alerts.yml").read_text().splitlines()
        if line.strip().startswith("- alert:")
    ]
    assert len(names) == 18
    untested = [name for name in names if f"alertname: {name}\n" not in tested]
    assert untested == []
