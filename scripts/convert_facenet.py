"""Convert a facenet-pytorch checkpoint (.pt state dict, e.g. 20180402-114759-vggface2.pt) to
safetensors for `inception ... --model inception_resnet_v1 --weights FILE`.

    python3 scripts/convert_facenet.py 20180402-114759-vggface2.pt vggface2.safetensors
    # the classifier (`logits.*`, 8631 VGGFace2 / 10575 CASIA classes) is kept unless --no-logits

Needs torch and safetensors (pip install torch safetensors); no facenet-pytorch required.
"""
import argparse

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--no-logits", action="store_true", help="drop the face-identity classifier")
    a = ap.parse_args()
    sd = torch.load(a.src, map_location="cpu", weights_only=True)
    if "state_dict" in sd:
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v) or (a.no_logits and k.startswith("logits.")):
            continue
        out[k] = v.float().contiguous() if v.is_floating_point() else v.contiguous()
    save_file(out, a.dst, metadata={"source": a.src, "format": "pt"})
    print(f"wrote {len(out)} tensors to {a.dst}")


if __name__ == "__main__":
    main()
