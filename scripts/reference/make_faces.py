"""Face fixtures for tests/faces.rs: photos with faces (downscaled, committed), facenet-pytorch's
MTCNN(keep_all=True) detections on them, per-net outputs on random inputs, area-resampling and
extract_face references.

    pip download face_recognition==1.3.0 --no-deps --no-binary :all: -d /tmp/fr && tar xzf /tmp/fr/*.tar.gz -C /tmp/fr
    python3 scripts/reference/make_faces.py --fr /tmp/fr/face_recognition-1.3.0/tests/test_images

Photos: face_recognition's test images (MIT package), scikit-image's `astronaut` (NASA, public
domain), matplotlib's `grace_hopper` (public domain), a collage of three of them (several faces),
and scikit-image's `chelsea` (a cat: no face). Needs facenet-pytorch, torch, pillow, safetensors,
scikit-image, matplotlib.
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "faces")


def small(img, side):
    img = img.convert("RGB")
    s = side / max(img.size)
    if s < 1:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    return img


def photos(fr):
    import matplotlib.cbook
    import skimage.data

    p = {}
    for name in ["obama", "obama2", "obama3", "biden", "obama_partial_face"]:
        p[name] = small(Image.open(os.path.join(fr, name + ".jpg")), 480)
    p["astronaut"] = small(Image.fromarray(skimage.data.astronaut()), 400)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        p["grace_hopper"] = small(Image.open(f), 400)
    # several faces of different sizes in one picture
    g = Image.new("RGB", (720, 400), (90, 110, 130))
    g.paste(p["biden"].resize((300, round(300 * p["biden"].height / p["biden"].width))), (10, 20))
    g.paste(p["obama"].resize((220, round(220 * p["obama"].height / p["obama"].width))), (330, 60))
    g.paste(p["astronaut"].resize((150, 150)), (560, 200))
    p["group"] = g
    p["no_face_chelsea"] = small(Image.fromarray(skimage.data.chelsea()), 400)
    return p


def main():
    from facenet_pytorch import MTCNN
    from facenet_pytorch.models.utils.detect_face import extract_face, imresample

    ap = argparse.ArgumentParser()
    ap.add_argument("--fr", required=True, help="face_recognition's tests/test_images folder")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    mtcnn = MTCNN(keep_all=True)
    ref, tensors = [], {}
    for name, img in photos(a.fr).items():
        path = f"{name}.jpg"
        img.save(os.path.join(OUT, path), quality=92)
        img = Image.open(os.path.join(OUT, path)).convert("RGB")  # detect on the decoded file
        boxes, probs, points = mtcnn.detect(img, landmarks=True)
        faces = []
        if boxes is not None:
            for i, (b, p, l) in enumerate(zip(boxes, probs, points)):
                faces.append({"box": [float(v) for v in b], "prob": float(p), "landmarks": l.tolist()})
                if i == 0 and name in ("obama2", "astronaut", "group"):
                    crop = extract_face(img, b, image_size=160, margin=0)  # [3,160,160], 0..255
                    tensors[f"extract.{name}"] = crop.round().to(torch.uint8).contiguous()
        ref.append({"image": path, "size": list(img.size), "faces": faces})
        print(name, img.size, len(faces), [round(f["prob"], 4) for f in faces])
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)

    # per-net parity on random inputs, and the pyramid's area resampling
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 31, 45, generator=g) * 2 - 1
    with torch.no_grad():
        reg, prob = mtcnn.pnet(x)
        tensors.update({"pnet.input": x, "pnet.reg": reg, "pnet.prob": prob})
        x = torch.rand(3, 3, 24, 24, generator=g) * 2 - 1
        reg, prob = mtcnn.rnet(x)
        tensors.update({"rnet.input": x, "rnet.reg": reg, "rnet.prob": prob})
        x = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
        reg, lm, prob = mtcnn.onet(x)
        tensors.update({"onet.input": x, "onet.reg": reg, "onet.landmarks": lm, "onet.prob": prob})
        img = (torch.rand(1, 3, 57, 83, generator=g) * 255).round()
        tensors["area.input"] = img
        tensors["area.down"] = imresample(img, (23, 35))
        tensors["area.up"] = imresample(img[:, :, 3:17, 5:14], (24, 24))
    dst = os.path.join(OUT, "reference.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst)
    os.chmod(dst, 0o644)


if __name__ == "__main__":
    main()
