"""Face detection speed: `inception faces detect` against facenet-pytorch's MTCNN on the same
photos, same thread count, each the median of N runs per photo (decoding excluded on both sides).

    python3 scripts/bench/faces.py --bin target/release/inception --threads 2 --runs 7 \
        tests/fixtures/faces/*.jpg [more photos...] [--json out.json]

Prints a table (per photo: size, faces found by each, ms each, ratio) and the geometric mean ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("photos", nargs="+")
    ap.add_argument("--bin", default="target/release/inception")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from facenet_pytorch import MTCNN
    from PIL import Image

    torch.set_num_threads(a.threads)
    mtcnn = MTCNN(keep_all=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = subprocess.run(
        [a.bin, "faces", "detect", "--json", "--runs", str(a.runs), *a.photos], env=env, capture_output=True, check=True
    )
    ours = {d["image"]: d for d in json.loads(out.stdout)}
    rows = []
    for p in a.photos:
        img = Image.open(p).convert("RGB")
        with torch.no_grad():
            mtcnn.detect(img)  # warm-up
            ts = []
            for _ in range(a.runs):
                t = time.perf_counter()
                boxes, _ = mtcnn.detect(img)
                ts.append((time.perf_counter() - t) * 1e3)
        ref_ms = statistics.median(ts)
        d = ours[p]
        rows.append({
            "photo": os.path.basename(p), "size": list(img.size),
            "faces_ref": 0 if boxes is None else len(boxes), "faces_ours": len(d["faces"]),
            "facenet_pytorch_ms": ref_ms, "ours_ms": d["ms"], "speedup": ref_ms / d["ms"],
        })
    load = os.getloadavg()[0]
    print(f"threads {a.threads}, runs {a.runs}, load {load:.2f}, torch {torch.__version__}")
    print(f"| photo | size | faces (ref / ours) | facenet-pytorch ms | ours ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['photo']} | {r['size'][0]}x{r['size'][1]} | {r['faces_ref']} / {r['faces_ours']} | "
              f"{r['facenet_pytorch_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x |")
    g = statistics.geometric_mean([r["speedup"] for r in rows])
    print(f"geometric mean speed-up: {g:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "runs": a.runs, "load": load, "rows": rows, "geomean": g}, f, indent=1)


if __name__ == "__main__":
    main()
