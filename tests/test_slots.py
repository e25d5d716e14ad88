"""Fair slots: the default per-team running-jobs quota is below every default count of training
slots, so one team cannot hold them all."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.core.config import QuotaDefaults
from tuneforge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_running_jobs_quota_is_below_the_default_training_slots():
    quota = QuotaDefaults().running_jobs
    parser = build_parser()
    assert quota < parser.parse_args(["worker"]).concurrency
    assert quota < parser.parse_args(["up"]).concurrency
    compose = (ROOT / "docker-compose.yml").read_text()
    commands = [json.loads(c) for c in re.findall(r"command: (\[.*\])", compose)]
    training = [c for c in commands if c[:2] == ["tuneforge", "worker"] and "training" in c[c.index("--queues") + 1]]
    assert training and all(quota < int(c[c.index("--concurrency") + 1]) for c in training)
