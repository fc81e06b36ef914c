"""Test-only fault injection for ``pretrain train`` subprocesses; the product never imports it.

A test puts this folder first on ``PYTHONPATH`` and sets ``PRETRAIN_FAULT_NONFINITE_STEPS=2,4,...``: Python imports
``sitecustomize`` at start-up in every process of the run, and on rank 0 the training loss of those optimizer steps
(1-based, as logged) becomes NaN, which exercises the trainer's cross-rank non-finite guard.
"""

import os

_STEPS = {int(s) for s in os.environ.get("PRETRAIN_FAULT_NONFINITE_STEPS", "").split(",") if s.strip()}

if _STEPS:
    import pretrain.trainer as _trainer

    _loss, _train_step = _trainer.soft_target_cross_entropy, _trainer.Trainer.train_step
    _now: dict[str, int] = {}

    def _tracked_train_step(self):
        _now.update(step=self.state.step + 1, rank=self.dist.rank)
        return _train_step(self)

    def _nan_on_chosen_steps(*args, **kwargs):
        loss = _loss(*args, **kwargs)
        if _now.get("rank") == 0 and _now.get("step") in _STEPS:
            loss = loss + float("nan")
        return loss

    _trainer.Trainer.train_step = _tracked_train_step
    _trainer.soft_target_cross_entropy = _nan_on_chosen_steps
