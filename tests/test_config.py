"""Every model x task x method composes; out-of-range values are refused before any work."""

import copy
import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from sift_cli.config import available_options, validate
from sift_cli.errors import SiftError
from tests.conftest import compose_config

MODELS = available_options("model")
TASKS = available_options("task")
METHODS = available_options("method")


def test_groups_hold_the_required_choices():
    assert {"minilm-l6", "bert-base-uncased", "roberta-base", "roberta-large", "tiny-bert"} <= set(MODELS)
    glue = {f"glue/{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")}
    assert glue <= set(TASKS)
    assert {"full_ft", "lora", "bitfit"} <= set(METHODS)


@pytest.fixture(scope="module")
def single_choices():
    """Each option of each group, composed by Hydra on top of the defaults."""
    return {(group, name): compose_config([f"{group}={name}"])[group]
            for group, names in (("model", MODELS), ("task", TASKS), ("method", METHODS)) for name in names}


@pytest.mark.parametrize("group, names", [("model", MODELS), ("task", TASKS), ("method", METHODS)])
def test_every_option_composes_and_validates(group, names):
    for name in names:
        cfg = compose_config([f"{group}={name}"])
        validate(cfg)
        assert cfg[group].name == name.split("/")[-1]


def test_every_model_task_method_combination_resolves_and_validates(single_choices):
    """Groups are independent files: the cross product is the default config with the three nodes swapped
    in, which checks that every interpolation across groups resolves and every value is in range."""
    base = compose_config()
    for model in MODELS:
        for task in TASKS:
            for method in METHODS:
                cfg = copy.deepcopy(base)
                with open_dict(cfg):
                    cfg.model = single_choices["model", model]
                    cfg.task = single_choices["task", task]
                    cfg.method = single_choices["method", method]
                OmegaConf.resolve(cfg)
                validate(cfg)
                assert cfg.task.main_metric in cfg.task.metrics or cfg.task.kind != "classification"


def test_a_sample_of_combinations_composes_with_hydra():
    for model, task, method in zip(MODELS, TASKS * 3, METHODS * 3):
        cfg = compose_config([f"model={model}", f"task={task}", f"method={method}"])
        validate(cfg)
        assert (cfg.model.name, cfg.method.name) == (model, method)


def test_task_files_state_their_protocol():
    stsb = compose_config(["task=glue/stsb"]).task
    assert stsb.num_labels == 1 and stsb.main_metric == "pearson"
    mnli = compose_config(["task=glue/mnli"]).task
    assert dict(mnli.eval_splits) == {"validation_matched": "", "validation_mismatched": "_mm"}
    assert compose_config(["task=glue/cola"]).task.main_metric == "matthews_correlation"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.k_shot=-1", "data.k_shot"),
        ("data.k_shot=0", "data.k_shot"),
        ("trainer.lr=0", "trainer.lr"),
        ("trainer.lr=-1e-3", "trainer.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio"),
        ("trainer.select_on=best", "trainer.select_on"),
        ("trainer.schedule=cosine", "trainer.schedule must be one of linear, constant, linear_nominal"),
        ("trainer.schedule=linear_nominal", "trainer.schedule=linear_nominal needs trainer.nominal_epochs > 0"),
        ("trainer.nominal_epochs=100", "trainer.nominal_epochs=100 is used only by trainer.schedule=linear_nominal"),
        ("seed=-3", "seed"),
        ("trainer.optimizer=adam", "trainer.optimizer must be one of adamw, sgd"),
        ("trainer.compile=yes", "trainer.compile must be true or false"),
        ("trainer.fused_optimizer=1", "trainer.fused_optimizer must be true or false"),
    ],
)
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(SiftError, match=message):
        validate(compose_config([override]))


def test_configs_are_found_from_any_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sift_cli.run", "--cfg", "job", "method=lora"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: lora" in out.stdout and "name: minilm-l6" in out.stdout
