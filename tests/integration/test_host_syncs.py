"""A train step reads the device back to the host at most once (issue 14 item 4).

Every host read of a tensor (``.item()``, ``.tolist()``, ``float()``, ``bool()``, ``int()``, ``.numpy()``) passes
through ``__torch_function__``; a ``TorchFunctionMode`` counts the ones our step code makes (the trainer, the engine and
the device-side augmentation; DeepSpeed's own reads and the loader's host-only index tensors are not ours). On GPU
each such read waits for the queued work of the step. The step runs for real: a DeepSpeed engine over the digits
shards in a fresh world-of-one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_run_overrides, train_env

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
from pathlib import Path
from torch.overrides import TorchFunctionMode
from pretrain.config import load_config
from pretrain.distributed import init_distributed
from pretrain.trainer import build_trainer, resolve_num_classes

READS = {"item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy", "cpu"}
OURS = ("/pretrain/", "/data_pipeline/augment.py")


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = sys._getframe(1).f_code
            if any(part in caller.co_filename for part in OURS):
                self.reads.append(f"{Path(caller.co_filename).name}:{caller.co_name}:{name}")
        return func(*args, **(kwargs or {}))


dist = None
results = []
for case, overrides in enumerate(json.loads(sys.argv[2])):  # one process for every case: imports cost more than steps
    cfg = resolve_num_classes(load_config(sys.argv[1], [*overrides, f"run.name=syncs{case}"]))
    cfg.run_dir.mkdir(parents=True)
    dist = dist or init_distributed(device="cpu")
    trainer = build_trainer(cfg, dist)
    trainer._batches = trainer._batch_stream()
    trainer.train_step()  # the first step builds what steps reuse
    steps = []
    for _ in range(3):
        with CountReads() as mode:
            out = trainer.train_step()
        steps.append({"reads": mode.reads, "skipped": out["skipped"]})
    results.append(steps)
    trainer.close()
print("RESULT " + json.dumps(results))
"""


CASES = [
    (["deepspeed.zero_stage=0"], ["trainer.py:_skip_if_nonfinite:__bool__"]),  # the plain optimizer: the one read
    (["deepspeed.zero_stage=2"], []),  # ZeRO's optimizer checks the gradient norm itself
    (["deepspeed.zero_stage=1", "trainer.grad_accum_steps=2", "augment.mixup_alpha=0.8"], []),
]


def test_a_train_step_reads_the_device_at_most_once(digits_dir, run_root, deepspeed_cpu_ops):
    overrides = [[*tiny_run_overrides(digits_dir, run_root, "syncs", "data.num_workers=0"), *o] for o, _ in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "configs/run/digits_sepvit_lite.yaml", json.dumps(overrides)],
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for (engine, reads), steps in zip(CASES, results, strict=True):
        assert [s["skipped"] for s in steps] == [False] * 3, engine
        assert [s["reads"] for s in steps] == [reads] * 3, engine
