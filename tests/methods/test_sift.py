"""SIFT picks the top |gradient| entries of the first batch per target weight and trains only those; through
the real loop, every step's update reaches the next forward, and weight decay leaves the selected entries
where their gradients put them (or decays their increment, or the weights, when asked)."""

import math

import pytest
import torch

from tests.conftest import FAST, make_job
from tests.methods.sparse_helpers import NO_DROPOUT, SETTING, attention_weights, dense_job, loop_batches

LR, WEIGHT_DECAY, BETAS, EPS = 1e-2, 0.5, (0.9, 0.999), 1e-8
# A constant rate with no warm-up and no clipping, so the reference below needs no schedule.
LOOP = ["trainer.lr=1e-2", "trainer.weight_decay=0.5", "trainer.schedule=constant", "trainer.warmup_ratio=0",
        "trainer.max_grad_norm=null", "trainer.eval_every=1000", "trainer.max_steps=4"]


def test_selection_is_the_top_gradient_entries_of_the_first_batches(tmp_path):
    sift = make_job(tmp_path / "sift", [*FAST, *NO_DROPOUT, "method=sift", "method.sparse_rate=0.05",
                                        "method.select_batches=2"])
    assert len(sift.method.layers) == 8  # 2 layers x query/key/value/attention-output

    dense = make_job(tmp_path / "dense", [*FAST, *NO_DROPOUT, "method=full_ft"])  # same seed, same weights
    model = dense.trainer.unwrapped_model
    for batch in loop_batches(dense, 2):
        model(**batch).loss.backward()
    for name, weight in attention_weights(model).items():
        grad = weight.grad.abs().view(-1)
        k = int(0.05 * grad.numel())
        assert set(sift.method.layers[name].index.tolist()) == set(torch.topk(grad, k).indices.tolist())


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
        delta = (layer.weight - before[name]).view(-1)
        assert torch.count_nonzero(delta) <= layer.index.numel()
    assert not any("intermediate" in n or "embeddings" in n for n in changed)


class ReferenceAdamW:
    """The reference run, by hand: dense autograd on the pre-trained model, then AdamW restricted to the
    selected entries and the head, with decoupled weight decay toward zero (`weights`, and the head's
    weight), toward the pre-trained value (`increment`), or none."""

    def __init__(self, model, indices: dict[str, torch.Tensor], decay: str):
        self.model, self.indices, self.decay = model, indices, decay
        self.params = dict(model.named_parameters())
        self.pretrained = {name: self.params[name].detach().view(-1)[index].clone() for name, index in indices.items()}
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained entries, flat: the selected ones of each target, and the whole head."""
        out = {name: self.params[name].view(-1)[index] for name, index in self.indices.items()}
        return {**out, **{n: p.view(-1) for n, p in self.params.items() if n.startswith("classifier")}}

    def step(self, batch) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model(**batch).loss.backward()
        self.steps += 1
        with torch.no_grad():
            for name, value in self.trained().items():
                index = self.indices.get(name)
                grad = self.params[name].grad.view(-1) if index is None else self.params[name].grad.view(-1)[index]
                m, v = self.moments.get(name, (torch.zeros_like(value), torch.zeros_like(value)))
                m, v = BETAS[0] * m + (1 - BETAS[0]) * grad, BETAS[1] * v + (1 - BETAS[1]) * grad * grad
                self.moments[name] = (m, v)
                if name == "classifier.weight" or (index is not None and self.decay == "weights"):
                    value = value - LR * WEIGHT_DECAY * value
                elif index is not None and self.decay == "increment":
                    value = value - LR * WEIGHT_DECAY * (value - self.pretrained[name])
                m_hat, v_hat = m / (1 - BETAS[0] ** self.steps), v / (1 - BETAS[1] ** self.steps)
                value = value - LR * m_hat / (v_hat.sqrt() + EPS)
                if index is None:
                    self.params[name].copy_(value.view_as(self.params[name]))
                else:
                    self.params[name].view(-1)[index] = value


def sift_and_reference(tmp_path, decay: str):
    job = make_job(tmp_path, [*SETTING, *LOOP, "method=sift", "method.sparse_rate=0.05", f"method.decay={decay}"])
    reference = dense_job(tmp_path / "dense", LOOP)  # the same pre-trained weights and head
    indices = {name: layer.index for name, layer in job.method.layers.items()}
    return job, ReferenceAdamW(reference.trainer.unwrapped_model, indices, decay), loop_batches(reference, 4)


def test_every_update_reaches_the_next_forward(tmp_path):
    """After k loop steps the model computes what the pre-trained model computes after k AdamW updates of the
    selected entries and the head, each taken at the weights the previous updates left (a loop that writes
    an update one step late computes with one update less, and takes its gradients at stale weights)."""
    job, reference, batches = sift_and_reference(tmp_path, "none")
    probe = loop_batches(job, 2)[1]
    model = job.trainer.unwrapped_model
    for step, batch in enumerate(batches, start=1):
        job.trainer.loop.train(until_step=step)
        reference.step(batch)
        with torch.no_grad():
            model.eval(), reference.model.eval()
            torch.testing.assert_close(model(**probe).logits, reference.model(**probe).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("decay", ["none", "increment", "weights"])
def test_weight_decay_acts_as_adamw_on_what_decay_names(tmp_path, decay):
    job, reference, batches = sift_and_reference(tmp_path, decay)
    job.trainer.loop.train()
    for batch in batches:
        reference.step(batch)
    params = dict(job.trainer.unwrapped_model.named_parameters())
    for name, expected in reference.trained().items():
        index = reference.indices.get(name)
        got = params[name].detach().view(-1) if index is None else params[name].detach().view(-1)[index]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("decay", ["none", "increment", "weights"])
def test_selected_entries_with_no_gradient_are_not_pulled_toward_zero(tmp_path, decay):
    """Entries of word-embedding rows no training batch touches have a zero gradient, so AdamW leaves them
    where they are: only weight decay could move them, and with `none` (SIFT's default) or `increment` it
    does not; with `weights` each step multiplies them by 1 - lr * weight_decay."""
    job = make_job(tmp_path, [*SETTING, *LOOP, "method=sift", "method.sparse_rate=0.05",
                              "method.target_modules=all_params", f"method.decay={decay}"])
    name = "bert.embeddings.word_embeddings.weight"
    layer = job.method.layers[name]
    seen = torch.cat([batch["input_ids"].reshape(-1) for batch in loop_batches(job, 4)]).unique()
    hidden = job.method.targets[name].shape[1]
    untouched = ~torch.isin(layer.index // hidden, seen)
    assert untouched.sum() > 1000  # most selected entries: the top-k of a gradient that is mostly zero
    before = layer.values.detach()[untouched].clone()
    job.trainer.loop.train()
    after = layer.values.detach()[untouched]
    embedding = job.trainer.unwrapped_model.bert.embeddings.word_embeddings.weight.detach().view(-1)
    torch.testing.assert_close(embedding[layer.index[untouched]], after)  # the forward sees the values
    if decay == "weights":
        torch.testing.assert_close(after, before * (1 - LR * WEIGHT_DECAY) ** 4)
    else:
        assert torch.equal(after, before)
    assert math.isclose(float(job.cfg.trainer.weight_decay), WEIGHT_DECAY)
