"""The contract between methods and the loop, for every registered method.

Each method runs two optimizer steps through the real loop on tiny-bert, and what it declares is checked
against what happens: the entries it says train are those its optimizer holds and the only ones that move,
the optimizer keeps AdamW's two moments per trained entry (and a method's own optimizer two per entry of
what it trains), and `sift-memory`'s plan of the method counts the same trainable and added entries as the
built model. Every bad setting below is refused before anything loads, in one line.
"""

import subprocess
import sys

import pytest
import torch

from sift_cli.errors import SiftError
from sift_cli.memory.measure import StepHarness
from sift_cli.memory.model import Parts, Setting, load_architecture
from sift_cli.methods import METHODS
from sift_cli.run import check_config
from tests.conftest import FAST, compose_config, make_job

# Settings that fit tiny-bert (2 layers, 32 wide) and two steps.
FITS = {
    "s4": ["method.groups=[1,1]", "method.assignment=[[adapter,lora],[prefix,bitfit]]", "method.budget=0.05"],
    "pac": ["method.k_samples=2", "method.k_prior_points=2", "method.stage1_epochs=1"],
    "graft": ["method.mask_steps=1", "method.sparsity=0.01"],
    "sam": ["method.burnin_steps=2", "method.sparse_rate=0.05"],
    "fisher": ["method.burnin_steps=2", "method.sparse_rate=0.05"],
    "magnitude": ["method.warmup_steps=2", "method.sparse_rate=0.05"],
    "diff_pruning": ["method.l0_steps=2", "method.sparse_rate=0.05"],
    "random_mask": ["method.sparse_rate=0.05"],
    "sift": ["method.sparse_rate=0.05"],
}
NOT_MODELLED = {"s4", "pac", "graft", "unipelt"}  # sift-memory says so (test_memory_plans_that_are_not_modelled_say_so)
# The sparse methods again on every tensor of the model (biases, LayerNorm, embeddings), SAM by its published
# rule, the others with weight decay on the selected increments or none.
ALL_PARAMS = {
    "sam": ["method.target_modules=all_params", "method.scope=per_tensor", "method.clip_burnin=true"],
    "fisher": ["method.target_modules=all_params", "method.clip_burnin=true", "method.decay=increment"],
    "magnitude": ["method.target_modules=all_params"],
    "random_mask": ["method.target_modules=all_params", "method.decay=none"],
    "diff_pruning": ["method.target_modules=all_params"],
    "sift": ["method.target_modules=all_params", "method.decay=increment"],
}
CASES = [pytest.param(name, [], id=name) for name in sorted(METHODS)] + [
    pytest.param(name, overrides, id=f"{name}-all_params") for name, overrides in sorted(ALL_PARAMS.items())]
PLANNED = [case for case in CASES if case.values[0] not in NOT_MODELLED]
EXPECTED_SIZE = {"random_mask"}  # a Bernoulli draw per entry: the plan counts its expected size


def two_steps(tmp_path, name, overrides=()):
    """A method's run on tiny-bert, its parameters before training, and its harness after two steps."""
    job = make_job(tmp_path, [*FAST, "task=glue/mrpc", f"method={name}", "trainer.max_steps=2",
                              "trainer.weight_decay=0.1", *FITS.get(name, []), *overrides])
    model = job.trainer.unwrapped_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    harness = StepHarness(job.trainer, batch=4, seq=16)
    for _ in range(2):
        harness.step()
    return job, before, harness


