"""Experiment trackers: W&B (a job's wandb integration), MLflow (the operator's tracking URI) and
TensorBoard event files (a job's tensorboard integration, attached to its result_files).

Trackers sits between the recipe and the job's hooks (worker.training.hooks): every event passes
through to the job, and each metrics event is also logged to every tracker that is running. The
recipe never knows: it keeps its one channel. The task builds the TrackerConfig from the settings
and the job (nothing here reads the environment) and closes the trackers with the job's outcome.

A tracker that fails, at start or at any step, is dropped with one event saying what happened;
training and the other trackers go on.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.domains.jobs.spec import TrainingSpec
from worker.training.hooks import EventType, StopReason, TrainingHooks

log = logging.getLogger("tuneforge.worker")

# A training log's keys that are not metrics of the step (loss is train_loss under its older name).
_NOT_LOGGED = {"step", "total_steps", "loss", "eta_seconds"}
# Final job statuses as MLflow's run statuses; others (paused, queued: the job goes on later) end the run FINISHED.
_MLFLOW_STATUS = {"failed": "FAILED", "cancelled": "KILLED"}
# Each tracker's name in events' data (integration), as the job's integrations and settings name it.
_KEYS = {"W&B": "wandb", "MLflow": "mlflow", "TensorBoard": "tensorboard"}


@dataclass(frozen=True)
class TrackerConfig:
    """What the trackers of one job need. wandb_mode online or offline (the task resolves auto);
    wandb_dir the folder W&B's run directories go in; mlflow_uri None: no MLflow; tensorboard_dir
    None: no TensorBoard files."""

    job_id: str
    team_id: str
    model: str
    spec: TrainingSpec
    wandb_mode: str = "offline"
    wandb_dir: Path | None = None
    wandb_api_key: str | None = None
    wandb_base_url: str | None = None
    wandb_init_timeout: float = 60.0
    mlflow_uri: str | None = None
    mlflow_experiment: str = "tuneforge"
    tensorboard_dir: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)


class _Tracker(Protocol):
    name: str

    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self, status: str) -> None: ...


def _numbers(data: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items()
            if k not in _NOT_LOGGED and isinstance(v, int | float) and not isinstance(v, bool)}


def _flat(prefix: str, value: Any) -> dict[str, str]:
    """The spec as MLflow params: nested keys joined by '.', values as text."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: str(value)}


class _Wandb:
    name = "W&B"

    def __init__(self, config: TrackerConfig, hooks: TrainingHooks):
        import wandb

        settings = config.spec.integrations
        w = next(i.wandb for i in settings if i.type == "wandb" and i.wandb is not None)
        assert config.wandb_dir is not None
        config.wandb_dir.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {}
        if config.wandb_api_key:
            extra["api_key"] = config.wandb_api_key
        if config.wandb_base_url:
            extra["base_url"] = config.wandb_base_url
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or config.job_id, id=config.job_id, resume="allow",
            tags=[*w.tags, "tuneforge/finetune", f"tuneforge/{config.model}"[:64], f"tuneforge/{config.job_id}"[:64]],
            config=config.spec.model_dump(mode="json"), dir=str(config.wandb_dir), mode=config.wandb_mode,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False,
                                    init_timeout=config.wandb_init_timeout, **extra),
        )
        # run.dir is <run directory>/files; the run directory is what `wandb sync` takes.
        self.run_dir = Path(self.run.dir).parent
        if config.wandb_mode == "offline":
            line = (f"W&B run {self.run.name} is logged offline to {self.run_dir} on this worker; `wandb sync "
                    f"{self.run_dir}` uploads it to a W&B server")
        else:
            line = f"W&B run {self.run.name} is logged to {self.run.url}"
        hooks.on_event("message", line, {"integration": "wandb", "mode": config.wandb_mode,
                                         "run_dir": str(self.run_dir), "run_id": self.run.id,
                                         "url": self.run.url if config.wandb_mode == "online" else None})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=1 if status == "failed" else 0)


