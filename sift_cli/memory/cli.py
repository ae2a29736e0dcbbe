"""`sift-memory`: the memory of one fine-tuning step, predicted from the architecture, the method and the batch
(sift_cli/memory/model.py), set against the SIFT paper's LLaMA-7B table (`--paper`) or against measured
builds (`--validate`, sift_cli/memory/measure.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from omegaconf import OmegaConf

from sift_cli.errors import SiftError
from sift_cli.memory.measure import validation_worker
from sift_cli.memory.model import (DTYPE_BYTES, GIB, KNOWN_ARCHITECTURES, PARTS, SPARSE_LAYOUTS, Breakdown, Setting,
                                   _first_line, load_architecture, predict)


# ---- reports -------------------------------------------------------------------------------------------
# Song et al., "Sparse is Enough in Fine-tuning Pre-trained Large Language Models" (ICML 2024): LLaMA-7B,
# bf16 weights, fp32 AdamW, sequence length 2048, batch 1; their "GB".
PAPER_SIFT_LLAMA7B = [("full_ft", False, 111.03), ("full_ft", True, 76.12), ("sift", False, 51.41),
                      ("sift", True, 16.50)]


def paper_rows() -> list[dict]:
    """The paper's four numbers beside the model's, in the paper's setting and in this project's SIFT layout."""
    arch = KNOWN_ARCHITECTURES["llama-7b"]
    rows = []
    for method, checkpointing, reported in PAPER_SIFT_LLAMA7B:
        setting = Setting(batch=1, seq=2048, precision="bf16", grad_checkpointing=checkpointing,
                          attention="eager", sparse_layout="paper")
        overrides = {"sparse_rate": 0.05} if method == "sift" else {}
        predicted = predict(arch, method, setting, overrides)
        ours = predict(arch, method, replace(setting, sparse_layout="sift-run"), overrides)
        rows.append({"method": method, "grad_checkpointing": checkpointing, "paper_gib": reported,
                     "after_forward_gib": predicted.after_forward / GIB, "peak_gib": predicted.total / GIB,
                     "sift_run_peak_gib": ours.total / GIB, "breakdown": asdict(predicted)})
    return rows


def _pct(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.2f}%" if measured else "n/a"


def paper_markdown(rows: list[dict]) -> str:
    lines = ["LLaMA-7B, bf16 weights and activations, fp32 AdamW, batch 1 x 2048 tokens; GiB = 2^30 bytes.",
             "'after forward' counts what the paper counts: weights, gradients, optimizer state and the activations",
             "kept for the backward; 'peak' adds the block rebuilt in the backward under checkpointing. SIFT: 5% of",
             "all parameters, updated in place (10 bytes each: bf16 gradient, fp32 m and v); 'sift-run' is this",
             "project's SparseLinear on the 7 linear layers of each block (values, initial copy, an int64 index;",
             "a CSR row pointer per row).",
             "", "| method | checkpointing | paper | after forward | diff | peak | diff | sift-run peak |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {'yes' if row['grad_checkpointing'] else 'no'} | {row['paper_gib']:.2f} | "
                     f"{row['after_forward_gib']:.2f} | {_pct(row['after_forward_gib'], row['paper_gib'])} | "
                     f"{row['peak_gib']:.2f} | {_pct(row['peak_gib'], row['paper_gib'])} | "
                     f"{row['sift_run_peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def breakdown_markdown(title: str, breakdown: Breakdown) -> str:
    lines = [title, "", "| part | bytes | GiB |", "|---|---:|---:|"]
    for part in PARTS + ("total",):
        value = getattr(breakdown, part)
        lines.append(f"| {part.replace('_', ' ')} | {value:,} | {value / GIB:.3f} |")
    lines += ["", f"trainable parameters: {breakdown.trainable_params:,} of {breakdown.total_params:,} "
                  f"({100 * breakdown.trainable_params / breakdown.total_params:.3f}%)"]
    return "\n".join(lines) + "\n"


def _method_overrides(overrides: list[str]) -> dict:
    """`method.KEY=VALUE` overrides given to the measured runs, for the prediction to use too."""
    chosen = [o.split(".", 1)[1] for o in overrides if o.startswith("method.")]
    return OmegaConf.to_container(OmegaConf.from_dotlist(chosen)) if chosen else {}


def compare(row: dict, num_labels: int, method_overrides: dict) -> dict:
    """Predicted against measured bytes for one measured row (sift-bench's, with or without our counts)."""
    counted = row.get("counted", {})
    setting = Setting(batch=row["batch"], seq=row["seq"], device="cpu", adam_dtype="weights",
                      num_labels=counted.get("num_labels", num_labels))
    predicted = predict(load_architecture(row["model"]), row["method"], setting, method_overrides)
    out = {"model": row["model"], "method": row["method"], "batch": row["batch"], "seq": row["seq"],
           "params": (predicted.weights, row["param_bytes"]), "grads": (predicted.gradients, row["grad_bytes"]),
           "optimizer": (predicted.optimizer, row["optimizer_bytes"])}
    if row.get("device") == "cuda" and row.get("peak_memory_bytes"):
        # Autocast (fp32 weights, gradients and AdamW state, bf16 activations) is no setting of the model's:
        # its peak is set against the fp32 and the bf16 predictions, which bracket it.
        for precision in ("fp32", "bf16"):
            gpu = replace(setting, device="cuda", precision=precision, adam_dtype="fp32")
            out[f"peak_{precision}"] = (predict(load_architecture(row["model"]), row["method"], gpu,
                                                method_overrides).total, row["peak_memory_bytes"])
    if counted:
        # a first step adds the activations, the gradients and the optimizer state to the loaded model
        step = predicted.activations + predicted.recompute + predicted.gradients + predicted.optimizer
        out["buffers"] = (predicted.buffers, counted["buffer_bytes"])
        out["activations"] = (predicted.activations, counted["activation_bytes"])
        out["step_live"] = (step, counted["step_allocated_increase"])
        out["step_rss"] = (step, counted["step_rss_increase"])
    return out


VALIDATION_COLUMNS = ("params", "buffers", "grads", "optimizer", "activations", "step_live", "step_rss")
GPU_COLUMNS = ("peak_fp32", "peak_bf16")


def validation_markdown(compared: list[dict], command: str) -> str:
    gpu = any(column in row for row in compared for column in GPU_COLUMNS)
    columns = VALIDATION_COLUMNS + GPU_COLUMNS if gpu else VALIDATION_COLUMNS
    lines = [f"Command: `{command}`", "",
             "Each cell: predicted / measured MiB (relative error of the prediction). params, grads, optimizer: "
             "sift-bench's counts; buffers, activations: a first step's tensors counted (activations: saved for "
             "the backward); step_live, step_rss: how far live malloc bytes and RSS rise over the loaded model "
             "during that step, against the predicted activations + gradients + optimizer state."
             + (" peak_fp32, peak_bf16: a GPU's peak allocated memory under bf16 autocast against the whole "
                "step predicted in fp32 and in bf16." if gpu else ""), "",
             "| model | method | batch x seq | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in compared:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | | failed: {row['error']} |")
            continue
        cells = [f"{p / 2**20:.4g} / {m / 2**20:.4g} ({_pct(p, m)})" if m is not None else ""
                 for p, m in (row.get(column, (None, None)) for column in columns)]
        lines.append(f"| {row['model']} | {row['method']} | {row['batch']} x {row['seq']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_data_overrides() -> list[str]:
    """Without SIFT_DATA_DIR, the measured runs read the test fixtures (MRPC rows) next to this package."""
    fixtures = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    if os.environ.get("SIFT_DATA_DIR") or not fixtures.is_dir():
        return []
    return ["task=glue/mrpc", f"data.dir={fixtures}", "data.k_shot=4"]


def _run_worker(model: str, method: str, args) -> dict:
    command = [sys.executable, "-m", "sift_cli.memory.cli", "--worker", "--models", model, "--methods", method,
               "--batch", str(args.batch), "--seq", str(args.seq), *[f"--override={o}" for o in args.override]]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return {"model": model, "method": method, "batch": args.batch, "seq": args.seq, "error": reason[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def validate(args, command: str) -> tuple[list[dict], str]:
    """Measure (or read sift-bench's rows) and set every measured byte count against its prediction."""
    if args.bench_json:
        try:
            rows = [row for row in json.loads(args.bench_json.read_text())["rows"] if row.get("loop") != "plain"]
        except (OSError, ValueError, KeyError) as err:
            raise SiftError(f"cannot read sift-bench rows from {args.bench_json}: {_first_line(err)}") from None
    else:
        rows = []
        for model in args.models:
            for method in args.methods:
                rows.append(_run_worker(model, method, args))
                status = rows[-1].get("error") or "measured"
                print(f"sift-memory: {model} {method}: {status}", file=sys.stderr, flush=True)
    overrides = _method_overrides(args.override)
    compared = [row if "error" in row else compare(row, args.num_labels, overrides) for row in rows]
    return compared, validation_markdown(compared, command)


# ---- command line --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this command
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sift-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="llama-7b, a conf/model name (tiny-bert, minilm-l6, ...) or a config folder")
    parser.add_argument("--method", default="full_ft", help="a conf/method name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument("--precision", choices=tuple(DTYPE_BYTES), default="fp32", help="weights and activations")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--sparse-rate", type=float, help="sparse methods' share of target entries (method.sparse_rate)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (method.r)")
    parser.add_argument("--num-labels", type=int, default=2, help="classes of the classification head")
    parser.add_argument("--master-weights", action="store_true", help="fp32 copies of 16-bit trainable weights")
    parser.add_argument("--adam-dtype", choices=("fp32", "weights"), default="fp32",
                        help="AdamW m and v: fp32, or the parameter's dtype (torch.optim.AdamW on bf16 weights)")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="sdpa: a fused kernel (its math fallback on a CPU with attention dropout); "
                             "eager: scores and probabilities kept")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="dropout masks: 1 byte per entry on a GPU, activation-sized on a CPU")
    parser.add_argument("--sparse-layout", choices=SPARSE_LAYOUTS, default="sift-run",
                        help="sift-run: SparseLinear on the target linears; paper: in place, over every parameter")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--paper", choices=("sift-llama7b",), help="the paper's numbers beside the predictions")
    parser.add_argument("--validate", action="store_true", help="predictions against measured bytes")
    parser.add_argument("--models", nargs="+", default=["tiny-bert", "minilm-l6"], help="--validate: models")
    parser.add_argument("--methods", nargs="+", default=["full_ft", "lora", "bitfit", "sift"],
                        help="--validate: methods")
    parser.add_argument("--override", action="append", default=None,
                        help="--validate: a config override of the measured runs (default: the test fixtures' MRPC)")
    parser.add_argument("--bench-json", type=Path, help="--validate: compare sift-bench's bench.json instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.override = default_data_overrides() if args.override is None else args.override
    try:
        if args.worker:
            print(json.dumps(validation_worker(args.models[0], args.methods[0], args.batch, args.seq, args.override)))
            return
        if args.paper:
            rows = paper_rows()
            print(json.dumps(rows, indent=2) if args.format == "json" else paper_markdown(rows), end="")
            return
        if args.validate:
            command = "sift-memory " + " ".join(argv if argv is not None else sys.argv[1:])
            compared, report = validate(args, command)
            print(json.dumps(compared, indent=2) if args.format == "json" else report, end="")
            return
        if not args.model:
            raise SiftError("give --model (or --paper sift-llama7b, or --validate)")
        setting = Setting(batch=args.batch, seq=args.seq, precision=args.precision,
                          grad_checkpointing=args.grad_checkpointing, master_weights=args.master_weights,
                          adam_dtype=args.adam_dtype, attention=args.attention, device=args.device,
                          sparse_layout=args.sparse_layout, num_labels=args.num_labels)
        breakdown = predict(load_architecture(args.model), args.method, setting,
                            {"sparse_rate": args.sparse_rate, "r": args.lora_r})
        if args.format == "json":
            print(json.dumps({"model": args.model, "method": args.method, **asdict(setting), **asdict(breakdown),
                              "total": breakdown.total, "unit": "bytes"}, indent=2))
        else:
            title = (f"sift-memory: {args.model}, {args.method}, batch {args.batch} x {args.seq} tokens, "
                     f"{args.precision}, gradient checkpointing {'on' if args.grad_checkpointing else 'off'}")
            print(breakdown_markdown(title, breakdown), end="")
    except SiftError as err:
        print(f"sift-memory: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
