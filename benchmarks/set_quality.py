"""SeT quality ablation: val accuracy and train time on digit pairs, fine-tuned from digits, at equal steps and recipe.

Usage::

    pretrain data build digits --out data/digits
    pretrain data build digit-pairs:canvas=64,scale=4,min_distance=40 --out data/digit_pairs_x4
    python benchmarks/set_quality.py                              # every row, 1 seed; prints and appends the table
    python benchmarks/set_quality.py --rows set softmax sepvit --seeds 0 1

A row is two runs, each ``pretrain train RUN_CONFIG --nproc 1`` with ``OMP_NUM_THREADS=1`` (1 rank, 1 thread),
``trainer.seed``/``data.seed`` = the seed, in its own run dir under ``--runs`` (``runs/bench_set``), with the row's
model overrides: first ``configs/run/digits_{setformer,sepvit}_lite.yaml`` on the digits for ``--digits-steps`` (its
val top-1 is the row's digits accuracy), then ``configs/run/digit_pairs_{setformer,sepvit}_lite.yaml`` on digit
pairs for ``--steps`` with ``model.init_from`` = that digits run (two digits at 4x on a 64x64 canvas, same/different
class, chance 50%; ``configs/data/digit_pairs.yaml``). ``*_scratch`` rows train on the pairs only, from scratch.
Trained from scratch, every model stayed at chance on every variant of the pairs tried (RESULTS.md); from digits
weights they learn it within a few hundred steps, and how far they get is what the table compares. A row differs from
the ``set`` row only by the model overrides it names. The table reports the final pairs val top-1 (mean and per
seed), the digits val top-1, the pairs train loop time (first to last train event of ``metrics.jsonl``) and the wall
time of both runs; the budget line says how long the table took. The 2-core machine is shared, so times are
comparable within one table only; ``--timing`` compares step costs with the rows interleaved in one process.
The tables of this ablation before 2026-11-30 20:03 trained every row from scratch and had separate ``digits_*`` rows
(this script as of commit 63c9ece).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RUNS = "runs/bench_set"  # default of --runs
PAIRS = "configs/run/digit_pairs_setformer_lite.yaml"
PAIRS_SEPVIT = "configs/run/digit_pairs_sepvit_lite.yaml"
DIGITS = "configs/run/digits_setformer_lite.yaml"
DIGITS_SEPVIT = "configs/run/digits_sepvit_lite.yaml"
K = "model.kwargs."

# The review's SeT (before issue 15's fixes): kernel sigma 0.5, fixed positional term 1/0.25 of the L1 distance,
# way back n T A with inexact rows, and the plan applied twice where p = n. The model configs' settings since
# 2026-12-07 (the 05:42 table: above issue 15's layer on every seed, by 2.2-5.1 points).
REVIEW = [f"{K}kernel_sigma=0.5", f"{K}pos_sigma=0.25", f"{K}learn_pos_scale=false", f"{K}exact_rows=false",
          f"{K}direct_output=false"]  # fmt: skip
# Issue 15's SeT, the configs' settings before 2026-12-07: the ``set`` row of the tables before then. The single
# change rows below change one of these, so they still read against it.
ISSUE15 = [f"{K}kernel_sigma=2.0", f"{K}pos_sigma=0.5", f"{K}learn_pos_scale=true", f"{K}exact_rows=true",
           f"{K}direct_output=true"]  # fmt: skip


def _issue15(*changes: str) -> list[str]:
    """Issue 15's settings with ``changes`` (``field=value``) in place of its own values of those fields."""
    fields = {c.split("=")[0] for c in changes}
    return [o for o in ISSUE15 if o.split("=")[0] not in fields] + list(changes)


