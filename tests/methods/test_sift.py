"""SIFT picks the top |gradient| entries of the first batch per target weight, and trains only those."""

import torch

from tests.conftest import FAST, make_job


NO_DROPOUT = ["+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]


def test_selection_is_the_top_gradient_entries_of_the_first_batches(tmp_path):
    sift = make_job(tmp_path / "sift", [*FAST, *NO_DROPOUT, "method=sift", "method.sparse_rate=0.05",
                                        "method.select_batches=2"])
    assert len(sift.method.layers) == 8  # 2 layers x query/key/value/attention-output

    dense = make_job(tmp_path / "dense", [*FAST, *NO_DROPOUT, "method=full_ft"])  # same seed, same weights
    model = dense.trainer.unwrapped_model
    for batch in dense.trainer.first_batches(2):
        model(**batch).loss.backward()
    weights = dict(model.named_parameters())
    for name, layer in sift.method.layers.items():
        grad = weights[f"{name}.weight"].grad.abs().view(-1)
        k = int(0.05 * grad.numel())
        assert set(layer.index.tolist()) == set(torch.topk(grad, k).indices.tolist())


def test_a_sift_run_trains_only_its_entries_and_the_head(tmp_path):
    job = make_job(tmp_path, [*FAST, "method=sift", "method.sparse_rate=0.02"])
    before = {n: p.detach().clone() for n, p in job.trainer.unwrapped_model.named_parameters()}
    job.method.fit(job.trainer.loop)
    model = job.trainer.unwrapped_model
    selected = sum(layer.index.numel() for layer in job.method.layers.values())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier"))
    assert job.trainable_params == selected + head
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("classifier") or n.endswith(".weight") or n.endswith(".values")
                           for n in changed)
    for name, layer in job.method.layers.items():
        delta = (layer.weight - before[f"{name}.weight"]).view(-1)
        assert torch.count_nonzero(delta) <= layer.index.numel()
    assert not any("intermediate" in n or "embeddings" in n for n in changed)