def trained_entries(optimizer) -> int:
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def moment_entries(optimizer) -> int:
    return sum(v.numel() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


@pytest.mark.parametrize("name, overrides", CASES)
def test_what_a_method_declares_is_what_the_loop_does(tmp_path, name, overrides):
    job, before, harness = two_steps(tmp_path, name, overrides)
    trainer, method = job.trainer, job.method
    model = trainer.unwrapped_model
    declared = method.count_trainable(model)
    assert declared == job.trainable_params > 0
    # the optimizer trains exactly the declared entries and keeps two moments for each
    assert trained_entries(trainer.optimizer) == declared
    assert moment_entries(trainer.optimizer) == 2 * declared
    for own in method.own_optimizers():  # PAC's noise and prior scales
        assert moment_entries(own) == 2 * trained_entries(own)
    # nothing outside the optimizer moves: a sparse layer's dense weight only where its entries are
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    # (a SparseEntries parametrization never writes into its tensor: the tensor must not move at all)
    sparse_weights = {id(m.weight): m.index for m in model.modules() if hasattr(m, "values") and hasattr(m, "index")
                      and hasattr(m, "weight")}
    moved = 0
    for n, p in model.named_parameters():
        changed = (p.detach() != before[n]).reshape(-1)
        if id(p) in in_optimizer:
            moved += int(changed.sum())
        elif id(p) in sparse_weights:
            allowed = torch.zeros_like(changed)
            allowed[sparse_weights[id(p)]] = True
            assert not (changed & ~allowed).any(), n
        else:
            assert not changed.any(), f"{name}: {n} is not trained but moved"
    assert 0 < moved <= declared


@pytest.mark.parametrize("name, overrides", PLANNED)
def test_the_memory_plan_counts_what_the_built_model_holds(tmp_path, name, overrides):
    job = make_job(tmp_path, [*FAST, f"method={name}", *FITS.get(name, []), *overrides])
    model = job.trainer.unwrapped_model
    plan = job.method.memory_plan(Parts(load_architecture("tiny-bert"), Setting(num_labels=2, device="cpu")))
    planned, added = sum(n for n, _ in plan.trainable), sum(n for n, _ in plan.added)
    built = job.method.count_trainable(model)
    built_added = sum(p.numel() for p in model.parameters()) - job.total_params
    if name in EXPECTED_SIZE:  # within four standard deviations of a binomial count
        assert abs(added - built_added) <= 4 * added ** 0.5 and planned - added == built - built_added
    else:
        assert (planned, added) == (built, built_added)


@pytest.mark.parametrize("name", sorted(NOT_MODELLED))
def test_memory_plans_that_are_not_modelled_say_so(name):
    method = check_config(compose_config([f"method={name}", "model=tiny-bert", *FITS.get(name, [])]))
    with pytest.raises(SiftError, match="not modelled"):
        method.memory_plan(Parts(load_architecture("tiny-bert"), Setting()))


# ---- settings refused before any work ------------------------------------------------------------------
BAD_SETTINGS = {
    "full_ft": [(["method.lr=0", "trainer.lr=1e-3"], "method.lr must be > 0"),
                (["method.lr=0"], "trainer.lr must be > 0"),  # method.lr is trainer.lr's default
                (["method.lr=fast", "trainer.lr=1e-3"], "method.lr: Value 'fast'"),
                (["method.new_lr=0"], "method.new_lr must be > 0 or null")],
    "linear_probe": [(["method.lr=-1", "trainer.lr=1e-3"], "method.lr must be > 0"),
                     (["method.lr=fast", "trainer.lr=1e-3"], "method.lr: Value 'fast'")],
    "bitfit": [(["method.lr=-1e-3", "trainer.lr=1e-3"], "method.lr must be > 0"),
               (["method.lr=fast", "trainer.lr=1e-3"], "method.lr: Value 'fast'")],
    "lora": [(["method.r=0"], "method.r must be a positive integer"),
             (["method.dropout=1.0"], r"method.dropout must be in \[0, 1\)"),
             (["method.target_modules=[nope]"], "matches no module of this model")],
    "adapter": [(["method.placement=inside"], "method.placement must be one of houlsby, pfeiffer"),
                (["method.bottleneck=8"], "set exactly one of method.bottleneck and method.reduction_factor")],
    "unipelt": [(["method.lora_r=0"], "method.lora_r must be a positive integer"),
                (["method.lora_targets=[]"], "method.lora_targets must be a non-empty list")],
    "prefix": [(["method.length=0"], "method.length must be a positive integer"),
               (["method.mlp_hidden=-4"], "method.mlp_hidden must be a positive integer")],
    "s4": [(["method.budget=2"], r"method.budget must be a fraction in \(0, 1\)"),
           (["method.groups=[1,2]", "method.assignment=[[lora],[lora]]"], "covers 3 layers, but the model has 2")],
    "sift": [(["method.sparse_rate=1.5"], r"method.sparse_rate must be in \(0, 1\], got 1.5"),
             (["method.sparse_rate=0"], r"method.sparse_rate must be in \(0, 1\], got 0.0"),
             (["method.select_batches=0"], "method.select_batches must be a positive integer"),
             (["method.target_modules=[nope]"], "matches no linear layer of this model"),
             (["method.decay=toward_zero"], "method.decay must be one of weights, increment, none"),
             (["method.target_modules=all_tensors"], "method.target_modules must be all_linear or a non-empty list")],
    "sam": [(["method.sparse_rate=-0.1"], r"method.sparse_rate must be in \(0, 1\]"),
            (["method.scope=layerwise"], "method.scope must be one of global, per_tensor"),
            (["method.clip_burnin=true", "trainer.max_grad_norm=null"],
             "method.clip_burnin clips to trainer.max_grad_norm, which is None"),
            (["method.clip_burnin=maybe"], "method.clip_burnin")],
    "fisher": [(["method.burnin_steps=0"], "method.burnin_steps must be a positive integer"),
               (["method.grad_mode=fast"], "method.grad_mode must be one of sampled, dense"),
               (["method.clip_burnin=true", "trainer.max_grad_norm=0"],
                "method.clip_burnin clips to trainer.max_grad_norm, which is 0")],
    "magnitude": [(["method.warmup_steps=-1"], "method.warmup_steps must be a non-negative integer"),
                  (["method.warmup_lr=0"], "method.warmup_lr must be > 0"),
                  (["method.decay=null"], "method.decay")],
    "random_mask": [(["method.sparse_rate=2"], r"method.sparse_rate must be in \(0, 1\]"),
                    (["method.target_modules=[]"], "method.target_modules must be all_linear or a non-empty list")],
    "diff_pruning": [(["method.concrete_lower=0.5"], "method.concrete_lower must be < 0 < method.concrete_upper"),
                     (["method.l0_steps=-2"], "method.l0_steps must be a non-negative integer")],
    "mixout": [(["method.p=1"], r"method.p must be in \[0, 1\)"),
               (["method.target_modules=[nope]"], "matches no linear layer of this model")],
    "pac": [(["method.stage1_epochs=10", "trainer.epochs=2", "trainer.max_steps=null"],
             "method.stage1_epochs=10 is longer than training"),
            (["method.gamma_min=20"], r"method.gamma_min \(20.0\) exceeds method.gamma_max"),
            (["method.base.lr=0"], "method.base.lr must be > 0"),
            (["method.base=lora"], "method@method.base=NAME"),
            (["method.arm=published"], "method.arm must be one of intended, as_published")],
    "graft": [(["method.sparsity=0"], r"method.sparsity must be in \(0, 1\]"),
              (["method.freeze=[layers]"], "method.freeze must be a list of groups among embeddings and head"),
              (["method@method.base=graft"], "method.base must name another method than graft"),
              (["task=superglue/copa"], "method=graft works with classification tasks"),
              (["method.head=fixed"], "method.head must be one of trained, random, probe"),
              (["method.sparsity_sweep=[1e-4,2]"], r"method.sparsity_sweep must be a list of sparsities in \(0, 1\]"),
              (["method.sparsity_sweep=[1e-9]"], r"method.sparsity_sweep=\[1e-09\] selects no entry"),
              (["method.source=/x", "method.head=probe"], "with method.source the head is the source run's")],
}


def test_every_method_has_a_list_of_bad_settings():
    assert set(BAD_SETTINGS) == set(METHODS)
    assert all(len(cases) >= 2 for cases in BAD_SETTINGS.values())


@pytest.mark.parametrize("name, overrides, message", [
    (name, overrides, message) for name, cases in sorted(BAD_SETTINGS.items()) for overrides, message in cases])
def test_a_bad_setting_is_refused_before_anything_loads(monkeypatch, name, overrides, message):
    import sift_cli.models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the settings were checked")

    for loader in ("load_tokenizer", "load_auto_model", "load_classifier", "load_causal_lm"):
        monkeypatch.setattr(sift_cli.models, loader, forbidden)
    with pytest.raises(SiftError, match=message) as err:
        check_config(compose_config(["model=tiny-bert", f"method={name}", *FITS.get(name, []), *overrides]))
    assert "\n" not in str(err.value)


def test_keys_a_method_does_not_read_are_left_out_with_a_warning(caplog):
    """A sweep over methods puts one method's keys on all of them (README: `++method.sparse_rate`)."""
    method = check_config(compose_config(["model=tiny-bert", "method=full_ft", "++method.sparse_rate=0.01"]))
    assert "sparse_rate" not in method.cfg
    assert "method: sparse_rate not a setting of method=full_ft, ignored" in caplog.text


@pytest.mark.parametrize("overrides", [["method=sift", "method.sparse_rate=1.5"],
                                       ["method=pac", "method.stage1_epochs=10", "trainer.epochs=2",
                                        "trainer.max_steps=null"]])
def test_the_command_refuses_in_one_line_with_no_run_directory(tmp_path, overrides):
    out = subprocess.run([sys.executable, "-m", "sift_cli.run", *FAST, *overrides, f"runs_dir={tmp_path / 'runs'}"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("sift-run: error: method.") and out.stderr.count("\n") == 1
    assert not [path for path in (tmp_path / "runs").rglob("*") if path.is_file()]
