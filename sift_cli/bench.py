"""`sift-bench`: what a training step of each method costs, as ratios to full fine-tuning measured in the
same run.

Each (model, sequence length, method) is measured in a fresh process, so that peak memory is its own: the
process builds the run exactly as `sift-run` does (same config, method set-up and `Trainer.micro_step`),
then times optimizer steps on a fixed random batch. Reported per method: median step time, peak memory
during the steps (resident set size on a CPU, max allocated on a GPU), bytes held by parameters,
gradients and optimizer state (with the tensors a method trains by its own optimizer, such as PAC's noise
scales), and trainable parameters. Full fine-tuning's achieved FLOP/s is set against a matrix-multiply peak
measured on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"tiny": "tiny-bert", "minilm": "minilm-l6"}
DEFAULT_METHODS = ["full_ft", "lora", "bitfit", "sift", "sam", "random_mask", "magnitude", "fisher", "mixout",
                   "diff_pruning", "adapter", "prefix", "s4", "pac"]


def train_step_flops(model, batch: int, seq: int) -> float:
    """Forward + backward FLOPs of a full fine-tuning step: 6 per weight per token in the linear layers,
    plus the attention scores and context (2 matmuls of seq x seq x width per layer, forward and back)."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    layers, width = config.num_hidden_layers, config.hidden_size
    tokens = batch * seq
    return 6.0 * linear * tokens + 3 * 4.0 * layers * batch * seq * seq * width


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / min(times)


def measure(model: str, method: str, batch: int, seq: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    """One method on one model and batch, in this process (the worker side of `sift-bench`)."""
    import torch

    from sift_cli.memory.measure import PeakMemory, StepHarness

    with tempfile.TemporaryDirectory() as scratch:
        harness = StepHarness.build(model, method, batch, seq, overrides, Path(scratch))
        trainer = harness.trainer
        device = trainer.accelerator.device
        for _ in range(warmup):
            harness.step()
        times = []
        with PeakMemory(device) as memory:
            for _ in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                harness.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        model_ = trainer.unwrapped_model
        return {
            "model": model, "method": method, "batch": batch, "seq": seq, "device": device.type,
            "step_s": statistics.median(times),
            "peak_memory_bytes": memory.peak,
            **{key: value for key, value in harness.state_bytes().items() if key != "buffer_bytes"},
            "trainable_params": harness.job.trainable_params,
            "total_params": harness.job.total_params,
            "train_flops": train_step_flops(model_, batch, seq) if method == "full_ft" else None,
        }


RATIO_KEYS = ("step_s", "peak_memory_bytes", "grad_bytes", "optimizer_bytes", "trainable_params")


def add_ratios(rows: list[dict]) -> None:
    """Each measured row gets `<key>_ratio`: its value over full fine-tuning's on the same model and batch."""
    reference = {(r["model"], r["seq"]): r for r in rows if r.get("method") == "full_ft" and "error" not in r}
    for row in rows:
        ref = reference.get((row["model"], row["seq"]))
        if ref is None or "error" in row:
            continue
        for key in RATIO_KEYS:
            row[f"{key}_ratio"] = row[key] / ref[key] if ref[key] else None


def _mb(value) -> str:
    return f"{value / 2**20:.3g}"


def _ratio(row: dict, key: str) -> str:
    value = row.get(f"{key}_ratio")
    return "" if value is None else f" ({value:.2f}x)" if value >= 0.01 else f" ({value:.4f}x)"


def markdown(rows: list[dict], peak_flops: float, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Matrix-multiply peak on this machine (fp32, 2048^3): {peak_flops / 1e9:.1f} GFLOP/s", ""]
    for row in rows:
        if row.get("method") == "full_ft" and row.get("train_flops"):
            achieved = row["train_flops"] / row["step_s"]
            lines.append(f"- full fine-tuning, {row['model']}, batch {row['batch']} x {row['seq']} tokens: "
                         f"{achieved / 1e9:.1f} GFLOP/s achieved = {100 * achieved / peak_flops:.0f}% of that peak")
    lines += ["", "Ratios in brackets are to full fine-tuning on the same model and batch, measured in the same run.",
              "", "| model | seq | method | step (ms) | peak memory (MB) | params (MB) | grads (MB) | "
              "optimizer state (MB) | trainable params |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['seq']} | {row['method']} | failed: {row['error']} | | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['seq']} | {row['method']} | {1000 * row['step_s']:.1f}{_ratio(row, 'step_s')} | "
            f"{_mb(row['peak_memory_bytes'])}{_ratio(row, 'peak_memory_bytes')} | {_mb(row['param_bytes'])} | "
            f"{_mb(row['grad_bytes'])}{_ratio(row, 'grad_bytes')} | "
            f"{_mb(row['optimizer_bytes'])}{_ratio(row, 'optimizer_bytes')} | "
            f"{row['trainable_params']:,}{_ratio(row, 'trainable_params')} |")
    return "\n".join(lines) + "\n"


def _run_worker(model: str, method: str, args) -> dict:
    command = [sys.executable, "-m", "sift_cli.bench", "--worker", "--models", model, "--methods", method,
               "--batch", str(args.batch), "--seqs", str(args.seqs[0]), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *[f"--override={o}" for o in args.override]]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]
        return {"model": model, "method": method, "seq": args.seqs[0], "batch": args.batch, "error": reason[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="sift-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS.values()),
                        help="model config names (tiny-bert, minilm-l6, ...)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--seqs", nargs="+", type=int, default=[64, 256], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="an extra config override")
    parser.add_argument("--output", type=Path, default=None, help="write JSON and Markdown here (a folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = measure(args.models[0], args.methods[0], args.batch, args.seqs[0], args.steps, args.warmup,
                         args.override)
        print(json.dumps(result))
        return
    methods = ["full_ft"] + [m for m in args.methods if m != "full_ft"]
    rows = []
    for model in args.models:
        for seq in args.seqs:
            for method in methods:
                worker_args = argparse.Namespace(**{**vars(args), "seqs": [seq]})
                row = _run_worker(model, method, worker_args)
                rows.append(row)
                status = row.get("error") or f"{1000 * row['step_s']:.1f} ms/step"
                print(f"{model} seq={seq} {method}: {status}", file=sys.stderr, flush=True)
    add_ratios(rows)
    peak = matmul_peak_flops()
    command = "sift-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(rows, peak, command)
    print(report)
    if args.output:
        from sift_cli.results import write_bytes_atomic, write_json_atomic

        args.output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output / "bench.json", {"matmul_peak_flops": peak, "rows": rows, "command": command})
        write_bytes_atomic(args.output / "bench.md", report.encode())


if __name__ == "__main__":
    main()
