#!/usr/bin/env python3
"""The PyTorch peer of axl's training benchmark: a plain training loop with transformers.

    python bench/peer_train.py --shape tiny|smol --mode full|lora [--steps N] [--seq N]
                               [--threads N] [--bf16]

Each step is what one optimizer step of `axl train` does: zero_grad, forward with labels,
backward, clip_grad_norm_(1.0), AdamW (lr 1e-4, weight decay 0, trainable parameters only).
One untimed warm-up step, then --steps timed steps. Weights are f32 and randomly initialised
(seed 0); inputs and labels are the same random token ids (batch x seq). --bf16 runs forward
and loss under torch.autocast("cpu", dtype=torch.bfloat16); weights, gradients and optimizer
state stay f32.

Shapes:
  tiny  Llama, hidden 256, intermediate 688, 4 layers, 8 heads, 4 KV heads, vocab 8192,
        untied embeddings, micro batch 2
  smol  SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab
        49152, tied embeddings, rope_theta 1e5), micro batch 1
LoRA: r 16, alpha 32, dropout 0, all linear layers (peft "all-linear", so not lm_head).

Prints one JSON line. Needs torch and transformers (and peft for --mode lora), installed by
hand from PyPI.
"""

import argparse
import json
import resource
import time

import torch
import transformers

SHAPES = {
    "tiny": (dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    ), 2),
    "smol": (dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=0, eos_token_id=0,
    ), 1),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--mode", choices=["full", "lora"], default="lora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shape, batch = SHAPES[a.shape]
    config = transformers.LlamaConfig(**shape, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).float()
    peer = f"transformers {transformers.__version__} + torch {torch.__version__}"
    if a.mode == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        peer += f" + peft {peft.__version__}"
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, shape["vocab_size"], (batch, a.seq))

    def step():
        opt.zero_grad(set_to_none=True)
        if a.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    step()
    start = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    step_s = (time.perf_counter() - start) / a.steps
    print(json.dumps({
        "shape": a.shape, "mode": a.mode, "bf16": a.bf16, "peer": peer,
        "tokens_per_s": batch * a.seq / step_s, "step_s": step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(q.numel() for q in params),
        "batch": batch, "seq": a.seq, "steps": a.steps, "threads": a.threads, "last_loss": loss,
    }))


if __name__ == "__main__":
    main()
