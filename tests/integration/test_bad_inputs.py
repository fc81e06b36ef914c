"""A catalogue of bad inputs across every command, each run in-process through ``launch.cli.main``.

For every case: the exit code is 2 for bad input or 1 for a runtime fault; stderr holds one message line (besides
log records and argparse's usage) that names what is wrong and what to do, and no traceback; nothing is half-written
(the case's folder, the shared run, export and data set and the shared small disks are byte-for-byte as before, save
for the paths a case may write); and a result computed before the failure is on stdout (eval prints its numbers
before it saves them). The cases share one tiny real training run (module fixture) and its export.

A case is a row of :data:`CASES`: ``Case(id, argv, code, message, setup=None, stdout="", may_write=())``. ``argv`` and
``message`` may name ``{tmp}`` (the case's own empty folder), ``{run}``, ``{export}``, ``{data}``, ``{config}``,
``{ro}`` (a read-only disk) and ``{full}`` (a full disk); ``setup(tmp, world)`` prepares ``{tmp}``. Other work adds its
cases to :data:`DATA_INDEX_CASES` (data build/index/inspect/plan) or appends rows to :data:`CASES`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from scratch_disks import fill, tmpfs_mounts

from launch.cli import main

CONFIG = "configs/run/digits_sepvit_lite.yaml"
_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d \[rank\d+\] (DEBUG|INFO|WARNING) ")


@dataclass(frozen=True)
class World:
    """What the cases share (none of it may change)."""

    run: Path
    export: Path
    data: Path
    ro: Path
    full: Path

    def fill_in(self, text: str, tmp: Path) -> str:
        return text.format(tmp=tmp, run=self.run, export=self.export, data=self.data, ro=self.ro, full=self.full,
                           config=CONFIG)  # fmt: skip


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    code: int
    """2: bad input, refused before any work; 1: a runtime fault."""
    message: str
    """A fragment of the one message line on stderr."""
    setup: Callable[[Path, World], None] | None = None
    stdout: str = ""
    """A fragment stdout must hold although the command failed (a result that must not be lost)."""
    may_write: tuple[str, ...] = ()
    """Paths under ``{tmp}`` the command may create or change; everything else must stay as it was."""


# ----------------------------------------------------------------------------------------------------- case setups


def _file(name: str, data: bytes | str) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def _copy_run(tamper: Callable[[Path], None] | None = None) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        shutil.copytree(world.run, tmp / "run")
        if tamper is not None:
            tamper(tmp / "run")

    return setup


def _flip_model_states(run: Path) -> None:
    (blob,) = (run / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0x5A for b in data[len(data) // 2 : len(data) // 2 + 64])
    blob.write_bytes(bytes(data))


def _tampered_export(
    name: str, state_edit: Callable[[dict], None] | None = None, augment: dict | None = None, **config_edit: object
) -> Callable[[Path, World], None]:
    """A copy of the shared export with its weights, its model config or its augment section changed."""

    def setup(tmp: Path, world: World) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(world.export), framework="pt") as f:
            meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), **config_edit})
        if augment is not None:
            meta["augment"] = json.dumps(augment)
        if state_edit is not None:
            state_edit(state)
        save_file(state, str(tmp / name), metadata=meta)

    return setup


def _wrong_head(state: dict) -> None:
    import torch

    state["head.weight"] = torch.zeros(3, 7)


def _history_without_checkpoint(tmp: Path, world: World) -> None:
    (tmp / "runs" / "hist").mkdir(parents=True)
    (tmp / "runs" / "hist" / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.3}\n')


def _sweep_file(space: str) -> Callable[[Path, World], None]:
    return _file("sweep.yaml", f"base: {Path(CONFIG).resolve()}\nspace:\n  {space}\nmetric: val_top1\nmode: max\n")


_TRAIN = ("train", "{config}", "data.path={data}", "run.output_dir={tmp}/runs")
_EVAL = ("eval", "{run}", "--data", "{data}", "--num-workers", "0")
_EVAL_RESULT = "pretrain eval: sepvit_lite step 4 on val (300 samples): top1 "

CASES: list[Case] = [
    # --- pretrain train: non-finite or absurd values, paths in the way, files that lie (all refused before a start)
    Case("train-lr-inf", (*_TRAIN, "optim.lr=inf"), 2, "optim.lr=inf must be positive and finite, in (0, 100]"),
    Case("train-lr-nan", (*_TRAIN, "optim.lr=.nan"), 2, "optim.lr=nan must be positive and finite"),
    Case(
        "train-seed-huge", (*_TRAIN, "trainer.seed=99999999999999999999999"), 2, "must be an integer in [0, 4294967295]"
    ),
    Case(
        "train-betas-one", (*_TRAIN, "optim.betas=[0.9,1.0]"), 2, "optim.betas[1]=1.0 must be a finite number in [0, 1)"
    ),
    Case("train-mean-0-255", (*_TRAIN, "augment.mean=[123.7,116.3,103.5]"), 2, "divide 0..255 values by 255"),
    Case("train-warmup-inf", (*_TRAIN, "schedule.warmup_lr=.inf"), 2, "schedule.warmup_lr=inf must be a finite number"),
    Case("train-batch-zero", (*_TRAIN, "data.batch_size=0"), 2, "data.batch_size=0 must be positive"),
    Case("train-unknown-key", (*_TRAIN, "trainer.max_step=5"), 2, "did you mean trainer.max_steps"),
    Case("train-wrong-type", (*_TRAIN, "optim.lr=fast"), 2, "optim.lr expects a number, got str 'fast'"),
    Case("train-no-config", ("train", "{tmp}/nothing.yaml"), 2, "config file '{tmp}/nothing.yaml' does not exist"),
    Case(
        "train-bad-yaml",
        ("train", "{tmp}/bad.yaml"),
        2,
        "{tmp}/bad.yaml: not valid YAML at line 2, column 1",
        setup=_file("bad.yaml", "optim: [\n"),
    ),  # fmt: skip
    Case(
        "train-no-data",
        ("train", "{config}", "data.path={tmp}/nodata", "run.output_dir={tmp}/runs"),
        2,
        "data.path={tmp}/nodata: no such folder; make a data set there with `pretrain data build",
    ),  # fmt: skip
    Case(
        "train-output-dir-is-file",
        ("train", "{config}", "data.path={data}", "run.output_dir={tmp}/notes"),
        2,
        "run.output_dir={tmp}/notes: {tmp}/notes is a file, not a folder",
        setup=_file("notes", "mine\n"),
    ),  # fmt: skip
    Case(
        "train-output-dir-read-only",
        ("train", "{config}", "data.path={data}", "run.output_dir={ro}/runs"),
        2,
        "{ro} is not writable (Read-only file system)",
    ),  # fmt: skip
    Case(
        "train-init-from-wrong-shape",
        (*_TRAIN, "model.init_from={tmp}/bad.safetensors"),
        2,
        "size mismatch for head.weight",
        setup=_tampered_export("bad.safetensors", _wrong_head),
    ),  # fmt: skip
    Case(
        "train-init-from-absurd-img-size",
        (*_TRAIN, "model.init_from={tmp}/bad.safetensors"),
        2,
        "model.img_size=1000000000 must be an integer in [1, 8192]",
        setup=_tampered_export("bad.safetensors", img_size=10**9),
    ),  # fmt: skip
    Case(
        "train-init-from-missing",
        (*_TRAIN, "model.init_from={tmp}/none.safetensors"),
        2,
        "model.init_from={tmp}/none.safetensors: no such file or directory",
    ),  # fmt: skip
    Case("train-nproc-zero", (*_TRAIN, "--nproc", "0"), 2, "--nproc=0 must be >= 1"),
    Case("train-resume-missing", (*_TRAIN, "--resume", "{tmp}/step_000001"), 2, "not a usable checkpoint"),
    Case(
        "train-history-without-checkpoint",
        (*_TRAIN, "run.name=hist"),
        2,
        "pass --restart",
        setup=_history_without_checkpoint,
    ),  # fmt: skip
    # --- pretrain submit --dry-run and pretrain sweep --dry-run: the same checks, nothing submitted
    Case("submit-lr-nan", ("submit", "{config}", "optim.lr=.nan", "--dry-run"), 2, "optim.lr=nan must be positive"),
    Case(
        "submit-no-profile",
        ("submit", "{config}", "--profile", "nosuch", "--dry-run"),
        2,
        "cluster profile 'nosuch' not found",
    ),  # fmt: skip
    Case("submit-zero-nodes", ("submit", "{config}", "--nodes", "0", "--dry-run"), 2, "nodes=0 must be >= 1"),
    Case(
        "submit-profile-inf",
        ("submit", "{config}", "--profile", "{tmp}/site.yaml", "--dry-run"),
        2,
        "mem_gb=inf must be a finite number",
        setup=_file("site.yaml", "cluster: slurm\nmem_gb: .inf\n"),
    ),  # fmt: skip
    Case(
        "sweep-no-file",
        ("sweep", "{tmp}/nothing.yaml", "--dry-run"),
        2,
        "sweep config '{tmp}/nothing.yaml' does not exist",
    ),
    Case(
        "sweep-space-inf",
        ("sweep", "{tmp}/sweep.yaml", "--dry-run"),
        2,
        "optim.lr=inf must be positive and finite",
        setup=_sweep_file("optim.lr: {choice: [1.0e-3, .inf]}"),
    ),  # fmt: skip
    Case(
        "sweep-space-unknown-key",
        ("sweep", "{tmp}/sweep.yaml", "--dry-run"),
        2,
        "did you mean optim.lr",
        setup=_sweep_file("optim.lrr: {choice: [1.0e-3]}"),
    ),  # fmt: skip
    # --- pretrain eval: bad arguments refused before the model loads; bad files named; the numbers never lost
    Case("eval-no-model", ("eval", "{tmp}/none", "--data", "{data}"), 2, "{tmp}/none does not exist"),
    Case("eval-no-data", ("eval", "{run}", "--data", "{tmp}/nodata"), 2, "data folder {tmp}/nodata does not exist"),
    Case("eval-no-split", (*_EVAL, "--split", "nosuch"), 2, "has no split 'nosuch' (splits: train, val)"),
    Case("eval-batch-zero", (*_EVAL, "--batch-size", "0"), 2, "--batch-size 0 must be in [1, 1048576]"),
    Case(
        "eval-workers-negative",
        ("eval", "{run}", "--data", "{data}", "--num-workers", "-1"),
        2,
        "--num-workers -1 must be in [0, 512]",
    ),  # fmt: skip
    Case(
        "eval-out-is-dir",
        (*_EVAL, "--out", "{tmp}/adir"),
        2,
        "{tmp}/adir is a directory; pass --out FILE.json",
        setup=lambda tmp, world: (tmp / "adir").mkdir(),
    ),  # fmt: skip
    Case("eval-out-read-only", (*_EVAL, "--out", "{ro}/r.json"), 2, "{ro} is not writable (Read-only file system)"),
    Case(
        "eval-out-full-disk",
        (*_EVAL, "--out", "{full}/r.json"),
        1,
        "could not save the result to {full}/r.json (No space left on device); the numbers above are the result",
        stdout=_EVAL_RESULT,
    ),  # fmt: skip
    Case(
        "eval-not-safetensors",
        ("eval", "{tmp}/junk.safetensors", "--data", "{data}", "--num-workers", "0"),
        1,
        "{tmp}/junk.safetensors is not a safetensors file",
        setup=_file("junk.safetensors", os.urandom(1000)),
    ),  # fmt: skip
    Case(
        "eval-export-wrong-shape",
        ("eval", "{tmp}/bad.safetensors", "--data", "{data}", "--num-workers", "0"),
        1,
        "its weights do not fit the sepvit_lite model its config describes (size mismatch for head.weight",
        setup=_tampered_export("bad.safetensors", _wrong_head),
    ),  # fmt: skip
    Case(
        "eval-export-absurd-img-size",
        ("eval", "{tmp}/bad.safetensors", "--data", "{data}"),
        1,
        "model.img_size=1000000000 must be an integer in [1, 8192]",
        setup=_tampered_export("bad.safetensors", img_size=10**9),
    ),  # fmt: skip
    Case(
        "eval-export-zero-std",
        ("eval", "{tmp}/bad.safetensors", "--data", "{data}"),
        1,
        "its augment section is unusable (augment.std[0]=0.0 must be positive and finite",
        setup=_tampered_export("bad.safetensors", augment={"std": [0.0, 0.0, 0.0]}),
    ),  # fmt: skip
    Case(
        "eval-export-with-ema",
        ("eval", "{export}", "--data", "{data}", "--ema"),
        1,
        "is an export: --ema applies to checkpoints",
    ),  # fmt: skip
    Case(
        "eval-corrupt-checkpoint",
        ("eval", "{tmp}/run", "--data", "{data}", "--num-workers", "0"),
        1,
        "mp_rank_00_model_states.pt does not match its sha256",
        setup=_copy_run(_flip_model_states),
    ),  # fmt: skip
    # --- pretrain export
    Case(
        "export-no-path",
        ("export", "{tmp}/none", "--out", "{tmp}/w.safetensors"),
        2,
        "{tmp}/none is neither a run directory nor a checkpoint",
    ),  # fmt: skip
    Case("export-out-is-dir", ("export", "{run}", "--out", "{tmp}"), 2, "cannot write {tmp}: {tmp} is a directory"),
    Case(
        "export-out-read-only",
        ("export", "{run}", "--out", "{ro}/w.safetensors"),
        2,
        "{ro} is not writable (Read-only file system)",
    ),  # fmt: skip
    Case(
        "export-out-full-disk",
        ("export", "{run}", "--out", "{full}/w.safetensors"),
        1,
        "could not write {full}/w.safetensors (No space left on device); nothing was written",
    ),  # fmt: skip
    Case(
        "export-bad-dtype",
        ("export", "{run}", "--out", "{tmp}/w.safetensors", "--dtype", "fp16"),
        2,
        "argument --dtype: invalid choice: 'fp16'",
    ),  # fmt: skip
    Case(
        "export-no-ema",
        ("export", "{run}", "--out", "{tmp}/w.safetensors", "--ema"),
        1,
        "has no ema.pt (the run had trainer.ema_decay=0)",
    ),  # fmt: skip
    Case(
        "export-corrupt-checkpoint",
        ("export", "{tmp}/run", "--out", "{tmp}/w.safetensors"),
        1,
        "does not match its sha256",
        setup=_copy_run(_flip_model_states),
    ),  # fmt: skip
    # --- pretrain checkpoint verify, status, cancel, models
    Case("verify-no-path", ("checkpoint", "verify", "{tmp}/none"), 2, "is neither a run directory nor a checkpoint"),
    Case(
        "verify-corrupt",
        ("checkpoint", "verify", "{tmp}/run"),
        1,
        "does not match its sha256",
        setup=_copy_run(_flip_model_states),
    ),  # fmt: skip
    Case("status-no-run", ("status", "{tmp}/none"), 2, "no run directory {tmp}/none"),
    Case(
        "status-bad-interval",
        ("status", "{run}", "--watch", "--interval-s", "nan"),
        2,
        "--interval-s nan must be in [0.5, 86400]",
    ),  # fmt: skip
    Case("cancel-no-run", ("cancel", "{tmp}/none"), 2, "no run directory {tmp}/none"),
    Case("cancel-nothing-runs", ("cancel", "{run}"), 2, "nothing to cancel"),
    Case("models-img-size-zero", ("models", "--img-size", "0"), 2, "--img-size 0 must be an integer in [1, 8192]"),
    Case("models-img-size-huge", ("models", "--img-size", "100000"), 2, "--img-size 100000 must be an integer"),
    Case("models-unknown", ("models", "--names", "nosuch"), 2, "unknown model 'nosuch'; known models: sepvit_base"),
    # --- pretrain data: a few here; the data-index work adds its own in DATA_INDEX_CASES
    Case("data-build-unknown-source", ("data", "build", "nosuch", "--out", "{tmp}/new"), 2, "unknown source 'nosuch'"),
    Case("data-inspect-nothing", ("data", "inspect", "{tmp}/none"), 2, "run `pretrain data index {tmp}/none`"),
    Case("data-index-no-shards", ("data", "index", "{tmp}"), 2, "no .tar shards in {tmp}"),
    Case(
        "data-plan-world-zero",
        ("data", "plan", "{data}", "--world-size", "0", "--workers", "1", "--batch-size", "4"),
        2,
        "--world-size=0 must be >= 1",
    ),  # fmt: skip
    Case(
        "data-plan-batch-zero",
        ("data", "plan", "{data}", "--world-size", "1", "--workers", "1", "--batch-size", "0"),
        2,
        "--batch-size=0 must be >= 1",
    ),  # fmt: skip
]


def _shard_folder(tmp: Path, world: World) -> Path:
    """``{tmp}/D/train/a.tar``: 4 samples of the shared digits (``.png``, ``.cls``), written by webdataset's writer."""
    import tarfile

    import webdataset as wds

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(sorted((world.data / "train").glob("*.tar"))[0]) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if len(samples) == 4 and key not in samples:
                break
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    (tmp / "D" / "train").mkdir(parents=True)
    with wds.TarWriter(str(tmp / "D" / "train" / "a.tar")) as sink:
        for key, fields in samples.items():
            sink.write({"__key__": key, **fields})
    return tmp / "D"


