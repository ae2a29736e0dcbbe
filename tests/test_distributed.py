"""`accelerate launch --num_processes 2 --cpu` trains the same model as one process, and only the main
process writes."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, accelerate_launch

ARGS = ["model=tiny-bert", f"data.dir={FIXTURES}", "data.k_shot=4", "trainer.max_steps=6", "trainer.log_every=1",
        "trainer.eval_every=3", "trainer.batch_size=4", "logger.mode=disabled",
        "+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]
METHODS = {"full_ft": [], "lora": ["method.dropout=0"], "sift": ["method.sparse_rate=0.05"]}


def launch(cwd: Path, processes: int, method: str, *extra: str) -> tuple[dict, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [*accelerate_launch(processes), "-m", "sift_cli.run"]
    out = subprocess.run([*prefix, *ARGS, f"method={method}", *METHODS[method], *extra], cwd=cwd,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = list((cwd / "runs").rglob("results.json"))
    curve = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    return json.loads(path.read_text()), [r["loss"] for r in curve if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method, micro_batches", [(method, False) for method in METHODS] + [("sift", True)])
def test_two_processes_match_one(tmp_path, method, micro_batches):
    """With micro_batches, the two processes run theirs one row at a time (gradients synchronised once, after
    the last) against one process's whole batches."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    single, single_losses = launch(tmp_path / "one", 1, method, "trainer.train_tokens=null")
    double, double_losses = launch(tmp_path / "two", 2, method, *(["trainer.train_tokens=1"] if micro_batches else []))
    assert len(double_losses) == len(single_losses) == 6
    assert double_losses == pytest.approx(single_losses, rel=1e-4)
    assert double["metrics"] == pytest.approx(single["metrics"], rel=1e-4, abs=1e-6)
    assert double["trainable_params"] == single["trainable_params"]
    assert len(list((tmp_path / "two" / "runs").glob("*/*"))) == 1  # one run directory, from the main process
