"""Exact resume with real 2-rank DeepSpeed ZeRO-2 on CPU (gloo), real digits shards and real TensorBoard files.

One uninterrupted reference run (the session's ``tiny_reference``) is compared, loss by loss and weight by weight,
with runs that are SIGKILLed mid-run, preempted with SIGTERM, or resumed past torn checkpoints. Runs are tiny: 20 steps
of 16 images per rank.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_STEPS, tiny_run_overrides

from pretrain.checkpoint import list_checkpoints
from pretrain.fsutil import read_jsonl
from pretrain.rundir import COMPLETE_MARKER, read_latest

pytestmark = [pytest.mark.slow, pytest.mark.world_size(2)]

CONFIG = "configs/run/digits_sepvit_lite.yaml"
MAX_STEPS = TINY_RUN_STEPS
EXIT_PREEMPTED = 3


def train_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "train"}


def eval_events(run_dir: Path) -> dict[int, dict]:
    return {e["step"]: e for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "eval"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tag_dir = run_dir / "checkpoints" / f"step_{MAX_STEPS:06d}"
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def wait_for(predicate, timeout: float, run=None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"run exited ({run.proc.returncode}) before {what}:\n{run.output[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{run.output[-3000:]}" if run is not None else ""))


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    got, want = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), "every step logged exactly once"
    mismatched = [s for s in want if got[s] != want[s]]
    assert not mismatched, f"losses differ at steps {mismatched}: {[(got[s], want[s]) for s in mismatched[:3]]}"
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"final weights differ in {different[:5]}"
    assert {s: e["val_top1"] for s, e in eval_events(run_dir).items()} == {
        s: e["val_top1"] for s, e in eval_events(ref_dir).items()
    }


@pytest.fixture(scope="module")
def reference(tiny_reference: Path) -> Path:
    """An uninterrupted 20-step run (the session's, shared with the trust and Slurm tests)."""
    return tiny_reference


def test_reference_run_layout(reference: Path):
    status = json.loads((reference / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == MAX_STEPS and status["exit_code"] == 0
    assert status["restarts"] == 0 and status["world_size"] == 2
    assert {"host", "pid", "updated", "last_checkpoint", "last_eval", "slurm_job_id"} <= status.keys()
    assert 0.0 <= status["last_eval"]["val_top1"] <= 1.0
    ckpts = list_checkpoints(reference / "checkpoints")
    assert [c.step for c in ckpts] == [12, 16, 20] and all(c.complete for c in ckpts)  # keep_last=3
    assert read_latest(reference / "checkpoints") == "step_000020"
    tag = reference / "checkpoints" / "step_000020"
    listed = json.loads((tag / COMPLETE_MARKER).read_text())["files"]
    assert {"rank_00000.pt", "rank_00001.pt", "meta.json", "mp_rank_00_model_states.pt"} <= listed.keys()
    assert any(f.startswith("zero_pp_rank_1") for f in listed)  # ZeRO-2 partition of rank 1
    rank1 = torch.load(tag / "rank_00001.pt", weights_only=False)
    assert rank1["rank"] == 1 and {"python", "numpy", "torch"} <= rank1["rng"].keys()
    assert rank1["data"]["world_size"] == 2
    events = read_jsonl(reference / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    for key in ("loss", "lr", "grad_norm", "img_per_s", "img_per_s_per_rank", "data_wait_frac", "step_time_s"):
        assert all(isinstance(e[key], float) for e in train), key
    assert train[0]["lr"] < train[5]["lr"]  # warmup
    assert sorted(eval_events(reference)) == [10, 20]
    assert (reference / "config.yaml").is_file()


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_has_the_scalars(reference: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/img_per_s", "eval/val_top1", "eval/val_loss"} <= set(tags)
    losses = dict(tb_scalars(reference, "train/loss"))
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[7] == pytest.approx(train_losses(reference)[7], rel=1e-6)
    assert [s for s, _ in tb_scalars(reference, "eval/val_top1")] == [10, 20]


def test_sigkill_all_ranks_then_same_command_resumes_exactly(reference, digits_dir, run_root, start_train):
    args = (CONFIG, tiny_run_overrides(digits_dir, run_root, "killed"), "--nproc", "2")
    run = start_train(*args)
    marker = run_root / "killed" / "checkpoints" / "step_000008" / COMPLETE_MARKER
    wait_for(marker.exists, 180, run, "checkpoint step_000008")
    run.kill_all(signal.SIGKILL)
    run.wait()
    assert json.loads((run_root / "killed" / "status.json").read_text())["state"] == "running"
    logged = max(train_losses(run_root / "killed"))
    assert 8 <= logged < MAX_STEPS, "killed mid-run"

    again = start_train(*args)
    assert again.wait() == 0, again.output[-5000:]
    assert "resumed from" in again.output and "step_000008" in again.output
    assert_same_run(run_root / "killed", reference)
    assert json.loads((run_root / "killed" / "status.json").read_text())["restarts"] == 1
    # TensorBoard drops the events the killed attempt logged after the checkpoint (purge_step on resume)
    assert tb_scalars(run_root / "killed", "train/loss") == tb_scalars(reference, "train/loss")


def test_sigterm_checkpoints_preempts_and_resumes_exactly(reference, digits_dir, run_root, start_train):
    args = (CONFIG, tiny_run_overrides(digits_dir, run_root, "preempted"), "--nproc", "2")
    run = start_train(*args)
    run_dir = run_root / "preempted"
    wait_for((run_dir / "checkpoints" / "step_000004" / COMPLETE_MARKER).exists, 180, run, "checkpoint step_000004")
    run.proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both ranks
    assert run.wait() == EXIT_PREEMPTED, run.output[-5000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == EXIT_PREEMPTED
    stopped = status["step"]
    assert 4 <= stopped < MAX_STEPS
    assert status["last_checkpoint"].endswith(f"step_{stopped:06d}")
    assert read_latest(run_dir / "checkpoints") == f"step_{stopped:06d}"
    assert "SIGTERM" in status["message"]

    again = start_train(*args)
    assert again.wait() == 0, again.output[-5000:]
    assert_same_run(run_dir, reference)


def test_torn_and_truncated_newest_checkpoints_resume_from_previous(reference, run_root, digits_dir, start_train):
    run_dir = run_root / "torn"
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_000020" / COMPLETE_MARKER).unlink()  # torn: the kill came before the marker
    victim = ckpts / "step_000016" / "rank_00001.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated file behind a COMPLETE marker
    (run_dir / "status.json").unlink()

    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "torn"), "--nproc", "2")
    assert run.wait() == 0, run.output[-5000:]
    assert "step_000020" in run.output and "no COMPLETE marker" in run.output
    assert "rank_00001.pt has 100 bytes" in run.output
    assert "resumed from" in run.output and "step_000012" in run.output
    assert_same_run(run_dir, reference)
    assert [c.step for c in list_checkpoints(ckpts) if c.complete][-1] == MAX_STEPS


def test_dead_rank_stops_the_others_and_names_it(digits_dir, run_root, start_train):
    run = start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, "dead", "trainer.max_steps=200"), "--nproc", "2")
    marker = run_root / "dead" / "checkpoints" / "step_000004" / COMPLETE_MARKER
    wait_for(marker.exists, 180, run, "checkpoint step_000004")
    children = Path(f"/proc/{run.proc.pid}/task/{run.proc.pid}/children").read_text().split()
    ranks = [int(pid) for pid in children]
    assert len(ranks) == 2
    import os

    os.kill(ranks[1], signal.SIGKILL)
    code = run.wait(timeout=60)
    assert code != 0
    assert "rank 1 was killed by SIGKILL" in run.output
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_resume_trains_with_the_configs_new_lr_and_weight_decay(digits_dir, run_root, start_train):
    # What a PBT exploit does (and a user lowering the lr of a diverging run): resume with other optimizer values.
    # The checkpoint's param groups (inside ZeRO-2's optimizer) and LR scheduler carry the old ones; the config's win.
    def overrides(*extra: str) -> list[str]:
        return tiny_run_overrides(
            digits_dir, run_root, "mutated", "schedule.name=cosine", "schedule.warmup_steps=0", "schedule.min_lr=0",
            *extra,
        )  # fmt: skip

    first = start_train(
        CONFIG, overrides("trainer.max_steps=4", "optim.lr=1e-3", "optim.weight_decay=0.05"), "--nproc", "2"
    )
    assert first.wait() == 0, first.output[-5000:]
    again = start_train(
        CONFIG, overrides("trainer.max_steps=8", "optim.lr=4e-4", "optim.weight_decay=0.2"), "--nproc", "2"
    )
    assert again.wait() == 0, again.output[-5000:]
    assert "optim.lr=0.0004 (the checkpoint's 0.001)" in again.output
    assert "optim.weight_decay=0.2 (the checkpoint's 0.05)" in again.output
    train = {e["step"]: e for e in read_jsonl(run_root / "mutated" / "metrics.jsonl") if e["event"] == "train"}
    # the lr logged for a step is the one its update used: cosine over the new 8 steps from the new base lr
    for step in range(5, 9):
        want = 4e-4 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 8))
        assert train[step]["lr"] == pytest.approx(want, rel=1e-9), (step, train[step])
    assert train[4]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-9)  # the first life's


