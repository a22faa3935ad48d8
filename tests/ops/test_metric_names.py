"""The alert rules, the dashboard and the operator's guide name only series the
daemons export: a renamed metric must not leave an alert that never fires."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.group.metrics import GroupMetrics
from mastertarget.metrics import PREFIX as MT_PREFIX
from mastertarget.metrics import MasterTargetMetrics
from processserver.metrics import PREFIX as PS_PREFIX
from processserver.metrics import ProcessServerMetrics
from runtime.reload import ReloadMetrics

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
NAME = re.compile(r"\bblockrepl_[a-z0-9_]+")
#: Sample suffixes of each metric type in the text format.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported() -> set[str]:
    registry = CollectorRegistry()
    ProcessServerMetrics(registry)
    MasterTargetMetrics(registry)
    ReloadMetrics(registry, PS_PREFIX)
    ReloadMetrics(registry, MT_PREFIX)
    GroupMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def referenced(text: str) -> set[str]:
    return set(NAME.findall(text))


def test_alert_rules_name_exported_series() -> None:
    names = referenced((SYSTEMD / "alerts.yml").read_text())
    assert len(names) > 20
    assert names - exported() == set()


def test_dashboard_names_exported_series() -> None:
    dashboard = json.loads((SYSTEMD / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = referenced("\n".join(exprs))
    assert len(names) > 20
    assert names - exported() == set()


def test_every_exported_series_is_in_the_operators_guide() -> None:
    """docs/operations.md lists each series with what it means and what to do."""
    guide = (REPO / "docs" / "operations.md").read_text()
    missing = sorted(
        name
        for name in exported()
        if not name.endswith(("_created", "_bucket", "_count", "_sum"))
        and name not in guide
        and f"..._{name.split('_', 2)[2]}" not in guide
    )
    assert missing == []
