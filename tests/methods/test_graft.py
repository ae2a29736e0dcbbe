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
    new = {"classifier.weight", "classifier.bias"}  # tiny-bert's new head: never in the region
    assert set(search.outside) == new == job.method.new_params
    assert any(not torch.equal(fine_tuned[n], pretrained[n]) for n in fine_tuned)
    ones = {n: torch.ones_like(v, dtype=torch.bool) for n, v in search.region.pre.items()}
    write_values(model, {**search.outside, **search.region.grafted(ones)})
    assert all(torch.equal(p, fine_tuned[n]) for n, p in model.named_parameters())
    zeros = {n: torch.zeros_like(m) for n, m in ones.items()}
    write_values(model, search.region.grafted(zeros))
    assert all(torch.equal(p, fine_tuned[n] if n in new else pretrained[n]) for n, p in model.named_parameters())


def test_outside_the_default_region_only_the_new_head_is_fine_tuned(tmp_path):
    job, search = fine_tuned_search(tmp_path)
    groups = {n: g for n, g in search.groups.items() if n not in search.region.pre}
    assert set(groups.values()) == {"embeddings", "head"}
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(groups)
    # the pre-trained pooler moved in fine-tuning but belongs to the pre-trained model; the new head keeps theta_ft
    pooler = "bert.pooler.dense.weight"
    assert not torch.equal(search.fine_tuned[pooler], job.method.pretrained[pooler])
    for name, value in search.outside.items():
        new = name in {"classifier.weight", "classifier.bias"}
        assert torch.equal(value, search.fine_tuned[name] if new else job.method.pretrained[name]), name


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
    cfg = compose_config([*GRAFT, "save.weights=true", "method.sparsity_sweep=[0.001,0.05]"])
    job = Job(cfg, tmp_path, None)
    job.setup()
    results = job.run()
    info = results["method_info"]
    assert set(info["models"]) == {"pretrained", "fine_tuned", "grafted", "random_graft"}
    assert [(row["sparsity"], row["entries"]) for row in info["sparsity_sweep"]] == [
        (0.001, math.floor(0.001 * info["region_entries"])), (0.05, math.floor(0.05 * info["region_entries"]))]
    assert all("accuracy" in row["grafted"] and "accuracy" in row["random_graft"] for row in info["sparsity_sweep"])
    gain = info["gain"]
    ft, pre = info["models"]["fine_tuned"]["accuracy"], info["models"]["pretrained"]["accuracy"]
    assert gain["fine_tuned_minus_pretrained"] == pytest.approx(ft - pre)
    assert gain["significant"] == (ft - pre > 2 * gain["standard_error"])
    assert (info["gain_kept"]["grafted"] is None) == (not gain["significant"])
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


# ---- the mask gradient, a planted skill, the head options, the significance of the gain ------------------
def test_the_mask_gradient_is_autograd_of_the_continuous_graft(tmp_path):
    """The search's step direction is d/dS of L(theta_pre + gamma(S) * delta), with gamma re-derived here:
    gamma = base + (1 - 2 base) sigmoid(S - bias), the loss averaged over the training batches in eval mode."""
    from torch.func import functional_call
    from torch.utils.data import DataLoader

    job, search = fine_tuned_search(tmp_path, ["trainer.lr=1e-2"])
    region, model = search.region, job.trainer.unwrapped_model
    generator = torch.Generator().manual_seed(3)
    # scores near the bias, where sigmoid' is large, so the gradient is far from rounding noise
    scores = {n: 10.0 + torch.randn(region.pre[n].shape, generator=generator) for n in region.names}
    base = {n: m.float() for n, m in region.top_movement(search.k).items()}
    write_values(model, search.outside)
    ours = search.score_gradient(scores, base)

    leaves = {n: s.clone().requires_grad_(True) for n, s in scores.items()}
    values = {n: region.pre[n] + (base[n] + (1 - 2 * base[n]) * torch.sigmoid(leaves[n] - 10.0)) * region.delta[n]
              for n in region.names}
    model.eval()
    batches = list(DataLoader(search.train_set.dataset, batch_size=int(job.cfg.trainer.batch_size),
                              collate_fn=job.data.collator))
    loss = sum(functional_call(model, values, args=(), kwargs=batch).loss for batch in batches) / len(batches)
    reference = torch.autograd.grad(loss, [leaves[n] for n in region.names])
    flat_ours = torch.cat([ours[n].reshape(-1) for n in region.names])
    flat_reference = torch.cat([g.reshape(-1) for g in reference])
    assert flat_reference.abs().max() > 0
    assert torch.allclose(flat_ours, flat_reference, rtol=1e-3, atol=1e-4 * flat_reference.abs().max().item())


