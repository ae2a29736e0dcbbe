"""Which parameters full fine-tuning, BitFit and LoRA train, and how many."""

import pytest
import torch

from sift_cli.methods import METHODS, ModelContext, build_method
from sift_cli.models import load_tokenizer
from sift_cli.tasks.classification import ClassificationTask
from tests.conftest import compose_config


def prepared(method: str, *overrides: str):
    cfg = compose_config(["model=tiny-bert", f"method={method}", *overrides])
    task = ClassificationTask(cfg, load_tokenizer(cfg.model))
    loaded = task.load_model(cfg.model, seed=0)
    m = build_method(cfg.method)
    model = m.prepare(loaded.model, ModelContext(new_params=loaded.new_params))
    return m, model, loaded


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_methods_are_registered_by_name():
    assert {"full_ft", "lora", "bitfit"} <= set(METHODS)


def test_full_ft_trains_everything():
    m, model, loaded = prepared("full_ft")
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    assert m.count_trainable(model) == loaded.total_params


def test_bitfit_trains_biases_and_the_new_head_only():
    m, model, loaded = prepared("bitfit")
    names = trainable(model)
    assert loaded.new_params == {"classifier.weight", "classifier.bias"}
    assert names == {n for n, _ in model.named_parameters() if n.endswith(".bias")} | loaded.new_params
    expected = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert m.count_trainable(model) == expected < loaded.total_params / 10


def test_bitfit_on_a_model_without_biases_is_refused():
    from sift_cli.errors import SiftError
    from sift_cli.models import load_causal_lm

    cfg = compose_config(["model=tiny-llama", "method=bitfit"])
    loaded = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=0)
    with pytest.raises(SiftError, match="method=bitfit has nothing to train: LlamaForCausalLM has no bias terms"):
        build_method(cfg.method).prepare(loaded.model, ModelContext(new_params=set(), task_kind="instruct"))


def test_lora_trains_low_rank_factors_and_the_head():
    m, model, _ = prepared("lora", "method.r=4", "method.target_modules=[query,value]")
    names = trainable(model)
    lora = [n for n in names if "lora_" in n]
    assert lora and all(".query." in n or ".value." in n for n in lora)
    assert any("classifier" in n for n in names)  # the task head trains densely
    assert not any("embeddings" in n or ".key." in n for n in names)
    # 2 layers x 2 modules x (A: r x 32 + B: 32 x r) + the head (2 x 32 + 2)
    assert m.count_trainable(model) == 2 * 2 * (4 * 32 + 32 * 4) + 2 * 32 + 2


def test_lora_starts_from_the_pretrained_function():
    _, model, loaded = prepared("lora")
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        model.disable_adapter_layers()
        base = model(**batch).logits
    torch.testing.assert_close(adapted, base)  # B is zero-initialised


def test_unknown_method_lists_the_valid_ones():
    cfg = compose_config(["method=lora"])
    cfg.method.name = "nope"
    with pytest.raises(Exception, match="unknown method 'nope'; choose from: .*lora"):
        build_method(cfg.method)


def test_lora_trains_a_two_layer_head_on_roberta():
    cfg = compose_config(["model=tiny-roberta", "method=lora"])
    task = ClassificationTask(cfg, load_tokenizer(cfg.model))
    loaded = task.load_model(cfg.model, seed=0)
    model = build_method(cfg.method).prepare(loaded.model, ModelContext(new_params=loaded.new_params))
    batch = {"input_ids": torch.tensor([[0, 2023, 2003, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([1])}
    model(**batch).loss.backward()
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert {"dense", "out_proj"} <= {n.split(".")[-2] for n, p in model.named_parameters()
                                       if "classifier" in n and p.requires_grad}
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def test_full_ft_matched_to_pac_trains_the_head_at_its_own_rate_and_leaves_the_embeddings():
    m, model, loaded = prepared("full_ft", "method.new_lr=1e-2", "method.freeze_embeddings=true")
    names = trainable(model)
    assert names == {n for n, _ in model.named_parameters() if ".embeddings." not in n}
    groups = m.param_groups(model, weight_decay=0.01)
    lr_of = {id(p): g.get("lr") for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert lr_of[id(param)] == (1e-2 if name in loaded.new_params else None), name  # None: trainer.lr
            assert decay_of[id(param)] == (0.0 if name.endswith("bias") or "LayerNorm" in name else 0.01), name


def test_a_linear_probe_trains_the_new_head_only():
    m, model, loaded = prepared("linear_probe")
    assert trainable(model) == loaded.new_params == {"classifier.weight", "classifier.bias"}


def test_sgd_takes_plain_gradient_steps_for_any_method(tmp_path):
    """trainer.optimizer=sgd: θ - lr (g + wd θ) on the decayed tensors, θ - lr g on the others, no momentum
    (SIFT's selected entries are decayed only with method.decay=weights)."""
    from tests.conftest import FAST, make_job

    for method, settings in (("full_ft", []), ("sift", ["method.sparse_rate=0.05", "method.decay=weights"]),
                             ("sift", ["method.sparse_rate=0.05"])):
        run_dir = tmp_path / f"{method}-{len(settings)}"
        run_dir.mkdir()
        job = make_job(run_dir, [*FAST, f"method={method}", *settings, "trainer.optimizer=sgd",
                                           "trainer.lr=0.5", "trainer.weight_decay=0.1", "trainer.schedule=constant",
                                           "trainer.warmup_ratio=0", "trainer.max_grad_norm=null"])
        trainer = job.trainer
        trainer.ensure_optimizer()
        assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.SGD)
        model = trainer.unwrapped_model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {}
        trainer.gradient_callbacks.append(lambda t: grads.update({n: p.grad.clone() for n, p in params.items()}))
        trainer.train(until_step=1)
        for n, p in params.items():
            undecayed = (n.endswith("bias") or "LayerNorm" in n
                         or (n.endswith(".values") and job.cfg.method.decay == "none"))
            decay = 0.0 if undecayed else 0.1
            expected = before[n] - 0.5 * (grads[n] + decay * before[n])
            assert torch.allclose(p.detach(), expected, atol=1e-6), (method, n)
