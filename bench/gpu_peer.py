"""The peer of `axl-bench-gpu`: the same ops of a SmolLM2-135M training step, forward and
backward, in f32, as PyTorch's eager mode runs them under transformers (LlamaRMSNorm's
composition, SiLU(gate)·up, rotate-half RoPE on q and k, lm_head then cross_entropy with
whole logits, torch.optim.AdamW's default step). One JSON line per op, median milliseconds.

    python3 bench/gpu_peer.py [--tokens 8192] [--repeat 20]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
VOCAB, SEQUENCE, PARAMETERS = 49152, 2048, 134_515_008


def timed(repeat, op):
    for _ in range(3):
        op()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        op()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def rms_norm(x, w, eps=1e-5):
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4 * SEQUENCE)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tokens, repeat = args.tokens, args.repeat
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(7)

    def rand(*shape, scale=1.0, grad=False):
        t = (torch.rand(*shape, device=dev, generator=gen) * 2 - 1) * scale
        return t.requires_grad_(grad)

    def report(op, ms):
        print(json.dumps({"op": op, "ms": ms, "tokens": tokens}), flush=True)

    x, w = rand(tokens, HIDDEN, scale=2.0, grad=True), rand(HIDDEN, grad=True)
    dy = rand(tokens, HIDDEN)
    report("rms_norm", timed(repeat, lambda: rms_norm(x, w).backward(dy)))

    gate, up = rand(tokens, INTERMEDIATE, scale=4.0, grad=True), rand(tokens, INTERMEDIATE, scale=2.0, grad=True)
    dout = rand(tokens, INTERMEDIATE)
    report("swiglu", timed(repeat, lambda: (F.silu(gate) * up).backward(dout)))

    batch = tokens // SEQUENCE
    q = rand(batch, Q_HEADS, SEQUENCE, HEAD_DIM, grad=True)
    k = rand(batch, KV_HEADS, SEQUENCE, HEAD_DIM, grad=True)
    cos, sin = rand(SEQUENCE, HEAD_DIM), rand(SEQUENCE, HEAD_DIM)
    dq, dk = rand(*q.shape), rand(*k.shape)

    def rope():
        qo = q * cos + rotate_half(q) * sin
        ko = k * cos + rotate_half(k) * sin
        torch.autograd.backward([qo, ko], [dq, dk])

    report("rope_qk", timed(repeat, rope))

    hidden = rand(tokens, HIDDEN, grad=True)
    weight = rand(VOCAB, HIDDEN, scale=0.05)
    targets = torch.randint(0, VOCAB, (tokens,), device=dev, generator=gen)

    def head_loss():
        F.cross_entropy(hidden @ weight.T, targets, reduction="sum").backward()

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    report("head_loss_logits", timed(repeat, head_loss))
    print(json.dumps({"op": "head_loss_logits_peak_mib",
                      "mib": (torch.cuda.max_memory_allocated() - base) / 2**20}), flush=True)

    del x, w, dy, gate, up, dout, q, k, dq, dk, hidden, weight
    param = torch.nn.Parameter(rand(PARAMETERS))
    param.grad = rand(PARAMETERS)
    optimizer = torch.optim.AdamW([param], lr=1e-5, weight_decay=0.01)
    report("adamw_135m", timed(repeat, optimizer.step))
    fused = torch.optim.AdamW([param], lr=1e-5, weight_decay=0.01, fused=True)
    report("adamw_135m_torch_fused", timed(repeat, fused.step))


if __name__ == "__main__":
    main()
