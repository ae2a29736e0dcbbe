"""Activations: the bytes autograd keeps for the backward, walked op by op through the model.

Counted tensor by tensor along a block, as Korthikanti et al. (2022, "Reducing Activation Recomputation in
Large Transformer Models") count sbh(34 + 5as/h) bytes for a BERT layer (2-byte activations, 1-byte dropout
masks), so that the same rules cover gated MLPs (LLaMA) and methods that train only some weights. The rule
behind all of them is autograd's: an op keeps an operand only when another operand's gradient needs it. A
linear layer with a frozen weight keeps no input; softmax, GELU/SiLU, the norms and the attention products
keep theirs whenever the gradient must pass through them to something trainable below.
"""

from __future__ import annotations

from sift_cli.memory.model import (DTYPE_BYTES, INDEX_BYTES, LORA_BYTES, Architecture, Linear, Setting, Training,
                                   backbone_top_linears, block_linears)


class Tape:
    """The tensors autograd keeps for the backward, by name: a tensor kept by two ops counts once."""

    def __init__(self):
        self.kept: dict[str, int] = {}

    def keep(self, name: str, nbytes: int, when: bool = True) -> None:
        if when:
            self.kept[name] = nbytes

    @property
    def total(self) -> int:
        return sum(self.kept.values())


