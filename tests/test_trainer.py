"""The training loop: its learning-rate schedules, read from the optimizer as the loop steps; its step, with
the optimizer's fused kernel, one read of the loss, and `trainer.compile`; its evaluation in
token-budget batches, in the order of the set."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from sift_cli.errors import SiftError, TrainingDiverged
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


@pytest.mark.parametrize("kind, reference_class", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_the_optimizer_is_fused_and_steps_as_torchs_per_tensor_one_does(tmp_path, kind, reference_class):
    job = make_job(tmp_path, [*FAST, "method=full_ft", "trainer.weight_decay=0.1", "trainer.lr=1e-2",
                              f"trainer.optimizer={kind}"])
    trainer = job.trainer
    trainer.ensure_optimizer()
    fused = trainer.optimizer.optimizer
    assert type(fused) is reference_class and fused.defaults["fused"] is True
    model = trainer.unwrapped_model
    # the reference: torch's per-tensor loop on a copy, with the same groups (decay and no decay)
    twin = copy.deepcopy(model)
    twin_params = dict(twin.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
               "params": [twin_params[names[id(p)]] for p in g["params"]]} for g in fused.param_groups]
    reference = reference_class(groups, foreach=False, fused=False)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert {g["weight_decay"] for g in fused.param_groups} == {0.0, 0.1}
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        for name, param in model.named_parameters():
            grad = torch.randn(param.shape, generator=generator)
            param.grad, twin_params[name].grad = grad.clone(), grad.clone()
        trainer.optimizer.step()
        reference.step()
    for name, param in model.named_parameters():
        assert torch.allclose(param, twin_params[name], rtol=1e-5, atol=1e-7), name
        assert not torch.equal(param, initial[name]), name


def test_trainer_fused_optimizer_false_keeps_torchs_default(tmp_path):
    job = make_job(tmp_path, [*FAST, "method=lora", "trainer.fused_optimizer=false"])
    job.trainer.ensure_optimizer()
    assert not job.trainer.optimizer.optimizer.defaults["fused"]


def test_a_loss_that_is_not_finite_stops_the_run_at_that_step(tmp_path):
    job = make_job(tmp_path, [*FAST, "method=full_ft"])
    trainer = job.trainer
    trainer.ensure_optimizer()
    loss, stepped = trainer.micro_step(trainer.next_batch())
    assert stepped and trainer.step == 1 and loss > 0
    with torch.no_grad():
        trainer.unwrapped_model.classifier.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="became nan at step 2"):
        trainer.micro_step(trainer.next_batch())
    assert trainer.step == 1  # the diverged step is not counted


def _trained(tmp_path, overrides):
    """A run's trainable state before and after its three steps, and the run."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = make_job(tmp_path, [*FAST, *overrides])
    before = job.method.trainable_state(job.trainer.unwrapped_model)
    job.fit()
    return before, job.method.trainable_state(job.trainer.unwrapped_model), job


