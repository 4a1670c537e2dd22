#!/usr/bin/env python3
"""Helper of bench/axolotl_train.sh; run with the Axolotl environment's Python.

    python bench/axolotl_train_setup.py prepare WORK --steps N [--seq 512] [--batch 2]
    python bench/axolotl_train_setup.py measure OUT.json -- COMMAND...

prepare: writes into WORK a randomly initialised "tiny" Llama (the shape of bench/peer_train.py
--shape tiny: hidden 256, intermediate 688, 4 layers, 8 heads, 4 KV heads, vocab 8192, untied,
f32, seed 0, saved with save_pretrained), a byte-level BPE tokenizer of 8192 tokens trained on
generated pseudo-text, a pre-tokenized dataset of random token ids (data.jsonl: input_ids,
attention_mask, labels; each row exactly --seq tokens), the Axolotl config (axolotl.yml: LoRA
r 16 / alpha 32 on all linear layers, f32, micro batch 2, max_steps N + 1) and the step-timing
plugin module (axl_bench_timer.py) that the config names.

measure: runs COMMAND, polls /proc every 50 ms for the summed resident set of its whole process
tree, and writes the peak (and the largest single process's peak, from getrusage, and each
process's polled peak) to OUT.json. Exits with COMMAND's status.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

TINY = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    pad_token_id=2,
)

# Registered through `plugins:` in the config; times each optimizer step from the end of the
# previous one (so data loading, logging and callbacks count) and writes the times, and the
# metrics the HF Trainer logs at the end, to $AXL_BENCH_TIMINGS.
TIMER_PLUGIN = '''
import json, os, time

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


class _StepTimes(TrainerCallback):
    def __init__(self):
        self.last = None
        self.steps = []
        self.final = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:
            self.final = dict(logs)

    def on_train_end(self, args, state, control, **kwargs):
        with open(os.environ["AXL_BENCH_TIMINGS"], "w") as f:
            json.dump({"step_s": self.steps, "final": self.final}, f)


class StepTimer(BasePlugin):
    def add_callbacks_pre_trainer(self, cfg, model):
        return [_StepTimes()]
'''


def prepare(a):
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    work = a.work
    os.makedirs(work, exist_ok=True)
    model_dir = os.path.join(work, "model")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY)
    model = transformers.LlamaForCausalLM(config).float()
    model.save_pretrained(model_dir, safe_serialization=True)

    # Pseudo-text from a few thousand made-up words, enough for 8192 BPE tokens.
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(6000)]
    lines = [" ".join(rng.choices(words, k=rng.randint(5, 30))) + "." for _ in range(20000)]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(model_dir)
    check = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(check) <= TINY["vocab_size"] and check.bos_token_id == 1 and check.eos_token_id == 2, (
        len(check), check.bos_token_id, check.eos_token_id)

    # Random token ids: BOS, then ids from the whole (non-special) vocabulary, then EOS.
    rows = max(64, 4 * a.batch * (a.steps + 1))
    with open(os.path.join(work, "data.jsonl"), "w") as f:
        for _ in range(rows):
            ids = [1] + [rng.randrange(3, len(check)) for _ in range(a.seq - 2)] + [2]
            f.write(json.dumps({"input_ids": ids, "attention_mask": [1] * a.seq, "labels": ids}) + "\n")

    with open(os.path.join(work, "axl_bench_timer.py"), "w") as f:
        f.write(TIMER_PLUGIN)

    with open(os.path.join(work, "axolotl.yml"), "w") as f:
        f.write(f"""\
base_model: {model_dir}
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer
plugins:
  - axl_bench_timer.StepTimer
datasets:
  - path: {work}/data.jsonl
    ds_type: json
    type:
dataset_prepared_path: {work}/prepared
dataset_num_proc: 1
val_set_size: 0
output_dir: {work}/out
sequence_len: {a.seq}
sample_packing: false
pad_to_sequence_len: false
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.0
lora_target_linear: true
# Axolotl 0.21 turns these on by default for LoRA; they are Triton kernels that allocate on
# "cuda" and fail on CPU.
lora_mlp_kernel: false
lora_qkv_kernel: false
lora_o_kernel: false
lora_embedding_kernel: false
micro_batch_size: {a.batch}
gradient_accumulation_steps: 1
max_steps: {a.steps + 1}
num_epochs: 1
optimizer: adamw_torch
learning_rate: 1e-4
weight_decay: 0.0
max_grad_norm: 1.0
lr_scheduler: constant
warmup_steps: 0
bf16: false
fp16: false
tf32: false
attn_implementation: sdpa
gradient_checkpointing: false
logging_steps: 1
save_strategy: "no"
dataloader_num_workers: 0
dataloader_pin_memory: false
seed: 0
""")


def tree_pids(root):
    """root and all its descendants (one scan of /proc)."""
    children = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def measure(a):
    # The tree is rescanned every 0.5 s and its members' RSS read every 50 ms, which keeps the
    # monitor's own CPU use well under 1 % of a core (a full /proc scan costs a few ms).
    proc = subprocess.Popen(a.command)
    peak, per_pid, names, pids, scanned = 0, {}, {}, [proc.pid], 0.0
    while proc.poll() is None:
        now = time.monotonic()
        if now - scanned > 0.5:
            pids, scanned = tree_pids(proc.pid), now
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    kib = int(f.read().split()[1]) * PAGE_KIB
                if pid not in names:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        names[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            except (OSError, ValueError, IndexError):
                continue
            total += kib
            per_pid[pid] = max(per_pid.get(pid, 0), kib)
        peak = max(peak, total)
        time.sleep(0.05)
    with open(a.out, "w") as f:
        json.dump({"tree_peak_rss_mib": peak / 1024,
                   "max_process_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                   "per_process_peak_mib": {f"{p} {names.get(p, '')}": k / 1024 for p, k in per_pid.items()}},
                  f, indent=1)
    sys.exit(proc.returncode)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("work")
    q.add_argument("--steps", type=int, default=3)
    q.add_argument("--seq", type=int, default=512)
    q.add_argument("--batch", type=int, default=2)
    q = sub.add_parser("measure")
    q.add_argument("out")
    q.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a)
    else:
        if a.command and a.command[0] == "--":
            a.command = a.command[1:]
        measure(a)


if __name__ == "__main__":
    main()
