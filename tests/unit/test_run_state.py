"""The run's checkpointed components (pretrain.run_state): what they save and put back, and when a save is due."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch

from pretrain.run_state import Components, RankState, SaveSchedule, TrainState, augment_seed


class _Loader:
    """The two calls RankState makes of the train loader (a position and the corrupt-sample counts)."""

    def __init__(self, batches_done: int = 0):
        self.position = {"epoch": 0, "batches_done": batches_done, "corrupt": {"decode": 1}}

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state)

    def corrupt_counts(self) -> dict:
        return dict(self.position["corrupt"])


def test_train_state_round_trips_and_names_what_a_state_lacks():
    state = TrainState(max_nonfinite_steps=3)
    state.step, state.restarts = 12, 2
    state.nonfinite.count(5, skipped=True, nonfinite=True)
    state.window.loss_sum, state.window.loss_count = 3.5, 7
    state.track_best({"val_top1": 0.25}, "val_top1", "max")
    state.track_best({"val_top1": 0.5}, "val_top1", "max")
    state.step = 13
    state.track_best({"val_top1": 0.4}, "val_top1", "max")  # worse: the best stays at step 12
    state.track_best({"val_top1": math.nan}, "val_top1", "max")
    saved = state.state_dict()
    other = TrainState(max_nonfinite_steps=3)
    other.load_state_dict(saved)
    assert other.state_dict() == saved
    assert (other.step, other.best_metric, other.best_step, other.nonfinite.total) == (13, 0.5, 12, 1)
    assert (other.window.loss_sum, other.window.loss_count) == (3.5, 7)
    lower = TrainState(3)
    lower.track_best({"val_loss": 2.0}, "val_loss", "min")
    lower.step = 1
    lower.track_best({"val_loss": 1.0}, "val_loss", "min")
    assert (lower.best_metric, lower.best_step) == (1.0, 1)
    del saved["log_window"], saved["restarts"]
    with pytest.raises(ValueError, match=r"lacks \['log_window', 'restarts'\].*model.init_from"):
        TrainState(3).load_state_dict(saved)


def test_rank_state_puts_back_the_position_and_the_rng_streams_or_reseeds_them_on_another_world():
    train = TrainState(3)
    train.step = 9
    loader = _Loader(batches_done=4)
    saved = RankState(1, loader, seed=7, train_state=train).state_dict()
    assert (saved["rank"], saved["data"]["batches_done"], saved["corrupt"]) == (1, 4, {"decode": 1})
    expected = (torch.rand(3), np.random.rand(), random.random())  # what follows the saved streams
    fresh = _Loader()
    RankState(1, fresh, seed=7, train_state=train).load_state_dict(saved)
    assert fresh.position["batches_done"] == 4
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]
    # another number of ranks: the saved streams are not this rank's; fresh ones, a function of (seed, step, rank)
    RankState(1, _Loader(), seed=7, train_state=train).load_state_dict(saved | {"rng": None})
    first = torch.rand(3)
    torch.manual_seed(augment_seed(7, 9, -1, 1))
    assert torch.equal(first, torch.rand(3))


def test_components_restore_the_client_state_first_and_every_file():
    order: list[str] = []

    class Part:
        def __init__(self, name: str):
            self.name, self.state = name, {"v": 0}

        def state_dict(self) -> dict:
            return dict(self.state)

        def load_state_dict(self, state: dict) -> None:
            order.append(self.name)
            self.state = dict(state)

    trainer, rank, ema = Part("trainer"), Part("rank"), Part("ema")
    parts = Components(client={"trainer": trainer}, rank=rank, files={"ema.pt": ema}, identity={"world_size": 2})
    trainer.state = {"v": 5}
    assert parts.client_state() == {"trainer": {"v": 5}, "world_size": 2}
    parts.restore({"trainer": {"v": 1}}, {"v": 2}, {"ema.pt": {"v": 3}})
    assert order == ["trainer", "rank", "ema"] and (trainer.state, rank.state, ema.state) == ({"v": 1}, {"v": 2},
                                                                                          {"v": 3})  # fmt: skip


def test_save_schedule_is_due_every_n_steps_at_the_end_and_by_rank_zeros_clock():
    every3 = SaveSchedule(every_steps=3, every_minutes=0, save_final=True, is_main=True)
    assert [s for s in range(1, 11) if every3.due(s, final=s == 10, time_due=False)] == [3, 6, 9, 10]
    no_final = SaveSchedule(every_steps=0, every_minutes=0, save_final=False, is_main=True)
    assert not any(no_final.due(s, final=s == 10, time_due=False) for s in range(1, 11))
    assert no_final.due(4, final=False, time_due=True)  # the ranks agreed that rank 0's clock says so
    assert not no_final.time_due()  # every_minutes=0: never by the clock
    clock = SaveSchedule(every_steps=0, every_minutes=0.0005, save_final=False, is_main=True)  # 30 ms
    other_rank = SaveSchedule(every_steps=0, every_minutes=0.0005, save_final=False, is_main=False)
    assert not clock.time_due()
    time.sleep(0.05)
    assert clock.time_due() and not other_rank.time_due()  # only rank 0's clock counts
    clock.saved(4)
    assert clock.saved_step == 4 and not clock.time_due()  # a save restarts the clock