def test_resume_on_another_number_of_ranks_reshards_and_continues_the_run(digits_dir, run_root, start_train):
    # 2 ranks to step 4 -> 1 rank (2x the micro-batch) to step 8 -> 2 ranks to step 12, against 2 ranks throughout.
    # ZeRO-2 partitions are resharded through a universal checkpoint and the stream continues at the same sample, so
    # the losses match the uninterrupted run to float rounding (another reduction order). No drop path: its RNG
    # streams are per rank and restart on a new world size. A constant lr after warmup: the middle life stops at 8.
    def overrides(name: str, *extra: str) -> list[str]:
        return tiny_run_overrides(
            digits_dir, run_root, name, "trainer.max_steps=12", "model.drop_path_rate=0", "data.num_workers=0",
            "schedule.name=constant", *extra,
        )  # fmt: skip

    ref = start_train(CONFIG, overrides("elastic_ref"), "--nproc", "2")
    assert ref.wait() == 0, ref.output[-5000:]
    run_dir = run_root / "elastic"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_root / "elastic_ref" / "checkpoints" / "step_000004", run_dir / "checkpoints" / "step_000004")

    shrunk = start_train(CONFIG, overrides("elastic", "trainer.max_steps=8", "data.batch_size=32"), "--nproc", "1")
    assert shrunk.wait() == 0, shrunk.output[-5000:]
    assert "resharded step_000004 from 2 to 1 ranks" in shrunk.output
    assert json.loads((run_dir / "checkpoints" / "step_000008" / "meta.json").read_text())["world_size"] == 1
    grown = start_train(CONFIG, overrides("elastic"), "--nproc", "2")
    assert grown.wait() == 0, grown.output[-5000:]
    assert "resharded step_000008 from 1 to 2 ranks" in grown.output
    assert not (run_dir / "checkpoints" / ".reshard").exists()

    got, want = train_losses(run_dir), train_losses(run_root / "elastic_ref")
    assert sorted(got) == list(range(5, 13))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], rel=1e-5)
    a = torch.load(run_dir / "checkpoints" / "step_000012" / "mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(
        run_root / "elastic_ref" / "checkpoints" / "step_000012" / "mp_rank_00_model_states.pt", weights_only=False
    )
    for k in b["module"]:
        torch.testing.assert_close(a["module"][k], b["module"][k], rtol=1e-4, atol=1e-5)

    # another global batch cannot continue the stream: refused before anything starts, naming a batch size that fits
    refused = start_train(CONFIG, overrides("elastic", "trainer.max_steps=16"), "--nproc", "1")
    assert refused.wait() == 2
    assert "set data.batch_size=32, or relaunch with 2 ranks" in refused.output


