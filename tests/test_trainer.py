"""The learning-rate schedules of the loop, read from the optimizer as the loop steps."""

import pytest
import torch
from omegaconf import OmegaConf

from sift_cli.errors import SiftError
from sift_cli.trainer import make_schedule
from tests.conftest import FAST, make_job


def rates(schedule: str, steps: int, total: int, steps_per_epoch: int, **trainer) -> list[float]:
    """The rate of each of the first `steps` optimizer steps under `schedule`."""
    tcfg = OmegaConf.create({"schedule": schedule, "warmup_ratio": 0.1, "nominal_epochs": None, **trainer})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = make_schedule(optimizer, tcfg, total, steps_per_epoch)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_warms_up_over_a_tenth_of_the_run_then_decays_to_zero():
    lr = rates("linear", 100, total=100, steps_per_epoch=10)
    assert lr[:3] == pytest.approx([0, 1e-5, 2e-5])  # warm-up of round(0.1 * 100) = 10 steps
    assert lr[10] == pytest.approx(1e-4) and lr[55] == pytest.approx(5e-5) and lr[99] == pytest.approx(1e-4 / 90)


def test_linear_nominal_lays_the_schedule_over_nominal_epochs_of_which_the_run_trains_the_start():
    # SAM's published CoLA run: 8551 rows in batches of 16 (535 a epoch), 10000 nominal epochs, a 10% warm-up
    # of 535,000 steps; at step 20,000 the rate has reached 20000 / 535000 of 1e-4.
    lr = rates("linear_nominal", 20001, total=20001, steps_per_epoch=535, nominal_epochs=10000)
    assert lr[20000] == pytest.approx(1e-4 * 20000 / 535000)
    assert all(b > a for a, b in zip(lr[:-1], lr[1:]))  # never leaves the warm-up
    short = rates("linear_nominal", 30, total=30, steps_per_epoch=10, nominal_epochs=3)  # 30 steps: as linear
    assert short == pytest.approx(rates("linear", 30, total=30, steps_per_epoch=10))


def test_a_nominal_schedule_shorter_than_the_run_is_refused(tmp_path):
    # 8 training rows in one batch of 16: an epoch is one step
    with pytest.raises(SiftError, match=r"trainer.nominal_epochs=2 spans 2 steps, fewer than the run's 3"):
        make_job(tmp_path, [*FAST, "trainer.schedule=linear_nominal", "trainer.nominal_epochs=2"])


def test_the_loop_runs_the_nominal_schedule(tmp_path):
    job = make_job(tmp_path, [*FAST, "trainer.schedule=linear_nominal", "trainer.nominal_epochs=100",
                              "trainer.warmup_ratio=0.5", "trainer.lr=1e-3"])
    job.trainer.loop.train()
    # 8 rows in batches of 16: one step an epoch, 100 nominal steps, 50 of warm-up; after 3 steps: 3/50 of lr
    assert job.trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 3 / 50)
