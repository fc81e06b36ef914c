"""What the sha256 digests in a checkpoint's COMPLETE marker cost at save time, on a sepvit_tiny-sized checkpoint.

A checkpoint's files are what DeepSpeed ZeRO writes for AdamW in fp32: the model weights (one file) and, per rank, the
fp32 master partition with its two Adam moments (one file). This script writes files of exactly those sizes from a
real ``sepvit_tiny`` with ``torch.save`` (fsync'd, as a save is), then hashes them the way
``CheckpointManager.save`` does (right after writing, while the files are in the page cache; here one rank hashes
everything, the worst case). Save and hash alternate over ``--repeats`` rounds; medians are reported.

Usage::

    python benchmarks/checkpoint.py                 # appends a section to benchmarks/RESULTS.md
    python benchmarks/checkpoint.py --no-append --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.checkpoint import sha256_file  # noqa: E402
from pretrain.models import create_model  # noqa: E402

__all__ = ["main"]


def _save(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sepvit_tiny")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    model = create_model(args.model, num_classes=1000)
    weights = model.state_dict()
    flat = torch.cat([t.detach().reshape(-1).float() for t in weights.values()])
    optim = {"fp32_master": flat.clone(), "exp_avg": torch.randn_like(flat), "exp_avg_sq": torch.rand_like(flat)}
    saves, hashes, sizes = [], [], 0
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=ROOT) as tmp:
        files = [Path(tmp) / "mp_rank_00_model_states.pt", Path(tmp) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _save({"module": weights}, files[0])
            _save({"optimizer_state_dict": optim}, files[1])
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in files:
                sha256_file(f)
            hashes.append(time.perf_counter() - t0)
        sizes = sum(f.stat().st_size for f in files)
    save_s, hash_s = statistics.median(saves), statistics.median(hashes)
    load = os.getloadavg()[0]
    rows = [
        (
            "checkpoint size",
            f"{sizes / 2**20:.0f} MB",
            f"{args.model}: {flat.numel() / 1e6:.1f} M params, AdamW fp32",
        ),
        ("save (torch.save + fsync), median", f"{save_s:.2f} s", f"{args.repeats} rounds, alternating with hashing"),
        ("sha256 of every file, median", f"{hash_s:.2f} s", f"{sizes / 2**20 / hash_s:.0f} MB/s, one process"),
        (
            "added to a save",
            f"{100 * hash_s / save_s:.0f}%",
            "split across ranks in a real save",
        ),
    ]
    table = "| measure | value | note |\n|---|---:|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    text = (
        f"## Checkpoint digests: save-time cost, {datetime.datetime.now().strftime('%Y-%m-%dT%H:%M')}\n\n"
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average "
        f"{load:.1f} (shared machine)\n"
        f"- command: `python benchmarks/checkpoint.py{' ' + ' '.join(argv) if argv else ''}`\n\n{table}\n"
    )
    print(text)
    if not args.no_append:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
