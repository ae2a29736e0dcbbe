"""The pre-run memory check: a run predicted to exceed the memory available is refused in one line, before
the data load when the config says so, else before the model loads; evaluation's peak follows the token
budget, not the prompt length, and a training step's the micro-batch, not the batch."""

import os
import subprocess
import sys

import psutil
import pytest
import torch
from datasets import Dataset

from sift_cli.errors import SiftError
from sift_cli.memory.check import (CPU_TRAIN_ACTIVATIONS, RUNTIME_BYTES, available_bytes, check_memory, longest_row,
                                   run_peak, train_tokens)
from sift_cli.memory.model import GIB, Setting, architecture_of, evaluation_bytes, load_architecture, predict
from sift_cli.methods import build_method
from sift_cli.models import skeleton
from sift_cli.run import Job
from tests.conftest import FIXTURES, compose_config

FAST = ["model=tiny-bert", f"data.dir={FIXTURES}", "data.k_shot=4", "trainer.max_steps=3", "logger.mode=disabled"]
# a batch of activations of about a petabyte, run whole: more than any machine has
HUGE_BATCH = ["trainer.batch_size=1000000000", "trainer.train_tokens=null"]


def test_available_memory_is_what_the_kernel_reports():
    assert available_bytes(torch.device("cpu")) == pytest.approx(psutil.virtual_memory().available, rel=0.05)


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(SiftError, match=r"this run needs about [\d.]+ GiB \(training step [\d.]+ GiB, evaluation "
                                        r"[\d.]+ GiB, from the memory model\) but this machine has [\d.]+ GiB "
                                        r"available; .* or set trainer.memory_check=false to run anyway"):
        Job(compose_config([*FAST, *HUGE_BATCH]), tmp_path, None).setup()
    job = Job(compose_config([*FAST, *HUGE_BATCH, "trainer.memory_check=false"]), tmp_path, None)
    job.setup()  # the user's word: it goes on
    assert job.model is not None


def test_an_evaluation_budget_that_cannot_fit_is_refused_before_the_data_load(tmp_path):
    # the data directory does not exist: the refusal comes first
    with pytest.raises(SiftError, match="this run needs about"):
        Job(compose_config([*FAST, "trainer.eval_tokens=100000000000000", "data.dir=/nonexistent"]), tmp_path,
            None).setup()


def test_the_longest_training_row_decides_the_step():
    cfg = compose_config([*FAST, "trainer.batch_size=1000"])
    method = build_method(cfg.method, cfg)
    cpu = torch.device("cpu")
    check_memory(cfg, method, cpu, 1)  # 1000 rows of one token
    check_memory(cfg, method, cpu, 1, train=Dataset.from_dict({"input_ids": [[0] * 64, [0] * 8]}))
    with pytest.raises(SiftError, match="this run needs about"):  # 1000 rows of a million tokens
        check_memory(cfg, method, cpu, 1, train=Dataset.from_dict({"input_ids": [[0] * 10**6, [0] * 8]}))


def test_the_refusal_is_one_line_with_exit_code_2_and_leaves_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sift_cli.run", *FAST, *HUGE_BATCH], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sift-run: error: this run needs about"), out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("results.json"))


def peak_of(overrides: list[str], seq: int, device: str = "cpu"):
    cfg = compose_config(overrides)
    return run_peak(cfg, build_method(cfg.method, cfg), architecture_of(skeleton(cfg.model).config), device, seq)


def test_evaluation_grows_with_the_budget_not_with_the_rows():
    base = ["model=smollm2-135m", "task=instruct/alpaca", "method=lora"]
    small, large = peak_of([*base, "trainer.eval_tokens=1024"], 300), peak_of([*base, "trainer.eval_tokens=8192"], 300)
    arch = load_architecture("smollm2-135m")
    assert large.evaluation - small.evaluation == (evaluation_bytes(arch, 8192, "fp32", 1)
                                                   - evaluation_bytes(arch, 1024, "fp32", 1))
    # the training step follows the longest training row; evaluation does not (within the budget)
    whole = [*base, "trainer.train_tokens=null"]
    short, long = peak_of(whole, 100), peak_of(whole, 500)
    assert short.training < long.training and short.evaluation == long.evaluation
    assert peak_of(base, 300, "cuda").evaluation > peak_of(base, 300, "cpu").evaluation  # auto: 32768 tokens


def test_the_issue_s_run_is_predicted_to_fit_in_3_gib_at_evaluation():
    """SmolLM2-135M with LoRA, the default budget: weights, LoRA's state and one evaluation batch."""
    peak = peak_of(["model=smollm2-135m", "task=instruct/alpaca", "method=lora"], 300)
    weights = 134_515_008 * 4
    assert weights + RUNTIME_BYTES < peak.evaluation < 3 * GIB


def test_training_micro_batches_bound_the_step_on_a_cpu():
    """trainer.train_tokens=auto: on a CPU, the micro-batch's activations stay within CPU_TRAIN_ACTIVATIONS
    (one row more would not), whatever the batch size; on a GPU, and with null, whole batches."""
    base = ["model=smollm2-135m", "task=instruct/alpaca", "method=lora"]
    cfg = compose_config(base)
    method, arch = build_method(cfg.method, cfg), load_architecture("smollm2-135m")
    tokens = train_tokens(cfg, method, arch, "cpu", 200)
    assert tokens % 200 == 0 and tokens // 200 < 16

    def activations(rows):
        step = predict(arch, method, Setting(batch=rows, seq=200, device="cpu", adam_dtype="weights"))
        return step.activations + step.recompute

    assert activations(tokens // 200) <= CPU_TRAIN_ACTIVATIONS < activations(tokens // 200 + 1)
    assert train_tokens(cfg, method, arch, "cuda", 200) is None
    assert train_tokens(compose_config([*base, "trainer.train_tokens=null"]), method, arch, "cpu", 200) is None
    assert train_tokens(compose_config([*base, "trainer.train_tokens=300"]), method, arch, "cuda", 200) == 300
    split, whole = peak_of(base, 200), peak_of([*base, "trainer.train_tokens=null"], 200)
    assert split.training < whole.training and split.evaluation == whole.evaluation
    assert peak_of([*base, "trainer.batch_size=64"], 200).training == split.training


@pytest.mark.parametrize("name, whole", [("full_ft", False), ("sift", False), ("mixout", True), ("pac", True)])
def test_methods_that_draw_random_weights_keep_whole_batches(name, whole):
    """Mixout's masks and PAC's noise are drawn at each forward, once per batch as published: micro-batches would
    each draw their own, so `auto` does not split their batches (an explicit budget still does)."""
    cfg = compose_config(["model=minilm-l6", f"method={name}", "task=glue/mrpc"])
    method, arch = build_method(cfg.method, cfg), load_architecture("minilm-l6")
    assert (train_tokens(cfg, method, arch, "cpu", 128) is None) == whole
    assert train_tokens(compose_config(["model=minilm-l6", f"method={name}", "trainer.train_tokens=256"]), method,
                        arch, "cpu", 128) == 256


def test_the_longest_row_of_plain_and_multiple_choice_sets():
    assert longest_row(Dataset.from_dict({"input_ids": [[1, 2], [1, 2, 3, 4], [5]]}).select([0, 2])) == 2
    assert longest_row(Dataset.from_dict({"input_ids": [[[1], [1, 2, 3]], [[1, 2], [1]]]})) == 3
