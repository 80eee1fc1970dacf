"""contrib/: the systemd unit for ``serve`` and the Prometheus scrape job and alert rules."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from exlab_wizard.service.server import SHUTDOWN_BUDGET_S
from tests.service.conftest import Service

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
UNIT = CONTRIB / "systemd" / "exlab-sync.service"
ALERTS = CONTRIB / "prometheus" / "exlab-sync-alerts.yml"
SCRAPE = CONTRIB / "prometheus" / "exlab-sync.yml"
_METRIC = re.compile(r"\bexlab_[a-z_]+\b")
_MATCHER = re.compile(r"\b(exlab_[a-z_]+)\{([^}]*)\}")
_LABEL = re.compile(r'(\w+)\s*=~?\s*"([^"]*)"')


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_serve_as_its_own_user_with_a_bounded_stop_and_hardening() -> None:
    unit = _unit()
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service["User"] not in ("", "root") and service["Group"] == service["User"]
    assert service["ExecStart"].endswith("/exlab-sync serve --config /etc/exlab-wizard/config.yaml")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    # serve's own stop is bounded (SHUTDOWN_BUDGET_S plus 3 s for the HTTP server): systemd waits longer.
    assert int(service["TimeoutStopSec"]) == 15 > SHUTDOWN_BUDGET_S + 3
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    # Under ProtectSystem=strict only these stay writable: the state dir, the local runs, the NAS mount.
    assert service["StateDirectory"] == "exlab-wizard"
    writable = service["ReadWritePaths"].split()
    assert "/mnt/nas" in writable and "/data/instruments" in writable
    assert "ProtectHome" not in service  # the rsync transport's ssh key may live in a home folder
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("exlab-sync"))
    text = UNIT.read_text().replace("/opt/exlab-wizard/.venv/bin/exlab-sync", exe)
    assert exe in text
    (tmp_path / UNIT.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # An unknown or misspelt key is only a warning (exit 0): refuse any line about our file.
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if UNIT.name in line]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules and all({"alert", "expr", "labels", "annotations"} <= rule.keys() for rule in rules)
    return rules


def test_the_scrape_job_targets_serves_default_address() -> None:
    doc = yaml.safe_load(SCRAPE.read_text())
    (job,) = doc["scrape_configs"]
    assert job["job_name"] == "exlab-sync" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8765"]
    # The "service down" alert names this job.
    assert any(f'up{{job="{job["job_name"]}"}}' in rule["expr"] for rule in _rules())


async def test_alert_rules_name_only_metrics_and_label_values_that_metrics_exposes(service: Service) -> None:
    reply = await service.http.get("/metrics")
    samples = [s for family in text_string_to_metric_families(reply.text) for s in family.samples]
    names = {s.name for s in samples}
    values: dict[tuple[str, str], set[str]] = {}
    for s in samples:
        for label, value in s.labels.items():
            values.setdefault((s.name, label), set()).add(value)
    rules = _rules()
    alerts = {rule["alert"] for rule in rules}
    for wanted in ("ExlabNoVerifiedSync", "ExlabJobsFailed", "ExlabNasUnreachable"):
        assert wanted in alerts
    used = set()
    for rule in rules:
        found = set(_METRIC.findall(rule["expr"]))
        assert found or "up{" in rule["expr"], rule["alert"]
        assert found <= names, (rule["alert"], found - names)
        used |= found
        for metric, matchers in _MATCHER.findall(rule["expr"]):
            for label, pattern in _LABEL.findall(matchers):
                exposed = values.get((metric, label), set())
                for value in pattern.split("|"):  # the rules' regex matchers are plain alternatives
                    assert value in exposed, (rule["alert"], metric, label, value, exposed)
    assert {"exlab_last_verified_sync_timestamp_seconds", "exlab_jobs", "exlab_nas_reachable"} <= used
