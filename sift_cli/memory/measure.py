"""Measuring a training step: one harness for `sift-bench` (time and peak memory) and `sift-memory --validate`
(bytes held, against the prediction).

`StepHarness` builds a run as `sift-run` builds it (the same config, the method's selection from data, the
trainer) and steps it on a fixed random batch; `state_bytes` counts what parameters, gradients and every
optimizer (the trainer's and the method's own, such as PAC's noise scales) hold. The meters say how much
memory a block of code takes: `PeakMemory` (max allocated on a GPU, sampled resident set size on a CPU),
`StepPeaks` (rise of RSS and of live malloc bytes), `SavedActivations` (the tensors autograd keeps).
"""

from __future__ import annotations

import ctypes
import gc
import os
import tempfile
import threading
from pathlib import Path

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer) -> int:
    return sum(tensor_bytes(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
               for state in optimizer.state.values())


def compose_run(model: str, method: str, batch: int, overrides: list[str]):
    """The config of `sift-run model=MODEL method=METHOD OVERRIDES` with batches of `batch` (a causal LM trains
    on instructions unless OVERRIDES name a task; OVERRIDES may set that task's keys)."""
    from sift_cli.config import compose

    base = [f"model={model}", f"method={method}", "logger.mode=disabled", f"trainer.batch_size={batch}",
            "trainer.grad_accum=1", *overrides]
    named_task = any(o.startswith("task=") for o in overrides)
    if not named_task and compose([f"model={model}"]).model.kind == "causal_lm":
        base.insert(2, "task=instruct/alpaca")
    return compose(base)


def random_batch(vocab_size: int, num_labels: int | None, batch: int, seq: int, device) -> dict:
    """A fixed batch of `batch` x `seq` random tokens, no padding: class labels, or (`num_labels` None) the
    tokens themselves, as a causal LM trains."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(min(1000, vocab_size // 4), min(2000, vocab_size), (batch, seq), generator=generator)
    labels = tokens.clone() if num_labels is None else torch.randint(0, num_labels, (batch,), generator=generator)
    inputs = {"input_ids": tokens, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels}
    return {k: v.to(device) for k, v in inputs.items()}


class StepHarness:
    """A run's trainer and a fixed random batch of `batch` x `seq` tokens, ready to step."""

    def __init__(self, trainer, batch: int, seq: int):
        self.trainer = trainer
        trainer.ensure_optimizer()
        causal = trainer.cfg.task.kind == "instruct"
        self.inputs = random_batch(trainer.unwrapped_model.config.vocab_size, None if causal else trainer.task.num_labels,
                                   batch, seq, trainer.accelerator.device)
        self.grad_bytes = 0
        trainer.gradient_callbacks.append(self._count_gradients)
        trainer.model.train()

    @classmethod
    def build(cls, model: str, method: str, batch: int, seq: int, overrides: list[str], scratch: Path) -> "StepHarness":
        """The run `sift-run model=MODEL method=METHOD OVERRIDES` would train, with batches of `batch` (a causal LM
        trains on instructions), set up in `scratch`."""
        from sift_cli.run import Job
        from sift_cli.tracking import Recorder

        cfg = compose_run(model, method, batch, overrides)  # the batch is made here: seq need not fit the data
        job = Job(cfg, scratch, None)
        job.setup()
        harness = cls(job.make_trainer(Recorder(scratch, cfg.logger, "measure", None, {})), batch, seq)
        harness.job = job
        return harness

    def optimizers(self) -> list:
        return [self.trainer.optimizer, *self.trainer.method.own_optimizers()]

    def _count_gradients(self, trainer) -> None:
        tensors = {id(p): p.grad for p in trainer.unwrapped_model.parameters() if p.grad is not None}
        for optimizer in self.optimizers():
            for group in optimizer.param_groups:
                tensors.update({id(p): p.grad for p in group["params"] if p.grad is not None})
        self.grad_bytes = tensor_bytes(tensors.values())

    def step(self) -> None:
        """One optimizer step (forward, backward, clipping, update) on the fixed batch."""
        self.trainer.micro_step(self.inputs)

    def state_bytes(self) -> dict:
        """Bytes of the parameters (with the tensors the method's own optimizers train), their gradients at
        the last step, and every optimizer's state."""
        model = self.trainer.unwrapped_model
        own = [p for o in self.trainer.method.own_optimizers() for g in o.param_groups for p in g["params"]]
        return {"param_bytes": tensor_bytes({id(p): p for p in [*model.parameters(), *own]}.values()),
                "buffer_bytes": tensor_bytes({id(b): b for b in model.buffers()}.values()),
                "grad_bytes": self.grad_bytes,
                "optimizer_bytes": sum(optimizer_bytes(o) for o in self.optimizers())}


def reset_peak_rss() -> bool:
    """Set the kernel's high-water mark of this process's resident set to its current size (Linux 4.0+);
    False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (VmHWM) since the last `reset_peak_rss`."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


class PeakMemory:
    """Peak memory while the block runs: max allocated on a GPU; on a CPU the resident set's high-water mark,
    which the kernel keeps at no cost to the block (timed steps run undisturbed), or where it cannot be
    reset, the resident set size sampled by a thread."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if reset_peak_rss():
            return self
        self._stop = threading.Event()
        self.peak = rss_bytes()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak = peak_rss_bytes()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


class SavedActivations:
    """Peak bytes of the tensors autograd keeps for the backward while the block runs: each saved storage once,
    the model's parameters and buffers left out. Exact where RSS is not, but blind to what non-reentrant
    checkpointing holds by itself (its block inputs)."""

    def __init__(self, model):
        self.excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.holders: dict[int, int] = {}
        self.current = self.peak = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self.excluded:
            return tensor
        if not self.holders.get(pointer):
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.holders[pointer] = self.holders.get(pointer, 0) + 1
        return _Held(tensor, self, pointer, storage.nbytes())

    def release(self, pointer: int, nbytes: int) -> None:
        self.holders[pointer] -= 1
        if not self.holders[pointer]:
            self.current -= nbytes

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor; when autograd lets go of it, the meter hears of it."""

    __slots__ = ("tensor", "meter", "pointer", "nbytes")

    def __init__(self, tensor, meter: SavedActivations, pointer: int, nbytes: int):
        self.tensor, self.meter, self.pointer, self.nbytes = tensor, meter, pointer, nbytes

    def __del__(self):
        self.meter.release(self.pointer, self.nbytes)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None


def _allocated_bytes(libc) -> int:
    """Bytes malloc has handed out and not taken back: live memory, which RSS overstates by what it keeps."""
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def release_freed() -> None:
    """Give memory that malloc keeps after frees back to the system, so that RSS starts at the live memory."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


class StepPeaks:
    """Increase of RSS and of live malloc bytes over their values at the start, sampled while the block runs."""

    def __init__(self):
        self.libc = _glibc()
        self.rss = self.allocated = None

    def _sample(self) -> tuple[int, int | None]:
        return rss_bytes(), _allocated_bytes(self.libc) if self.libc else None

    def __enter__(self):
        release_freed()
        self._start = self._sample()
        self._peak = list(self._start)
        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(0.001):
                self._record()

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def _record(self) -> None:
        now = self._sample()
        self._peak = [max(p, n) if n is not None else None for p, n in zip(self._peak, now)]

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._record()
        self.rss = self._peak[0] - self._start[0]
        self.allocated = None if self._start[1] is None else self._peak[1] - self._start[1]


def measure_step(trainer, batch: int, seq: int) -> dict:
    """The first training step of a built trainer, counted on its tensors: parameters, buffers, gradients and
    optimizer state, the peak of the activations saved for the backward, and how far RSS and live malloc
    bytes rise over the loaded model during the step (a CPU only)."""
    harness = StepHarness(trainer, batch, seq)
    gc.collect()
    with StepPeaks() as peaks, SavedActivations(trainer.unwrapped_model) as saved:
        harness.step()
    return {**harness.state_bytes(), "activation_bytes": saved.peak,
            "num_labels": getattr(trainer.task, "num_labels", None),  # None: a language model
            "step_rss_increase": peaks.rss, "step_allocated_increase": peaks.allocated}


def validation_worker(model: str, method: str, batch: int, seq: int, overrides: list[str]) -> dict:
    """In a fresh process: sift-bench's measurement of a step (`sift_cli.bench.measure`), and the first step of
    a second build counted tensor by tensor, with its rise over the loaded model."""
    from sift_cli.bench import measure

    with tempfile.TemporaryDirectory() as scratch:
        harness = StepHarness.build(model, method, batch, seq, [f"task.max_length={seq}", *overrides], Path(scratch))
        counted = measure_step(harness.trainer, batch, seq)
    row = measure(model, method, batch, seq, steps=1, warmup=0, overrides=overrides)
    return {**row, "counted": counted}
