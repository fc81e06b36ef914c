"""The end of a sweep: the trials ranked by the evals they reported to Ray Tune, and files for people to read.

:func:`summarize_sweep` prints the ranked table and the best config and checkpoint (with the ``pretrain export``
command for it), and writes ``summary.txt``/``.json``, ``metric_vs_step.png``, ``best_config.yaml`` and ``tb/`` links to
every trial's TensorBoard logs into the sweep dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.sweep.spec import SweepSpec, format_override
from launch.sweep.trial import newest_checkpoint
from pretrain.config import dump_config, load_config
from pretrain.fsutil import read_jsonl
from pretrain.rundir import TB, read_status

__all__ = ["TrialRecord", "summarize_sweep"]


@dataclass
class TrialRecord:
    """One trial in the final table."""

    trial_id: str
    params: dict[str, Any]
    status: str
    """``finished``, ``stopped`` (by the scheduler, or the sweep was interrupted) or ``error``."""
    step: int
    """The step of its last eval: where it finished or was stopped."""
    best: float | None
    best_step: int | None
    last: float | None
    run_dir: str
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: str | None = None
    """The checkpoint at the best eval if Ray Tune kept it, else the run dir's newest."""


def _run_evals(run_dir: Path, metric: str) -> dict[int, float]:
    """``metric`` at each eval in the run's ``metrics.jsonl`` (the later of a step logged twice)."""
    events = (e for e in read_jsonl(run_dir / "metrics.jsonl") if isinstance(e, dict) and e.get("event") == "eval")
    return {int(e["step"]): float(e[metric]) for e in events if isinstance(e.get(metric), (int, float))}


def _trial_record(spec: SweepSpec, result: Any) -> TrialRecord:
    """The record of one ``ray.tune.Result``: the evals the trial reported, and how its run ended.

    The curve comes from the run's own ``metrics.jsonl``, which holds the same evals the trial reported: Ray Tune's
    ``progress.csv`` is copied back over the trial's local one when a PBT exploit restarts the trial, and a CI run lost
    the exploited trial's first eval that way, so Ray's dataframe is only the fallback for a run without metrics."""
    df, run_dir = result.metrics_dataframe, spec.sweep_dir.resolve() / "trials" / result.metrics["trial_id"]
    evals = _run_evals(run_dir, spec.metric)
    if not evals and df is not None and spec.metric in df:
        evals = dict(zip(df["step"].astype(int), df[spec.metric]))
    curve = [(step, float(v)) for step, v in sorted(evals.items())]  # a step reported twice (a resumed sweep) once
    finished = (read_status(run_dir)[0] or {}).get("state") == "finished"  # Tune marks a stopped trial done too
    status = "error" if result.error else "finished" if finished else "stopped"
    best = best_step = last = checkpoint = None
    if curve:
        best_step, best = (max if spec.mode == "max" else min)(curve, key=lambda sv: sv[1])
        last = curve[-1][1]
        kept = [c.path for c, m in result.best_checkpoints if m.get("step") == best_step and os.path.isdir(c.path)]
        checkpoint = kept[0] if kept else newest_checkpoint(run_dir)
    return TrialRecord(run_dir.name, dict(result.config or {}), status, curve[-1][0] if curve else 0, best, best_step,
                       last, str(run_dir), str(result.error or ""), curve, checkpoint and str(checkpoint))  # fmt: skip


def _format_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(spec: SweepSpec, records: list[TrialRecord]) -> str:
    """The ranked table: rank, trial, status, steps, best metric (at step), last metric, parameters."""
    keys = sorted({k for r in records for k in r.params})
    header = ["rank", "trial", "status", "steps", f"best {spec.metric}", "at step", "last", *keys]
    rows = [
        [str(i), r.trial_id, r.status, str(r.step), "-" if r.best is None else f"{r.best:.4f}",
         "-" if r.best_step is None else str(r.best_step), "-" if r.last is None else f"{r.last:.4f}",
         *[_format_value(r.params.get(k, "")) for k in keys]]
        for i, r in enumerate(records, 1)
    ]  # fmt: skip
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _plot(spec: SweepSpec, records: list[TrialRecord], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for r in (r for r in records if r.curve):
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format_value(v)}" for k, v in sorted(r.params.items()))
        ax.plot(*zip(*r.curve), "-" if r.status == "finished" else "--", marker="o", markersize=3,
                label=f"{r.trial_id} ({r.status}) {params}")  # fmt: skip
    ax.set(xlabel="optimizer step", ylabel=spec.metric)
    ax.set_title(f"sweep {spec.name}: {spec.metric} vs step ({spec.scheduler.name}; dashed = stopped early)")
    ax.grid(alpha=0.3)
    if any(r.curve for r in records):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_best_config(spec: SweepSpec, best: TrialRecord, path: Path) -> None:
    """The best trial's config as a fresh run: the base, the sweep's overrides (not its trial settings: the base's
    retention, progress bar, output dir) and the trial's values, with its own name."""
    about = f"best trial {best.trial_id} of sweep {spec.name} ({spec.metric}={best.best})"
    params = [format_override(k, v) for k, v in sorted(best.params.items())]
    names = [format_override("run.name", f"{spec.name}-best"), format_override("run.description", about)]
    dump_config(load_config(spec.base, [*spec.overrides, *params, *names]), path)
    load_config(path)  # it must load as is


def summarize_sweep(spec: SweepSpec, results: Any) -> list[TrialRecord]:
    """Rank the trials of Ray Tune's ``ResultGrid``, print the table and write summary.txt/json, the plot,
    best_config.yaml and the tb links."""
    sweep_dir = spec.sweep_dir.resolve()
    records = [_trial_record(spec, r) for r in results]
    sign = 1.0 if spec.mode == "max" else -1.0
    records.sort(key=lambda r: (r.best is None, -sign * (r.best if r.best is not None else 0.0), r.trial_id))

    table = _table(spec, records)
    (sweep_dir / "summary.txt").write_text(table + "\n")
    summary = json.dumps([dataclasses.asdict(r) for r in records], indent=1, default=str)
    (sweep_dir / "summary.json").write_text(summary + "\n")
    _plot(spec, records, sweep_dir / "metric_vs_step.png")
    (sweep_dir / TB).mkdir(exist_ok=True)
    for r in records:
        link = sweep_dir / TB / r.trial_id
        if (Path(r.run_dir) / TB).is_dir() and not link.is_symlink():
            link.symlink_to(Path("..") / "trials" / r.trial_id / TB, target_is_directory=True)
    print(f"\nsweep {spec.name}: {len(records)} trials, ranked by {spec.metric} ({spec.mode})\n{table}\n")
    if ranked := [r for r in records if r.best is not None and r.status != "error"]:
        _write_best_config(spec, ranked[0], sweep_dir / "best_config.yaml")
        print(f"best: {ranked[0].trial_id} {spec.metric}={ranked[0].best:.4f} at step {ranked[0].best_step}")
        print(f"  config:      {sweep_dir / 'best_config.yaml'}   (pretrain train {sweep_dir / 'best_config.yaml'})")
        if ranked[0].checkpoint:
            print(f"  checkpoint:  {ranked[0].checkpoint}")
            print(f"  export:      pretrain export {ranked[0].checkpoint} --out {sweep_dir / 'best.safetensors'}")
    print(f"  plot:        {sweep_dir / 'metric_vs_step.png'}")
    print(f"  tensorboard: tensorboard --logdir {sweep_dir / 'tb'}")
    return records
