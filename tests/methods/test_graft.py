"""Grafting: the base patch holds exactly the requested entries, binary grafts are theta_ft or theta_pre bit
for bit, a source run stands in for fine-tuning (and a mismatched one is refused in one line), and a run
records the four models side by side with its mask and diagrams."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sift_cli.errors import SiftError
from sift_cli.methods.graft import MaskSearch, Region, gain_kept, group_of, snapshot, write_values
from sift_cli.methods.sparse import apply_export
from sift_cli.run import Job
from tests.conftest import FAST, compose_config, make_job

GRAFT = [*FAST, "method=graft", "method.mask_steps=2", "method.sparsity=0.01"]


def fine_tuned_search(tmp_path, overrides=()):
    """A graft job whose base fine-tuning has run, and a mask search over its fine-tuned weights."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = make_job(tmp_path, [*GRAFT, *overrides])
    job.trainer.train()
    return job, MaskSearch(job.method, job.trainer, snapshot(job.trainer.unwrapped_model))


def test_the_base_patch_holds_exactly_the_requested_entries_even_with_ties():
    pre = {"a": torch.zeros(4, 5), "b": torch.zeros(10)}
    ft = {"a": torch.ones(4, 5), "b": torch.cat([torch.ones(3), torch.zeros(7)])}  # 23 tied movements of 1
    region = Region(["a", "b"], pre, ft, "cpu")
    for k in (1, 7, 22, 23, 30):
        base = region.top_movement(k)
        assert sum(int(m.sum()) for m in base.values()) == k
    # S ~ U[0, 1) with the sigmoid bias of 10: gamma stays below 1/2 off the patch and above it on it
    base = region.top_movement(7)
    scores = {n: torch.rand(pre[n].shape) for n in pre}
    rounded = {n: (b.float() + (1 - 2 * b.float()) * torch.sigmoid(scores[n] - 10.0)) > 0.5 for n, b in base.items()}
    assert all(torch.equal(rounded[n], base[n]) for n in base)


def test_a_random_mask_has_the_requested_size_and_stays_in_the_region():
    region = Region(["a", "b"], {"a": torch.zeros(50, 40), "b": torch.zeros(7)}, {"a": torch.ones(50, 40),
                                                                               "b": torch.ones(7)}, "cpu")
    for count in (0, 1, 13, 1500, 2007):
        mask = region.random_mask(count, torch.Generator().manual_seed(0))
        assert sum(int(m.sum()) for m in mask.values()) == count
        assert mask["a"].shape == (50, 40) and mask["b"].shape == (7,)


def test_layer_groups_follow_the_published_split():
    pattern = compose_config(["method=graft"]).method.layer_pattern
    assert group_of("bert.encoder.layer.11.output.LayerNorm.bias", pattern) == "layer 11"
    assert group_of("mlm.roberta.encoder.layer.0.attention.self.query.weight", pattern) == "layer 0"
    assert group_of("model.layers.3.mlp.up_proj.weight", pattern) == "layer 3"
    assert group_of("bert.embeddings.word_embeddings.weight", pattern) == "embeddings"
    assert group_of("bert.pooler.dense.weight", pattern) == "head"
    assert group_of("classifier.weight", pattern) == "head"


def test_binary_grafts_are_the_fine_tuned_or_the_pretrained_model_bit_for_bit(tmp_path):
    job, search = fine_tuned_search(tmp_path, ["method.include_embeddings=true", "method.include_head=true"])
    model, fine_tuned, pretrained = job.trainer.unwrapped_model, search.fine_tuned, job.method.pretrained
    assert not search.outside  # the region is the whole model
    assert any(not torch.equal(fine_tuned[n], pretrained[n]) for n in fine_tuned)
    ones = {n: torch.ones_like(v, dtype=torch.bool) for n, v in search.region.pre.items()}
    write_values(model, search.region.grafted(ones))
    assert all(torch.equal(p, fine_tuned[n]) for n, p in model.named_parameters())
    zeros = {n: torch.zeros_like(m) for n, m in ones.items()}
    write_values(model, search.region.grafted(zeros))
    assert all(torch.equal(p, pretrained[n]) for n, p in model.named_parameters())


def test_outside_the_default_region_the_head_is_fine_tuned_and_the_rest_pretrained(tmp_path):
    job, search = fine_tuned_search(tmp_path)
    groups = {n: g for n, g in search.groups.items() if n not in search.region.pre}
    assert set(groups.values()) == {"embeddings", "head"}
    for name, value in search.outside.items():
        expected = search.fine_tuned[name] if groups[name] == "head" else job.method.pretrained[name]
        assert torch.equal(value, expected)


def test_the_search_starts_from_the_base_patch_and_ends_on_a_rounded_mask(tmp_path):
    job, search = fine_tuned_search(tmp_path, ["method.mask_steps=0"])
    mask = search.run()
    assert sum(int(m.sum()) for m in mask.values()) == math.floor(0.01 * search.region.size) == search.k
    assert all(torch.equal(mask[n], search.base_mask[n]) for n in mask)
    job2, search2 = fine_tuned_search(tmp_path / "steps", ["method.mask_steps=3", "method.mask_lr=1e9"])
    mask2 = search2.run()
    assert [p["step"] for p in search2.curve] == [0, 1, 2, 3]
    assert all(m.dtype == torch.bool for m in mask2.values())


def test_the_share_of_the_gain_is_undefined_when_fine_tuning_gained_nothing():
    assert gain_kept(0.7, pretrained=0.6, fine_tuned=0.8) == pytest.approx(0.5)
    assert gain_kept(0.5, pretrained=0.6, fine_tuned=0.8) == pytest.approx(-0.5)
    assert gain_kept(0.58, pretrained=0.6, fine_tuned=0.55) is None  # fine-tuning lost: no share to keep
    assert gain_kept(0.6, pretrained=0.6, fine_tuned=0.6) is None
    assert gain_kept(1.5, pretrained=2.0, fine_tuned=1.0, maximize=False) == pytest.approx(0.5)


