"""`sift-bench`: what a training step of each method costs, as ratios to full fine-tuning measured in the
same run.

Each (model, sequence length, method) is measured in a fresh process, so that peak memory is its own: the
process builds the run exactly as `sift-run` does (same config, method set-up and `Trainer.micro_step`),
then times optimizer steps on a fixed random batch. Reported per method: median step time, peak memory
during the steps (resident set size on a CPU, max allocated on a GPU), bytes held by parameters,
gradients and optimizer state (with the tensors a method trains by its own optimizer, such as PAC's noise
scales), and trainable parameters. Full fine-tuning's achieved FLOP/s is set against a matrix-multiply peak
measured on the same machine. `--eval` adds, per model and method, the peak memory and time of evaluating each
of the run's test sets, in a fresh process before any training step.

`--peers` measures plain loops beside ours (sift_cli/peers.py: a transformers loop for full fine-tuning, a
peft loop for LoRA, on the same config and batch, each in a fresh process too) and prints each method's
step as a ratio to its peer's, so the runner's own overhead stays visible. Each step is also timed in
process CPU time, which on a shared machine moves less with the load than the wall clock; `--rounds`
repeats every measurement, alternating, and reports medians.
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


def matmul_peak_flops(device: str = "cpu", dtype: str = "fp32", repeats: int = 5) -> tuple[float, str]:
    """The best FLOP/s of a square matrix multiply on `device` in `dtype` (fp32 or bf16), and what was
    multiplied: 2048^3 on a CPU, 8192^3 on a GPU (whose clock must be read after the product ends)."""
    import torch

    size = 8192 if device == "cuda" else 2048
    kind = torch.float32 if dtype == "fp32" else torch.bfloat16
    a, b = (torch.randn(size, size, device=device, dtype=kind) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / min(times), f"{dtype}, {size}^3, {device}"


def _time_steps(step, device, steps: int, warmup: int) -> dict:
    """Median wall and process CPU time of `steps` calls of `step` after `warmup` more, and the peak memory
    while the timed ones run."""
    import torch

    from sift_cli.memory.measure import PeakMemory

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    with PeakMemory(device) as memory:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started, started_cpu = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_memory_bytes": memory.peak}


def measure(model: str, method: str, batch: int, seq: int, steps: int, warmup: int, overrides: list[str],
            loop: str = "ours") -> dict:
    """One method on one model and batch, in this process (the worker side of `sift-bench`): our loop, or
    (`loop="plain"`) its plain peer (sift_cli/peers.py) on the same config and batch."""
    from sift_cli.memory.measure import StepHarness, compose_run, random_batch

    row = {"model": model, "method": method, "loop": loop, "batch": batch, "seq": seq}
    if loop == "plain":
        from sift_cli.peers import PlainLoop

        plain = PlainLoop(compose_run(model, method, batch, overrides),
                          lambda vocab, labels, device: random_batch(vocab, labels, batch, seq, device))
        timed = _time_steps(plain.step, plain.device, steps, warmup)
        return {**row, "device": plain.device.type, "precision": plain.precision, **timed,
                "trainable_params": plain.trainable_params}
    with tempfile.TemporaryDirectory() as scratch:
        harness = StepHarness.build(model, method, batch, seq, overrides, Path(scratch))
        trainer = harness.trainer
        device = trainer.accelerator.device
        timed = _time_steps(harness.step, device, steps, warmup)
        return {
            **row, "device": device.type, "precision": trainer.accelerator.mixed_precision, **timed,
            **{key: value for key, value in harness.state_bytes().items() if key != "buffer_bytes"},
            "trainable_params": harness.job.trainable_params,
            "total_params": harness.job.total_params,
            "train_flops": train_step_flops(trainer.unwrapped_model, batch, seq) if method == "full_ft" else None,
        }


def measure_evaluation(model: str, method: str, overrides: list[str]) -> list[dict]:
    """Each of the run's test sets evaluated once, in this process, before any training step: peak memory
    (resident set size on a CPU, max allocated on a GPU, as for a step) and seconds."""
    import torch

    from sift_cli.batching import eval_tokens
    from sift_cli.memory.measure import PeakMemory, StepHarness, release_freed

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = StepHarness.build(model, method, 1, 8, overrides, Path(scratch)).trainer
        device = trainer.accelerator.device
        for eval_set in trainer.data.tests:
            release_freed()
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                trainer.evaluate(eval_set)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            rows.append({"model": model, "method": method, "eval_set": eval_set.split,
                         "rows": len(eval_set.dataset), "eval_tokens": eval_tokens(trainer.tcfg, device.type),
                         "eval_batch_size": trainer.tcfg.eval_batch_size, "device": device.type, "eval_s": seconds,
                         "eval_peak_memory_bytes": memory.peak})
    return rows


RATIO_KEYS = ("step_s", "peak_memory_bytes", "grad_bytes", "optimizer_bytes", "trainable_params")
PEER_KEYS = ("step_s", "cpu_s", "peak_memory_bytes")


def ours(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("loop", "ours") == "ours"]


def add_ratios(rows: list[dict]) -> None:
    """Each measured row of ours gets `<key>_ratio`: its value over full fine-tuning's on the same model and batch."""
    rows = ours(rows)
    reference = {(r["model"], r["seq"]): r for r in rows if r.get("method") == "full_ft" and "error" not in r}
    for row in rows:
        ref = reference.get((row["model"], row["seq"]))
        if ref is None or "error" in row:
            continue
        for key in RATIO_KEYS:
            row[f"{key}_ratio"] = row[key] / ref[key] if ref[key] else None