def _stepped(tmp_path, overrides, steps=3):
    """The losses of a run's first `steps` optimizer steps, its trainable state after them, and the run."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = make_job(tmp_path, [*FAST, *overrides])
    trainer = job.trainer
    trainer.ensure_optimizer()
    losses = [trainer.micro_step(trainer.next_batch())[0] for _ in range(steps)]
    return losses, job.method.trainable_state(trainer.unwrapped_model), job


def test_a_compiled_run_trains_as_the_eager_run_does(tmp_path):
    """torch.compile with its default backend (inductor) on the real loop: with dropout off, the same losses
    step by step and the same weights, to float rounding (inductor fuses and reorders the arithmetic)."""
    no_dropout = ["method=full_ft", "model.dropout=0.0"]
    eager_losses, eager, _ = _stepped(tmp_path / "eager", no_dropout)
    torch._dynamo.reset()
    losses, compiled, job = _stepped(tmp_path / "compiled", [*no_dropout, "trainer.compile=true"])
    assert job.trainer.unwrapped_model._compiled_call_impl is not None  # compiled in place, names unchanged
    assert set(compiled) == set(eager)
    assert eager_losses[0] != eager_losses[2]  # the steps moved the weights
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, value in eager.items():
        assert torch.allclose(value, compiled[name], atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "sift", "prefix"])
def test_methods_with_their_own_machinery_train_compiled_as_they_train_eagerly(tmp_path, method, monkeypatch):
    """peft's wrapper, SIFT's autograd function and a forward pre-hook with keyword arguments, captured by
    dynamo (aot_eager: the same graphs without inductor's code generation, which the test above covers). With
    dropout off, the compiled run's weights are the eager run's."""
    no_dropout = ["+model.config.hidden_dropout_prob=0.0", "+model.config.attention_probs_dropout_prob=0.0"]
    overrides = [f"method={method}", *no_dropout, *(["method.dropout=0.0"] if method == "lora" else [])]
    _, eager, _ = _trained(tmp_path / "eager", overrides)
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    _, compiled, job = _trained(tmp_path / "compiled", [*overrides, "trainer.compile=true"])
    assert job.trainer.unwrapped_model._compiled_call_impl is not None
    for name, value in eager.items():
        assert torch.allclose(value, compiled[name], atol=1e-5), name


def forward_shapes(model) -> tuple[list, object]:
    """The input_ids shapes the model sees, recorded by a forward pre-hook (and the hook, to remove)."""
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    return shapes, hook


@pytest.mark.parametrize("budget", [1, 40, 200, 100000])
def test_predictions_are_those_of_each_row_alone_in_the_order_of_the_set(tmp_path, budget):
    job = make_job(tmp_path, [*FAST, "task=glue/mrpc", "method=lora", f"trainer.eval_tokens={budget}"])
    trainer, dataset = job.trainer, job.data.tests[0].dataset
    model = trainer.unwrapped_model
    with torch.no_grad():  # LoRA's B is zero at the start: make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    shapes, hook = forward_shapes(model)
    logits, labels = trainer.predict(job.data.tests[0])
    hook.remove()
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(**job.data.collator([dataset[i]])).logits for i in range(len(dataset))])
    assert labels.tolist() == dataset.with_format(None)["labels"]
    assert logits == pytest.approx(alone, abs=1e-5)
    assert sum(rows for rows, _ in shapes) == len(dataset)
    assert all(rows * width <= budget or rows == 1 for rows, width in shapes)
    widths = [width for _, width in shapes]
    assert widths == sorted(widths, reverse=True)  # the longest rows first
    if budget == 1:
        assert len(shapes) == len(dataset)
    if budget == 100000:
        assert len(shapes) == 1


def test_eval_batch_size_still_caps_the_rows(tmp_path):
    job = make_job(tmp_path, [*FAST, "task=glue/mrpc", "trainer.eval_batch_size=3"])
    shapes, hook = forward_shapes(job.trainer.unwrapped_model)
    job.trainer.predict(job.data.tests[0])
    hook.remove()
    assert max(rows for rows, _ in shapes) == 3 and sum(rows for rows, _ in shapes) == len(job.data.tests[0].dataset)


@pytest.mark.parametrize("kind, method", [("classifier", "full_ft"), ("classifier", "sift"), ("classifier", "prefix"),
                                          ("causal_lm", "full_ft"), ("causal_lm", "lora")])
def test_micro_batches_give_the_whole_batchs_gradient(tmp_path, kind, method):
    """trainer.train_tokens=1 runs each row alone; the summed gradient is autograd's of the whole batch's loss
    (a language model's mean over every labelled token of the batch, not a mean of the rows' means)."""
    from sift_cli.batching import micro_batches
    from tests.tasks.instruct_helpers import instruct_overrides, make_data_root

    common = ["trainer.train_tokens=1", "model.dropout=0.0", "trainer.max_grad_norm=null", f"method={method}"]
    overrides = ([*instruct_overrides(make_data_root(tmp_path / "data")), "trainer.batch_size=4"]
                 if kind == "causal_lm" else [*FAST, "task=glue/mrpc", "trainer.batch_size=4"])
    if method == "lora":
        common.append("method.dropout=0.0")
    job = make_job(tmp_path, [*overrides, *common])
    trainer = job.trainer
    trainer.ensure_optimizer()
    model = trainer.unwrapped_model
    batch = trainer.next_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    assert len(micro_batches(batch, trainer.micro_batch_tokens(batch["input_ids"].shape[-1]))) > 1
    if kind == "causal_lm":  # rows hold different numbers of labelled tokens, so the weighting matters
        assert len(set((batch["labels"][:, 1:] != -100).sum(1).tolist())) > 1
    summed = []
    trainer.gradient_callbacks.append(lambda t: summed.extend(p.grad.clone() if p.grad is not None else None
                                                              for p in params))
    trainer.micro_step(batch)
    for expected, got in zip(reference, summed):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
