"""The main of training ranks 1..N-1 (python -m worker.training.rank_process), started by rank 0
(worker.training.distributed.RankGroup.start) with its RankInputs as JSON on stdin.

The rank runs the job's recipe on rank 0's local files with PassiveHooks, so it writes nothing:
no events, checkpoints, adapter or database rows. It dies with rank 0 (PR_SET_PDEATHSIG), and
its output (a traceback on failure) goes where rank 0 reads it back into the job's error.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from app.domains.jobs.spec import TrainingSpec
from worker.training.distributed import PassiveHooks, RankInputs
from worker.training.recipe import LoraRecipe

_PR_SET_PDEATHSIG = 1


def run_rank() -> None:
    """A child rank's main: read RankInputs (JSON) from stdin, run the recipe as that rank, exit.

    Exit status 0 when training ended, 1 with the traceback on its output otherwise.
    """
    inputs = RankInputs(**json.loads(sys.stdin.read()))
    # Die with the parent: SIGKILL when the process that started this one exits, however it exits.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != inputs.parent_pid:  # the parent died before the request took effect
        sys.exit(1)
    try:
        _train(inputs)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train(inputs: RankInputs) -> None:
    def path(value: str | None) -> Path | None:
        return Path(value) if value is not None else None

    recipe = LoraRecipe(spec=TrainingSpec.model_validate(inputs.spec), base_model_path=Path(inputs.base_model_path),
                        train_file=Path(inputs.train_file), validation_file=path(inputs.validation_file),
                        work_dir=Path(inputs.work_dir), hooks=PassiveHooks(), resume_from=path(inputs.resume_from),
                        init_adapter=path(inputs.init_adapter), rank=inputs)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    run_rank()