def test_a_planted_local_skill_is_recovered_by_the_top_k_graft_and_not_by_a_random_one(tmp_path):
    """theta_ft = theta_pre + small noise everywhere + a large change on k entries of the last layer's output
    LayerNorm bias that moves every prediction to the class the pre-trained model predicts least: the
    top-movement graft of k entries finds those entries and the fine-tuned predictions; a random graft of k
    entries is the pre-trained model."""
    job = make_job(tmp_path, [*GRAFT, "model.head=cls_linear"])
    model, method, trainer = job.trainer.unwrapped_model, job.method, job.trainer
    test_set = job.data.tests[0]
    pretrained = method.pretrained
    write_values(model, pretrained)
    before = trainer.predict(test_set)[0].argmax(-1)
    minority = int(torch.bincount(before, minlength=2).argmin())
    head = pretrained["classifier.weight"]
    direction = head[minority] - head[1 - minority]
    k, target = 3, "bert.encoder.layer.1.output.LayerNorm.bias"
    planted = direction.abs().topk(k).indices
    generator = torch.Generator().manual_seed(0)
    fine_tuned = {n: v + 1e-4 * torch.randn(v.shape, generator=generator) for n, v in pretrained.items()}
    fine_tuned[target][planted] += 50.0 * direction[planted].sign()
    search = MaskSearch(method, trainer, fine_tuned)
    write_values(model, fine_tuned)
    labels = trainer.predict(test_set)[0].argmax(-1)
    assert (labels == minority).all()

    def agreement(mask):
        write_values(model, {**search.outside, **search.region.grafted(mask)})
        return (trainer.predict(test_set)[0].argmax(-1) == labels).float().mean().item()

    top = search.region.top_movement(k)
    assert torch.equal(top[target].nonzero().reshape(-1).sort().values, planted.sort().values)
    assert sum(int(m.sum()) for m in top.values()) == k
    assert agreement(top) == 1.0
    zeros = {n: torch.zeros_like(m) for n, m in top.items()}
    pre_agreement = agreement(zeros)
    assert pre_agreement <= 0.5
    random = search.region.random_mask(k, torch.Generator().manual_seed(1))
    assert agreement(random) <= pre_agreement + 0.1


@pytest.mark.parametrize("head", ["random", "probe"])
def test_a_fixed_head_is_the_same_in_every_model_compared(tmp_path, head):
    job = make_job(tmp_path, [*GRAFT, "model.head=cls_linear", f"method.head={head}", "trainer.lr=1e-3"])
    model = job.trainer.unwrapped_model
    new = {"classifier.weight", "classifier.bias"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in new)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in new}
    if head == "random":  # the initialisation, untouched
        assert all(torch.equal(start[n], job.method.pretrained[n]) for n in new)
    job.trainer.train()
    search = MaskSearch(job.method, job.trainer, snapshot(model))
    assert all(torch.equal(search.outside[n], start[n]) for n in new)
    assert any(not torch.equal(search.fine_tuned[n], job.method.pretrained[n]) for n in search.region.names)


def test_the_probe_is_the_logistic_regression_of_the_pretrained_first_token_states(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from torch.utils.data import DataLoader

    job = make_job(tmp_path, [*GRAFT, "model.head=cls_linear", "method.head=probe"])
    model = job.trainer.unwrapped_model.eval()
    batch = next(iter(DataLoader(job.data.train, batch_size=len(job.data.train), collate_fn=job.data.collator)))
    with torch.no_grad():
        states = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch.get("token_type_ids")).last_hidden_state[:, 0]
        ours = torch.softmax(model(**batch).logits.double(), -1)
    fitted = LogisticRegression(max_iter=5000).fit(states.double().numpy(), batch["labels"].numpy())
    assert torch.allclose(ours, torch.as_tensor(fitted.predict_proba(states.double().numpy())), atol=1e-5)
    assert job.method.info["probe"]["examples"] == len(job.data.train)


def test_the_gain_counts_only_beyond_two_standard_errors():
    from sift_cli.methods.graft import gain_standard_error

    assert gain_kept(0.625, pretrained=0.5, fine_tuned=0.75, standard_error=0.12) == pytest.approx(0.5)
    assert gain_kept(0.625, pretrained=0.5, fine_tuned=0.75, standard_error=0.125) is None  # 0.25 is not > 0.25
    # The paired bootstrap's standard error against the closed form for a difference of accuracies on the
    # same n examples: sqrt(((b + c) / n - ((c - b) / n)^2) / n), b and c the two kinds of disagreement.
    n, b, c = 400, 40, 120  # pre-trained right and fine-tuned wrong on b examples; the other way round on c
    labels = torch.zeros(n, dtype=torch.long)
    pre_right = torch.zeros(n, dtype=torch.bool)
    ft_right = torch.zeros(n, dtype=torch.bool)
    pre_right[:b] = True
    ft_right[b:b + c] = True
    pre_right[b + c:b + c + 100] = ft_right[b + c:b + c + 100] = True  # both right on 100 more
    logits = {name: torch.stack([right.float(), (~right).float()], -1) for name, right in
              (("pre", pre_right), ("ft", ft_right))}

    def accuracy(x, y):
        return (x.argmax(-1) == y).float().mean().item()

    closed = math.sqrt(((b + c) / n - ((c - b) / n) ** 2) / n)
    bootstrap = gain_standard_error(accuracy, logits["ft"], logits["pre"], labels, resamples=2000)
    assert bootstrap == pytest.approx(closed, rel=0.08)
    assert gain_standard_error(accuracy, logits["ft"], logits["ft"], labels, resamples=50) == 0.0
