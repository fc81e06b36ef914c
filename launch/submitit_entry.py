"""What each task of a submitted job runs in place of ``python -m submitit.core._submit FOLDER``: the same job, with the
job's pickle loaded as plain data.

submitit pickles the submitted callable into ``RUN_DIR/slurm/<job_id>_submitted.pkl`` and the task unpickles it on the
node; a requeue writes it again. Anyone who can write the run directory could replace it while the job waits in the
queue, and unpickling runs whatever the file says. What we submit is always a :class:`launch.submit.TrainJob` (three
paths and numbers) inside submitit's ``DelayedSubmission``, so the pickle is loaded with an unpickler that knows those
two classes and nothing else (:func:`load_submission`): builtins such as ``os.system`` cannot even be named, and the
fields are checked before anything runs. Then submitit's own ``process_job`` runs the job as usual (signal handling,
checkpoint and requeue, the result file).

The task reaches this module through submitit's ``python`` executor parameter (the command that starts Python on the
node): ``build_executor`` sets it to ``python -u -m launch.submitit_entry``, so the task's command line reads
``python -u -m launch.submitit_entry -u -m submitit.core._submit FOLDER`` and this module takes FOLDER from its end.
Nobody unpickles the result files submitit writes back: ``pretrain status`` and the sweep read the job's state from
Slurm and the run directory, never through ``job.result()``.
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_submission", "main"]

_ALLOWED = {("submitit.core.utils", "DelayedSubmission"), ("launch.submit", "TrainJob")}


class _JobUnpickler(pickle.Unpickler):
    """Builds only submitit's ``DelayedSubmission`` and our ``TrainJob``, from their fields (neither defines
    ``__setstate__`` or ``__reduce__``: a field is set, nothing is called); any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a training job")
        return super().find_class(module, name)


def load_submission(path: str | Path) -> Any:
    """The ``DelayedSubmission`` of a ``TrainJob`` in ``path``, loaded as plain data and checked.

    Raises:
        pickle.UnpicklingError: The file holds anything else (another class, a function, fields of the wrong type).
    """
    from submitit.core.utils import DelayedSubmission

    from launch.submit import TrainJob

    data = Path(path).read_bytes()
    try:
        obj = _JobUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(_refusal(path, str(e))) from None
    except Exception as e:  # a truncated or garbled file: whatever the unpickler says, it is not a job
        raise pickle.UnpicklingError(_refusal(path, f"{type(e).__name__}: {e}")) from None
    job = getattr(obj, "function", None)
    fields = vars(job) if isinstance(job, TrainJob) else {}
    plain = (
        isinstance(obj, DelayedSubmission)
        and isinstance(job, TrainJob)
        and obj.args == ()
        and obj.kwargs == {}
        and all(isinstance(fields.get(k), str) for k in ("config_path", "run_dir"))
        and isinstance(fields.get("signal_delay_s"), int)
        and isinstance(fields.get("trust_checkpoint", False), bool)
        and isinstance(getattr(obj, "_timeout_min", 0), int)
        and isinstance(getattr(obj, "_timeout_countdown", 0), int)
    )
    if not plain:
        raise pickle.UnpicklingError(_refusal(path, "its fields are not those of a training job"))
    return obj


def _refusal(path: str | Path, why: str) -> str:
    return (
        f"{path} is not a job `pretrain submit` wrote ({why}); it was not run. Anyone who can write the run "
        "directory can replace this file while the job waits: resubmit with `pretrain submit`"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the job in the folder named last on the command line, as ``submitit.core._submit`` would."""
    from pretrain.lifecycle import pause_gc

    pause_gc()  # until torch and DeepSpeed are loaded, as in `pretrain train` (pretrain.rank.run_training)
    from submitit.core import submission, utils

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m launch.submitit_entry [-u -m submitit.core._submit] FOLDER")
    # process_job loads the job through this classmethod: the one place the pickle is read
    utils.DelayedSubmission.load = classmethod(lambda cls, path: load_submission(path))  # type: ignore[method-assign]
    submission.process_job(argv[-1])


if __name__ == "__main__":
    main()