# name -> (pairs run config, digits run config it starts from (None: from scratch), overrides, what it tests).
# Row order is the table's.
ROWS: dict[str, tuple[str, str | None, list[str], str]] = {
    "set": (PAIRS, DIGITS, [], "SeT, the model config's settings"),
    "softmax": (PAIRS, DIGITS, [f"{K}attention=softmax"], "same backbone, global softmax attention"),
    "sepvit": (PAIRS_SEPVIT, DIGITS_SEPVIT, [], "sepvit_lite (windowed softmax attention)"),
    "set_scratch": (PAIRS, None, [], "SeT, pairs only, from scratch"),
    "softmax_scratch": (PAIRS, None, [f"{K}attention=softmax"], "softmax, pairs only, from scratch"),
    "set_review": (PAIRS, DIGITS, REVIEW, "SeT as reviewed (sigma 0.5, fixed pos 0.25, n T A, p = n twice)"),
    "set_issue15": (PAIRS, DIGITS, ISSUE15, "SeT as of issue 15 (sigma 2, learned pos 0.5, exact rows, direct)"),
    "set_pos_off": (PAIRS, DIGITS, _issue15(f"{K}pos_sigma=null"), "issue 15's SeT, OT positional term off"),
    "set_pos_fixed": (PAIRS, DIGITS, _issue15(f"{K}learn_pos_scale=false"), "issue 15's SeT, positional scale 1"),
    "set_pos_sigma0.25": (PAIRS, DIGITS, _issue15(f"{K}pos_sigma=0.25"), "issue 15's SeT, positional 1/0.25"),
    "set_iters1": (PAIRS, DIGITS, _issue15(f"{K}sinkhorn_iters=1"), "issue 15's SeT, 1 Sinkhorn iteration"),
    "set_iters5": (PAIRS, DIGITS, _issue15(f"{K}sinkhorn_iters=5"), "issue 15's SeT, 5 Sinkhorn iterations"),
    "set_iters10": (PAIRS, DIGITS, _issue15(f"{K}sinkhorn_iters=10"), "issue 15's SeT, 10 Sinkhorn iterations"),
    "set_eps0.1": (PAIRS, DIGITS, _issue15(f"{K}sinkhorn_eps=0.1"), "issue 15's SeT, eps 0.1"),
    "set_eps2": (PAIRS, DIGITS, _issue15(f"{K}sinkhorn_eps=2.0"), "issue 15's SeT, eps 2.0"),
    "set_anchors64": (PAIRS, DIGITS, _issue15(f"{K}num_anchors=64"), "issue 15's SeT, 64 Nystrom anchors per head"),
    "set_sigma0.5": (PAIRS, DIGITS, _issue15(f"{K}kernel_sigma=0.5"), "issue 15's SeT, kernel sigma 0.5"),
    "set_inexact_rows": (PAIRS, DIGITS, _issue15(f"{K}exact_rows=false"), "issue 15's SeT, way back n T A"),
    "set_plan_twice": (PAIRS, DIGITS, _issue15(f"{K}direct_output=false"), "issue 15's SeT, plan twice where p = n"),
    "set_ref64": (PAIRS, DIGITS, _issue15(f"{K}num_ref=[64,16,4,1]"), "issue 15's SeT, 64 slots in stage 1 (8x8)"),
    # step-time rows (--timing) only: the digits model's 32x32 token maps clamp these reference sizes
    "set_p_n": (PAIRS, None, [f"{K}num_ref=[64,64,16,4]", f"{K}direct_output=true"], "SeT, p = n from stage 2, direct"),
    "set_p_n_twice": (PAIRS, None, [f"{K}num_ref=[64,64,16,4]", f"{K}direct_output=false"], "SeT, p = n, plan twice"),
}
TIMING_ONLY = ("set_p_n", "set_p_n_twice")

__all__ = ["ROWS", "main"]


def _train(config: str, run: str, data: str, steps: int, seed: int, extra: list[str], args: argparse.Namespace) -> dict:
    """One ``pretrain train`` run (or, with ``--collect``, what an earlier one left) and its figures."""
    cmd = [
        sys.executable, "-m", "launch.cli", "train", config, f"data.path={data}", f"run.output_dir={args.runs}",
        f"run.name={run}", "trainer.progress_bar=false", f"trainer.max_steps={steps}",
        f"trainer.eval_every_steps={steps}", f"checkpoint.every_steps={steps}", f"trainer.seed={seed}",
        f"data.seed={seed}", f"schedule.warmup_steps={min(50, steps // 4)}", *extra, *args.overrides, "--nproc", "1",
    ]  # fmt: skip
    if args.collect:  # a run made earlier (or by an interrupted table): read what it left
        saved = ROOT / args.runs / f"{run}.json"
        wall = json.loads(saved.read_text())["wall_s"] if saved.exists() else float("nan")
        return _result(args.runs, run, cmd, 0, wall)
    shutil.rmtree(ROOT / args.runs / run, ignore_errors=True)
    t0 = time.perf_counter()
    log = ROOT / args.runs / f"{run}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    result = _result(args.runs, run, cmd, proc.returncode, time.perf_counter() - t0)
    (ROOT / args.runs / f"{run}.json").write_text(json.dumps(result))
    print(f"{run}: {result}", flush=True)
    return result