def _indexed(tamper: Callable[[Path], None] | None = None) -> Callable[[Path, World], None]:
    """``{tmp}/D`` indexed with ``pretrain data index`` (its output discarded by the test), then ``tamper(D)``."""

    def setup(tmp: Path, world: World) -> None:
        folder = _shard_folder(tmp, world)
        assert main(["data", "index", str(folder)]) == 0
        if tamper is not None:
            tamper(folder)

    return setup


def _unindexed(tmp: Path, world: World) -> None:
    _shard_folder(tmp, world)


def _link_index_outside(tmp: Path, world: World) -> None:
    _shard_folder(tmp, world)
    (tmp / "elsewhere").mkdir()
    (tmp / "D" / ".index").symlink_to(tmp / "elsewhere")


def _edit_stored_label(folder: Path) -> None:
    (index,) = (folder / ".index" / "train").glob("*.json")
    data = json.loads(index.read_text())
    data["samples"][0][1] = 3 if data["samples"][0][1] != 3 else 6  # [key, label, image ext, members]: a class it has
    index.write_text(json.dumps(data))


def _drop_index_sha256(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["index_sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _deep_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("[" * 100_000)


_PLAN = ("data", "plan", "{tmp}/D", "--world-size", "1", "--workers", "0", "--batch-size", "2")

DATA_INDEX_CASES: list[Case] = [
    # Cases of ``pretrain data build|index|inspect|plan`` from the data-index work: split globs and index folders
    # outside the data directory, hostile names, changed or unreadable stored indexes and manifests.
    Case("index-glob-parent", ("data", "index", "{tmp}/D", "--split-glob", "train=../*.tar"), 2,
         "is not a path inside", setup=_unindexed),
    Case("index-glob-absolute", ("data", "index", "{tmp}/D", "--split-glob", "train=/etc/*.tar"), 2,
         "is not a path inside", setup=_unindexed),
    Case("index-glob-url", ("data", "index", "{tmp}/D", "--split-glob", "train=s3://elsewhere/x.tar"), 2,
         "is not a path inside", setup=_unindexed),
    Case("index-glob-braces", ("data", "index", "{tmp}/D", "--split-glob", "train={{a..c"), 2, "Unbalanced braces",
         setup=_unindexed),
    Case("index-split-name", ("data", "index", "{tmp}/D", "--split-glob", "../x=train/*.tar"), 2,
         "must be a plain name", setup=_unindexed),
    Case("index-out-a-file", ("data", "index", "{tmp}/D", "--index-out", "{tmp}/D/manifest.json"), 2,
         "is a file, not a folder", setup=_indexed()),
    Case("index-folder-links-outside", ("data", "index", "{tmp}/D"), 2, "(a symbolic link); remove the link",
         setup=_link_index_outside),
    Case("index-classes-control-char", ("data", "index", "{tmp}/D", "--classes", "{tmp}/classes.txt"), 2,
         "is not a class name", setup=lambda tmp, world: (_unindexed(tmp, world),
                                                          (tmp / "classes.txt").write_text("cat\ndog\x07bell\n"))),
    Case("build-out-a-file", ("data", "build", "digits", "--out", "{tmp}/D/manifest.json"), 2,
         "is a file, not a folder", setup=_indexed()),
    Case("build-shard-size-nan", ("data", "build", "digits", "--out", "{tmp}/X", "--shard-size-mb", "nan"), 2,
         "must be positive numbers"),
    Case("plan-world-huge", ("data", "plan", "{tmp}/D", "--world-size", "100000000", "--workers", "0",
                             "--batch-size", "1"), 2, "more than the 4 of split 'train'", setup=_indexed()),
    Case("plan-index-changed", _PLAN, 2, "the stored index changed after the manifest was written",
         setup=_indexed(_edit_stored_label)),
    Case("plan-index-sha256-missing", _PLAN, 2, "records no sha256 of its stored index",
         setup=_indexed(_drop_index_sha256)),
    Case("plan-manifest-too-deep", _PLAN, 2, "not valid JSON (RecursionError", setup=_indexed(_deep_manifest)),
    Case("inspect-manifest-too-deep", ("data", "inspect", "{tmp}/D"), 1, "not valid JSON (RecursionError",
         setup=_indexed(_deep_manifest)),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def world(digits_dir: Path, scratch_root: Path, start_train) -> World:
    """One tiny real run (1 rank, ZeRO-0, 4 steps, its checkpoint signed by this user), its export, and two small
    disks: one mounted read-only, one full."""
    root = scratch_root / "bad-inputs"
    overrides = [f"data.path={digits_dir}", f"run.output_dir={root / 'runs'}", "run.name=tiny", "trainer.max_steps=4",
                 "trainer.eval_every_steps=0", "trainer.progress_bar=false", "checkpoint.every_steps=4",
                 "checkpoint.every_minutes=0", "data.batch_size=16", "data.num_workers=0", "schedule.warmup_steps=1",
                 "deepspeed.zero_stage=0"]  # fmt: skip
    run = start_train(CONFIG, overrides)
    assert run.wait() == 0, run.output[-3000:]
    export = root / "tiny.safetensors"
    assert main(["export", str(root / "runs" / "tiny"), "--out", str(export)]) == 0
    mounts = tmpfs_mounts(root / "disks")
    mount = next(mounts)
    ro, full = mount(1 << 20, ro=True), mount(1 << 20)
    fill(full)
    yield World(run=root / "runs" / "tiny", export=export, data=digits_dir, ro=ro, full=full)
    next(mounts, None)


def _tree(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``roots``: size and sha256 (files), or -1 (folders)."""
    out = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            if p.is_file():
                out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = (-1, "")
    return out


def _message_lines(err: str) -> list[str]:
    """What the command said, apart from log records and argparse's usage lines."""
    return [
        line
        for line in err.splitlines()
        if line.strip() and not _LOG_RECORD.match(line) and not line.startswith(("usage:", " "))
    ]


@pytest.mark.parametrize("case", CASES + DATA_INDEX_CASES, ids=lambda c: c.id)
def test_a_bad_input_gets_one_message_and_changes_nothing(
    case: Case, world: World, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "case"
    tmp.mkdir()
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # CONFIG and the `base:` files are repo-relative
    if case.setup is not None:
        case.setup(tmp, world)
        capsys.readouterr()  # what a setup's own commands printed
    shared = (world.run, world.export, world.ro, world.full)
    before = _tree(tmp, *shared)
    try:
        code = main([world.fill_in(a, tmp) for a in case.argv])
    except SystemExit as e:  # argparse's usage errors leave this way, as they do from the `pretrain` executable
        code = e.code
    out, err = capsys.readouterr()

    assert code == case.code, f"exit {code}, expected {case.code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    said = _message_lines(err)
    assert len(said) == 1, f"expected one message line on stderr, got:\n{err}"
    assert world.fill_in(case.message, tmp) in said[0], said[0]
    if case.stdout:
        assert world.fill_in(case.stdout, tmp) in out, f"a result was lost:\n{out}"
    after = _tree(tmp, *shared)
    allowed = [str(tmp / world.fill_in(p, tmp)) for p in case.may_write]
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert [p for p in changed if not any(p.startswith(a) for a in allowed)] == [], "half-written or changed"


def test_the_catalogue_covers_every_command() -> None:
    cases = CASES + DATA_INDEX_CASES
    assert len(cases) >= 40 and len({c.id for c in cases}) == len(cases)
    commands = {" ".join(c.argv[:2]) if c.argv[0] in ("data", "checkpoint") else c.argv[0] for c in cases}
    assert commands >= {"train", "submit", "sweep", "eval", "export", "status", "cancel", "checkpoint verify",
                        "models", "data build", "data index", "data inspect", "data plan"}  # fmt: skip