class _Mlflow:
    name = "MLflow"

    def __init__(self, config: TrackerConfig, hooks: TrainingHooks):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        assert config.mlflow_uri is not None
        if config.mlflow_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless this is set; the file store is the embedded default's.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=config.mlflow_uri)
        experiment = self.client.get_experiment_by_name(config.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(config.mlflow_experiment))
        tags = {"tuneforge.job_id": config.job_id, "tuneforge.team_id": config.team_id,
                "tuneforge.model": config.model, **config.tags}
        self.run_id = self.client.create_run(experiment_id, run_name=config.job_id, tags=tags).info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat("", config.spec.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        hooks.on_event("message", f"MLflow run {self.run_id} is logged to {config.mlflow_uri} (experiment "
                                  f"{config.mlflow_experiment!r})",
                       {"integration": "mlflow", "run_id": self.run_id, "experiment_id": experiment_id})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_tag(self.run_id, "tuneforge.status", status)
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(status, "FINISHED"))


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, config: TrackerConfig, hooks: TrainingHooks):
        from torch.utils.tensorboard import SummaryWriter

        assert config.tensorboard_dir is not None
        self.dir = config.tensorboard_dir
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=30)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, status: str) -> None:
        self.writer.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


class Trackers:
    """TrainingHooks for the recipe: forwards everything to `hooks` and logs metrics to the trackers.

    start() opens the trackers the config asks for; end_training() closes the TensorBoard writer and
    returns the archive of its event files (None without one); close(status) ends the other runs with
    the job's outcome. Each tracker's failure becomes one event and drops that tracker. Idempotent
    closes; never raises for a tracker's fault.
    """

    def __init__(self, config: TrackerConfig, hooks: TrainingHooks):
        self.config, self.hooks = config, hooks
        self._trackers: list[_Tracker] = []
        self._tensorboard: _TensorBoard | None = None

    def start(self) -> None:
        c = self.config
        types = {i.type for i in c.spec.integrations}
        wanted: list[type] = []
        if "wandb" in types:
            wanted.append(_Wandb)
        if c.mlflow_uri:
            wanted.append(_Mlflow)
        if "tensorboard" in types and c.tensorboard_dir is not None:
            wanted.append(_TensorBoard)
        for kind in wanted:
            try:
                tracker = kind(c, self.hooks)
            except Exception as exc:  # noqa: BLE001 (any tracker's fault: the job goes on without it)
                self._failed(kind.name, "could not start", exc)
                continue
            self._trackers.append(tracker)
            if isinstance(tracker, _TensorBoard):
                self._tensorboard = tracker

    # -- TrainingHooks -----------------------------------------------------------------------

    def on_event(self, type: EventType, message: str, data: dict[str, Any] | None) -> None:
        self.hooks.on_event(type, message, data)
        if type != "metrics" or not data or not isinstance(data.get("step"), int):
            return
        metrics = _numbers(data)
        if not metrics:
            return
        for tracker in list(self._trackers):
            try:
                tracker.log(data["step"], metrics)
            except Exception as exc:  # noqa: BLE001
                self._drop(tracker, f"failed at step {data['step']}", exc)

    def should_stop(self) -> StopReason | None:
        return self.hooks.should_stop()

    def cancel_requested(self) -> bool:
        asked = getattr(self.hooks, "cancel_requested", None)
        return bool(asked()) if asked is not None else False

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.hooks.on_checkpoint(step, path, metrics)

    # -- ending --------------------------------------------------------------------------------

    def end_training(self, archive: Path) -> Path | None:
        """Close the TensorBoard writer and write its event files to `archive` (a .tar.gz); returns
        it, or None when there is no TensorBoard tracker (or it failed)."""
        board, self._tensorboard = self._tensorboard, None
        if board is None or board not in self._trackers:
            return None
        self._trackers.remove(board)
        try:
            board.close("trained")
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(board.dir, arcname="tensorboard")
        except Exception as exc:  # noqa: BLE001
            self._failed(board.name, "could not write its event files", exc)
            return None
        return archive

    def close(self, status: str) -> None:
        """End every tracker's run with the job's status (succeeded, failed, cancelled, paused, ...)."""
        trackers, self._trackers, self._tensorboard = self._trackers, [], None
        for tracker in trackers:
            try:
                tracker.close(status)
            except Exception as exc:  # noqa: BLE001
                self._failed(tracker.name, "could not end its run", exc)

    def _drop(self, tracker: _Tracker, what: str, exc: Exception) -> None:
        self._trackers.remove(tracker)
        if tracker is self._tensorboard:
            self._tensorboard = None
        try:
            tracker.close("failed")
        except Exception:  # noqa: BLE001 (already failing; the event says so)
            pass
        self._failed(tracker.name, what, exc)

    def _failed(self, name: str, what: str, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("job %s: %s tracker %s: %s", self.config.job_id, name, what, message)
        try:
            self.hooks.on_event("message", f"{name} tracking {what} ({message}); training goes on without it",
                                {"integration": _KEYS[name], "error": message})
        except Exception:  # noqa: BLE001 (the event itself failed: the log line above stands)
            log.exception("job %s: could not record the tracker failure", self.config.job_id)
