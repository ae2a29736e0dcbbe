"""`sift-run` end to end, as a user runs it: results on disk, sweeps, W&B offline, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import FIXTURES, compose_config, make_job

FAST = ["model=tiny-bert", f"data.dir={FIXTURES}", "data.k_shot=4", "trainer.max_steps=3", "trainer.eval_every=3"]
CONTRACT = {"status", "task", "method", "model", "seed", "metrics", "main_metric", "main_score",
            "trainable_params", "total_params", "train_time_s", "config", "versions"}


def sift_run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    environment.pop("SIFT_DATA_DIR", None) if env is None or "SIFT_DATA_DIR" not in env else None
    return subprocess.run([sys.executable, "-m", "sift_cli.run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=environment)


def results_under(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


def test_a_run_writes_its_results(tmp_path):
    out = sift_run(tmp_path, *FAST, "method=bitfit", "seed=3", "save.weights=true")
    assert out.returncode == 0, out.stderr
    [result] = results_under(tmp_path / "runs")
    assert CONTRACT <= set(result)
    assert result["status"] == "completed" and result["task"] == "sst2" and result["method"] == "bitfit"
    assert result["seed"] == 3 and result["main_metric"] == "accuracy"
    assert result["main_score"] == result["metrics"]["accuracy"] and "ece" in result["metrics"]
    assert 0 < result["trainable_params"] < result["total_params"]
    assert result["selection"]["on"] == "dev" and result["data"]["n_train"] == 8
    run_dir = Path(result["run_dir"])
    assert "accuracy" in out.stdout and str(run_dir) in out.stdout
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in curve) and any(r.get("split") == "dev" for r in curve)
    from safetensors.torch import load_file

    saved = load_file(run_dir / "trainable.safetensors")
    assert sum(t.numel() for t in saved.values()) == result["trainable_params"]


def test_eval_on_start_records_the_model_as_it_was_before_training(tmp_path):
    out = sift_run(tmp_path, *FAST, "method=lora", "trainer.eval_on_start=true")
    assert out.returncode == 0, out.stderr
    [result] = results_under(tmp_path / "runs")
    curve = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert curve[0].items() >= {"step": 0, "split": "start", **result["start_metrics"]}.items()
    untrained = make_job(tmp_path / "in_process", [*FAST, "method=lora", "logger.mode=disabled"])
    assert result["start_metrics"] == untrained.trainer.evaluate_tests()


def test_a_sweep_gives_one_directory_per_job_and_a_table(tmp_path):
    out = sift_run(tmp_path, "-m", *FAST, "method=full_ft,bitfit")
    assert out.returncode == 0, out.stderr
    results = results_under(tmp_path / "runs" / "multirun")
    assert sorted(r["method"] for r in results) == ["bitfit", "full_ft"]
    assert len({r["run_dir"] for r in results}) == 2
    table = subprocess.run([sys.executable, "-m", "sift_cli.table", str(tmp_path / "runs")],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "bitfit" in table.stdout and "full_ft" in table.stdout and "sst2" in table.stdout


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = sift_run(tmp_path, "-m", *FAST, "trainer.lr=1e30,1e-4")
    assert out.returncode == 1
    statuses = sorted(r["status"] for r in results_under(tmp_path / "runs"))
    assert statuses == ["completed", "failed"]
    failed = next(r for r in results_under(tmp_path / "runs") if r["status"] == "failed")
    assert "nan" in failed["error"] and failed["main_score"] is None


def test_wandb_offline_writes_the_run_files(tmp_path):
    out = sift_run(tmp_path, *FAST, "logger.mode=offline")
    assert out.returncode == 0, out.stderr
    [result] = results_under(tmp_path / "runs")
    offline = list((Path(result["run_dir"]) / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].rglob("*.wandb"))
    assert "WANDB_API_KEY" not in json.dumps(result)


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=nope"], "unknown method 'nope'; choose from: "),
        (["task=glue/nope"], "unknown task 'glue/nope'; choose from: "),
        (["model=nope"], "unknown model 'nope'; choose from: "),
        (["trainer.lrr=1"], "unknown config key 'trainer.lrr'"),
        (["data.k_shot=-2"], "data.k_shot must be a positive integer"),
        (["trainer.lr=0"], "trainer.lr must be > 0"),
        (["data.k_shot=50"], "k_shot=50 needs 100 rows"),
        (["task=glue/qnli", "data.dir=/nonexistent"], "missing data file"),
        (["model.init=pretrained", "model.pretrained=/nonexistent"], "cannot load model"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    out = sift_run(tmp_path, *FAST, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))
    assert not any(p.is_dir() for p in (tmp_path / "runs").glob("*/*")) if (tmp_path / "runs").exists() else True


def test_a_method_setting_in_a_sweep_over_methods_is_told_to_use_two_pluses(tmp_path):
    out = sift_run(tmp_path, "-m", *FAST, "method=sift,sam", "method.sparse_rate=0.03")
    assert out.returncode == 2 and "a key that they lack needs '++'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_a_model_directory_without_weights_is_refused(tmp_path):
    weightless = tmp_path / "model"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                        "num_hidden_layers": 1, "num_attention_heads": 2,
                                                        "intermediate_size": 37}))
    out = sift_run(tmp_path, *FAST, "model.init=pretrained", f"model.pretrained={weightless}")
    assert out.returncode == 2 and "cannot load model" in out.stderr


def test_an_earlier_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "fixed"
    first = sift_run(tmp_path, *FAST, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    before = (run_dir / "results.json").read_bytes()
    second = sift_run(tmp_path, *FAST, "method=bitfit", f"hydra.run.dir={run_dir}")
    assert second.returncode == 2 and "never overwritten" in second.stderr
    assert (run_dir / "results.json").read_bytes() == before


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no data root (sift_run drops SIFT_DATA_DIR)


@pytest.mark.slow
def test_the_default_job_runs_with_no_data_root_and_no_hub(tmp_path, monkeypatch):
    out = sift_run(tmp_path, "trainer.max_steps=2", "data.max_eval_samples=32", env=OFFLINE)  # shorter, else as is
    assert out.returncode == 0, out.stderr
    assert "data: sst2 train from the copy bundled with sift-run" in out.stdout + out.stderr
    assert "full_ft-sst2-minilm-l6-s42: accuracy = " in out.stdout
    [result] = results_under(tmp_path / "runs")
    assert result["status"] == "completed" and result["data"]["n_eval"] == {"validation": 32}
    monkeypatch.delenv("SIFT_DATA_DIR", raising=False)
    default = compose_config([])  # what `sift-run` with nothing set runs: the same job, with no data root
    assert default.data.dir is None and result["config"]["data"]["dir"] is None
    assert (default.model.name, default.task.name, default.method.name) == ("minilm-l6", "sst2", "full_ft")
    expected = OmegaConf.to_container(default, resolve=True)
    assert {key: result["config"][key] for key in ("model", "task", "method", "seed")} == \
        {key: expected[key] for key in ("model", "task", "method", "seed")}


def test_other_tasks_with_no_data_root_and_no_hub_fail_in_one_line(tmp_path):
    out = sift_run(tmp_path, "task=glue/cola", env=OFFLINE)
    assert out.returncode == 2 and not list((tmp_path / "runs").glob("*/*"))  # no run directory left
    assert out.stderr.strip().splitlines()[-1].startswith(
        "sift-run: error: cannot load split 'train' of nyu-mll/glue/cola from the hub")


@pytest.mark.slow
def test_minilm_few_shot_sst2_beats_the_majority_class(real_data, tmp_path):
    out = sift_run(tmp_path, "trainer.max_steps=60", "trainer.eval_every=60", env={"SIFT_DATA_DIR": str(real_data)})
    assert out.returncode == 0, out.stderr
    [result] = results_under(tmp_path / "runs")
    labels = [json.loads(line)["label"] for line in (real_data / "glue/sst2/validation.jsonl").open()]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert result["metrics"]["accuracy"] > majority + 0.03
