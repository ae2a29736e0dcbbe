"""The model settings every method sees: `model.head=cls_linear` (one new linear layer on the first token's
final hidden state, no pooler) and `model.dropout`."""

import math

import pytest
import torch

from sift_cli.config import validate
from sift_cli.errors import SiftError
from sift_cli.models import load_tokenizer, skeleton
from sift_cli.run import check_config
from sift_cli.tasks.classification import ClassificationTask
from tests.conftest import compose_config


def loaded(*overrides):
    cfg = compose_config(["model=tiny-bert", *overrides])
    return ClassificationTask(cfg, load_tokenizer(cfg.model)).load_model(cfg.model, seed=7), cfg


@pytest.mark.parametrize("model, prefix, head", [("tiny-bert", "bert", ["classifier.weight", "classifier.bias"]),
                                                 ("tiny-roberta", "roberta",
                                                  ["classifier.out.weight", "classifier.out.bias"])])
def test_the_cls_linear_head_is_one_linear_layer_on_the_first_token(model, prefix, head):
    record, cfg = loaded(f"model={model}", "model.head=cls_linear", "model.dropout=0.0")
    net, names = record.model.eval(), [n for n, _ in record.model.named_parameters()]
    assert record.new_params == set(head)
    assert not any("pooler" in n for n in names) and not any(n.startswith("classifier.dense") for n in names)
    assert record.total_params == sum(p.numel() for p in net.parameters())
    ids = torch.randint(5, 1000, (3, 9))
    with torch.no_grad():
        first = getattr(net, prefix)(input_ids=ids).last_hidden_state[:, 0]
        params = dict(net.named_parameters())
        expected = first @ params[head[0]].T + params[head[1]]
        assert torch.allclose(net(input_ids=ids).logits, expected, atol=1e-6)
    # initialised as torch.nn.Linear is, from the run's seed
    torch.manual_seed(7)
    reference = torch.nn.Linear(32, 2)
    assert torch.equal(params[head[0]], reference.weight) and torch.equal(params[head[1]], reference.bias)


def test_the_head_s_dropout_is_its_own_unless_model_dropout_sets_every_rate():
    record, _ = loaded("model.head=cls_linear", "model.head_dropout=0.3")
    rates = [m.p for m in record.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert record.model.dropout.p == 0.3 and 0.1 in rates  # the encoder keeps its configured 0.1
    record, _ = loaded("model.head=cls_linear", "model.dropout=0.0")
    assert all(m.p == 0.0 for m in record.model.modules() if isinstance(m, torch.nn.Dropout))
    record.model.train()
    ids = torch.randint(5, 1000, (2, 6))
    with torch.no_grad():
        assert torch.equal(record.model(input_ids=ids).logits, record.model(input_ids=ids).logits)


def test_the_default_head_is_left_as_it_was():
    record, _ = loaded()
    names = {n for n, _ in record.model.named_parameters()}
    assert "bert.pooler.dense.weight" in names and record.new_params == {"classifier.weight", "classifier.bias"}


def test_the_skeleton_has_the_same_parameters_as_the_loaded_model():
    record, cfg = loaded("model.head=cls_linear")
    assert {n for n, _ in skeleton(cfg.model).named_parameters()} == {n for n, _ in record.model.named_parameters()}


@pytest.mark.parametrize("overrides, message", [
    (["model.head=mlp"], "model.head must be one of default, cls_linear"),
    (["model.head_dropout=1.0"], r"model.head_dropout must be in \[0, 1\)"),
    (["model.dropout=-0.1"], r"model.dropout must be in \[0, 1\)"),
    (["model.head=cls_linear", "task.prompt={template: '*cls**sent_0*_It_was*mask*.*sep+*', "
                               "verbalizer: {0: terrible, 1: great}}"], "with a prompt"),
    (["model.head=cls_linear", "task=superglue/copa"], "needs a classification task"),
])
def test_bad_head_settings_are_one_line_errors(overrides, message):
    with pytest.raises(SiftError, match=message) as err:
        validate(compose_config(["model=tiny-bert", *overrides]))
    assert "\n" not in str(err.value)


def test_every_method_runs_on_the_cls_linear_head():
    for method in ("full_ft", "lora", "bitfit", "linear_probe", "sift", "pac", "graft"):
        check_config(compose_config(["model=tiny-bert", "model.head=cls_linear", f"method={method}"]))
    assert math.isclose(compose_config(["model=minilm-l6"]).model.head_dropout, 0.5)