def peer_of(method: str) -> str:
    """The plain loop a method is set against: full fine-tuning against transformers', the rest against peft's LoRA."""
    return "full_ft" if method == "full_ft" else "lora"


def add_peer_ratios(rows: list[dict]) -> None:
    """Each measured row of ours gets `peer` and `<key>_vs_peer`: its value over its plain peer's (`peer_of`) on the
    same model and batch, where that peer was measured."""
    peers = {(r["model"], r["seq"], r["method"]): r for r in rows if r.get("loop") == "plain" and "error" not in r}
    for row in ours(rows):
        peer = peers.get((row["model"], row["seq"], peer_of(row["method"])))
        if peer is None or "error" in row:
            continue
        row["peer"] = peer["method"]
        for key in PEER_KEYS:
            row[f"{key}_vs_peer"] = row[key] / peer[key] if peer[key] else None


def _mb(value) -> str:
    return f"{value / 2**20:.3g}"


def _ratio(row: dict, key: str) -> str:
    value = row.get(f"{key}_ratio")
    return "" if value is None else f" ({value:.2f}x)" if value >= 0.01 else f" ({value:.4f}x)"


def _times(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else f"{value:.2f}x"


def peers_markdown(rows: list[dict]) -> str:
    """Each method of ours beside its plain peer, measured in the same invocation."""
    from sift_cli.peers import PEERS

    lines = ["Plain-loop peers, measured in the same invocation, each in a fresh process: full fine-tuning against "
             "a plain transformers loop, every other method against a plain peft LoRA loop (sift_cli/peers.py: "
             "same model, batch, dropout, AdamW, clipping and schedule). CPU: the process's CPU time per step, "
             "all threads.", "",
             "| model | seq | method | step (ms) | CPU (ms) | peak memory (MB) | peer | step / peer's | "
             "CPU / peer's | peak memory / peer's |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plain = row.get("loop") == "plain"
        name = f"{PEERS[row['method']]}, {row['method']}" if plain else row["method"]
        if "error" in row:
            lines.append(f"| {row['model']} | {row['seq']} | {name} | failed: {row['error']} | | | | | | |")
            continue
        peer = "" if plain or "peer" not in row else f"plain {row['peer']}"
        lines.append(f"| {row['model']} | {row['seq']} | {name} | {1000 * row['step_s']:.1f} | "
                     f"{1000 * row['cpu_s']:.1f} | {_mb(row['peak_memory_bytes'])} | {peer} | "
                     f"{_times(row, 'step_s_vs_peer')} | {_times(row, 'cpu_s_vs_peer')} | "
                     f"{_times(row, 'peak_memory_bytes_vs_peer')} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], peak_flops: float, command: str, peak_of: str = "fp32, 2048^3, cpu") -> str:
    lines = [f"Command: `{command}`", "",
             f"Matrix-multiply peak on this machine ({peak_of}): {peak_flops / 1e9:.1f} GFLOP/s", ""]
    for row in ours(rows):
        if row.get("method") == "full_ft" and row.get("train_flops"):
            achieved = row["train_flops"] / row["step_s"]
            lines.append(f"- full fine-tuning, {row['model']}, batch {row['batch']} x {row['seq']} tokens: "
                         f"{achieved / 1e9:.1f} GFLOP/s achieved = {100 * achieved / peak_flops:.0f}% of that peak")
    lines += ["", "Ratios in brackets are to full fine-tuning on the same model and batch, measured in the same run.",
              "", "| model | seq | method | step (ms) | peak memory (MB) | params (MB) | grads (MB) | "
              "optimizer state (MB) | trainable params |", "|---|---|---|---|---|---|---|---|---|"]
    for row in ours(rows):
        if "error" in row:
            lines.append(f"| {row['model']} | {row['seq']} | {row['method']} | failed: {row['error']} | | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['seq']} | {row['method']} | {1000 * row['step_s']:.1f}{_ratio(row, 'step_s')} | "
            f"{_mb(row['peak_memory_bytes'])}{_ratio(row, 'peak_memory_bytes')} | {_mb(row['param_bytes'])} | "
            f"{_mb(row['grad_bytes'])}{_ratio(row, 'grad_bytes')} | "
            f"{_mb(row['optimizer_bytes'])}{_ratio(row, 'optimizer_bytes')} | "
            f"{row['trainable_params']:,}{_ratio(row, 'trainable_params')} |")
    if len(ours(rows)) < len(rows):
        lines += ["", peers_markdown(rows).rstrip("\n")]
    return "\n".join(lines) + "\n"


def eval_markdown(rows: list[dict]) -> str:
    lines = ["Evaluation of each test set once, before training, in a fresh process: peak memory as for a step.", "",
             "| model | method | evaluation set | rows | eval_tokens | eval_batch_size | time (s) | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | failed: {row['error']} | | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['method']} | {row['eval_set']} | {row['rows']} | {row['eval_tokens']} | "
                     f"{row['eval_batch_size'] or '-'} | {row['eval_s']:.1f} | {_mb(row['eval_peak_memory_bytes'])} |")
    return "\n".join(lines) + "\n"


def _run_worker(model: str, method: str, loop: str, args, evaluation: bool = False):
    command = [sys.executable, "-m", "sift_cli.bench", "--worker", "--loop", loop, "--models", model,
               "--methods", method, "--batch", str(args.batch), "--seqs", str(args.seqs[0]), "--steps",
               str(args.steps), "--warmup", str(args.warmup), *[f"--override={o}" for o in args.override]]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if evaluation:
        command.append("--eval")
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]
        failed = {"model": model, "method": method, "loop": loop, "seq": args.seqs[0], "batch": args.batch,
                  "error": reason[:200]}
        return [failed] if evaluation else failed
    return json.loads(out.stdout.strip().splitlines()[-1])


def jobs(models: list[str], seqs: list[int], methods: list[str], peers: bool) -> list[tuple[str, int, str, str]]:
    """(model, seq, loop, method) in the order they run: full fine-tuning first, LoRA next, each plain peer just
    before our method of the same name (with `peers`, both peers run whichever methods are asked for)."""
    rest = sorted((m for m in methods if m != "full_ft"), key=lambda m: m != "lora")
    order = []
    for model in models:
        for seq in seqs:
            plain = [(model, seq, "plain", method) for method in ("full_ft", "lora")] if peers else []
            order += [*plain[:1], (model, seq, "ours", "full_ft"), *plain[1:]]
            order += [(model, seq, "ours", method) for method in rest]
    return order


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per job: the last round's, with the median over rounds of its timings (each round's own
    `step_s_rounds`, ... kept); a job that failed in any round is reported failed."""
    merged = []
    for runs in zip(*rounds):
        failed = [run for run in runs if "error" in run]
        if failed or len(runs) == 1:
            merged.append(failed[0] if failed else runs[0])
            continue
        row = dict(runs[-1])
        for key in PEER_KEYS:
            row[f"{key}_rounds"] = [run[key] for run in runs]
            row[key] = statistics.median(row[f"{key}_rounds"])
        merged.append(row)
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="sift-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS.values()),
                        help="model config names (tiny-bert, minilm-l6, ...)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--seqs", nargs="+", type=int, default=[64, 256], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peers", action="store_true",
                        help="also measure plain transformers and peft loops (sift_cli/peers.py) and print our "
                             "step as a ratio to theirs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every job this many times, alternating, and report the medians")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each measuring process")
    parser.add_argument("--override", action="append", default=[], help="an extra config override")
    parser.add_argument("--eval", action="store_true",
                        help="also measure evaluating each of the run's test sets (peak memory and time)")
    parser.add_argument("--output", type=Path, default=None, help="write JSON and Markdown here (a folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=("ours", "plain"), default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.eval:
            result = measure_evaluation(args.models[0], args.methods[0], args.override)
        else:
            result = measure(args.models[0], args.methods[0], args.batch, args.seqs[0], args.steps, args.warmup,
                             args.override, loop=args.loop)
        print(json.dumps(result))
        return
    order = jobs(args.models, args.seqs, args.methods, args.peers)
    rounds = []
    for index in range(max(1, args.rounds)):
        runs = {}
        for model, seq, loop, method in order if index % 2 == 0 else order[::-1]:  # drift hits both ends alike
            worker_args = argparse.Namespace(**{**vars(args), "seqs": [seq]})
            row = _run_worker(model, method, loop, worker_args)
            runs[(model, seq, loop, method)] = row
            status = row.get("error") or f"{1000 * row['step_s']:.1f} ms/step"
            print(f"{model} seq={seq} {'plain ' if loop == 'plain' else ''}{method}: {status}", file=sys.stderr,
                  flush=True)
        rounds.append([runs[job] for job in order])
    rows = merge_rounds(rounds)
    add_ratios(rows)
    add_peer_ratios(rows)
    measured = [row for row in rows if "error" not in row]
    gpu = any(row["device"] == "cuda" for row in measured)
    bf16 = any(row.get("precision") == "bf16" for row in measured)
    peak, peak_of = matmul_peak_flops("cuda" if gpu else "cpu", "bf16" if bf16 else "fp32")
    command = "sift-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    eval_rows = []
    if args.eval:
        for model in args.models:
            for method in ["full_ft"] + [m for m in args.methods if m != "full_ft"]:
                eval_rows += _run_worker(model, method, "ours", args, evaluation=True)
                print(f"{model} {method}: evaluation measured", file=sys.stderr, flush=True)
    report = markdown(rows, peak, command, peak_of) + ("\n" + eval_markdown(eval_rows) if args.eval else "")
    print(report)
    if args.output:
        from sift_cli.results import write_bytes_atomic, write_json_atomic

        args.output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output / "bench.json", {"matmul_peak_flops": peak, "matmul_peak_of": peak_of,
                                                        "rows": rows, "eval_rows": eval_rows,
                                                        "command": command})
        write_bytes_atomic(args.output / "bench.md", report.encode())


if __name__ == "__main__":
    main()
