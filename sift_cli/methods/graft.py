"""Skill localization by grafting (Panigrahi, Saunshi, Zhao and Arora, "Task-Specific Skill Localization in
Fine-tuned Language Models", ICML 2023; code: github.com/abhishekpanigrahi1996/Skill-Localization-by-grafting,
Grafting.py, src/graft_trainer.py and run_graft_task.sh): find a tiny mask gamma over a region of the weights
such that the grafted model theta_pre + gamma * (theta_ft - theta_pre) keeps the fine-tuned model's skill,
with no re-training of the grafted entries.

theta_ft is this run's own fine-tuning by `method.base` (its prepare, optimizer and phases, through the one
training loop, model selection included) or, with `method.source=RUN_DIR`, a finished run's saved weights.
The mask search then follows the published code:

- region: every tensor of the encoder layers (weights, biases, LayerNorms; `layer_pattern`), as the paper's
  runs with fixed embeddings and head; `include_embeddings` / `include_head` add those. Outside the region
  the grafted model has theta_pre, except the head, which keeps theta_ft (a new classification head has no
  pre-trained value). "Head" is whatever is neither a layer nor the embeddings (pooler, classifier, MLM head),
  as in the code's `select_trainable_parameters`.
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
k-th); the base patch is scored too, as step 0, so `mask_steps: 0` is the "highest movement" graft and the
search never ends below it; base fine-tuning follows this project's protocol (AdamW, linear schedule)
rather than the code's SGD.

After the search, the pre-trained model (with the fine-tuned head when the head is outside the region),
the fine-tuned model, the grafted model and a graft of a random mask of the same size are evaluated side by
side on every test set (task.extra_eval included): metrics with ECE, the share of the fine-tuned gain each
keeps, reliability diagrams, mask sizes per layer. All go to results.json `method_info`; the mask
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
# The model keys a source run must share with this run (and the task, its prompt and, for a random
# initialisation, the seed).
MODEL_IDENTITY = ("name", "pretrained", "tokenizer", "revision", "config", "init", "dtype")


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


def gain_kept(score: float, pretrained: float, fine_tuned: float, maximize: bool = True) -> float | None:
    """The share of fine-tuning's gain over the pre-trained model that `score` keeps; None when fine-tuning
    gained nothing, where a share would only flip signs."""
    gained = fine_tuned - pretrained if maximize else pretrained - fine_tuned
    if gained <= 0:
        return None
    return (score - pretrained) / (fine_tuned - pretrained)


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

    def check_model(self, model):
        self.base.check_model(model)
        self._choose_region({name: p.numel() for name, p in model.named_parameters()})

    # ---- the base fine-tuning: the base method decides -----------------------------------------------
    def prepare(self, model, ctx):
        self.pretrained = snapshot(model)
        self._choose_region({name: value.numel() for name, value in self.pretrained.items()})
        model = self.base.prepare(model, ctx)
        self._check_in_place(model)
        frozen = set(self.cfg.freeze or [])
        for name, param in model.named_parameters():
            if self.groups[name] in frozen and name not in ctx.new_params:
                param.requires_grad_(False)
        if self.cfg.source:
            self._load_source(model)
        return model

    def _choose_region(self, sizes: dict[str, int]) -> None:
        """The masked tensors (layers, and embeddings or head when included) and the base patch size k, from
        the entries of each parameter."""
        self.groups = {name: group_of(name, self.cfg.layer_pattern) for name in sizes}
        included = {"embeddings": bool(self.cfg.include_embeddings), "head": bool(self.cfg.include_head)}
        self.region_names = [n for n, group in self.groups.items() if included.get(group, True)]
        size = sum(sizes[n] for n in self.region_names)
        if not self.region_names:
            raise SiftError(f"method.layer_pattern={self.cfg.layer_pattern} matches no tensor of this model and "
                            "the embeddings and head are left out: the region is empty")
        self.k = math.floor(float(self.cfg.sparsity) * size)
        if self.k < 1:
            raise SiftError(f"method.sparsity={self.cfg.sparsity} selects no entry of the {size} region entries")

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
        pairs = [(f"model.{key}", (theirs.get("model") or {}).get(key), ours["model"].get(key))
                 for key in MODEL_IDENTITY]
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
        # Outside the region: theta_pre, but the head keeps theta_ft (it may have no pre-trained value).
        self.outside = {n: (fine_tuned[n] if group == "head" else method.pretrained[n])
                        for n, group in self.groups.items() if n not in self.region.pre}
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
        sign = {n: 1 - 2 * b for n, b in base.items()}
        generator = torch.Generator().manual_seed(int(self.loop.cfg.seed))
        scores = {n: torch.rand(region.pre[n].shape, generator=generator).to(region.pre[n].device)
                  for n in region.names}
        bias, lr = float(cfg.sigmoid_bias), float(cfg.mask_lr)
        sigmoid = {n: torch.sigmoid(scores[n] - bias) for n in region.names}
        best_mask, best_score = self.base_mask, self._score(0, self.base_mask)
        self.best_step = 0
        for step in range(1, int(cfg.mask_steps) + 1):
            self._stop_if_asked(step)
            gamma = {n: base[n] + sign[n] * sigmoid[n] for n in region.names}
            grads = self._gradients(region.interpolated(gamma))
            with torch.no_grad():
                for n in region.names:  # chain rule: d gamma / d S = (1 - 2 gamma_base) sigmoid'(S - bias)
                    slope = sigmoid[n] * (1 - sigmoid[n])
                    scores[n].sub_(grads[n].mul_(region.delta[n]).mul_(sign[n]).mul_(slope), alpha=lr)
                    sigmoid[n] = torch.sigmoid(scores[n] - bias)
            rounded = {n: base[n] + sign[n] * sigmoid[n] > 0.5 for n in region.names}
            score = self._score(step, rounded)
            if score > best_score:
                best_mask, best_score, self.best_step = rounded, score, step
        self.best_score = best_score
        return best_mask

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
        """Evaluate the four models side by side; leave the grafted one in the model."""
        from sift_cli.analysis.graft import scope_order

        region, loop = self.region, self.loop
        count = mask_size(mask)
        generator = torch.Generator().manual_seed(int(loop.cfg.seed) + 1)
        random_mask = region.random_mask(count, generator)
        write_values(self.model, self.fine_tuned)
        models, predictions = {}, {}
        models["fine_tuned"], predictions["fine_tuned"] = self._evaluate_tests()
        write_values(self.model, self.outside)
        for name, values in (("pretrained", region.pre), ("random_graft", region.grafted(random_mask)),
                             ("grafted", region.grafted(mask))):
            write_values(self.model, values)
            models[name], predictions[name] = self._evaluate_tests()
        metric = loop.task.main_metric
        pre, ft = models["pretrained"].get(metric), models["fine_tuned"].get(metric)
        gain = {name: gain_kept(models[name][metric], pre, ft, loop.task.maximize)
                for name in ("grafted", "random_graft")}
        files = self._write_files(mask, predictions)
        per_layer: dict[str, int] = {}
        for name, m in mask.items():
            per_layer[self.groups[name]] = per_layer.get(self.groups[name], 0) + int(m.sum())
        total = sum(p.numel() for p in self.model.parameters())
        ece_ft, ece_graft = models["fine_tuned"].get("ece"), models["grafted"].get("ece")
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
            "gain_kept": gain,
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

