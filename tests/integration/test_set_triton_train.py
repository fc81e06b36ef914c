"""A digits run of setformer_lite with the fused Triton SeT (``model.kwargs.set_impl=triton``, under Triton's
interpreter on CPU) logs the losses of the same run on the torch path.

One rank: the kernels are what is under test, and every rank runs them alike; the ranks' gradient exchange does not
depend on them (the 2-rank runs of the torch path test it)."""

from __future__ import annotations

import pytest
from conftest import tiny_run_overrides, train_env

from pretrain.fsutil import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.world_size(1)]

CONFIG = "configs/run/digits_setformer_lite.yaml"
STEPS = 3
# Triton's interpreter runs each (image, head) program as numpy: 4 images a step and no eval keep the run short
SMALL = [
    "data.batch_size=4",
    "data.val_split=",
    "schedule.warmup_steps=2",
    "trainer.eval_every_steps=0",
    "checkpoint.every_steps=0",
]


def _losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"}


def test_triton_set_trains_like_the_torch_path(digits_dir, run_root, start_train):
    pytest.importorskip("triton")
    runs = {}
    for impl in ("torch", "triton"):
        overrides = tiny_run_overrides(digits_dir, run_root, impl, f"model.kwargs.set_impl={impl}")
        overrides += [f"trainer.max_steps={STEPS}", *SMALL]
        env = train_env(TRITON_INTERPRET="1") if impl == "triton" else None
        runs[impl] = start_train(CONFIG, overrides, "--nproc", "1", env=env)
    for impl, run in runs.items():
        assert run.wait(timeout=300) == 0, f"{impl}: {run.output[-5000:]}"
    torch_losses, triton_losses = _losses(run_root / "torch"), _losses(run_root / "triton")
    assert sorted(torch_losses) == sorted(triton_losses) == list(range(1, STEPS + 1))
    for step, loss in torch_losses.items():  # float32 runs; the paths differ by float32 rounding (~1e-5 relative)
        assert abs(triton_losses[step] - loss) <= 2e-3 * max(1.0, abs(loss)), (step, loss, triton_losses[step])