def _run(name: str, seed: int, args: argparse.Namespace) -> dict:
    """A row's digits run (unless it starts from scratch), then its digit-pairs run from the digits run's weights."""
    pairs, digits, overrides, _ = ROWS[name]
    run = f"{name}_s{seed}"
    init = "model.init_from="
    digits_result = None
    if digits is not None:
        digits_result = _train(digits, f"{run}_digits", args.digits_data, args.digits_steps, seed, overrides, args)
        init += f"{args.runs}/{run}_digits"
    result = _train(pairs, run, args.pairs_data, args.steps, seed, [*overrides, init], args)
    result.update(_cost(pairs, [*overrides, *(o for o in args.overrides if o.startswith("model."))]))  # once a row
    if digits_result is None:
        return {**result, "digits_top1": float("nan")}
    return {
        **result,
        "digits_top1": digits_result["val_top1"],
        "exit": max(result["exit"], digits_result["exit"]),
        "wall_s": result["wall_s"] + digits_result["wall_s"],
        "command": f"{digits_result['command']}; {result['command']}",
    }


def _result(runs: str, run: str, cmd: list[str], exit_code: int, wall: float) -> dict:
    from pretrain.fsutil import read_jsonl

    events = read_jsonl(ROOT / runs / run / "metrics.jsonl")
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    return {
        "step_s": statistics.fmean(e["step_time_s"] for e in train[1:]) if len(train) > 1 else float("nan"),
        "exit": exit_code if evals else 1,
        "val_top1": evals[-1]["val_top1"] if evals else float("nan"),
        "train_loss": train[-1]["loss"] if train else float("nan"),
        "train_s": train[-1]["time"] - train[0]["time"] if train else float("nan"),
        "wall_s": wall,
        "command": shlex.join(["pretrain", *cmd[3:]]),
    }


def _build(config: str, overrides: list[str]):
    """The freshly initialised model of a run config with ``overrides`` (no ``init_from``), its input size and its
    per-rank batch size."""
    from pretrain.config import load_config
    from pretrain.rank import build_model

    classes = 10 if "digits_" in Path(config).name else 2
    cfg = load_config(ROOT / config, [*overrides, "model.init_from=", f"model.num_classes={classes}"])
    return build_model(cfg), cfg.model.img_size, cfg.data.batch_size


def _cost(config: str, overrides: list[str]) -> dict:
    """Params (M) and forward MMACs per image of a run config's model (matmuls and convolutions), counted on a batch
    of the run's size: SeT's whitening is computed once per forward whatever the batch (once per step in training),
    so a batch of 1 would charge all of it to one image."""
    from pretrain.models.flops import count_macs, count_params

    model, size, batch = _build(config, overrides)
    mmacs = count_macs(model, size, batch=batch) * 1e3 / batch
    return {"params_m": count_params(model.eval()) / 1e6, "mmacs": mmacs}


