"""Every experiment file composes alone and for every job of its sweep, its per-task and per-method lookups
resolve, it says how to run it and what it reproduces, and its `_cpu` twin runs on MiniLM or SmolLM2."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from sift_cli.config import CONFIG_DIR, available_options, validate
from sift_cli.methods import build_method
from tests.conftest import FIXTURES, REAL_DATA, compose_config

EXPERIMENTS = available_options("experiment")
# Settings that table experiments include (graft_lmbff_table, pac_glue_table), not tables of their own.
SETTINGS = {"graft_lmbff", "pac_glue"}
TABLES = [e for e in EXPERIMENTS if e not in SETTINGS and not e.endswith("_cpu")]
CPU_MODELS = {"minilm-l6", "smollm2-135m"}
# conf/config.yaml merges these after an experiment file, so an experiment setting them would be overridden.
def experiment_file(name: str) -> Path:
    return Path(CONFIG_DIR) / "experiment" / f"{name}.yaml"


def sweep_params(name: str) -> dict[str, list[str]]:
    """The experiment's hydra.sweeper.params, each expanded into its values as the basic sweeper expands them."""
    cfg = compose_config([f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    parser = OverridesParser.create()
    expanded = {}
    for key, value in params.items():
        [override] = parser.parse_overrides([f"{key}={value}"])
        expanded[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(value)]
    return expanded


def compose_job(name: str, overrides: list[str]):
    """A job of the experiment, resolved, its ranges and its method's settings checked."""
    cfg = compose_config([f"experiment={name}", *overrides])
    OmegaConf.resolve(cfg)
    validate(cfg)
    build_method(cfg.method, cfg)
    return cfg


def test_there_is_an_experiment_per_published_table():
    assert {"sift_glue", "sift_instruct", "sift_memory", "sam_glue_superglue", "design_spaces_glue",
            "pac_glue_table", "graft_lmbff_table"} <= set(TABLES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_file_opens_with_its_command_and_its_source(name):
    lines = experiment_file(name).read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# sift-")  # the command
    assert any(f"experiment={name}" in line for line in lines[1:3])
    header = "\n".join(line for line in itertools.takewhile(lambda line: line.startswith("#"), lines))
    assert "arXiv:" in header or "github.com" in header or name.endswith("_cpu")


def test_experiments_merge_after_the_main_config():
    """`_self_` comes first in the defaults list, so an experiment may set seed, data.* and the rest; only the
    experiment's settings for the method it runs come after it."""
    defaults = yaml.safe_load((Path(CONFIG_DIR) / "config.yaml").read_text())["defaults"]
    assert defaults[0] == "_self_" and defaults[-2:] == [
        {"optional experiment": None}, {"optional experiment_method@method": "${experiment}/${method}"}]


def sweep_jobs(name: str) -> set[tuple[str, ...]]:
    """Overrides of the jobs worth composing: every value of every swept key (the first and last of keys like
    seeds, which change no lookup), and every task x method where the file keeps lookup tables keyed by them."""
    params = sweep_params(name)
    first = {key: values[0] for key, values in params.items()}
    jobs = set()
    for key, values in params.items():
        for value in values if key in ("task", "method") else {values[0], values[-1]}:
            jobs.add(tuple(f"{k}={v}" for k, v in {**first, key: value}.items()))
    if "published" in (yaml.safe_load(experiment_file(name).read_text()) or {}):
        for task, method in itertools.product(params.get("task", [None]), params.get("method", [None])):
            chosen = {**first, **({"task": task} if task else {}), **({"method": method} if method else {})}
            jobs.add(tuple(f"{k}={v}" for k, v in chosen.items()))
    return jobs or {()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_the_sweep_composes_and_resolves(name):
    for overrides in sweep_jobs(name):
        compose_job(name, list(overrides))


def test_sift_glue_takes_sift_s_per_task_settings_and_the_others_their_own_rate():
    stsb = compose_job("sift_glue", ["task=glue/stsb"])
    assert (stsb.trainer.lr, stsb.trainer.epochs, stsb.method.sparse_rate) == (8e-5, 30, 0.008)
    assert compose_job("sift_glue", ["task=glue/mnli"]).trainer.epochs == 10
    lora = compose_job("sift_glue", ["task=glue/stsb", "method=lora"])
    assert lora.trainer.lr == lora.method.lr and lora.trainer.epochs == 30
    assert sweep_params("sift_glue")["data.k_shot"] == ["null"]


def test_sift_glue_is_the_published_scripts_settings():
    """rob-l-TASK.sh at the head of github.com/song-wx/SIFT (QNLI at 5e-5, as the authors corrected it)."""
    published = {"cola": (7e-5, 20), "mnli": (7e-5, 10), "mrpc": (7e-5, 20), "qnli": (5e-5, 10),
                 "qqp": (7e-5, 20), "rte": (7e-5, 20), "sst2": (7e-5, 15), "stsb": (8e-5, 30)}
    for task, (lr, epochs) in published.items():
        job = compose_job("sift_glue", [f"task=glue/{task}"])
        assert (job.trainer.lr, job.trainer.epochs) == (lr, epochs), task
        assert (job.model.name, job.trainer.batch_size, job.trainer.grad_accum, job.task.max_length) == (
            "roberta-large", 32, 1, 512)
        assert (job.trainer.weight_decay, job.trainer.warmup_ratio, job.trainer.precision) == (0.1, 0.06, "no")
        assert job.method.sparse_rate == 0.008
        assert list(job.method.target_modules)[:4] == ["query", "key", "value", "attention.output.dense"]


def test_sift_run_shows_qnli_s_learning_rate():
    out = subprocess.run([sys.executable, "-m", "sift_cli.run", "--cfg", "job", "--resolve", "experiment=sift_glue",
                          "task=glue/qnli"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert yaml.safe_load(out.stdout)["trainer"]["lr"] == 5e-5


def test_sift_instruct_takes_each_method_s_published_optimisation():
    lora = compose_job("sift_instruct", ["method=lora"])
    assert (lora.trainer.lr, lora.trainer.batch_size * lora.trainer.grad_accum, lora.method.r) == (2e-4, 128, 128)
    full = compose_job("sift_instruct", ["method=full_ft"])
    assert (full.trainer.lr, full.trainer.weight_decay) == (2e-5, 0.0)
    sift = compose_job("sift_instruct", ["method=sift"])
    assert (sift.trainer.weight_decay, sift.method.sparse_rate) == (0.01, 0.05)


def test_graft_table_gives_each_task_lm_bff_s_prompt():
    mnli = compose_job("graft_lmbff_table", ["task=glue/mnli"]).task.prompt
    assert dict(mnli.verbalizer) == {0: "Yes", 1: "Maybe", 2: "No"} and "*mask*" in mnli.template
    assert compose_job("graft_lmbff_table_cpu", ["task=glue/rte"]).task.prompt is None
    assert sweep_params("graft_lmbff_table")["data.seed"] == ["13", "21", "42", "87", "100"]


def test_sam_table_runs_ten_seeds_of_every_baseline():
    params = sweep_params("sam_glue_superglue")
    assert params["seed"] == [str(s) for s in range(1, 11)]
    assert len(params["method"]) == 10 and {"superglue/cb", "superglue/copa", "superglue/wsc"} <= set(params["task"])


def test_sam_table_is_the_published_code_s_protocol():
    """scripts/train.sh and src/runner.py at ea1a73b of github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune."""
    sam = compose_job("sam_glue_superglue", ["task=glue/rte"])
    m, t = sam.method, sam.trainer
    assert (m.name, m.sparse_rate, m.burnin_steps, m.clip_burnin, m.scope, m.target_modules) == (
        "sam", 0.005, 600, True, "per_tensor", "all_params")
    assert (t.schedule, t.nominal_epochs, t.warmup_ratio, t.lr, t.weight_decay, t.max_grad_norm) == (
        "linear_nominal", 10000, 0.1, 1e-4, 0.01, 1.0)
    assert (t.batch_size, t.max_steps, t.eval_every, t.select_on, sam.task.max_length) == (
        16, 20000, 500, "heldout", 256)
    assert sam.data.heldout_size == 249  # RTE: the repository's val.jsonl, 10% of the 2490 training rows
    magnitude = compose_job("sam_glue_superglue", ["method=magnitude"]).method
    assert (magnitude.warmup_steps, magnitude.warmup_lr, magnitude.target_modules) == (499, None, "all_params")
    assert compose_job("sam_glue_superglue", ["method=random_mask"]).method.target_modules == "all_params"
    assert compose_job("sam_glue_superglue", ["method=fisher"]).method.clip_burnin is True
    assert "burnin_steps" not in compose_job("sam_glue_superglue", ["method=full_ft"]).method
    lrs = {compose_job("sam_glue_superglue", [f"method={name}"]).trainer.lr
           for name in sweep_params("sam_glue_superglue")["method"]}
    assert lrs == {1e-4}  # the one published command's rate, for every method


def test_sift_run_shows_sam_s_published_rule():
    out = subprocess.run([sys.executable, "-m", "sift_cli.run", "--cfg", "job", "experiment=sam_glue_superglue"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    job = yaml.safe_load(out.stdout)
    assert {k: job["method"][k] for k in ("scope", "clip_burnin", "burnin_steps", "target_modules")} == {
        "scope": "per_tensor", "clip_burnin": True, "burnin_steps": 600, "target_modules": "all_params"}
    assert (job["trainer"]["schedule"], job["trainer"]["nominal_epochs"]) == ("linear_nominal", 10000)


def test_sam_cpu_table_runs_every_method_at_one_rate_on_the_tasks_of_the_data_root():
    params = sweep_params("sam_glue_superglue_cpu")
    assert params["method"] == sweep_params("sam_glue_superglue")["method"] and len(params["seed"]) >= 3
    rates = set()
    for method in params["method"]:
        job = compose_job("sam_glue_superglue_cpu", [f"method={method}"])
        rates.add(job.trainer.lr)
        assert job.trainer.schedule == "linear_nominal" and job.trainer.select_on == "heldout"
    assert rates == {5e-4}
    sam = compose_job("sam_glue_superglue_cpu", []).method
    assert (sam.burnin_steps, sam.scope, sam.clip_burnin, sam.target_modules) == (30, "per_tensor", True, "all_params")
    assert compose_job("sam_glue_superglue_cpu", ["method=magnitude"]).method.warmup_steps == 24
    assert "glue/rte" not in params["task"] and not any(task.startswith("superglue/") for task in params["task"])
    if REAL_DATA is not None:  # every task has its training rows in the data root
        assert all(list((REAL_DATA / task).glob("train.*")) for task in params["task"])


def test_sift_cpu_table_runs_three_seeds_on_tasks_the_data_root_trains_on():
    params = sweep_params("sift_glue_cpu")
    assert len(params["seed"]) >= 3 and params["method"] == sweep_params("sift_glue")["method"]
    if REAL_DATA is not None:
        assert all(list((REAL_DATA / task).glob("train.*")) for task in params["task"])


def test_design_spaces_groups_fit_each_model():
    assert list(compose_job("design_spaces_glue", []).method.groups) == [2, 4, 4, 2]
    assert list(compose_job("design_spaces_glue_cpu", []).method.groups) == [1, 2, 2, 1]


@pytest.mark.parametrize("name", TABLES)
def test_each_table_has_a_cpu_twin_on_a_small_model(name):
    assert f"{name}_cpu" in EXPERIMENTS
    cpu = compose_job(f"{name}_cpu", [])
    assert cpu.model.name in CPU_MODELS
    assert compose_job(name, []).model.name not in CPU_MODELS


def sift_run(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "sift_cli.run", "-m", *args, f"data.dir={FIXTURES}",
                          "model=tiny-bert"], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("results.json")]


@pytest.mark.slow
def test_a_cpu_table_runs_as_a_sweep_with_its_protocol(tmp_path):
    results = sift_run(tmp_path, "experiment=sift_glue_cpu", "task=glue/rte", "method=sift,full_ft", "seed=42",
                       "trainer.epochs=1")
    by_method = {r["method"]: r for r in results}
    assert set(by_method) == {"sift", "full_ft"} and all(r["status"] == "completed" for r in results)
    assert by_method["sift"]["config"]["trainer"]["lr"] == 7e-5
    assert by_method["full_ft"]["config"]["trainer"]["lr"] == 5e-5
    assert all(r["config"]["data"]["k_shot"] is None and r["seed"] == 42 for r in results)
    assert all(r["config"]["data"]["max_eval_samples"] == 256 for r in results)


@pytest.mark.parametrize("name", ["pac_glue_table", "pac_glue_table_cpu", "graft_lmbff_table",
                                  "graft_lmbff_table_cpu"])
def test_every_job_passes_the_checks_of_its_method(name):
    """What sift-run checks before any work, for every job of the sweep: a method's settings that another job's
    method does not have would be refused."""
    from sift_cli.run import check_config

    params = sweep_params(name)
    first = {key: values[0] for key, values in params.items()}
    for key in ("task", "pac_arm"):
        for value in params.get(key, []):
            check_config(compose_config([f"experiment={name}",
                                         *(f"{k}={v}" for k, v in {**first, key: value}.items())]))


def test_pac_runs_five_matched_jobs_per_task_and_draw():
    arms = {arm: compose_job("pac_glue_table_cpu", [f"pac_arm={arm}"])
            for arm in sweep_params("pac_glue_table_cpu")["pac_arm"]}
    lrs = {arm: (cfg.method.name, cfg.trainer.lr, cfg.method.get("new_lr"), cfg.method.get("arm"))
           for arm, cfg in arms.items()}
    assert lrs == {"pac_intended": ("pac", 5e-5, 1e-2, "intended"),
                   "pac_as_published": ("pac", 1e-2, 1e-2, "as_published"),
                   "full_ft_intended": ("full_ft", 5e-5, 1e-2, None),
                   "full_ft_as_published": ("full_ft", 1e-2, 1e-2, None),
                   "linear_probe": ("linear_probe", 1e-2, None, None)}
    for arm, cfg in arms.items():
        assert cfg.pac_arm == arm
        assert (cfg.model.head, cfg.model.dropout, cfg.model.name) == ("cls_linear", 0.0, "minilm-l6")
        assert (cfg.trainer.epochs, cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.data.max_train_samples) == (
            250, None, 100, 100)
        assert (cfg.trainer.schedule, cfg.trainer.weight_decay, cfg.trainer.max_grad_norm) == ("constant", 0.01, None)
        assert cfg.analysis.dynamics
    assert arms["pac_intended"].method.stage1_epochs == 200 and arms["full_ft_intended"].method.freeze_embeddings
    params = sweep_params("pac_glue_table_cpu")
    assert len(params["task"]) >= 2 and params["data.seed"] == ["1", "2", "3"]


def test_graft_cpu_fine_tunes_by_sgd_with_a_fixed_head_and_sweeps_the_sparsity():
    cfg = compose_job("graft_lmbff_table_cpu", [])
    t = cfg.trainer
    assert (t.optimizer, t.lr, t.schedule, t.batch_size, t.max_steps, t.eval_every, t.weight_decay) == (
        "sgd", 1e-3, "constant", 2, 1000, 100, 1e-4)
    assert (cfg.model.head, cfg.method.head, cfg.task.prompt) == ("cls_linear", "probe", None)
    assert (cfg.method.sparsity, cfg.method.mask_steps, cfg.method.mask_lr) == (1e-7, 100, 1e7)
    assert list(cfg.method.sparsity_sweep) == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    assert sweep_params("graft_lmbff_table_cpu")["data.seed"] == ["13", "21", "42", "87", "100"]
