"""The compose file's Prometheus scrapes every Tuneforge process it runs, at the port each serves /metrics on."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _targets(config: dict) -> dict[str, set[tuple[str, int]]]:
    """job name -> (host, port) of its static targets and DNS names."""
    found: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        hosts = found.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            hosts |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in static["targets"]}
        for dns in job.get("dns_sd_configs", []):
            hosts |= {(name, int(dns["port"])) for name in dns["names"]}
        assert job.get("metrics_path", "/metrics") == "/metrics"
    return found


def test_prometheus_scrapes_every_tuneforge_service_of_the_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    prometheus = services["prometheus"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"]}
    assert mounted["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    scraped = set().union(*_targets(yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())).values())

    expected = set()
    for name, service in services.items():
        command = service.get("command") or []
        if command[:2] == ["tuneforge", "serve"]:
            expected.add((name, int(command[command.index("--port") + 1])))
        elif command[:2] == ["tuneforge", "worker"]:
            expected.add((name, int(service["environment"]["TUNEFORGE_METRICS__WORKER_PORT"])))
            assert service["environment"]["TUNEFORGE_METRICS__WORKER_HOST"] == "0.0.0.0"
        elif command[:2] == ["tuneforge", "inference"]:
            expected.add((name, int(command[command.index("--port") + 1])))
    assert {name for name, _ in expected} == {"api", "worker", "evaluator", "inference"}
    assert expected <= scraped, expected - scraped