def _table(rows: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| row | what | pairs val top-1 (mean) | per seed | digits val top-1 | last train loss | s/step"
        " | train loop (s) | wall (s) | params (M) | MMACs/img | exit |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, results in rows.items():
        acc = [r["val_top1"] for r in results]
        mean = statistics.fmean(acc)
        spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
        digits = " ".join("-" if r["digits_top1"] != r["digits_top1"] else f"{r['digits_top1']:.3f}" for r in results)
        lines.append(
            f"| {name} | {ROWS[name][3]} | {mean:.3f}{spread} | {' '.join(f'{a:.3f}' for a in acc)} | {digits} | "
            f"{statistics.fmean(r['train_loss'] for r in results):.3f} | "
            f"{statistics.fmean(r['step_s'] for r in results):.2f} | "
            f"{statistics.fmean(r['train_s'] for r in results):.0f} | "
            f"{statistics.fmean(r['wall_s'] for r in results):.0f} | {results[0]['params_m']:.2f} | "
            f"{results[0]['mmacs']:.0f} | {','.join(str(r['exit']) for r in results)} |"
        )
    return lines


def _append(title: str, lines: list[str], argv: list[str] | None, notes: list[str]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = [
        f"\n## {title} ({stamp})\n",
        f"Machine: {platform.node()} ({os.cpu_count()} CPUs, shared; load average {os.getloadavg()[0]:.1f} at the "
        f"end), Python {platform.python_version()}  ",
        f"Command: `python benchmarks/set_quality.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n",
        *lines,
        "",
        *[f"- {n}" for n in notes],
    ]
    with RESULTS.open("a") as f:
        f.write("\n".join(block) + "\n")


def _step_timing(rows: list[str], repeats: int, batch: int = 64) -> list[str]:
    """Median forward+backward time of each row's model on one random batch, rows interleaved in one process (1 thread):
    load changes on the shared machine then hit every row alike, unlike the separate training runs."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    models, inputs = {}, {}
    for name in rows:
        model, size, _ = _build(ROWS[name][0], ROWS[name][2])
        models[name] = model.train()
        inputs[name] = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in rows}
    labels = torch.zeros(batch, dtype=torch.long)
    for i in range(repeats + 1):
        for name in rows:
            t0 = time.perf_counter()
            F.cross_entropy(models[name](inputs[name]), labels).backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            models[name].zero_grad(set_to_none=True)
    lines = [f"| row | fwd+bwd s/batch of {batch} (median of {repeats}) | min | vs softmax |", "|---|---:|---:|---:|"]
    ref = statistics.median(times["softmax"]) if "softmax" in times else float("nan")
    for name in rows:
        med = statistics.median(times[name])
        lines.append(f"| {name} | {med:.3f} | {min(times[name]):.3f} | {med / ref:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    trained = [n for n in ROWS if n not in TIMING_ONLY]
    p.add_argument("--rows", nargs="+", default=trained, choices=list(ROWS), metavar="ROW", help="rows to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=400, help="train steps of every digit-pairs run")
    p.add_argument("--digits-steps", type=int, default=400, help="train steps of every digits run")
    p.add_argument("--pairs-data", default="data/digit_pairs_x4")
    p.add_argument("--digits-data", default="data/digits")
    p.add_argument("--override", dest="overrides", action="append", default=[], help="section.field=value, every row")
    p.add_argument("--note", action="append", default=[], help="a line under the table")
    p.add_argument("--collect", action="store_true", help="train nothing: tabulate the runs already in --runs")
    p.add_argument("--runs", default=RUNS, help="folder of the runs (one per row and seed)")
    p.add_argument("--timing", type=int, default=0, metavar="N", help="instead: interleaved fwd+bwd timing, N rounds")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    if args.timing:
        lines = _step_timing(args.rows, args.timing)
        print("\n".join(lines))
        if not args.no_append:
            _append("SeT quality ablation: step time, rows interleaved", lines, argv, [*args.note])
        return 0
    if set(args.rows) & set(TIMING_ONLY):
        p.error(f"{', '.join(sorted(set(args.rows) & set(TIMING_ONLY)))}: step-time rows, for --timing only")
    if args.collect:  # the seeds each row has a run of
        found = {
            n: [s for s in args.seeds if (ROOT / args.runs / f"{n}_s{s}" / "metrics.jsonl").exists()] for n in args.rows
        }
        results = {name: [_run(name, seed, args) for seed in seeds] for name, seeds in found.items() if seeds}
    else:
        results = {name: [_run(name, seed, args) for seed in args.seeds] for name in args.rows}
    lines = _table(results)
    print("\n".join(lines))
    if not args.no_append:
        notes = [
            f"Budget: {sum(map(len, results.values()))} rows x seeds ({args.digits_steps} steps on digits, then "
            f"{args.steps} on digit pairs; the run configs' batch sizes), 1 rank, 1 thread each: "
            f"{sum(r['wall_s'] for rs in results.values() for r in rs) / 60:.0f} min of wall time in all.",
            *args.note,
            f"every row: `{next(iter(results.values()))[0]['command']}` with the row's overrides (first shown).",
        ]
        _append("SeT quality ablation", lines, argv, notes)
    return 0 if all(r["exit"] == 0 for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
