"""Will the run fit? The memory model's peak for a run against the memory the machine has available, checked
twice before the model loads (`trainer.memory_check=false` skips it): before the data load, with what every
run of the config needs, and once the data are tokenised, with the longest training row. Training batches are
padded to their longest row, so the batch that holds the longest row is trainer.batch_size x that row, run in
micro-batches of at most trainer.train_tokens tokens: the training step is predicted at the micro-batch that
holds the longest row, not at task.max_length (which real rows rarely reach).

The peak is the larger of a training step (`predict`: weights, buffers, gradients, optimizer state,
activations) and an evaluation during training (what stays between steps, plus a forward pass over
trainer.eval_tokens tokens: `evaluation_bytes`), plus what the process holds besides tensors. Activations
are counted at the weights' precision (under autocast they are narrower); what loading takes for a moment
(a GGUF file's dequantisation) and the data are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sift_cli.errors import SiftError
from sift_cli.memory.model import DTYPE_BYTES, GIB, Architecture, Setting, architecture_of, evaluation_bytes, predict

# trainer.train_tokens=auto on a CPU: training micro-batches whose activations the memory model puts within
# this (on a GPU, whole batches: memory_check says when one would not fit)
CPU_TRAIN_ACTIVATIONS = 2**29
RUNTIME_BYTES = 2**29  # the process besides its tensors: torch and the libraries (~0.5 GB resident), a CUDA context
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # model.dtype -> the memory model's


@dataclass(frozen=True)
class RunPeak:
    training: int  # a training step, with the process's own
    evaluation: int  # an evaluation during training, with the process's own
    processes: int  # processes sharing the memory that is compared

    @property
    def total(self) -> int:
        return self.processes * max(self.training, self.evaluation)


def available_bytes(device) -> int | None:
    """Memory a new run can take on a torch device: MemAvailable of /proc/meminfo on a CPU, the GPU's free
    memory; None where it cannot be read."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sequences_per_row(task) -> int:
    """The sequences one row of a task's batches holds: a multiple-choice row one per choice."""
    return len(task.choice_columns) if task.kind == "multiple_choice" else 1


def modelled_architecture(model) -> Architecture | None:
    """The memory model's view of a loaded `model`, or None where it does not model it."""
    try:
        return architecture_of(model.config)
    except (AttributeError, SiftError):
        return None


def step_setting(cfg, device: str, seq: int, sequences: int) -> Setting:
    """The memory model's setting of a training step of `cfg` over `sequences` sequences of `seq` tokens."""
    return Setting(batch=sequences, seq=max(1, seq), precision=PRECISIONS[cfg.model.dtype],
                   grad_checkpointing=bool(cfg.model.gradient_checkpointing), adam_dtype="weights", device=device,
                   num_labels=int(cfg.task.get("num_labels") or sequences_per_row(cfg.task)))


def train_tokens(cfg, method, arch: Architecture | None, device: str, seq: int) -> int | None:
    """The tokens (sequences x width) a training micro-batch may hold, with training rows of `seq` tokens at
    most: trainer.train_tokens, or with `auto` on a CPU as many as keep the activations the memory model
    predicts for `method` (full fine-tuning's where it does not model the method) within
    CPU_TRAIN_ACTIVATIONS; None: whole batches (and with `auto` where the architecture is not modelled, or for
    a method that draws random weights once per batch: `Method.draws_weights`)."""
    value = cfg.trainer.get("train_tokens")
    if value != "auto":
        return None if value is None else int(value)
    if device != "cpu" or arch is None or method.draws_weights:
        return None
    setting = step_setting(cfg, device, seq, 1)
    try:
        step = predict(arch, method, setting)
    except SiftError:
        step = predict(arch, "full_ft", setting)
    per_sequence = step.activations + step.recompute
    return max(1, CPU_TRAIN_ACTIVATIONS // per_sequence) * max(1, seq)


def run_peak(cfg, method, arch: Architecture, device: str, seq: int, processes: int = 1) -> RunPeak:
    """The peak of `cfg`'s run on a `device` type with training rows of `seq` tokens at most, per process
    (trainer.batch_size is split over `processes`, and run in micro-batches of trainer.train_tokens); processes
    on a CPU share its memory."""
    from sift_cli.batching import eval_tokens, logit_positions

    tcfg = cfg.trainer
    choices = sequences_per_row(cfg.task)
    precision = PRECISIONS[cfg.model.dtype]
    rows = math.ceil(int(tcfg.batch_size) / processes)
    budget = train_tokens(cfg, method, arch, device, seq)
    if budget is not None:
        rows = min(rows, max(1, budget // (max(1, seq) * choices)))
    setting = step_setting(cfg, device, seq, rows * choices)
    step = predict(arch, method, setting)
    between_steps = step.weights + step.buffers + step.master_weights + step.optimizer
    if device == "cpu" and tcfg.select_on != "last":  # the best trainable state so far, copied to the CPU
        between_steps += step.trainable_params * (4 if step.master_weights else DTYPE_BYTES[precision])
    tokens = max(eval_tokens(tcfg, device), seq)  # a row longer than the budget runs alone
    evaluation = evaluation_bytes(arch, tokens, precision, logit_positions(arch.vocab))
    return RunPeak(training=step.total + RUNTIME_BYTES, evaluation=between_steps + evaluation + RUNTIME_BYTES,
                   processes=processes if device == "cpu" else 1)


def longest_row(dataset) -> int:
    """The widest row of a tokenised set (a multiple-choice row: its longest choice), from its Arrow column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["input_ids"]
    while pa.types.is_list(column.type.value_type):
        column = pc.list_flatten(column)
    return pc.max(pc.list_value_length(column)).as_py() or 0


def check_memory(cfg, method, device, processes: int, train=None) -> None:
    """Refuse, in one line, a run whose predicted peak on a torch `device` exceeds the memory available there.
    Without the tokenised training set (`train`), before the data load, training rows count one token: what
    every run of the config needs (weights, optimizer state, an evaluation batch); with it, the longest row.
    Runs the memory model cannot predict (an architecture or method it does not model, a config that cannot
    be read without a download) are not checked."""
    from sift_cli.models import skeleton

    if not cfg.trainer.memory_check:
        return
    modules = skeleton(cfg.model)
    if modules is None:
        return
    seq = 1 if train is None else longest_row(train)
    try:
        peak = run_peak(cfg, method, architecture_of(modules.config), device.type, seq, processes)
    except SiftError:
        return
    available = available_bytes(device)
    if available is None or peak.total <= available:
        return
    where = "the GPU has" if device.type == "cuda" else "this machine has"
    shared = f" for {peak.processes} processes" if peak.processes > 1 else ""
    raise SiftError(f"this run needs about {peak.total / GIB:.1f} GiB{shared} (training step "
                    f"{peak.training / GIB:.1f} GiB, evaluation {peak.evaluation / GIB:.1f} GiB, from the memory "
                    f"model) but {where} {available / GIB:.1f} GiB available; lower trainer.train_tokens, "
                    f"task.max_length or trainer.eval_tokens, or set trainer.memory_check=false to run anyway")
