"""A resumed run cuts its metrics back to the checkpoint it resumes from, and keeps what it cut."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.metrics import truncate_jsonl
from pretrain.rundir import PREVIOUS


def test_events_after_the_resume_step_are_set_aside_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    events = [{"event": "train", "step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"event": "note"}]
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert truncate_jsonl(path, 4) == 3
    assert [json.loads(line).get("step") for line in path.read_text().splitlines()] == [1, 2, 3, 4, None]
    aside = tmp_path / PREVIOUS / "metrics.after-step-4.jsonl"
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [5, 6, 7]
    assert truncate_jsonl(path, 4) == 0 and len(aside.read_text().splitlines()) == 3  # nothing more to cut
