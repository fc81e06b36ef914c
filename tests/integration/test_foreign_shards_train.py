"""Training on shards written by ``webdataset.ShardWriter`` (ImageNet layout), indexed by `pretrain data index`.

The digits, re-encoded as JPEG, are written as ImageNet-style WebDataset shards (synset keys, ``.jpg`` + ``.cls`` +
``.json``, several shards per split, the last train shard truncated). A real 2-rank DeepSpeed run trains on them, and
a run SIGKILLed after its step-8 checkpoint and started again logs the same losses and ends with the same weights as
the uninterrupted one.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import TINY_RUN_STEPS, tiny_run_overrides
from PIL import Image

from data_pipeline.manifest import load_manifest
from data_pipeline.sources import DigitsSource
from launch.cli import main
from pretrain.fsutil import read_jsonl
from pretrain.rundir import COMPLETE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"
PER_SHARD = 300


def train_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = run_dir / "checkpoints" / f"step_{TINY_RUN_STEPS:06d}"
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def wait_for(predicate, timeout: float, run, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"run exited ({run.proc.returncode}) before {what}:\n{run.output[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def foreign_digits(scratch_root: Path) -> Path:
    """The digits as ImageNet-layout WebDataset shards, indexed; train/shard-000004.tar is truncated."""
    root = scratch_root / "data" / "foreign-digits"
    src = DigitsSource()
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        items = [it for it in src.list_items() if it.split == split]
        with wds.ShardWriter(str(root / split / "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
            for i, it in enumerate(items):
                synset = f"n{it.label:08d}"
                sink.write(
                    {
                        "__key__": f"{synset}_{10000 + i}",
                        "jpg": _jpeg(src.read(it)),
                        "cls": it.label,
                        "json": {"label": it.label, "synset": synset},
                    }
                )
    victim = root / "train" / "shard-000004.tar"
    with tarfile.open(victim) as tar:
        cut = [m for m in tar if m.name.endswith(".jpg")][100].offset_data + 10
    victim.write_bytes(victim.read_bytes()[:cut])
    assert main(["data", "index", str(root)]) == 0
    manifest = load_manifest(root)
    assert [s["path"] for s in manifest.skipped] == ["train/shard-000004.tar"]
    assert manifest.splits["train"].num_samples == 4 * PER_SHARD and manifest.splits["val"].num_samples == 300
    assert main(["data", "inspect", str(root)]) == 0
    return root


def test_train_on_indexed_shards_and_resume_after_sigkill(foreign_digits: Path, run_root: Path, start_train) -> None:
    ref = start_train(CONFIG, tiny_run_overrides(foreign_digits, run_root, "ref"), "--nproc", "2")
    assert ref.wait() == 0, ref.output[-5000:]
    assert "val_top1=" in ref.output
    reference = train_losses(run_root / "ref")
    assert sorted(reference) == list(range(1, TINY_RUN_STEPS + 1))
    evals = [e for e in read_jsonl(run_root / "ref" / "metrics.jsonl") if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [10, 20]
    status = json.loads((run_root / "ref" / "status.json").read_text())
    assert status["state"] == "finished" and status["world_size"] == 2

    args = (CONFIG, tiny_run_overrides(foreign_digits, run_root, "killed"), "--nproc", "2")
    run = start_train(*args)
    marker = run_root / "killed" / "checkpoints" / "step_000008" / COMPLETE_MARKER
    wait_for(marker.exists, 180, run, "checkpoint step_000008")
    run.kill_all(signal.SIGKILL)
    run.wait()
    assert 8 <= max(train_losses(run_root / "killed")) < TINY_RUN_STEPS, "killed mid-run"
    again = start_train(*args)
    assert again.wait() == 0, again.output[-5000:]
    assert "resumed from" in again.output and "step_000008" in again.output

    got = train_losses(run_root / "killed")
    assert sorted(got) == list(range(1, TINY_RUN_STEPS + 1)), "every step logged exactly once"
    mismatched = [s for s in reference if got[s] != reference[s]]
    assert not mismatched, f"losses differ at steps {mismatched}"
    a, b = final_weights(run_root / "killed"), final_weights(run_root / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