class Activations:
    """Bytes autograd keeps, walked op by op through the model (Hugging Face's BERT and LLaMA code).

    Each walk step takes whether its input needs a gradient and returns whether its output does.
    """

    def __init__(self, arch: Architecture, setting: Setting, training: Training):
        self.arch, self.setting, self.training = arch, setting, training
        self.act = DTYPE_BYTES[setting.precision]
        self.tokens = setting.batch * setting.seq

    def mask(self, dtype_bytes: int) -> int:
        return 1 if self.setting.device == "cuda" else dtype_bytes

    def dropout(self, tape: Tape, name: str, entries: int, grad: bool) -> None:
        tape.keep(f"{name}.mask", self.mask(self.act) * entries, when=grad and self.training.dropout)

    def linear(self, tape: Tape, lin: Linear, x: str, x_grad: bool) -> bool:
        mode = self.training.linears.get(lin.name, "frozen")
        x_bytes = self.act * self.tokens * lin.fan_in
        tape.keep(x, x_bytes, when=mode in ("dense", "sparse", "mixed"))  # the weight's gradient needs the input
        # mixout computes with a new mixed weight, which the matmul keeps for the input's gradient
        tape.keep(f"{lin.name}.mixed", self.act * lin.fan_in * lin.fan_out, when=mode == "mixed")
        if mode == "lora":  # lora_A keeps its (dropped-out, fp32) input, lora_B the rank-wide middle
            if self.training.lora_dropout or self.act != LORA_BYTES:
                tape.keep(f"{lin.name}.lora_in", LORA_BYTES * self.tokens * lin.fan_in)
                tape.keep(f"{lin.name}.lora_mask", self.mask(LORA_BYTES) * self.tokens * lin.fan_in,
                          when=x_grad and self.training.lora_dropout)
            else:
                tape.keep(x, x_bytes)
            tape.keep(f"{lin.name}.lora_mid", LORA_BYTES * self.tokens * self.training.lora_rank)
        return x_grad or mode != "frozen"

    def attention(self, tape: Tape, q_grad: bool, k_grad: bool, v_grad: bool) -> bool:
        arch, b, s = self.arch, self.setting.batch, self.setting.seq
        keys = s + self.training.prefix
        q_bytes, kv_bytes = self.act * b * s * arch.hidden, self.act * b * keys * arch.hidden  # K, V repeated for GQA
        if not self.keeps_probabilities():  # a fused kernel: q, k, v (not repeated), the output, the log-sum-exp
            grad = q_grad or k_grad or v_grad
            kv_bytes = self.act * b * keys * arch.kv_width
            for name, nbytes in (("q", q_bytes), ("k", kv_bytes), ("v", kv_bytes), ("context", q_bytes),
                                 ("lse", 4 * b * arch.heads * s)):
                tape.keep(name, nbytes, when=grad)
            return grad
        scores_grad = q_grad or k_grad
        scores = arch.heads * b * s * keys
        tape.keep("q", q_bytes, when=k_grad)
        tape.keep("k", kv_bytes, when=q_grad)
        if arch.family == "decoder":  # softmax in fp32, cast back to the activation dtype for the product with V
            tape.keep("probs32", 4 * scores, when=scores_grad)
            tape.keep("probs32" if self.act == 4 else "probs", self.act * scores, when=v_grad)
        elif self.training.dropout:
            tape.keep("probs", self.act * scores, when=scores_grad)
            tape.keep("probs.mask", self.mask(self.act) * scores, when=scores_grad)
            tape.keep("probs.dropped", self.act * scores, when=v_grad)
        else:
            tape.keep("probs", self.act * scores, when=scores_grad or v_grad)
        tape.keep("v", kv_bytes, when=scores_grad)
        return scores_grad or v_grad

    def keeps_probabilities(self) -> bool:
        """Eager attention keeps the scores' softmax; so does SDPA's math fallback, which PyTorch takes on a CPU
        when attention dropout is on. Otherwise SDPA runs a fused (flash, memory-efficient) kernel."""
        if self.setting.attention == "eager":
            return True
        return self.setting.device == "cpu" and self.arch.family == "encoder" and self.training.dropout

    def layer_norm(self, tape: Tape, name: str, x_grad: bool) -> bool:
        """LayerNorm keeps its input, mean and 1/std (fp32) when anything about it needs a gradient."""
        grad = x_grad or self.training.norms != "frozen"
        tape.keep(f"{name}.in", self.act * self.tokens * self.arch.hidden + 2 * 4 * self.tokens, when=grad)
        return grad

    def rms_norm(self, tape: Tape, name: str, x: str, x_grad: bool) -> bool:
        """LLaMA's RMSNorm: x in fp32 times rsqrt(mean(x^2) + eps), then weight times that in the activation dtype."""
        trains = self.training.norms == "all"
        tape.keep(x if self.act == 4 else f"{name}.fp32", 4 * self.tokens * self.arch.hidden, when=x_grad)
        tape.keep(f"{name}.rstd", 4 * self.tokens, when=x_grad)
        tape.keep(f"{name}.normed", self.act * self.tokens * self.arch.hidden, when=trains)
        return x_grad or trains

    def adapter(self, tape: Tape, place: str, grad: bool) -> bool:
        if place not in self.training.adapter_places:
            return grad
        if self.training.adapter_reads_norm:
            self.layer_norm(tape, f"{place}.adapter_norm", True)
        tape.keep(f"{place}.adapter_in", self.act * self.tokens * self.arch.hidden)
        tape.keep(f"{place}.adapter_mid", self.act * self.tokens * self.training.adapter_width)
        tape.keep(f"{place}.adapter_act", self.act * self.tokens * self.training.adapter_width,
                  when=self.training.adapter_activation != "relu")
        return True

    def encoder_block(self, tape: Tape, x_grad: bool) -> bool:
        query, key, value, out, up, down = block_linears(self.arch)
        q = self.linear(tape, query, "x", x_grad)
        k = self.linear(tape, key, "x", x_grad) or self.training.prefix > 0
        v = self.linear(tape, value, "x", x_grad) or self.training.prefix > 0
        o = self.linear(tape, out, "context", self.attention(tape, q, k, v))
        self.dropout(tape, "attention", self.tokens * self.arch.hidden, o)
        o = self.adapter(tape, "attention", o)
        norm1 = self.layer_norm(tape, "norm1", o or x_grad)
        hidden = self.linear(tape, up, "norm1.out", norm1)
        tape.keep("gelu.in", self.act * self.tokens * up.fan_out, when=hidden)
        d = self.linear(tape, down, "gelu.out", hidden)
        self.dropout(tape, "ffn", self.tokens * self.arch.hidden, d)
        d = self.adapter(tape, "ffn", d)
        return self.layer_norm(tape, "norm2", d or norm1)

    def decoder_block(self, tape: Tape, x_grad: bool) -> bool:
        q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = block_linears(self.arch)
        norm1 = self.rms_norm(tape, "norm1", "x", x_grad)
        q, k, v = (self.linear(tape, lin, "norm1.out", norm1) for lin in (q_proj, k_proj, v_proj))
        attended = self.linear(tape, o_proj, "context", self.attention(tape, q, k, v)) or x_grad
        norm2 = self.rms_norm(tape, "norm2", "residual", attended)
        gate = self.linear(tape, gate_proj, "norm2.out", norm2)
        up = self.linear(tape, up_proj, "norm2.out", norm2)
        mlp = self.act * self.tokens * self.arch.intermediate
        tape.keep("gate", mlp, when=gate)  # SiLU keeps its input
        tape.keep("silu", mlp, when=up)  # the product keeps each factor for the other's gradient
        tape.keep("up", mlp, when=gate)
        return self.linear(tape, down_proj, "product", gate or up) or attended

    def block(self, tape: Tape, x_grad: bool) -> bool:
        return (self.encoder_block if self.arch.family == "encoder" else self.decoder_block)(tape, x_grad)

    def embeddings(self, tape: Tape) -> bool:
        trains = self.training.embeddings
        tape.keep("input_ids", INDEX_BYTES * self.tokens, when=trains)
        if self.arch.family == "decoder":
            return trains
        norm = self.layer_norm(tape, "embeddings.norm", trains)
        self.dropout(tape, "embeddings", self.tokens * self.arch.hidden, norm)
        return norm

    def top(self, tape: Tape, x_grad: bool) -> None:
        arch, b, h = self.arch, self.setting.batch, self.arch.hidden
        if arch.family == "decoder":  # final norm, LM head, and the loss's fp32 log-probabilities
            norm = self.rms_norm(tape, "final_norm", "last_hidden", x_grad)
            tied_head_trains = arch.tied_embeddings and self.training.embeddings  # the embedding matrix is the head
            tape.keep("final_norm.out", self.act * self.tokens * arch.hidden, when=tied_head_trains)
            untied = any(self.linear(tape, lin, "final_norm.out", norm) for lin in backbone_top_linears(arch))
            logits = untied or norm or tied_head_trains
            tape.keep("log_probs", 4 * self.tokens * arch.vocab, when=logits)
            tape.keep("labels", INDEX_BYTES * self.tokens, when=logits)
            # the rotary cos and sin tables, made once and kept by every block's query and key
            tape.keep("rotary", 2 * self.act * self.setting.seq * arch.hidden // arch.heads, when=logits)
            return
        first = self.act * b * h  # the first token's hidden state
        if arch.roberta_head:
            self.dropout(tape, "head.features", b * h, x_grad)
            dense = True
            tape.keep("head.dense_in", first)
        else:  # the pooler's input is a view of the first token, which keeps the whole last hidden state
            dense = self.linear(tape, backbone_top_linears(arch)[0], "last_hidden", x_grad)
        tape.keep("head.tanh", first, when=dense)
        self.dropout(tape, "head", b * h, dense)
        tape.keep("head.classifier_in", first)

    def measure(self) -> tuple[int, int]:
        """Bytes kept at the end of the forward, and those of the block rebuilt in the backward (checkpointing)."""
        checkpointing = self.setting.grad_checkpointing
        head = Tape()
        # Hugging Face's checkpointing makes the embedding output require a gradient (enable_input_require_grads)
        grad = self.embeddings(head) or checkpointing
        kept = head.total
        block_input = self.act * self.tokens * self.arch.hidden
        for _ in range(self.arch.layers):
            tape = Tape()
            grad = self.block(tape, grad)
            kept += block_input if checkpointing else tape.total
        tail = Tape()
        self.top(tail, grad)
        kept += tail.total
        if not checkpointing:
            return kept, 0
        rebuilt = Tape()
        self.block(rebuilt, True)
        return kept, rebuilt.total - rebuilt.kept.get("x", 0)  # its input is already kept
