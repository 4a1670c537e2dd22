#!/usr/bin/env python3
"""The transformers peer of axl-bench-model: same modes, same shape, same measurements.

    python bench/peer_transformers.py MODE [--seq N] [--steps N] [--new-tokens N]

MODE is `forward` or `generate` (training is bench/peer_train.py). Prints one JSON line like
axl-bench-model. Needs torch and transformers, installed by hand from PyPI.
"""

import argparse
import json
import resource
import time

import torch
import transformers

SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=0, eos_token_id=0,
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).float()
    ids = torch.randint(0, 49152, (1, a.seq))
    out = {"mode": a.mode, "peer": "transformers " + transformers.__version__, "torch": torch.__version__}
    if a.mode == "forward":
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
            start = time.perf_counter()
            for _ in range(a.steps):
                model(input_ids=ids)
        step = (time.perf_counter() - start) / a.steps
        out.update(seq=a.seq, tokens_per_s=a.seq / step, step_s=step)
    elif a.mode == "generate":
        model.eval()
        prompt = ids[:, :16]
        per_token = []
        with torch.no_grad():
            res = model(input_ids=prompt, use_cache=True)
            cache = res.past_key_values
            nxt = res.logits[:, -1:].argmax(-1)
            for _ in range(a.new_tokens):
                start = time.perf_counter()
                res = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                per_token.append(time.perf_counter() - start)
                cache = res.past_key_values
                nxt = res.logits[:, -1:].argmax(-1)
        w = max(a.new_tokens // 8, 1)
        first = sum(per_token[:w]) / w
        last = sum(per_token[-w:]) / w
        out.update(new_tokens=a.new_tokens, tokens_per_s=a.new_tokens / sum(per_token),
                   first_ms_per_token=first * 1e3, last_ms_per_token=last * 1e3, last_over_first=last / first)
    else:
        raise SystemExit(f"unknown mode {a.mode}")
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = str(a.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
