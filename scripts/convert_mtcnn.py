"""Convert facenet-pytorch's trained MTCNN weights (P-Net, R-Net, O-Net) to one safetensors file
for `inception faces` (shipped as assets/mtcnn/mtcnn.safetensors, embedded in the binary).

    pip download facenet-pytorch --no-deps -d /tmp/fp && unzip -o /tmp/fp/*.whl -d /tmp/fp
    python3 scripts/convert_mtcnn.py /tmp/fp/facenet_pytorch/data assets/mtcnn/mtcnn.safetensors

Keys are facenet-pytorch's state-dict keys prefixed by the net: `pnet.conv1.weight`,
`rnet.dense4.weight`, `onet.prelu5.weight`, ... Needs torch and safetensors only.
"""
import argparse
import os

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir", help="folder with pnet.pt, rnet.pt, onet.pt")
    ap.add_argument("dst")
    a = ap.parse_args()
    out = {}
    for net in ("pnet", "rnet", "onet"):
        sd = torch.load(os.path.join(a.data_dir, f"{net}.pt"), map_location="cpu", weights_only=True)
        for k, v in sd.items():
            out[f"{net}.{k}"] = v.float().contiguous()
    meta = {
        "model": "mtcnn",
        "source": "facenet-pytorch 2.6.0 wheel, facenet_pytorch/data/{pnet,rnet,onet}.pt (MIT licence); "
        "converted by the MTCNN authors' Caffe weights (Zhang et al. 2016) via davidsandberg/facenet (MIT)",
    }
    save_file(out, a.dst, metadata=meta)
    print(f"wrote {len(out)} tensors to {a.dst}")


if __name__ == "__main__":
    main()
