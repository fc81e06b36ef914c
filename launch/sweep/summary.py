"""The end of a sweep: the trials ranked by their eval metric, and the files written for people to read.

:func:`summarize_sweep` builds one :class:`TrialRecord` per trial from its run dir (``metrics.jsonl``, ``status.json``,
``sweep/trial.json``) and Ray Tune's view of it (when the sweep just ran), prints the ranked table, the best config and
checkpoint with the ``pretrain export`` command for it, and writes ``summary.txt``/``summary.json``,
``metric_vs_step.png``, ``best_config.yaml`` and the ``tb/`` links into the sweep dir.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.sweep.spec import SweepSpec, format_override
from launch.sweep.trial import newest_checkpoint
from pretrain.config import dump_config, load_config
from pretrain.fsutil import read_jsonl
from pretrain.rundir import CONFIG_YAML, METRICS, SWEEP, TB, read_status

__all__ = ["TrialRecord", "best_checkpoint", "format_table", "summarize_sweep"]


@dataclass
class TrialRecord:
    """One trial in the final table."""

    trial_id: str
    params: dict[str, Any]
    status: str
    """``finished``, ``stopped`` (by the scheduler), ``error``, or ``pending``/``running`` (sweep interrupted)."""
    step: int
    best: float | None
    best_step: int | None
    last: float | None
    run_dir: str
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)


def _trial_record(spec: SweepSpec, run_dir: Path, ray_info: dict[str, Any] | None, max_steps: int) -> TrialRecord:
    try:
        params = json.loads((run_dir / SWEEP / "trial.json").read_text())["params"]
    except (OSError, ValueError, KeyError):
        params = {}
    params = dict((ray_info or {}).get("config") or params)
    events = read_jsonl(run_dir / METRICS)
    curve = [(int(e["step"]), float(e[spec.metric])) for e in events if spec.metric in e and "step" in e]
    step = max([int(e.get("step", 0)) for e in events] or [0])
    state = (read_status(run_dir)[0] or {}).get("state", "")
    error = (ray_info or {}).get("error", "")
    if error:
        status = "error"
    elif state == "finished" or (max_steps and step >= max_steps):
        status = "finished"
    elif ray_info is not None:
        status = "stopped"
    else:
        status = "running" if state == "running" else "pending"
    best = best_step = last = None
    if curve:
        best_step, best = (max if spec.mode == "max" else min)(curve, key=lambda sv: sv[1])
        last = curve[-1][1]
    return TrialRecord(run_dir.name, params, status, step, best, best_step, last, str(run_dir), error, curve)


def _format_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(spec: SweepSpec, records: list[TrialRecord]) -> str:
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
    for r in records:
        if r.curve:
            steps, values = zip(*r.curve)
            params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format_value(v)}" for k, v in sorted(r.params.items()))
            style = "-" if r.status == "finished" else "--"
            ax.plot(steps, values, style, marker="o", markersize=3, label=f"{r.trial_id} ({r.status}) {params}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"sweep {spec.name}: {spec.metric} vs step ({spec.scheduler.name}; dashed = stopped early)")
    ax.grid(alpha=0.3)
    if any(r.curve for r in records):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _write_best_config(spec: SweepSpec, best: TrialRecord, path: Path) -> None:
    """The best trial's resolved config as a fresh run (own name, the base's output dir and retention)."""
    reference = load_config(spec.base, spec.overrides)  # what the user asked for, without the sweep's trial settings
    trial_yaml = Path(best.run_dir) / CONFIG_YAML
    if trial_yaml.is_file():
        cfg = load_config(trial_yaml)
    else:
        cfg = load_config(spec.base, [*spec.overrides, *(format_override(k, v) for k, v in best.params.items())])
    cfg.run = dataclasses.replace(
        reference.run,
        name=f"{spec.name}-best",
        description=f"best trial {best.trial_id} of sweep {spec.name} ({spec.metric}={best.best})",
    )
    cfg.checkpoint = dataclasses.replace(
        cfg.checkpoint, keep_last=reference.checkpoint.keep_last, keep_best=reference.checkpoint.keep_best
    )
    cfg.trainer = dataclasses.replace(cfg.trainer, progress_bar=reference.trainer.progress_bar)
    dump_config(cfg, path)
    load_config(path)  # it must load as is


def best_checkpoint(sweep_dir: Path, best: TrialRecord) -> Path | None:
    """The best trial's checkpoint at its best eval if Ray Tune kept it (``tune/``; the trial wrote its id and step
    into the checkpoint's Ray metadata), else the newest one of its run dir; None if neither exists."""
    kept = []
    for path in (sweep_dir / "tune").glob("*/checkpoint_*"):
        try:
            meta = json.loads((path / ".metadata.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("trial_id") == best.trial_id and isinstance(meta.get("step"), int):
            kept.append((meta["step"] == best.best_step, meta["step"], str(path)))
    return Path(max(kept)[2]) if kept else newest_checkpoint(best.run_dir)


def _link_tensorboard(sweep_dir: Path) -> None:
    tb_root = sweep_dir / TB
    tb_root.mkdir(parents=True, exist_ok=True)
    for trial in sorted((sweep_dir / "trials").glob("*")):
        link = tb_root / trial.name
        if (trial / TB).is_dir() and not link.exists() and not link.is_symlink():
            link.symlink_to(Path("..") / "trials" / trial.name / TB, target_is_directory=True)


def summarize_sweep(spec: SweepSpec, ray_trials: dict[str, dict[str, Any]] | None = None) -> list[TrialRecord]:
    """Rank the trials, print the table and write summary.txt/json, the plot, best_config.yaml and the tb links.

    Args:
        spec: The sweep.
        ray_trials: Ray Tune's view (trial_id -> config, error) when the sweep just ran; without it the records are
            built from the trials' run dirs alone.
    """
    sweep_dir = spec.sweep_dir.resolve()
    max_steps = load_config(spec.base, spec.trial_overrides()).trainer.max_steps
    run_dirs = {p.name: p for p in sorted((sweep_dir / "trials").glob("*")) if p.is_dir()}
    if ray_trials:  # leftovers of a driver killed before Ray Tune recorded their trials are not part of the sweep
        run_dirs = {t: run_dirs.get(t, sweep_dir / "trials" / t) for t in ray_trials}
    records = [_trial_record(spec, d, (ray_trials or {}).get(t) if ray_trials else None, max_steps)
               for t, d in run_dirs.items()]  # fmt: skip
    sign = 1.0 if spec.mode == "max" else -1.0
    records.sort(key=lambda r: (r.best is None, -sign * (r.best if r.best is not None else 0.0), r.trial_id))

    table = format_table(spec, records)
    (sweep_dir / "summary.txt").write_text(table + "\n")
    (sweep_dir / "summary.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in records], indent=1, default=str) + "\n"
    )
    _plot(spec, records, sweep_dir / "metric_vs_step.png")
    _link_tensorboard(sweep_dir)
    ranked = [r for r in records if r.best is not None and r.status != "error"]
    print(f"\nsweep {spec.name}: {len(records)} trials, ranked by {spec.metric} ({spec.mode})\n{table}\n")
    if ranked:
        _write_best_config(spec, ranked[0], sweep_dir / "best_config.yaml")
        print(f"best: {ranked[0].trial_id} {spec.metric}={ranked[0].best:.4f} at step {ranked[0].best_step}")
        print(f"  config:      {sweep_dir / 'best_config.yaml'}   (pretrain train {sweep_dir / 'best_config.yaml'})")
        if (ckpt := best_checkpoint(sweep_dir, ranked[0])) is not None:
            print(f"  checkpoint:  {ckpt}")
            print(f"  export:      pretrain export {ckpt} --out {sweep_dir / 'best.safetensors'}")
    print(f"  plot:        {sweep_dir / 'metric_vs_step.png'}")
    print(f"  tensorboard: tensorboard --logdir {sweep_dir / 'tb'}")
    return records