def test_a_graft_run_records_four_models_its_mask_and_diagrams(tmp_path):
    cfg = compose_config([*GRAFT, "save.weights=true"])
    job = Job(cfg, tmp_path, None)
    job.setup()
    results = job.run()
    info = results["method_info"]
    assert set(info["models"]) == {"pretrained", "fine_tuned", "grafted", "random_graft"}
    assert results["metrics"] == info["models"]["grafted"]
    assert all("ece" in m and "accuracy" in m for m in info["models"].values())
    assert set(info["gain_kept"]) == {"grafted", "random_graft"}
    assert sum(info["mask_entries_per_group"].values()) == info["mask_entries"]
    assert info["base_patch_entries"] == math.floor(0.01 * info["region_entries"])
    saved = load_file(tmp_path / "graft_mask.safetensors")
    assert sum(t.numel() for t in saved.values()) == info["mask_entries"]
    assert (tmp_path / "reliability_fine_tuned.png").stat().st_size > 0
    assert (tmp_path / "reliability_grafted.png").stat().st_size > 0
    # The export rebuilds the grafted model from the pre-trained one.
    rebuilt = make_job(tmp_path / "fresh", FAST).trainer.unwrapped_model
    apply_export(rebuilt, load_file(tmp_path / "trainable.safetensors"))
    grafted = job.trainer.unwrapped_model.state_dict()
    assert all(torch.allclose(v, grafted[k]) for k, v in rebuilt.state_dict().items())


def finished_run(run_dir, overrides):
    cfg = compose_config([*FAST, *overrides])
    job = Job(cfg, run_dir, None)
    job.setup()
    job.run()
    return job


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished full fine-tuning run with its weights saved, and its fine-tuned parameters."""
    run_dir = tmp_path_factory.mktemp("source")
    job = finished_run(run_dir, ["method=full_ft", "save.weights=true"])
    fine_tuned = {n: p.detach().clone() for n, p in job.trainer.unwrapped_model.named_parameters()}
    return run_dir, fine_tuned, json.loads((run_dir / "results.json").read_text())["metrics"]


def test_a_source_run_stands_in_for_fine_tuning(tmp_path, source):
    run_dir, fine_tuned, metrics = source
    job = make_job(tmp_path, [*GRAFT, f"method.source={run_dir}"])
    model = job.trainer.unwrapped_model
    assert all(torch.equal(p, fine_tuned[n]) for n, p in model.named_parameters())
    job.method.fit(job.trainer.loop)
    info = job.method.summary()
    assert job.trainer.step == 0 and info["source"]["method"] == "full_ft"
    assert info["models"]["fine_tuned"]["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize("override, message", [
    ("seed=7", r"another seed \(42, this run: 7\)"),
    ("task=glue/mrpc", r"another task \(sst2, this run: mrpc\)"),
    ("model.config.intermediate_size=48", r"another model.config \("),
])
def test_a_mismatched_source_is_one_line(tmp_path, source, override, message):
    with pytest.raises(SiftError, match=message) as err:
        make_job(tmp_path, [*GRAFT, f"method.source={source[0]}", override])
    assert "\n" not in str(err.value)


def test_a_source_without_saved_weights_says_how_to_save_them(tmp_path, source):
    (tmp_path / "unsaved").mkdir()
    shutil.copy(source[0] / "results.json", tmp_path / "unsaved")
    with pytest.raises(SiftError, match="save.weights=true"):
        make_job(tmp_path, [*GRAFT, f"method.source={tmp_path / 'unsaved'}"])
    with pytest.raises(SiftError, match="no results.json"):
        make_job(tmp_path, [*GRAFT, f"method.source={tmp_path / 'nowhere'}"])


def test_a_base_that_rewires_the_model_is_refused(tmp_path):
    with pytest.raises(SiftError, match="method.base=lora changes the model's parameters"):
        make_job(tmp_path, [*GRAFT, "method@method.base=lora"])
    with pytest.raises(SiftError, match="method.base must name another method than graft"):
        make_job(tmp_path, [*GRAFT, "method@method.base=graft"])


@pytest.mark.parametrize("override, message", [
    ("method.sparsity=0", r"method.sparsity must be in \(0, 1\], got 0"),
    ("method.sparsity=1e-9", "selects no entry of the 17088 region entries"),
    ("method.mask_steps=-1", "method.mask_steps must be a non-negative integer"),
    ("method.mask_batches=0", "method.mask_batches must be a positive integer or null"),
    ("method.mask_lr=0", "method.mask_lr must be > 0"),
    ("method.freeze=[layers]", "method.freeze must be a list of groups among embeddings and head"),
    ("method.layer_pattern=nothing", "the region is empty"),
])
def test_bad_settings_fail_before_fine_tuning(tmp_path, override, message):
    with pytest.raises(SiftError, match=message):
        make_job(tmp_path, [*GRAFT, override])


def test_frozen_groups_keep_their_pretrained_values_during_fine_tuning(tmp_path):
    job = make_job(tmp_path, [*GRAFT, "method.freeze=[embeddings]"])
    before = snapshot(job.trainer.unwrapped_model)
    job.trainer.train()
    after = snapshot(job.trainer.unwrapped_model)
    pattern = job.cfg.method.layer_pattern
    assert all(torch.equal(before[n], after[n]) for n in before if group_of(n, pattern) == "embeddings")
    assert any(not torch.equal(before[n], after[n]) for n in before if group_of(n, pattern) != "embeddings")
