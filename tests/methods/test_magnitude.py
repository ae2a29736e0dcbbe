"""Magnitude masks, as the published code runs them: full fine-tuning for the warm-up steps, the top |theta| of
each tensor of the warmed-up weights, and training goes on from the warmed-up model, changing only the
chosen entries (and the head)."""

import torch

from sift_cli.methods.sparse import apply_export
from tests.conftest import make_job
from tests.methods.sparse_helpers import (SETTING, assert_trains_only_its_entries, chosen,
                                          dense_job, loop_batches, per_tensor_top, pretrained)

WARMUP_LR = 0.05  # large, so that two warm-up steps reorder the magnitudes


def warmed_up(tmp_path, steps: int, lrs: list[float], weight_decay: float = 0.0, extra=()) -> dict[str, torch.Tensor]:
    """The reference warm-up: full fine-tuning with torch's AdamW at the given rate per step, the weight decay
    on every tensor but biases and LayerNorm, clipped to norm 1, on the batches the loop starts with."""
    job = dense_job(tmp_path, extra)
    model = job.trainer.unwrapped_model
    params = dict(model.named_parameters())
    decayed = [p for n, p in params.items() if not ("bias" in n or "LayerNorm" in n)]
    undecayed = [p for n, p in params.items() if "bias" in n or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                   {"params": undecayed, "weight_decay": 0.0}], lr=lrs[0])
    for batch, lr in zip(loop_batches(job, steps), lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in params.items()}


def test_selection_ranks_the_warmed_up_weights_and_training_goes_on_from_them(tmp_path):
    before = pretrained(tmp_path / "dense")
    warmed = warmed_up(tmp_path / "reference", 2, [WARMUP_LR] * 2)
    # torch's unfused AdamW on both sides: the fused kernel rounds differently, which lr 0.05 magnifies
    job = make_job(tmp_path / "magnitude", [*SETTING, "method=magnitude", "method.sparse_rate=0.02",
                                            "method.warmup_steps=2", f"method.warmup_lr={WARMUP_LR}",
                                            "trainer.fused_optimizer=false"])
    targets = set(job.method.targets)
    assert chosen(job) == per_tensor_top({n: warmed[n].abs() for n in targets}, 0.02)
    assert chosen(job) != per_tensor_top({n: before[n].abs() for n in targets}, 0.02)  # the warm-up mattered
    params = dict(job.trainer.unwrapped_model.named_parameters())
    for name, value in warmed.items():  # every tensor, the head's too, goes on from the warm-up
        torch.testing.assert_close(params[name].detach(), value, rtol=1e-5, atol=1e-7)
        assert name.startswith("classifier") or not torch.equal(value, before[name]) or "token_type" in name


def test_the_warm_up_is_the_start_of_the_run(tmp_path):
    """warmup_lr: null follows the run's optimizer: its learning rate under its schedule (a linear warm-up of
    two steps here: rates 0 then lr / 2) and its weight decay."""
    run = ["trainer.lr=0.05", "trainer.weight_decay=0.3", "trainer.warmup_ratio=0.5", "trainer.max_steps=4"]
    warmed = warmed_up(tmp_path / "reference", 2, [0.0, 0.025], weight_decay=0.3, extra=run)
    job = make_job(tmp_path / "magnitude", [*SETTING, *run, "method=magnitude", "method.warmup_steps=2"])
    params = dict(job.trainer.unwrapped_model.named_parameters())
    for name, value in warmed.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=1e-5, atol=1e-7)


def test_without_warm_up_the_pretrained_magnitudes_decide(tmp_path):
    before = pretrained(tmp_path / "dense")
    job = make_job(tmp_path / "magnitude", [*SETTING, "method=magnitude", "method.warmup_steps=0"])
    rate = float(job.cfg.method.sparse_rate)
    assert chosen(job) == per_tensor_top({name: before[name].abs() for name in job.method.targets}, rate)


def test_a_magnitude_run_trains_only_its_entries_and_exports_the_whole_model(tmp_path):
    job = make_job(tmp_path, [*SETTING, "method=magnitude", "method.warmup_steps=2"])
    after_warm_up = {n: p.detach().clone() for n, p in job.trainer.unwrapped_model.named_parameters()}
    job.method.fit(job.trainer.loop)
    assert_trains_only_its_entries(job, after_warm_up)
    rebuilt = apply_export(dense_job(tmp_path / "dense").trainer.unwrapped_model,
                           job.method.export(job.trainer.unwrapped_model))
    params = dict(job.trainer.unwrapped_model.named_parameters())
    for name, param in rebuilt.named_parameters():
        assert torch.equal(param, params[name]), name