def test_compiled_run_with_ema_resumes_exactly(digits_dir, run_root, start_train):
    # trainer.compile=true compiles the DeepSpeed-wrapped module (ZeRO-2 here, with an EMA; one rank, as compiling
    # costs CPU): resumed from the uninterrupted compiled run's step-3 checkpoint, a new process continues with its
    # losses and ends with its weights, bit for bit.
    # aot_eager traces the same graphs as inductor without its C++ code generation (minutes per rank on this CPU);
    # benchmarks/train.py measures inductor against eager.
    def start(name: str, *flags: str, more: tuple[str, ...] = ()):
        extra = [*more, "trainer.compile=true", "trainer.compile_backend=aot_eager", "trainer.ema_decay=0.9"]
        extra += ["schedule.name=constant", "schedule.warmup_steps=0", "trainer.eval_every_steps=0"]
        extra += ["checkpoint.every_steps=3", "trainer.max_steps=6", "data.num_workers=1"]
        return start_train(CONFIG, tiny_run_overrides(digits_dir, run_root, name, *extra), "--nproc", "1", *flags)

    def finished(run):
        assert run.wait(timeout=600) == 0, run.output[-5000:]
        return run

    assert finished(start("compiled")).output.count("first step with torch.compile (backend aot_eager)") == 1
    evals = [e for e in read_jsonl(run_root / "compiled" / "metrics.jsonl") if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [6] and evals[0]["val_top1_ema"] > 0.2  # the compiled model and its EMA
    step3 = run_root / "compiled" / "checkpoints" / "step_000003"
    # no final eval in the resumed run: compiling the eval graphs again takes as long as the 3 steps it trains
    resumed = finished(start("compiled_resumed", "--resume", str(step3), more=("data.val_split=",)))
    assert f"resumed from {step3}" in resumed.output
    assert "first step with torch.compile (backend aot_eager)" in resumed.output  # compiled again after the resume
    want, got = train_losses(run_root / "compiled"), train_losses(run_root / "compiled_resumed")
    assert sorted(want) == list(range(1, 7)) and got == {s: loss for s, loss in want.items() if s > 3}

    def weights(name: str) -> dict[str, torch.Tensor]:
        tag = run_root / name / "checkpoints" / "step_000006"
        return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]

    a, b = weights("compiled"), weights("compiled_resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("_orig_mod" in k for k in a)  # compiled in place: the eager model's parameter names
    ema_a, ema_b = (torch.load(run_root / n / "checkpoints" / "step_000006" / "ema.pt", weights_only=True)["module"]
                    for n in ("compiled", "compiled_resumed"))  # fmt: skip
    assert ema_a.keys() == a.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)  # the EMA resumed too
