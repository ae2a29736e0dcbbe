"""The plain loops `sift-bench --peers` sets ours against: written with transformers, peft and torch alone,
they must train exactly as our loop does on the same config and batch, so that a ratio of step times
measures the loop and nothing else."""

import tempfile
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from sift_cli.errors import SiftError
from sift_cli.memory.measure import StepHarness, compose_run, random_batch
from sift_cli.peers import PlainLoop
from tests.conftest import FIXTURES

NO_DROPOUT = [f"data.dir={FIXTURES}", "data.k_shot=4", "trainer.max_steps=10", "model.dropout=0.0",
              "trainer.weight_decay=0.01"]


def plain_loop(method: str, overrides: list[str]) -> PlainLoop:
    GlobalHydra.instance().clear()
    return PlainLoop(compose_run("tiny-bert", method, 4, overrides),
                     lambda vocab, labels, device: random_batch(vocab, labels, 4, 16, device))


def our_losses(method: str, overrides: list[str], steps: int) -> tuple[list[float], int]:
    GlobalHydra.instance().clear()
    with tempfile.TemporaryDirectory() as scratch:
        harness = StepHarness.build("tiny-bert", method, 4, 16, overrides, Path(scratch))
        return [harness.trainer.micro_step(harness.inputs)[0] for _ in range(steps)], harness.job.trainable_params


@pytest.mark.parametrize("method, extra", [("full_ft", []), ("lora", ["method.dropout=0.0"]),
                                           ("full_ft", ["trainer.optimizer=sgd", "trainer.lr=0.5"])])
def test_the_plain_loop_trains_as_ours_does(method, extra):
    """Same weights, head, LoRA initialisation, groups, optimizer, warm-up and clipping: the same losses, step
    by step (the first step's rate is 0 in warm-up, so the third loss is the first one an update moved)."""
    overrides = [*NO_DROPOUT, *extra]
    ours, trainable = our_losses(method, overrides, steps=4)
    plain = plain_loop(method, overrides)
    theirs = [plain.step() for _ in range(4)]
    assert plain.trainable_params == trainable
    assert theirs == pytest.approx(ours, rel=1e-6, abs=1e-7)
    assert ours[2] != ours[1] and ours[3] != ours[2]


def test_a_method_without_a_peer_is_refused():
    with pytest.raises(SiftError, match="no plain-loop peer for method=sift"):
        plain_loop("sift", NO_DROPOUT)


def test_a_schedule_the_plain_loops_do_not_run_is_refused():
    with pytest.raises(SiftError, match="peers run trainer.schedule=linear or constant, not linear_nominal"):
        plain_loop("full_ft", [*NO_DROPOUT, "trainer.schedule=linear_nominal", "trainer.nominal_epochs=100"])
