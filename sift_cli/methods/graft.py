"""Skill localization by grafting (Panigrahi, Saunshi, Zhao and Arora, "Task-Specific Skill Localization in
Fine-tuned Language Models", ICML 2023; code: github.com/abhishekpanigrahi1996/Skill-Localization-by-grafting,
Grafting.py, src/graft_trainer.py and run_graft_task.sh): find a tiny mask gamma over a region of the weights
such that the grafted model theta_pre + gamma * (theta_ft - theta_pre) keeps the fine-tuned model's skill,
with no re-training of the grafted entries.

theta_ft is this run's own fine-tuning by `method.base` (its prepare, optimizer and phases, through the one
training loop, model selection included) or, with `method.source=RUN_DIR`, a finished run's saved weights.
The mask search then follows the published code:

- region: every tensor of the encoder layers (weights, biases, LayerNorms; `layer_pattern`), as the paper's
  runs with fixed embeddings and head; `include_embeddings` / `include_head` add those groups' pre-trained
  tensors (a pooler, an MLM head), which are then counted in the region. Outside the region the grafted
  model has theta_pre, except the parameters the checkpoint lacks (a new classification head: the model
  loader's `new_params`), which keep theta_ft: they have no pre-trained value, and the code loads the same
  head into its pre-trained, fine-tuned and grafted models.
- the head: `head: trained` lets the base fine-tuning train the new head; `random` keeps it at its random
  initialisation, fixed (the code's "finetune" type with a linear head on [CLS] and fix_head); `probe` fits
  it on theta_pre as a linear probe (logistic regression, or least squares for a regression task, on the
  head's inputs over the training set), then keeps it fixed, so the pre-trained model is a linear probe and
  fine-tuning changes only the body, as with the code's fixed pre-trained MLM head.
- gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - sigmoid_bias): gamma_base marks the top
  floor(sparsity * N) entries of |theta_ft - theta_pre| over the N region entries; S starts uniform in
  [0, 1) and the bias is 10, so sigmoid is ~1e-4 and the rounded mask starts as gamma_base.
- a mask step: the training loss of the continuous graft, its gradient with respect to S averaged over the
  first `mask_batches` training batches (the code accumulates 128 batches: the whole few-shot set), the
  model in eval mode as in the code, then one plain gradient step on S with `mask_lr` (1e7; the sigmoid's
  slope at the start is ~1e-4).
- after each step the rounded mask (gamma > 1/2) is scored by the task's main metric on those training
  examples plus on the selection split (the k-shot dev set; the validation sets when the run selects on
  validation); the mask of the best sum is kept, a later one only when strictly better.

Differences from the code: gamma_base is exactly the top k entries (the code's strict threshold drops the
k-th, so at k = 1 its base patch is empty); the base patch is scored too, as step 0, so `mask_steps: 0` is
the "highest movement" graft and the search never ends below it. The base fine-tuning is this project's loop
(`trainer.optimizer=sgd` and `trainer.schedule=constant` give the code's SGD at a constant rate).

`sparsity_sweep` also grafts the top-movement patch at each listed sparsity, without mask steps, beside a
random patch of the same size.

After the search, the pre-trained model (with the new head), the fine-tuned model, the grafted model and a
graft of a random mask of the same size are evaluated side by side on every test set (task.extra_eval
included): metrics with ECE, the share of the fine-tuned gain each keeps, reliability diagrams, mask sizes
per layer. The share of the gain, (graft - pre-trained) / (fine-tuned - pre-trained), is given only when
fine-tuning gained more than two standard errors on the first test set's main metric: the standard error of
the difference, from 1000 paired bootstrap resamples of its examples (`gain_standard_error`); otherwise
the share would be noise over noise, and it is null. All go to results.json `method_info`; the mask
(graft_mask.safetensors, read by `sift-graft overlap`) and the diagrams go to the run directory. The run's
own metrics are the grafted model's.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf

from sift_cli.context import FitResult
from sift_cli.errors import Interrupted, SiftError
from sift_cli.methods import register_method
from sift_cli.methods.base import Wrapper, WrapperSettings, is_count
from sift_cli.methods.sparse import apply_export, global_top_indices
from sift_cli.tasks.base import EvalSet

log = logging.getLogger("sift_cli")
MODELS = ("pretrained", "fine_tuned", "grafted", "random_graft")
HEADS = ("trained", "random", "probe")
# The model keys a source run must share with this run (and the task, its prompt and, for a random
# initialisation, the seed).
MODEL_IDENTITY = ("name", "pretrained", "tokenizer", "revision", "config", "init", "dtype", "head")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


@torch.no_grad()
def write_values(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in values.items():
        params[name].copy_(value)


def group_of(name: str, layer_pattern: str) -> str:
    """'layer N' for a tensor of encoder layer N, else 'embeddings', else 'head' (pooler, classifier, LM head)."""
    layer = re.search(layer_pattern, name)
    if layer:
        return f"layer {int(layer.group(1))}"
    return "embeddings" if "embeddings" in name else "head"


class Region:
    """The masked tensors' pre-trained and fine-tuned values, on the model's device."""

    def __init__(self, names: list[str], pretrained: dict, fine_tuned: dict, device):
        self.names = names
        self.pre = {n: pretrained[n].to(device) for n in names}
        self.ft = {n: fine_tuned[n].to(device) for n in names}
        self.delta = {n: self.ft[n] - self.pre[n] for n in names}
        self.sizes = {n: self.pre[n].numel() for n in names}
        self.size = sum(self.sizes.values())

    def top_movement(self, k: int) -> dict[str, torch.Tensor]:
        """gamma_base: exactly the k entries of largest |theta_ft - theta_pre| over the whole region."""
        indices = global_top_indices({n: self.delta[n].abs().float() for n in self.names}, k)
        return self.from_indices(indices)

    def from_indices(self, indices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks = {}
        for name in self.names:
            mask = torch.zeros(self.sizes[name], dtype=torch.bool, device=self.pre[name].device)
            mask[indices[name].to(mask.device)] = True
            masks[name] = mask.view_as(self.pre[name])
        return masks

    def random_mask(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`count` entries drawn uniformly, without replacement, from the whole region."""
        if count * 4 > self.size:
            flat = torch.randperm(self.size, generator=generator)[:count]
        else:  # rejection sampling: a permutation of a 100M-entry region would be a gigabyte
            flat = torch.empty(0, dtype=torch.long)
            while flat.numel() < count:
                draws = torch.randint(self.size, (2 * (count - flat.numel()) + 16,), generator=generator)
                flat = torch.unique(torch.cat([flat, draws]))
            flat = flat[torch.randperm(flat.numel(), generator=generator)[:count]]
        flat, offset, indices = flat.sort().values, 0, {}
        for name in self.names:
            low, high = torch.searchsorted(flat, torch.tensor([offset, offset + self.sizes[name]]))
            indices[name] = flat[low:high] - offset
            offset += self.sizes[name]
        return self.from_indices(indices)

    def grafted(self, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A binary mask's graft, theta_ft where the mask is one and theta_pre elsewhere, bit for bit."""
        return {n: torch.where(mask[n], self.ft[n], self.pre[n]) for n in self.names}

    def interpolated(self, gamma: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.pre[n] + gamma[n].to(self.pre[n].dtype) * self.delta[n] for n in self.names}


def gain_kept(score: float, pretrained: float, fine_tuned: float, maximize: bool = True,
              standard_error: float = 0.0) -> float | None:
    """The share of fine-tuning's gain over the pre-trained model that `score` keeps; None unless fine-tuning
    gained more than two standard errors of that gain (with none given, more than nothing), where a share
    would only divide noise by noise."""
    gained = fine_tuned - pretrained if maximize else pretrained - fine_tuned
    if not gained > 2 * standard_error:
        return None
    return (score - pretrained) / (fine_tuned - pretrained)


def gain_standard_error(score, fine_tuned: torch.Tensor, pretrained: torch.Tensor, labels: torch.Tensor,
                        resamples: int = 1000, seed: int = 0) -> float:
    """The standard error of score(fine-tuned) - score(pre-trained) on one test set: the spread of that
    difference over `resamples` paired bootstrap resamples of the examples (both models scored on the same
    draw). `score(logits, labels)` is the main metric."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    differences = []
    for _ in range(resamples):
        rows = torch.randint(n, (n,), generator=generator)
        differences.append(score(fine_tuned[rows], labels[rows]) - score(pretrained[rows], labels[rows]))
    return float(np.nanstd(differences, ddof=1))


def mask_size(mask: dict[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in mask.values()))


@dataclass
class GraftSettings(WrapperSettings):
    source: Optional[str] = MISSING  # a finished run directory whose saved weights are theta_ft
    freeze: List[str] = MISSING  # groups the base fine-tuning leaves at theta_pre: embeddings, head
    layer_pattern: str = MISSING  # the region's layers (group 1 = the layer number)
    include_embeddings: bool = MISSING
    include_head: bool = MISSING
    sparsity: float = MISSING
    sigmoid_bias: float = MISSING
    mask_lr: float = MISSING
    mask_steps: int = MISSING
    mask_batches: Optional[int] = MISSING
    head: str = MISSING  # trained | random | probe: the new head during the base fine-tuning
    sparsity_sweep: List[float] = MISSING  # more sparsities, grafted from the top movement without mask steps
    expects: Any = MISSING  # filled from the run's config: what a source run must share with this one

    def check(self, run) -> None:
        """Out-of-range mask-search settings fail at set-up, not after the fine-tuning."""
        super().check(run)
        self.need(0 < self.sparsity <= 1, "sparsity", "in (0, 1]")
        self.need(self.mask_lr > 0, "mask_lr", "> 0")
        self.need(is_count(self.mask_steps, 0), "mask_steps", "a non-negative integer")
        self.need(self.mask_batches is None or is_count(self.mask_batches), "mask_batches",
                  "a positive integer or null")
        self.need(set(self.freeze) <= {"embeddings", "head"}, "freeze", "a list of groups among embeddings and head")
        self.need(self.head in HEADS, "head", f"one of {', '.join(HEADS)}")
        self.need(all(0 < s <= 1 for s in self.sparsity_sweep), "sparsity_sweep", "a list of sparsities in (0, 1]")
        if self.source and self.head != "trained":
            self.refuse(f"{self.where}.head={self.head} sets the head before fine-tuning; with {self.where}.source "
                        "the head is the source run's (use head=trained)")
        try:
            re.compile(self.layer_pattern)
        except re.error:
            self.need(False, "layer_pattern", "a regular expression whose group 1 is the layer number")
        if run is not None and run.task.kind != "classification":  # the comparison scores logits with GLUE metrics
            self.refuse(f"method=graft works with classification tasks, not task.kind={run.task.kind}")


@register_method
class Graft(Wrapper):
    name = "graft"
    Settings = GraftSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        self.info: dict = {}
        self.new_params: set[str] = set()
        self.probe_layer: torch.nn.Linear | None = None

    def check_model(self, model):
        self.base.check_model(model)
        self._choose_region({name: p.numel() for name, p in model.named_parameters()})

    # ---- the base fine-tuning: the base method decides -----------------------------------------------
    def prepare(self, model, ctx):
        self.pretrained = snapshot(model)
        self.new_params = set(ctx.new_params)
        self._choose_region({name: value.numel() for name, value in self.pretrained.items()})
        model = self.base.prepare(model, ctx)
        self._check_in_place(model)
        frozen = set(self.cfg.freeze or [])
        for name, param in model.named_parameters():
            new = name in self.new_params
            if (new and self.cfg.head != "trained") or (not new and self.groups[name] in frozen):
                param.requires_grad_(False)
        if self.cfg.head == "probe":
            self.probe_layer = self._new_linear_layer(model)
        if self.cfg.source:
            self._load_source(model)
        return model

    def select(self, run):
        self.base.select(run)
        if self.probe_layer is not None:
            self.info["probe"] = fit_linear_probe(run, self.probe_layer)

    def _new_linear_layer(self, model) -> torch.nn.Linear:
        """The one linear layer that holds every new parameter (the head a probe fits)."""
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and {f"{name}.weight", f"{name}.bias"} == self.new_params:
                return module
        raise SiftError(f"method.head=probe fits a head of one linear layer; this model's new parameters are "
                        f"{', '.join(sorted(self.new_params)) or 'none'} (model.head=cls_linear has one)")

    def _choose_region(self, sizes: dict[str, int]) -> None:
        """The masked tensors (layers, and the pre-trained embeddings or head when included; never a new
        parameter) and the base patch sizes, from the entries of each parameter."""
        self.groups = {name: group_of(name, self.cfg.layer_pattern) for name in sizes}
        included = {"embeddings": bool(self.cfg.include_embeddings), "head": bool(self.cfg.include_head)}
        self.region_names = [n for n, group in self.groups.items()
                             if included.get(group, True) and n not in self.new_params]
        size = sum(sizes[n] for n in self.region_names)
        if not self.region_names:
            raise SiftError(f"method.layer_pattern={self.cfg.layer_pattern} matches no tensor of this model and "
                            "the embeddings and head are left out: the region is empty")
        self.k = math.floor(float(self.cfg.sparsity) * size)
        self.sweep = {float(s): math.floor(float(s) * size) for s in self.cfg.sparsity_sweep}
        for key, count in (("sparsity", self.k), *(("sparsity_sweep", k) for k in self.sweep.values())):
            if count < 1:
                value = self.cfg[key]
                raise SiftError(f"method.{key}={value if key == 'sparsity' else list(value)} selects no entry of "
                                f"the {size} region entries")

    def _check_in_place(self, model) -> None:
        if {name for name, _ in model.named_parameters()} != set(self.pretrained):
            raise SiftError(f"method.base={self.base.name} changes the model's parameters; grafting needs a base "
                            "that fine-tunes them in place (full_ft, bitfit, ...)")

    # ---- a finished run as theta_ft -----------------------------------------------------------------------
    def _load_source(self, model) -> None:
        """theta_ft from a finished run's trainable.safetensors, checked to be the same model and task."""
        from safetensors.torch import load_file

        from sift_cli.results import RESULTS_FILE, read_results

        run = Path(self.cfg.source)
        if not (run / RESULTS_FILE).is_file():
            raise SiftError(f"method.source={run}: no {RESULTS_FILE} there (a finished run directory is needed)")
        results = read_results(run / RESULTS_FILE)
        if results.get("status") != "completed":
            raise SiftError(f"method.source={run}: that run did not complete (status {results.get('status')})")
        theirs = results.get("config") or {}
        ours = OmegaConf.to_container(self.cfg.expects, resolve=True)
        defaults = {"head": "default"}  # a run from before the key existed
        pairs = [(f"model.{key}", (theirs.get("model") or {}).get(key, defaults.get(key)),
                  ours["model"].get(key, defaults.get(key))) for key in MODEL_IDENTITY]
        pairs += [("task", (theirs.get("task") or {}).get("name"), ours["task"]),
                  ("task.prompt", (theirs.get("task") or {}).get("prompt"), ours["prompt"])]
        if ours["model"].get("init") == "random":  # a random initialisation depends on the seed
            pairs.append(("seed", theirs.get("seed"), ours["seed"]))
        for label, found, expected in pairs:
            if found != expected:
                raise SiftError(f"method.source={run} fine-tuned another {label} ({found}, this run: {expected}); "
                                "grafting needs the same model and task")
        weights = run / "trainable.safetensors"
        if not weights.is_file():
            raise SiftError(f"method.source={run} has no trainable.safetensors: run it with save.weights=true")
        apply_export(model, load_file(weights, device="cpu"))
        self.info["source"] = {"run_dir": str(run), "method": results.get("method"), "score": results.get("main_score")}

    # ---- the run: fine-tune, search the mask, compare ------------------------------------------------
    def fit(self, loop) -> FitResult:
        """theta_ft (the base's selected model, or the source run's), the mask search, the comparison; the
        run reports the grafted model, which the comparison has already evaluated."""
        fine_tuned = loop.selected() if self.cfg.source else self.base.fit(loop)
        if fine_tuned.state is not None:  # theta_ft is the model the run selected
            self.base.load_trainable_state(loop.unwrapped_model, fine_tuned.state)
        model = loop.unwrapped_model
        self._check_in_place(model)
        started = time.perf_counter()
        search = MaskSearch(self, loop, snapshot(model))
        mask = search.run()
        searched = time.perf_counter()
        self.info.update(search.compare(mask))
        compared = time.perf_counter()
        return FitResult(state=None, metrics=dict(self.info["models"]["grafted"]), selection=fine_tuned.selection,
                         extra_time_s={"train": searched - started, "eval": compared - searched})

    def export(self, model) -> dict[str, torch.Tensor]:
        """The grafted model as a change of the pre-trained one, for sparse.apply_export: a `.weight` with
        few changed entries as those entries (sparse_index / sparse_delta: 12 bytes an entry, so when under
        a third changed), any other changed tensor whole."""
        out = {}
        for name, param in model.named_parameters():
            value = param.detach().cpu()
            changed = value != self.pretrained[name]
            if not changed.any():
                continue
            if name.endswith(".weight") and 3 * int(changed.sum()) < changed.numel():
                index = changed.reshape(-1).nonzero().reshape(-1)
                out[f"{name[:-len('.weight')]}.sparse_index"] = index
                out[f"{name[:-len('.weight')]}.sparse_delta"] = (value - self.pretrained[name]).reshape(-1)[index]
            else:
                out[name] = value.clone()
        return out

    def summary(self) -> dict:
        return self.info

    def memory_plan(self, parts):
        raise SiftError("method=graft is not modelled by sift-memory: model it as its base (method=BASE)")


class MaskSearch:
    """One mask search on the run's model, from the fine-tuned weights it holds."""

    def __init__(self, method: Graft, loop, fine_tuned: dict[str, torch.Tensor]):
        cfg = method.cfg
        self.cfg, self.method, self.loop = cfg, method, loop
        self.model = loop.unwrapped_model
        self.fine_tuned = fine_tuned
        self.groups, self.k = method.groups, method.k
        device = next(self.model.parameters()).device
        self.region = Region(method.region_names, method.pretrained, fine_tuned, device)
        # Outside the region: theta_pre, but the new parameters (the head) keep theta_ft: they have no
        # pre-trained value.
        self.outside = {n: (fine_tuned[n] if n in method.new_params else method.pretrained[n])
                        for n in self.groups if n not in self.region.pre}
        data = loop.data
        rows = len(data.train) if cfg.mask_batches is None else min(
            len(data.train), int(cfg.mask_batches) * int(loop.tcfg.batch_size))
        self.train_set = EvalSet("graft_train", "", data.train.select(range(rows)))
        if data.select is not None:
            self.select_sets = [data.select]
        elif loop.select_on == "validation":
            self.select_sets = [t for t in data.tests if t.suffix == ""]
        else:
            self.select_sets = []
        self.curve: list[dict] = []

    # ---- the search ------------------------------------------------------------------------------------
    def run(self) -> dict[str, torch.Tensor]:
        cfg, region = self.cfg, self.region
        write_values(self.model, self.outside)
        self.base_mask = region.top_movement(self.k)
        base = {n: m.float() for n, m in self.base_mask.items()}
        generator = torch.Generator().manual_seed(int(self.loop.cfg.seed))
        scores = {n: torch.rand(region.pre[n].shape, generator=generator).to(region.pre[n].device)
                  for n in region.names}
        best_mask, best_score = self.base_mask, self._score(0, self.base_mask)
        self.best_step = 0
        for step in range(1, int(cfg.mask_steps) + 1):
            self._stop_if_asked(step)
            gradient = self.score_gradient(scores, base)
            with torch.no_grad():
                for n in region.names:
                    scores[n].sub_(gradient.pop(n), alpha=float(cfg.mask_lr))
            rounded = {n: self.gamma(scores[n], base[n]) > 0.5 for n in region.names}
            score = self._score(step, rounded)
            if score > best_score:
                best_mask, best_score, self.best_step = rounded, score, step
        self.best_score = best_score
        log.info("mask search: %d entries kept (base patch %d), from step %d", mask_size(best_mask), self.k,
                 self.best_step)
        return best_mask

    def gamma(self, scores: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """gamma = gamma_base + (1 - 2 gamma_base) sigmoid(S - sigmoid_bias), entry by entry."""
        return base + (1 - 2 * base) * torch.sigmoid(scores - float(self.cfg.sigmoid_bias))

    def score_gradient(self, scores: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """d L(theta_pre + gamma(S) * delta) / d S at the current scores: the loss gradient at the continuous
        graft times delta (d theta / d gamma) times (1 - 2 gamma_base) sigmoid'(S - bias) (d gamma / d S)."""
        region, bias = self.region, float(self.cfg.sigmoid_bias)
        grads = self._gradients(region.interpolated({n: self.gamma(scores[n], base[n]) for n in region.names}))
        out = {}
        for n in region.names:
            sigmoid = torch.sigmoid(scores[n] - bias)
            out[n] = grads.pop(n).mul_(region.delta[n]).mul_(1 - 2 * base[n]).mul_(sigmoid * (1 - sigmoid))
        return out

    def _gradients(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """d loss / d theta at the region tensors, averaged over the search's training batches (and processes)."""
        from torch.utils.data import DataLoader

        loop, model = self.loop, self.model
        write_values(model, values)
        params = dict(model.named_parameters())
        states = {n: p.requires_grad for n, p in params.items()}
        loader = loop.accelerator.prepare_data_loader(DataLoader(
            self.train_set.dataset, batch_size=int(loop.tcfg.batch_size), collate_fn=loop.data.collator))
        was_training = model.training
        model.eval()  # as the published code: no dropout while the mask learns
        try:
            for name, param in params.items():
                param.requires_grad_(name in self.region.pre)
                param.grad = None
            batches = 0
            for batch in loader:
                with loop.accelerator.autocast():
                    loss = model(**batch).loss
                loss.backward()
                batches += 1
            # a tensor the loss does not reach (say, an unused pooler in the region) has no gradient: zero
            grads = {n: params[n].grad.float() / batches if params[n].grad is not None
                     else torch.zeros_like(params[n], dtype=torch.float32) for n in self.region.names}
            if loop.accelerator.num_processes > 1:
                for grad in grads.values():
                    torch.distributed.all_reduce(grad)
                    grad /= loop.accelerator.num_processes
        finally:
            for name, param in params.items():
                param.requires_grad_(states[name])
                param.grad = None
            model.train(was_training)
        return grads

    def _score(self, step: int, mask: dict[str, torch.Tensor]) -> float:
        """The main metric of the rounded graft on the search's training examples plus the selection split."""
        write_values(self.model, self.region.grafted(mask))
        metric = self.loop.task.main_metric
        train = self._metrics(self.train_set)[metric]
        selection = [self._metrics(s)[metric] for s in self.select_sets]
        self.curve.append({"step": step, "entries": mask_size(mask), "train": train,
                           "selection": selection[0] if selection else None})
        if step % int(self.loop.tcfg.log_every) == 0 or step == int(self.cfg.mask_steps):
            log.info("mask step %d: %d entries, train %s %.4f, selection %s", step, self.curve[-1]["entries"],
                     metric, train, "none" if not selection else f"{selection[0]:.4f}")
        return sum(v for v in [train, *selection] if not math.isnan(v))

    def _metrics(self, eval_set) -> dict[str, float]:
        logits, labels = self.loop.predict(eval_set)
        return self.loop.task.score(logits, labels, eval_set.suffix)

    def _stop_if_asked(self, step: int) -> None:
        """On SIGINT/SIGTERM: checkpoint theta_ft (when fine-tuning ran here) and stop; a rerun searches anew."""
        loop = self.loop
        if not loop.stop_requested:
            return
        write_values(self.model, self.fine_tuned)
        loop.checkpoint()
        raise Interrupted(f"stopped by {loop.stop_requested} in the mask search (step {step}); "
                          "the fine-tuned model is kept, the search starts again")

    # ---- the comparison ---------------------------------------------------------------------------------
    def compare(self, mask: dict[str, torch.Tensor]) -> dict:
        """Evaluate the four models side by side (and the sparsity sweep's grafts); leave the grafted one in
        the model."""
        from sift_cli.analysis.graft import scope_order

        region, loop, task = self.region, self.loop, self.loop.task
        count = mask_size(mask)
        generator = torch.Generator().manual_seed(int(loop.cfg.seed) + 1)
        write_values(self.model, self.fine_tuned)
        models, predictions = {}, {}
        models["fine_tuned"], predictions["fine_tuned"] = self._evaluate_tests()
        write_values(self.model, self.outside)
        for name, values in (("pretrained", region.pre),
                             ("random_graft", region.grafted(region.random_mask(count, generator)))):
            write_values(self.model, values)
            models[name], predictions[name] = self._evaluate_tests()
        metric = task.main_metric
        pre, ft = models["pretrained"].get(metric), models["fine_tuned"].get(metric)
        _, ft_logits, labels = predictions["fine_tuned"][0]
        standard_error = gain_standard_error(lambda logits, y: task.score(logits, y)[metric], ft_logits,
                                             predictions["pretrained"][0][1], labels, seed=int(loop.cfg.seed))

        def kept(metrics):
            return gain_kept(metrics[metric], pre, ft, task.maximize, standard_error)

        sweep = []
        for sparsity, k in self.method.sweep.items():
            row = {"sparsity": sparsity, "entries": k}
            for name, chosen in (("grafted", region.top_movement(k)),
                                 ("random_graft", region.random_mask(k, generator))):
                write_values(self.model, region.grafted(chosen))
                row[name] = self._evaluate_tests()[0]
            row["gain_kept"] = {name: kept(row[name]) for name in ("grafted", "random_graft")}
            sweep.append(row)
        write_values(self.model, region.grafted(mask))
        models["grafted"], predictions["grafted"] = self._evaluate_tests()
        files = self._write_files(mask, predictions)
        per_layer: dict[str, int] = {}
        for name, m in mask.items():
            per_layer[self.groups[name]] = per_layer.get(self.groups[name], 0) + int(m.sum())
        total = sum(p.numel() for p in self.model.parameters())
        ece_ft, ece_graft = models["fine_tuned"].get("ece"), models["grafted"].get("ece")
        gained = (ft - pre) if task.maximize else (pre - ft)
        return {
            "base": None if self.cfg.source else self.method.base.name,
            "region_entries": region.size,
            "region_tensors": len(region.names),
            "base_patch_entries": self.k,
            "mask_entries": count,
            "mask_share_of_region": count / region.size,
            "mask_share_of_model": count / total,
            "mask_entries_per_group": dict(sorted(per_layer.items(), key=lambda kv: scope_order(kv[0]))),
            "best_step": self.best_step,
            "best_selection_score": self.best_score,
            "search_curve": self.curve,
            "models": {name: models[name] for name in MODELS},
            "gain": {"fine_tuned_minus_pretrained": gained, "standard_error": standard_error,
                     "significant": bool(gained > 2 * standard_error),
                     "standard_error_from": "1000 paired bootstrap resamples of the first test set"},
            "gain_kept": {name: kept(models[name]) for name in ("grafted", "random_graft")},
            "sparsity_sweep": sweep,
            "ece_reduction": (ece_ft - ece_graft) / ece_ft if ece_ft and ece_graft is not None else None,
            "files": files,
        }

    def _evaluate_tests(self):
        metrics, predictions = {}, []
        for eval_set in self.loop.data.tests:
            logits, labels = self.loop.predict(eval_set)
            metrics.update(self.loop.task.score(logits, labels, eval_set.suffix))
            predictions.append((eval_set.split, logits, labels))
        return metrics, predictions

    def _write_files(self, mask, predictions) -> dict:
        """The mask and the reliability diagrams, in the run directory (main process only)."""
        from sift_cli.analysis import save_png
        from sift_cli.analysis.graft import MASK_FILE, reliability_figure, write_mask
        from sift_cli.metrics import softmax

        run_dir = self.loop.run_dir
        if run_dir is None or not self.loop.accelerator.is_main_process:
            return {}
        cfg = self.loop.cfg
        write_mask(run_dir / MASK_FILE, mask, {n: self.groups[n] for n in mask},
                   {"task": cfg.task.name, "model": cfg.model.name, "seed": cfg.seed, "method": "graft"})
        files = {"mask": MASK_FILE}
        for name in ("fine_tuned", "grafted"):
            panels = [(split, softmax(logits.double().numpy()), labels.numpy().astype(int))
                      for split, logits, labels in predictions[name] if logits.shape[-1] > 1]
            if panels:
                figure = reliability_figure(panels, f"{name.replace('_', '-')} model: {cfg.task.name}, "
                                                    f"{cfg.model.name}")
                files[f"reliability_{name}"] = save_png(figure, run_dir / f"reliability_{name}.png").name
        return files


@torch.no_grad()
def fit_linear_probe(run, layer: torch.nn.Linear) -> dict:
    """Fit `layer` on the model as it is (theta_pre) as a linear probe: multinomial logistic regression
    (scikit-learn's default L2 strength), or ridge regression for one output, on the layer's inputs over the
    whole training set, in eval mode. Every process fits the same probe on the same rows."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from torch.utils.data import DataLoader

    model = run.unwrapped_model
    inputs, labels = [], []
    handle = layer.register_forward_hook(lambda module, args, output: inputs.append(args[0].float().cpu()))
    was_training = model.training
    model.eval()
    try:
        rows = int(run.tcfg.eval_batch_size or run.tcfg.batch_size)  # the training batch unless a cap is set
        for batch in DataLoader(run.data.train, batch_size=rows, collate_fn=run.data.collator):
            model(**{key: value.to(run.device) for key, value in batch.items()})
            labels.append(batch["labels"].cpu())
    finally:
        handle.remove()
        model.train(was_training)
    x, y = torch.cat(inputs).double().numpy(), torch.cat(labels).numpy()
    outputs = layer.out_features
    if outputs == 1:
        fitted = Ridge(alpha=1.0).fit(x, y)
        weight, bias = fitted.coef_[None, :], np.atleast_1d(fitted.intercept_)
    else:
        fitted = LogisticRegression(max_iter=5000).fit(x, y.astype(int))
        if list(fitted.classes_) != list(range(outputs)):
            raise SiftError(f"method.head=probe: the training set has classes {list(fitted.classes_)}, the head "
                            f"{outputs} outputs")
        weight, bias = fitted.coef_, fitted.intercept_
        if outputs == 2:  # one score for class 1, split as logits of two classes with the same softmax
            weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
    layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    return {"examples": len(y), "train_score": float(fitted.score(x, y)),
            "train_score_is": "r2" if outputs == 1 else "accuracy"}
