"""Gradient references for the CPU training engine: one training-mode step of every block of
`make_blocks.py` and of the three full networks, in float64, with the deterministic weights of
common.py (reproduced in tests/common/mod.rs, so no weights are stored).

Blocks: input `[2, C, 5, 5]`, loss `sum(out * R)` with a deterministic `R` (so dL/dout = R).
Networks (batch 2, 10 classes, labels 1 and 7, label-smoothed cross entropy 0.1):
inception_resnet_v1 (facenet, dropout off) at 160 px, inception_resnet_v2 and inception_v4
at 139 px (every map at least 3 x 3, so batch statistics stay well conditioned).

Stored per case (`<case>.` prefix, keys in the reference's naming):
- `loss`, the output's sum of squares (`out_sq`);
- for the input gradient and every parameter gradient `K`: `norm.K` and `proj.K` (16 dot
  products with the deterministic vectors `2 * det_uniform(K + ".proj{j}") - 1`), from which a
  test estimates the relative error of the whole tensor (committed file, small);
- with `--full`: the gradients themselves, `grad.K` (large; `fixtures/grads`, not committed);
- the BatchNorm running statistics after the step (momentum 0.1, unbiased variance): `run.K`;
- how far PyTorch's own float32 lands from float64: `f32err.K` per gradient (relative) and
  `f32err_loss`: deep batch-statistics nets at batch 2 are ill-conditioned (Inception-v4's
  float32 input gradient is ~7% off float64), so a test allows the larger of 1e-4 and twice
  PyTorch's float32 error.

    python3 scripts/reference/make_grads.py                          # tests/fixtures/grads.safetensors
    python3 scripts/reference/make_grads.py --full --out fixtures/grads/grads_full.safetensors
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import build, det_uniform, set_deterministic
from make_blocks import SPATIAL, blocks

PROJ = 16
NETS = {"inception_resnet_v1": 160, "inception_resnet_v2": 139, "inception_v4": 139}


def projections(key, g):
    g = g.detach().double().reshape(-1).numpy()
    r = np.stack([det_uniform(f"{key}.proj{j}", g.size) * 2.0 - 1.0 for j in range(PROJ)])
    return torch.from_numpy(r @ g), torch.tensor([np.sqrt((g * g).sum())])


def grads_of(module, x):
    g = {"input": x.grad}
    g.update({k: p.grad for k, p in module.named_parameters() if p.grad is not None})
    return g


def record(out, case, module, x, loss, y, full, f32):
    """`f32`: (loss, gradients) of the same step in float32."""
    out[f"{case}.loss"] = torch.tensor([float(loss)], dtype=torch.float64)
    out[f"{case}.out_sq"] = torch.tensor([float((y.double() ** 2).sum())], dtype=torch.float64)
    out[f"{case}.f32err_loss"] = torch.tensor([abs(float(f32[0]) - float(loss))], dtype=torch.float64)
    for k, g in grads_of(module, x).items():
        out[f"{case}.proj.{k}"], out[f"{case}.norm.{k}"] = projections(f"{case}.{k}", g)
        g32 = f32[1][k].double()
        out[f"{case}.f32err.{k}"] = torch.tensor([float((g32 - g).norm() / g.norm().clamp_min(1e-300))])
        if full:
            out[f"{case}.grad.{k}"] = g.detach().float().contiguous()
    for k, b in module.named_buffers():
        if k.endswith("running_mean") or k.endswith("running_var"):
            out[f"{case}.run.{k}"] = b.detach().double().contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "../../tests/fixtures/grads.safetensors"))
    ap.add_argument("--full", action="store_true", help="also store the whole gradients (large)")
    ap.add_argument("--cases", nargs="*", default=None, help="only these blocks / networks")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    def block_step(module, name, cin, dtype):
        set_deterministic(module)
        module = module.to(dtype).train()
        n = 2 * cin * SPATIAL * SPATIAL
        x = torch.from_numpy(det_uniform(name + ".gin", n) * 2 - 1).reshape(2, cin, SPATIAL, SPATIAL)
        x = x.to(dtype).requires_grad_()
        y = module(x)
        r = torch.from_numpy(det_uniform(name + ".R", y.numel()) * 2 - 1).reshape(y.shape).to(dtype)
        loss = (y * r).sum()
        loss.backward()
        return module, x, loss, y

    def net_step(name, size, dtype):
        model = build(name, 10)
        set_deterministic(model)
        if hasattr(model, "dropout"):
            model.dropout.p = 0.0  # facenet's 0.6 before last_linear; ours has none
        model = model.to(dtype).train()
        n = 2 * 3 * size * size
        x = torch.from_numpy(det_uniform(name + ".x", n) * 2 - 1).reshape(2, 3, size, size).to(dtype).requires_grad_()
        y = model(x)
        loss = F.cross_entropy(y, torch.tensor([1, 7]), label_smoothing=0.1)
        loss.backward()
        return model, x, loss, y

    for name, (_, cin) in blocks().items():
        if args.cases and name not in args.cases:
            continue
        m32, x32, l32, _ = block_step(blocks()[name][0], name, cin, torch.float32)
        module, x, loss, y = block_step(blocks()[name][0], name, cin, torch.float64)
        record(out, name, module, x, loss, y, args.full, (l32, grads_of(m32, x32)))
        print(name, tuple(y.shape), float(loss))
    for name, size in NETS.items():
        if args.cases and name not in args.cases:
            continue
        m32, x32, l32, _ = net_step(name, size, torch.float32)
        model, x, loss, y = net_step(name, size, torch.float64)
        record(out, name, model, x, loss, y, args.full, (l32, grads_of(m32, x32)))
        print(name, tuple(y.shape), float(loss))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(out, args.out)
    print("wrote", args.out, sum(t.numel() for t in out.values()), "values")


if __name__ == "__main__":
    main()
