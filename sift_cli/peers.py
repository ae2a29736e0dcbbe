"""Plain training loops, the reference `sift-bench --peers` sets our step against.

What one writes without this project, after transformers' examples/pytorch/text-classification/
run_glue_no_trainer.py: peft's `get_peft_model` for LoRA, torch's AdamW (or SGD, as `trainer.optimizer`
says) over the trainable parameters (no weight decay on biases and norm weights), transformers' linear or
constant schedule, `loss.backward()`, clipping, step. The model loads as `sift-run` loads it (sift_cli/models.py: the same weights, dtype and head), and every setting
comes from the config our run of the same method composes (batch, dropout, learning rate, weight decay,
clipping, schedule, the optimizer's fused kernel, precision, LoRA's rank, alpha, dropout and targets), so
the two differ by the loop alone.
"""

from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from sift_cli.errors import SiftError
from sift_cli.methods.base import NO_DECAY, make_optimizer

PEERS = {"full_ft": "plain transformers loop", "lora": "plain peft loop"}


def _precision(tcfg, device: torch.device) -> str:
    """trainer.precision as `make_accelerator` resolves it; fp16 would need a gradient scaler, which the
    plain loops leave out."""
    if tcfg.precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if tcfg.precision == "fp16":
        raise SiftError("the plain-loop peers run in fp32 or bf16, not trainer.precision=fp16")
    return tcfg.precision


class PlainLoop:
    """The plain loop of `cfg.method.name` (full_ft or lora) on a fixed batch, ready to step."""

    def __init__(self, cfg, inputs_for):
        from peft import LoraConfig, get_peft_model
        from transformers import get_scheduler

        from sift_cli.models import load_causal_lm, load_classifier, load_tokenizer

        method, tcfg = cfg.method, cfg.trainer
        if method.name not in PEERS:
            raise SiftError(f"no plain-loop peer for method={method.name}; peers: {', '.join(PEERS)}")
        if tcfg.schedule not in ("linear", "constant"):
            raise SiftError(f"the plain-loop peers run trainer.schedule=linear or constant, not {tcfg.schedule}")
        causal = cfg.model.kind == "causal_lm"
        tokenizer = load_tokenizer(cfg.model)
        torch.manual_seed(int(cfg.seed))
        if causal:
            model = load_causal_lm(cfg.model, tokenizer, int(cfg.seed)).model
        else:
            model = load_classifier(cfg.model, int(cfg.task.num_labels), tokenizer, int(cfg.seed)).model
        if method.name == "lora":
            targets = method.target_modules
            model = get_peft_model(model, LoraConfig(
                task_type="CAUSAL_LM" if causal else "SEQ_CLS", r=int(method.r), lora_alpha=float(method.alpha),
                lora_dropout=float(method.dropout),
                target_modules=OmegaConf.to_container(targets) if targets is not None else None))
        cpu = tcfg.device == "cpu" or not torch.cuda.is_available()
        self.device = torch.device("cpu" if cpu else "cuda")
        self.model = model.to(self.device)
        self.model.train()
        if tcfg.get("compile", False):  # as our trainer does with trainer.compile=true
            self.model.compile()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not any(k in n for k in NO_DECAY)],
                   "weight_decay": float(tcfg.weight_decay)},
                  {"params": [p for n, p in named if any(k in n for k in NO_DECAY)], "weight_decay": 0.0}]
        self.params = [p for _, p in named]
        self.optimizer = make_optimizer([g for g in groups if g["params"]], tcfg)
        total = int(tcfg.max_steps or 1000)
        schedule = "constant_with_warmup" if tcfg.schedule == "constant" else tcfg.schedule
        self.scheduler = get_scheduler(schedule, self.optimizer, round(float(tcfg.warmup_ratio) * total), total)
        self.max_grad_norm = float(tcfg.max_grad_norm or 0)
        self.precision = _precision(tcfg, self.device)
        self.inputs = inputs_for(self.model.config.vocab_size, None if causal else int(cfg.task.num_labels),
                                 self.device)
        self.trainable_params = sum(p.numel() for p in self.params)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> float:
        with self._autocast():
            loss = self.model(**self.inputs).loss
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
