"""The one training loop, on `accelerate`: the same code on a CPU, a GPU with bf16, or several processes.

AdamW or SGD (`trainer.optimizer`, through the method), linear warm-up and decay (over the run, or over a
nominal length of which the run trains the start: `trainer.schedule=linear_nominal`), gradient accumulation,
clipping, periodic evaluation on the selection split, and the best trainable state kept for the final
evaluation. Methods see the loop only through `sift_cli.context` (a `RunContext` in their hooks, a `Loop` in
`fit`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from sift_cli.batching import eval_tokens, micro_batches, restore_order, row_widths, shard, token_batches
from sift_cli.context import FitResult, Loop, RunContext
from sift_cli.errors import Interrupted, SiftError, TrainingDiverged
from sift_cli.memory.check import modelled_architecture
from sift_cli.results import write_bytes_atomic
from sift_cli.runs import CHECKPOINT_DIR, CHECKPOINT_FILE, FINGERPRINT_FILE
from sift_cli.tasks.base import EvalSet, TaskData

log = logging.getLogger("sift_cli")


def make_accelerator(tcfg) -> Accelerator:
    precision = tcfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Jobs of a sweep share a process: the previous job's precision settings must not leak into this one.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=tcfg.device == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=int(tcfg.grad_accum),
        # trainer.batch_size is the global batch, split over processes: the same run on 1 or N processes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True),
    )


def schedule_length(tcfg, total_steps: int, steps_per_epoch: int) -> int:
    """The steps the learning-rate schedule spans: the run's own, or with `linear_nominal` the
    `trainer.nominal_epochs` it is laid over, of which the run trains only the first `total_steps`."""
    if tcfg.schedule != "linear_nominal":
        return total_steps
    nominal = round(float(tcfg.nominal_epochs) * steps_per_epoch)
    if nominal < total_steps:
        raise SiftError(f"trainer.nominal_epochs={tcfg.nominal_epochs} spans {nominal} steps, fewer than the run's "
                        f"{total_steps}: the learning rate would reach zero before the end")
    return nominal


def make_schedule(optimizer, tcfg, total_steps: int, steps_per_epoch: int):
    """Linear warm-up over `trainer.warmup_ratio` of the schedule's length, then linear decay to zero
    (`linear`, `linear_nominal`) or a constant rate (`constant`)."""
    length = schedule_length(tcfg, total_steps, steps_per_epoch)
    warmup = round(float(tcfg.warmup_ratio) * length)
    if tcfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_linear_schedule_with_warmup(optimizer, warmup, length)


@dataclass
class Best:
    score: float = -math.inf
    step: int = -1
    metrics: dict = field(default_factory=dict)
    state: dict | None = None


def _score(metrics: dict, key: str, maximize: bool) -> float:
    """The selection score, larger is better; a missing or NaN metric never wins."""
    value = metrics.get(key, math.nan)
    if value is None or math.isnan(value):
        return -math.inf
    return float(value) if maximize else -float(value)


class Trainer:
    """The loop. Built with the model on its device but not yet wrapped for data parallelism: the runner
    lets the method choose its trainable set from data (`Method.select`) and then calls `wrap_model`."""

    def __init__(self, cfg, model, method, task, data: TaskData, accelerator: Accelerator, recorder,
                 run_dir: Path | None = None, fingerprint: str = "", new_params=frozenset()):
        self.cfg = cfg
        self.new_params = frozenset(new_params)  # what the checkpoint lacked (the head), as the loader said
        self.tcfg = cfg.trainer
        self.method = method
        self.task = task
        self.data = data
        self.accelerator = accelerator
        self.recorder = recorder  # writes metrics.jsonl and mirrors to W&B (main process only)
        self.select_on = task.select_on
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / CHECKPOINT_DIR if run_dir is not None else None

        generator = torch.Generator().manual_seed(int(cfg.seed))
        loader = DataLoader(
            data.train,
            batch_size=int(self.tcfg.batch_size),
            shuffle=True,
            collate_fn=data.collator,
            num_workers=int(cfg.data.num_workers),
            generator=generator,
        )
        self.steps_per_epoch = max(1, math.ceil(len(loader) / int(self.tcfg.grad_accum)))
        self.total_steps = int(self.tcfg.max_steps or self.tcfg.epochs * self.steps_per_epoch)
        schedule_length(self.tcfg, self.total_steps, self.steps_per_epoch)  # refuses a schedule shorter than the run
        self.eval_every = int(self.tcfg.eval_every or self.steps_per_epoch)
        self.train_loader = accelerator.prepare_data_loader(loader)
        self._architecture = modelled_architecture(model)  # for trainer.train_tokens=auto
        self._micro_batch_tokens: dict[int, int | None] = {}  # by batch width
        self._log_micro_batches()
        self.model = model.to(accelerator.device)
        self.optimizer = None
        self.scheduler = None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed: the data position
        self.running_loss = [0.0, 0]  # sum and count of micro-batch losses since the last log line
        # Called with the trainer once gradients are complete, before the optimizer step (analyses, benchmarks)
        self.gradient_callbacks: list = []
        self.fingerprint = fingerprint
        self.stop_requested: str | None = None  # set by a signal handler: checkpoint and stop at the next step
        self.best = Best()
        self.start_metrics: dict | None = None  # trainer.eval_on_start: the test metrics before the first step
        self.train_time_s = 0.0
        self.eval_time_s = 0.0
        self._stream = self._batches()
        self._eval_plans: dict[int, tuple] = {}  # evaluation set -> (the set, its batches)
        show = self.tcfg.progress_bar
        self.show_progress = (sys.stderr.isatty() if show == "auto" else bool(show)) and accelerator.is_main_process
        self.context = RunContext(self)  # what the method's hooks and the task's evaluation see
        self.loop = Loop(self)  # what the method's fit drives
        self._wrapped = False

    def micro_batch_tokens(self, width: int) -> int | None:
        """trainer.train_tokens for a batch padded to `width` (sift_cli/memory/check.py): with `auto`, the
        memory model's activations per sequence depend on the width (attention's are quadratic in it)."""
        from sift_cli.memory.check import train_tokens

        if width not in self._micro_batch_tokens:
            self._micro_batch_tokens[width] = train_tokens(self.cfg, self.method, self._architecture,
                                                           self.accelerator.device.type, width)
        return self._micro_batch_tokens[width]

    def _log_micro_batches(self) -> None:
        """Say when trainer.train_tokens splits the batch that holds the data's longest row."""
        from sift_cli.memory.check import longest_row, sequences_per_row

        seq = longest_row(self.data.train)
        budget = self.micro_batch_tokens(seq)
        sequences = sequences_per_row(self.cfg.task)
        rows = math.ceil(int(self.tcfg.batch_size) / self.accelerator.num_processes)
        if budget is not None and budget < rows * sequences * seq:
            log.info("training batches of %d rows run in micro-batches of at most %d tokens (trainer.train_tokens="
                     "%s, at the longest row's %d), their gradients summed", rows, budget, self.tcfg.train_tokens, seq)

    def wrap_model(self) -> None:
        """Wrap the model for data parallelism, which fixes the parameters it synchronises: after the method
        has chosen its trainable set (`Method.select`), before the first step."""
        if self._wrapped:
            return
        if self.tcfg.get("compile", False):
            self.model.compile()  # in place: parameter names, hooks and `unwrapped_model` stay as they were
        self.model = self.accelerator.prepare_model(self.model)
        self._wrapped = True
        if self.cfg.analysis.grad_sparsity:
            self._probe_gradient_sparsity()
        if self.cfg.analysis.get("dynamics"):
            self._probe_dynamics()

    def _probe_gradient_sparsity(self) -> None:
        """`analysis.grad_sparsity=true`: log the share of the gradient held by its largest components."""
        from sift_cli.analysis.grad_sparsity import GradSparsityProbe

        probe = GradSparsityProbe(self.unwrapped_model)
        self.gradient_callbacks.append(lambda trainer: trainer.recorder.log({"step": trainer.step + 1,
                                                                            **probe.measure()}))

    def _probe_dynamics(self) -> None:
        """`analysis.dynamics=true`: log the body's movement and Adam's damping at every optimizer step."""
        from sift_cli.analysis.dynamics import DynamicsProbe

        probe = DynamicsProbe(self.unwrapped_model, self.new_params)
        self.gradient_callbacks.append(lambda trainer: trainer.recorder.log({"step": trainer.step + 1,
                                                                            **probe.measure(trainer.optimizer)}))

    # ---- data --------------------------------------------------------------------------------------
    def _batches(self):
        """Training batches forever, epoch after epoch, each epoch in a fresh seeded order.

        Starts at the data position (`epoch`, `batch_in_epoch`), so a resumed run sees the same batches.
        """
        while True:
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(self.epoch)
            skip = self.batch_in_epoch
            for position, batch in enumerate(self.train_loader):
                if position < skip:
                    continue
                self.batch_in_epoch = position + 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def next_batch(self) -> dict:
        return next(self._stream)

    def first_batches(self, count: int):
        """The first `count` training batches, the ones training starts with, without consuming them."""
        generator = torch.Generator().manual_seed(int(self.cfg.seed))
        loader = DataLoader(self.data.train, batch_size=int(self.tcfg.batch_size), shuffle=True,
                            collate_fn=self.data.collator, generator=generator)
        loader = self.accelerator.prepare_data_loader(loader)
        produced, epoch = 0, 0
        while produced < count:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                yield batch
                produced += 1
                if produced == count:
                    return
            epoch += 1

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # ---- training ----------------------------------------------------------------------------------
    def ensure_optimizer(self) -> None:
        if self.optimizer is not None:
            return
        self.wrap_model()
        self.method.on_train_begin(self.context)
        optimizer = self.method.create_optimizer(self.unwrapped_model, self.tcfg)
        self.scheduler = make_schedule(optimizer, self.tcfg, self.total_steps, self.steps_per_epoch)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return self.method.training_loss(self.context, batch)

    def micro_step(self, batch: dict) -> tuple[float, bool]:
        """Forward and backward of one batch (in micro-batches of trainer.train_tokens tokens, each loss weighted
        by its share of the batch's), and the optimizer step once gradients are accumulated.

        Returns the batch loss and whether an optimizer step happened. The loss is read once, after the
        step: on a GPU that is the step's only wait for the device, as in a plain loop. A loss that is not
        finite stops the run there (its update is never kept: a failed run saves nothing).
        """
        with self.accelerator.accumulate(self.model):
            parts = micro_batches(batch, self.micro_batch_tokens(batch["input_ids"].shape[-1]))
            loss = 0.0
            for index, (part, share) in enumerate(parts):
                last = index == len(parts) - 1  # the backward that synchronises gradients across processes
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                    part_loss = self.compute_loss(part)
                    self.accelerator.backward(part_loss * share)
                loss = loss + share * part_loss.detach()
            stepped = self.accelerator.sync_gradients
            if stepped:
                if self.tcfg.max_grad_norm:
                    self.method.clip_gradients(self.context, float(self.tcfg.max_grad_norm))
                for callback in self.gradient_callbacks:
                    callback(self)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"the training loss became {value} at step {self.step + 1}; run stopped")
        if stepped:
            self.scheduler.step()
            self.step += 1
            self.method.after_optimizer_step(self.context)
        return value, stepped

    def train(self, until_step: int | None = None) -> None:
        """Optimizer steps until `until_step` (default: the end of training); resumable by a later call."""
        until_step = self.total_steps if until_step is None else min(until_step, self.total_steps)
        self.ensure_optimizer()
        self.model.train()
        bar = tqdm(total=until_step, initial=self.step, desc="train", disable=not self.show_progress, leave=False)
        started = time.perf_counter()
        while self.step < until_step:
            loss, stepped = self.micro_step(self.next_batch())
            self.running_loss[0] += loss
            self.running_loss[1] += 1
            if not stepped:
                continue
            bar.update(1)
            if self.step % int(self.tcfg.log_every) == 0 or self.step == until_step:
                record = {"step": self.step, "epoch": self.epoch, "loss": self.running_loss[0] / self.running_loss[1],
                          "lr": self.scheduler.get_last_lr()[0]}
                self.recorder.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                self.running_loss = [0.0, 0]
            if self.step % self.eval_every == 0 or self.step == self.total_steps:
                self.train_time_s += time.perf_counter() - started
                self.select()
                started = time.perf_counter()
            every = self.tcfg.checkpoint_every
            if self.stop_requested or (every and self.step % int(every) == 0 and self.step < self.total_steps):
                self.train_time_s += time.perf_counter() - started
                self.save_checkpoint()
                started = time.perf_counter()
                if self.stop_requested:
                    bar.close()
                    raise Interrupted(f"stopped by {self.stop_requested} at step {self.step}; checkpoint saved")
        self.train_time_s += time.perf_counter() - started
        bar.close()

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly where training stopped."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "trainable": self.method.trainable_state(self.unwrapped_model),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": vars(self.best),
            "start_metrics": self.start_metrics,
            "times": (self.train_time_s, self.eval_time_s),
            "running_loss": self.running_loss,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, state: dict) -> None:
        self.ensure_optimizer()
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.method.load_trainable_state(self.unwrapped_model, state["trainable"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best = Best(**state["best"])
        self.start_metrics = state.get("start_metrics")
        self.train_time_s, self.eval_time_s = state["times"]
        self.running_loss = list(state["running_loss"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._stream = self._batches()

    def save_checkpoint(self, **extra) -> None:
        """Atomically replace the run's checkpoint (main process only), with the config's fingerprint;
        `extra` entries are stored beside the trainer's state."""
        if self.checkpoint_dir is None:
            return
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            torch.save({**self.state_dict(), **extra}, buffer)
            # the fingerprint first: a checkpoint file is only ever seen with its fingerprint beside it
            write_bytes_atomic(self.checkpoint_dir / FINGERPRINT_FILE, self.fingerprint.encode())
            write_bytes_atomic(self.checkpoint_dir / CHECKPOINT_FILE, buffer.getvalue())
            log.info("step %d: checkpoint saved", self.step)

    # ---- evaluation --------------------------------------------------------------------------------
    def eval_batches(self, dataset, desc: str, collator=None) -> Iterator[tuple[list[int], dict]]:
        """This process's share of an evaluation set as (row indices, batch on the device), in batches of at
        most trainer.eval_tokens tokens (sift_cli/batching.py). Every process gets as many batches: one that
        only evens the count comes with no indices, and its results must be left out."""
        key = id(dataset)
        if key not in self._eval_plans:
            widths, counts = row_widths(dataset.with_format(None)["input_ids"])
            budget = eval_tokens(self.tcfg, self.accelerator.device.type)
            max_rows = int(self.tcfg.eval_batch_size) if self.tcfg.eval_batch_size else None
            self._eval_plans[key] = (dataset, token_batches(widths, budget, max_rows, counts))
        share = shard(self._eval_plans[key][1], self.accelerator.process_index, self.accelerator.num_processes)
        loader = DataLoader(dataset, batch_sampler=[rows for rows, _ in share],
                            collate_fn=collator or self.data.collator)
        device = self.accelerator.device
        batches = tqdm(loader, desc=desc, leave=False, disable=not self.show_progress)
        for (rows, counted), batch in zip(share, batches):
            yield rows if counted else [], {name: value.to(device) for name, value in batch.items()}

    @torch.no_grad()
    def predict(self, eval_set: EvalSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of a whole evaluation set in its order, gathered from every process once."""
        was_training = self.model.training
        self.model.eval()
        parts = []
        for indices, batch in self.eval_batches(eval_set.dataset, f"eval {eval_set.split}"):
            logits = self.model(**batch).logits.float().cpu()
            if indices:
                parts.append((indices, logits, batch["labels"].cpu()))
        self.model.train(was_training)
        if self.accelerator.num_processes > 1:
            parts = gather_object(parts)
        indices = [p[0] for p in parts]
        size = len(eval_set.dataset)
        return restore_order(indices, [p[1] for p in parts], size), restore_order(indices, [p[2] for p in parts], size)

    def evaluate(self, eval_set: EvalSet) -> dict[str, float]:
        """Metrics of one evaluation set; the task decides how it is scored."""
        started = time.perf_counter()
        metrics = self.task.evaluate(self.context, eval_set)
        self.eval_time_s += time.perf_counter() - started
        return metrics

    def evaluate_tests(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for eval_set in self.data.tests:
            metrics.update(self.evaluate(eval_set))
        return metrics

    def evaluate_start(self) -> None:
        """The test metrics of the model as it starts, logged at step 0: the baseline training moves from."""
        self.start_metrics = self.evaluate_tests()
        self.recorder.log({"step": 0, "split": "start", **self.start_metrics})

    def select(self) -> None:
        """Evaluate on the selection split and keep the best trainable state so far."""
        if self.select_on == "last":
            return
        if self.select_on == "validation":
            metrics, split = self.evaluate_tests(), "validation"
        else:
            if self.data.select is None:
                raise SiftError(f"trainer.select_on={self.select_on} but the task has no such split")
            metrics, split = self.evaluate(self.data.select), self.data.select.split
        score = _score(metrics, self.task.main_metric, self.task.maximize)
        self.recorder.log({"step": self.step, "split": split, **metrics})
        log.info("step %d: %s %s = %.4f", self.step, split, self.task.main_metric, metrics.get(self.task.main_metric))
        if score > self.best.score or self.best.step < 0:
            self.best = Best(score, self.step, metrics, self.method.trainable_state(self.unwrapped_model))

    def selected(self) -> FitResult:
        """The selected model: its trainable state (none when the last step is kept) and, when the
        validation sets selected it, the metrics of that evaluation."""
        validated = self.select_on == "validation" and self.best.step >= 0
        return FitResult(state=self.best.state, metrics=dict(self.best.metrics) if validated else None,
                         selection=self.selection_info())

    def selection_info(self) -> dict:
        info = {"on": self.select_on, "metric": self.task.main_metric}
        if self.select_on != "last":
            info.update(step=self.best.step, score=self.best.metrics.get(self.task.main_metric))
        return info
