"""Full-model reference fixtures (large, not committed): for each model, `model.safetensors`
(timm / facenet state dict with random non-trivial weights) and `io_<size>.safetensors` with
`input` [2,3,S,S] and the reference `logits`, `pre_logits`, (IR-v1) `embedding` and (timm models) the feature maps
`stage0..stage4` of `forward_intermediates`.

    python3 scripts/reference/make_full.py --out fixtures/full
    cargo test --release -- --ignored
"""
import argparse
import copy
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import FULL_MODELS, build, randomize


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/full")
    ap.add_argument("--models", nargs="*", default=list(FULL_MODELS))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    for i, name in enumerate(args.models):
        sizes, classes = FULL_MODELS[name]
        torch.manual_seed(1000 + i)
        model = randomize(build(name, classes), seed=2000 + i, calib_size=sizes[0])
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(d, "model.safetensors"))
        for s in sizes:
            g = torch.Generator().manual_seed(3000 + s)
            x = torch.rand(2, 3, s, s, generator=g) * 2 - 1
            out = {"input": x}
            if name == "inception_resnet_v1":
                out["logits"] = model(x)
                model.classify = False
                out["embedding"] = model(x)
                model.classify = True
                # pre-logits: the 512-d bottleneck after last_bn (before normalisation)
                h = x
                for n in ["conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a",
                          "conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8"]:
                    h = getattr(model, n)(h)
                h = model.last_bn(model.last_linear(h.mean((2, 3))))
                out["pre_logits"] = h
                assert torch.allclose(F.normalize(h, dim=1), out["embedding"], atol=1e-6)
            else:
                feats = model.forward_features(x)
                out["logits"] = model.forward_head(feats)
                out["pre_logits"] = model.forward_head(feats, pre_logits=True)
            # the reference's own f32 rounding, measured against float64
            ref64 = copy.deepcopy(model).double()
            drift = (ref64(x.double()) - out["logits"].double()).abs().max().item()
            print(f"{name} {s}: reference f32 vs float64 max diff on logits {drift:.2e}")
            for i, f in enumerate(model.forward_intermediates(x, intermediates_only=True) if name != "inception_resnet_v1" else []):
                out[f"stage{i}"] = f
            save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, f"io_{s}.safetensors"))
            print(name, s, {k: (tuple(v.shape), float(v.abs().max())) for k, v in out.items()})


if __name__ == "__main__":
    main()
