"""PAC-tuning: the bound's pieces against hand computations, noise confined to training steps, the two
stages, resuming, other bases, and a short run on real few-shot data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sift_cli.errors import Interrupted, SiftError
from sift_cli.methods import METHODS, Method, ModelContext, build_method
from sift_cli.methods.pac import gaussian_kl, interpolate, moment_constant
from sift_cli.run import Job
from sift_cli.tasks.classification import EvalSet
from sift_cli.tracking import Recorder
from tests.conftest import FIXTURES, compose_config

QUICK_K = ["method.k_samples=2", "method.k_prior_points=2"]


def _hand_kl(mean, mean0, log_std, prior_log_std) -> float:
    """KL(N(mean, σq²) ‖ N(mean0, σp²)) per entry: ln(σp/σq) + (σq² + (mean - mean0)²) / (2σp²) - 1/2."""
    sp = math.exp(prior_log_std)
    total = 0.0
    for m, m0, lq in zip(mean, mean0, log_std):
        sq = math.exp(lq)
        total += math.log(sp / sq) + (sq**2 + (m - m0) ** 2) / (2 * sp**2) - 0.5
    return total


def test_kl_matches_the_gaussian_formula_by_hand():
    weight, init = torch.tensor([[0.3, -0.1], [0.2, 0.05]]), torch.tensor([[0.25, 0.0], [0.2, -0.05]])
    log_std, prior = torch.tensor([[-2.0, -1.5], [-3.0, -2.5]]), torch.tensor(-2.2)
    expected = _hand_kl(weight.flatten().tolist(), init.flatten().tolist(), log_std.flatten().tolist(), -2.2)
    assert gaussian_kl(weight, init, log_std, prior).item() == pytest.approx(expected, rel=1e-6)

    # The method's KL: the sum over its tensors, each against its own prior scale.
    model = torch.nn.Linear(2, 2)
    method = build_method(compose_config(["method=pac"]).method)
    method.prepare(model, ModelContext(new_params={"bias"}))
    weight_t, bias_t = sorted(method.tensors, key=lambda t: t.name, reverse=True)
    assert (weight_t.name, weight_t.is_new, bias_t.name, bias_t.is_new) == ("weight", False, "bias", True)
    with torch.no_grad():
        model.weight.copy_(weight_t.init + torch.tensor([[0.1, -0.2], [0.0, 0.3]]))
        model.bias.copy_(bias_t.init + torch.tensor([0.05, -0.05]))
        weight_t.log_std.copy_(torch.tensor([[-1.0, -2.0], [-1.5, -0.5]]))
        bias_t.log_std.copy_(torch.tensor([-2.0, -1.0]))
        method.prior_log_std[False].fill_(-1.2)
        method.prior_log_std[True].fill_(-0.7)
    expected = (_hand_kl(model.weight.flatten().tolist(), weight_t.init.flatten().tolist(),
                         weight_t.log_std.flatten().tolist(), -1.2)
                + _hand_kl(model.bias.tolist(), bias_t.init.tolist(), bias_t.log_std.tolist(), -0.7))
    assert method.kl().item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_at_initialisation():
    model = torch.nn.Linear(3, 2)
    method = build_method(compose_config(["method=pac"]).method)
    method.prepare(model, ModelContext(new_params={"bias"}))
    assert method.kl().item() == 0.0
    pretrained_scale = model.weight.detach().abs().mean().item()
    assert method.tensors[0].log_std[0, 0].item() == pytest.approx(2 * math.log(pretrained_scale), rel=1e-5)


def test_K_solves_the_moment_condition_and_is_interpolated():
    # Two losses 0 and 2 around their mean 1: mean(exp(γ(μ - ℓ))) = cosh γ = exp(3/2 γ² K²).
    assert moment_constant(torch.tensor([[0.0, 2.0]]), [1.0]) == pytest.approx(math.sqrt(math.log(math.cosh(1)) / 1.5))
    # The largest K over the γ grid counts.
    both = moment_constant(torch.tensor([[0.0, 2.0]]), [1.0, 3.0])
    assert both == pytest.approx(max(math.sqrt(math.log(math.cosh(g)) / (1.5 * g * g)) for g in (1.0, 3.0)))
    knots, values = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 4.0])
    for x, expected in ((0.5, 1.0), (1.5, 2.0), (3.0, 3.5), (5.0, 4.5)):
        assert interpolate(torch.tensor(x), knots, values).item() == pytest.approx(expected)


def _setup(tmp_path: Path, overrides: list[str], data_dir: Path):
    cfg = compose_config(["method=pac", "model=tiny-bert", f"data.dir={data_dir}", "logger.mode=disabled",
                          "trainer.select_on=last", *QUICK_K, *overrides])
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = Job(cfg, tmp_path, None)
    job.setup()
    trainer = job.make_trainer(Recorder(tmp_path, cfg.logger, "test", None, {}, True))
    return job, trainer


def test_noise_is_injected_in_training_steps_only(tmp_path, fixture_data):
    job, trainer = _setup(tmp_path, ["data.k_shot=4", "trainer.batch_size=8", "trainer.max_steps=3",
                                     "method.stage1_epochs=2"], fixture_data)
    method, model = job.method, trainer.model
    assert method.summary()["dropouts_disabled"] > 0
    batch = next(iter(DataLoader(job.data.tests[0].dataset, batch_size=8, collate_fn=job.data.collator)))

    def clean_logits(train_mode: bool):
        model.train(train_mode)
        with torch.no_grad():
            return model(**batch).logits

    before = clean_logits(False)
    assert torch.equal(before, clean_logits(False))
    assert torch.equal(before, clean_logits(True))  # dropout is off: training mode alone changes nothing

    method.fit(trainer.loop)
    assert method.stage == 2
    first, second = trainer.predict(job.data.tests[0]), trainer.predict(job.data.tests[0])
    assert torch.equal(first[0], second[0])
    assert torch.allclose(first[0], clean_logits(True), atol=1e-6)
    with torch.no_grad():  # predictions do not depend on the noise scales at all
        for t in method.tensors:
            t.log_std.add_(3.0)
    assert torch.equal(trainer.predict(job.data.tests[0])[0], first[0])
    # ... while two training losses at the same weights differ: the noise lives in training_loss only.
    train_batch = trainer.next_batch()
    with torch.no_grad():
        clean = model(**train_batch).loss
        noisy = [method.training_loss(trainer, train_batch) for _ in range(2)]
    assert noisy[0] != noisy[1] and clean != noisy[0]


def test_noise_scales_learn_in_stage_1_and_stay_frozen_in_stage_2(tmp_path, fixture_data):
    job, trainer = _setup(tmp_path, ["data.k_shot=4", "trainer.batch_size=4", "trainer.max_steps=5",
                                     "method.stage1_epochs=1"], fixture_data)
    method = job.method
    assert trainer.steps_per_epoch == 2
    snapshots = []
    train = trainer.train

    def snapshot_then_train(until_step=None):
        snapshots.append(([t.log_std.detach().clone() for t in method.tensors],
                          [t.weight.detach().clone() for t in method.tensors]))
        train(until_step)

    trainer.train = snapshot_then_train
    method.fit(trainer.loop)
    final_p = [t.log_std.detach() for t in method.tensors]
    final_theta = [t.weight.detach() for t in method.tensors]
    (p0, _), (p1, theta1) = snapshots
    assert trainer.step == 5 and method.summary()["stage1_steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(p0, p1)), "p did not learn in stage 1"
    assert all(torch.equal(a, b) for a, b in zip(p1, final_p)), "p changed in stage 2"
    assert any(not torch.equal(a, b) for a, b in zip(theta1, final_theta)), "θ did not train in stage 2"
    assert all(not t.log_std.requires_grad for t in method.tensors)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bound_steps = [r["step"] for r in records if r.get("pac_stage") == 1]
    assert bound_steps == [1, 2]
    end = method.summary()["end_of_stage1"]
    expected = end["pac_train_loss"] + 1.5 * end["pac_gamma"] * end["pac_K"] ** 2 + (
        end["pac_kl"] + 10 + 3 * len(method.tensors)) / (len(job.data.train) * end["pac_gamma"])
    assert end["step"] == 2 and end["pac_bound"] == pytest.approx(expected, rel=1e-5)


RESUME = ["data.k_shot=4", "trainer.batch_size=4", "trainer.max_steps=4", "method.stage1_epochs=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """θ and p at the end of a run that was never stopped."""
    job, trainer = _setup(tmp_path_factory.mktemp("whole"), RESUME, FIXTURES)
    job.method.fit(trainer.loop)
    return [(t.weight.detach().clone(), t.log_std.detach().clone()) for t in job.method.tensors]


@pytest.mark.parametrize("stop_at", [1, 3], ids=["in-stage-1", "in-stage-2"])
def test_a_resumed_run_continues_exactly(tmp_path, fixture_data, stop_at, uninterrupted):
    checkpoint = tmp_path / "stopped" / "checkpoint"
    job, trainer = _setup(tmp_path / "stopped", RESUME, fixture_data)
    step_noise = job.method.after_optimizer_step

    def stop_after(run):
        step_noise(run)
        if run.step == stop_at:
            trainer.stop_requested = "test"

    job.method.after_optimizer_step = stop_after
    with pytest.raises(Interrupted):
        job.method.fit(trainer.loop)
    job, trainer = _setup(tmp_path / "resumed", RESUME, fixture_data)
    trainer.load_state_dict(torch.load(checkpoint / "state.pt", weights_only=False))
    assert (trainer.step, job.method.stage) == (stop_at, 1 if stop_at < 2 else 2)
    job.method.fit(trainer.loop)
    for t, (weight, log_std) in zip(job.method.tensors, uninterrupted):
        assert torch.equal(t.weight, weight) and torch.equal(t.log_std, log_std), t.name
    assert job.method.summary()["end_of_stage1"]["step"] == 2


def test_pac_on_a_lora_base(tmp_path, fixture_data):
    cfg = compose_config(["method=pac", "method@method.base=lora", "model=tiny-bert", f"data.dir={fixture_data}",
                          "data.k_shot=4", "logger.mode=disabled", "trainer.batch_size=8", "trainer.max_steps=3",
                          "method.stage1_epochs=2", *QUICK_K])
    job = Job(cfg, tmp_path, None)
    job.setup()
    names = [t.name for t in job.method.tensors]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert all(("lora_" in n) or ("classifier" in n) for n in names)
    trainable = job.method.count_trainable(job.model)
    assert trainable == sum(t.weight.numel() for t in job.method.tensors)
    frozen = {n: p.detach().clone() for n, p in job.model.named_parameters() if not p.requires_grad}
    lora_p = {t.name: t.log_std.detach().clone() for t in job.method.tensors}
    results = job.run()
    assert results["status"] == "completed"
    info = results["method_info"]
    assert info["base"] == "lora" and info["noise_params"] == trainable == results["trainable_params"]
    assert info["end_of_stage1"]["pac_bound"] > 0
    assert all(torch.equal(p, dict(job.model.named_parameters())[n]) for n, p in frozen.items())
    assert any(not torch.equal(t.log_std, lora_p[t.name]) for t in job.method.tensors if "lora_" in t.name)


class IncrementMethod(Method):
    """A sparse method in the shape of index/value increments: its state is not whole trainable tensors."""

    name = "toy_increments"

    def trainable_state(self, model):
        return {}

    def after_optimizer_step(self, trainer):
        pass


def test_an_ill_defined_base_is_refused(monkeypatch):
    monkeypatch.setitem(METHODS, IncrementMethod.name, IncrementMethod)
    cfg = compose_config(["method=pac"]).method
    cfg.base = {"name": "toy_increments"}  # a registered method with no config file
    with pytest.raises(SiftError, match="base 'toy_increments' cannot carry noise: it overrides "
                                        "after_optimizer_step, trainable_state") as err:
        build_method(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(SiftError, match="method.base must name another method"):
        build_method(compose_config(["method=pac", "method@method.base=pac"]).method)
    cfg.base = {"name": "nope"}
    with pytest.raises(SiftError, match="method.base: unknown method 'nope'"):
        build_method(cfg)


def test_instruction_tuning_is_refused_at_set_up():
    cfg = compose_config(["method=pac", "task=instruct/alpaca", "model=tiny-llama"])
    with pytest.raises(SiftError, match="method=pac needs a task with one prediction per example"):
        build_method(cfg.method, cfg)


def test_bad_constants_are_one_line_errors():
    with pytest.raises(SiftError, match="method.stage1_epochs must be a non-negative integer"):
        build_method(compose_config(["method=pac", "method.stage1_epochs=-1"]).method)
    with pytest.raises(SiftError, match="method.gamma_min .* exceeds method.gamma_max"):
        build_method(compose_config(["method=pac", "method.gamma_min=20"]).method)


def test_the_published_setting_composes():
    cfg = compose_config(["experiment=pac_glue", "data.k_shot=null", "data.max_train_samples=100"])
    assert cfg.method.name == "pac" and cfg.method.base.name == "full_ft" and cfg.method.freeze_embeddings
    assert (cfg.trainer.epochs, cfg.trainer.max_steps, cfg.method.stage1_epochs) == (250, None, 200)
    assert (cfg.trainer.batch_size, cfg.data.max_train_samples, cfg.task.max_length) == (100, 100, 128)


@pytest.mark.slow
def test_a_short_run_on_real_few_shot_data_learns(tmp_path, real_data):
    """MiniLM on 8 real SST-2 examples, whole-set batches: one stage-1 step, three of stage 2; the clean
    (noise-free) training loss falls. K from one random model, to fit the time of a unit test."""
    job, trainer = _setup(tmp_path, ["model=minilm-l6", "data.k_shot=4", "trainer.batch_size=8",
                                     "trainer.max_steps=4", "method.stage1_epochs=1", "trainer.lr=1e-4",
                                     "method.new_lr=1e-2", "task.max_length=64", "method.k_samples=1",
                                     "method.k_prior_points=1", "method.k_log_prior_std=[-4,-4]"], real_data)
    train = EvalSet("train", "", job.data.train)

    def clean_train_loss():
        logits, labels = trainer.predict(train)
        return F.cross_entropy(logits, labels).item()

    before = clean_train_loss()
    job.method.fit(trainer.loop)
    after = clean_train_loss()
    assert after < before - 0.1, (before, after)
    assert math.isfinite(job.method.summary()["end_of_stage1"]["pac_bound"])


# ---- the arms' learning rates, and the bound's pull on θ -------------------------------------------------
@pytest.mark.parametrize("arm", ["intended", "as_published"])
def test_each_arm_trains_theta_at_its_learning_rates(tmp_path, fixture_data, arm):
    job, trainer = _setup(tmp_path, ["model.head=cls_linear", "data.k_shot=4", "trainer.max_steps=2",
                                     "method.stage1_epochs=1", "trainer.lr=5e-5", "method.new_lr=1e-2",
                                     f"method.arm={arm}"], fixture_data)
    trainer.ensure_optimizer()
    model = trainer.unwrapped_model
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    head = {"classifier.weight", "classifier.bias"}
    embeddings = {n for n, _ in model.named_parameters() if ".embeddings." in n}
    assert set(lr_of) == set(names.values()) - embeddings  # the embeddings stay frozen, as published
    body_lr = 5e-5 if arm == "intended" else 1e-2
    assert all(lr_of[n] == (1e-2 if n in head else body_lr) for n in lr_of), lr_of
    # p and b: their own Adam; pre-trained tensors at noise_lr / prior_lr, the head at new_noise_lr x 50
    noise = {}
    for group in job.method.own_optimizers()[0].param_groups:
        for p in group["params"]:
            noise[id(p)] = group["lr"]
    for t in job.method.tensors:
        assert noise[id(t.log_std)] == (0.01 * 50 if t.name in head else 0.1), t.name
    assert noise[id(job.method.prior_log_std[False])] == 0.1 and noise[id(job.method.prior_log_std[True])] == 0.5


def test_the_bound_pulls_theta_itself_towards_theta0():
    """d bound / d θ by autograd is the KL's pull (θ - θ0) e^{-2b} / (n γ): the bound reaches the trained θ,
    not a detached copy (γ is fixed at 10, so it carries no gradient)."""
    model = torch.nn.Linear(4, 3)
    method = build_method(compose_config(["method=pac"]).method)
    method.prepare(model, ModelContext(new_params={"bias"}))
    method.k_prior_std, method.k_values = torch.tensor([1e-3, 1e-1], dtype=torch.float64), torch.tensor([0.2, 0.4])
    shift = {"weight": torch.randn(3, 4) * 0.01, "bias": torch.randn(3) * 0.01}
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(shift[name])
    n = 100
    method.bound_terms(n).complexity.backward()
    for t in method.tensors:
        b = method.prior_log_std[t.is_new][t.prior_index].item()
        expected = shift[t.name].double() * math.exp(-2 * b) / (n * 10.0)
        assert t.weight.grad is not None, t.name
        assert torch.allclose(t.weight.grad.double(), expected, rtol=1e-4), t.name
