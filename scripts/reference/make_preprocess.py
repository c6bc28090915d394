"""Preprocessing fixtures: real photos of varied size, aspect and format, and what timm's eval
transform makes of them for the Inception-v4 and Inception-ResNet-v2 configs.

Photos come from packages that ship them (scikit-image's data folder: CC0 / public domain;
matplotlib's Grace Hopper sample), reduced and converted with Pillow so that the set covers a
landscape, a portrait, an image smaller than the crop, grayscale, RGBA, 16-bit RGB, baseline
JPEGs and a CMYK JPEG. For each photo and config, the output of

    timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

applied to `Image.open(p).convert("RGB")` is saved as the uint8 crop it was made from (checked
to give back timm's float tensor exactly), as the lossless PNG `reference/<photo>.<model>.png`;
`reference/configs.json` holds the configs and which photos are lossless.

    pip install timm pillow scikit-image matplotlib
    python3 scripts/reference/make_preprocess.py --out tests/fixtures/preprocess
"""
import argparse
import json
import os
import struct
import zlib

import numpy as np
import timm
import torch
from PIL import Image

MODELS = ["inception_v4", "inception_resnet_v2"]


def skimage_photo(name):
    import skimage
    return Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name))


def mpl_photo(name):
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), "sample_data", name)


def write_png16(path, rgb16):
    """A 16-bit RGB PNG (Pillow cannot write one): filter 0 rows, big-endian samples."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def make_photos(out):
    photos = {}
    chelsea = skimage_photo("chelsea.png").convert("RGB")  # 451 x 300 landscape
    chelsea.save(os.path.join(out, "landscape_chelsea.png"))
    photos["landscape_chelsea.png"] = "lossless"
    coffee = skimage_photo("coffee.png").convert("RGB").transpose(Image.Transpose.ROTATE_90)
    coffee.resize((300, 450), Image.Resampling.LANCZOS).save(os.path.join(out, "portrait_coffee.png"))
    photos["portrait_coffee.png"] = "lossless"
    astro = skimage_photo("astronaut.png").convert("RGB")
    astro.resize((180, 140), Image.Resampling.LANCZOS).save(os.path.join(out, "small_astronaut.png"))
    photos["small_astronaut.png"] = "lossless"
    skimage_photo("camera.png").convert("L").crop((40, 60, 440, 380)).save(os.path.join(out, "gray_camera.png"))
    photos["gray_camera.png"] = "lossless"
    rgba = astro.resize((260, 310), Image.Resampling.LANCZOS).convert("RGBA")
    a = np.array(rgba)
    yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    a[..., 3] = ((xx * 3 + yy * 5) % 256).astype(np.uint8)  # alpha varies; convert("RGB") drops it
    Image.fromarray(a, "RGBA").save(os.path.join(out, "alpha_astronaut.png"))
    photos["alpha_astronaut.png"] = "lossless"
    color = np.array(skimage_photo("color.png").convert("RGB").crop((60, 40, 300, 230))).astype(np.uint16)
    rng = np.random.default_rng(0)
    write_png16(os.path.join(out, "rgb16_color.png"), color * 256 + rng.integers(0, 256, color.shape, dtype=np.uint16))
    photos["rgb16_color.png"] = "lossless"
    with open(os.path.join(out, "rocket.jpg"), "wb") as f:  # 640 x 427, original bytes
        f.write(open(os.path.join(os.path.dirname(__import__("skimage").__file__), "data", "rocket.jpg"), "rb").read())
    photos["rocket.jpg"] = "jpeg"
    with open(os.path.join(out, "grace_hopper.jpg"), "wb") as f:  # 512 x 600
        f.write(open(mpl_photo("grace_hopper.jpg"), "rb").read())
    photos["grace_hopper.jpg"] = "jpeg"
    chelsea.convert("CMYK").save(os.path.join(out, "cmyk_chelsea.jpg"), quality=90)
    photos["cmyk_chelsea.jpg"] = "jpeg"
    return photos


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/preprocess")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    photos = make_photos(args.out)
    os.makedirs(os.path.join(args.out, "reference"), exist_ok=True)
    count, meta = 0, {"configs": {}, "photos": photos}
    for name in MODELS:
        model = timm.create_model(name, pretrained=False)
        cfg = timm.data.resolve_data_config({}, model=model)
        tf = timm.data.create_transform(**cfg)
        meta["configs"][name] = {k: cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")}
        mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        std = torch.tensor(cfg["std"]).view(3, 1, 1)
        for photo in photos:
            img = Image.open(os.path.join(args.out, photo)).convert("RGB")
            x = tf(img)
            u8 = torch.round((x * std + mean) * 255).clamp(0, 255).to(torch.uint8)
            back = (u8.float() / 255 - mean) / std
            assert torch.equal(back, x), f"{photo}: timm's tensor is not an 8-bit image"
            Image.fromarray(u8.permute(1, 2, 0).numpy(), "RGB").save(
                os.path.join(args.out, "reference", f"{photo}.{name}.png"), optimize=True)
            count += 1
    with open(os.path.join(args.out, "reference", "configs.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{count} reference crops for {len(photos)} photos in {args.out}")


if __name__ == "__main__":
    main()
