"""Face detection speed: `inception faces detect` against facenet-pytorch's MTCNN on the same
photos, same thread count: per photo the median of N runs (decoding excluded on both sides),
ours and theirs alternated, `--rounds` times, each side's best median kept (the host's speed
drifts by tens of percent within minutes).

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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from facenet_pytorch import MTCNN
    from PIL import Image

    torch.set_num_threads(a.threads)
    mtcnn = MTCNN(keep_all=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    loads = [os.getloadavg()]

    def ours(p):
        out = subprocess.run(
            [a.bin, "faces", "detect", "--json", "--runs", str(a.runs), p], env=env, capture_output=True, check=True
        )
        return json.loads(out.stdout)[0]

    def theirs(img):
        with torch.no_grad():
            mtcnn.detect(img)  # warm-up
            ts = []
            for _ in range(a.runs):
                t = time.perf_counter()
                boxes, _ = mtcnn.detect(img)
                ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts), 0 if boxes is None else len(boxes)

    rows = []
    for p in a.photos:
        img = Image.open(p).convert("RGB")
        best_ours, best_ref = float("inf"), float("inf")
        for _ in range(a.rounds):
            d = ours(p)
            best_ours = min(best_ours, d["ms"])
            ref_ms, n_ref = theirs(img)
            best_ref = min(best_ref, ref_ms)
        rows.append({
            "photo": os.path.basename(p), "size": list(img.size),
            "faces_ref": n_ref, "faces_ours": len(d["faces"]),
            "facenet_pytorch_ms": best_ref, "ours_ms": best_ours, "speedup": best_ref / best_ours,
        })
    loads.append(os.getloadavg())
    load = [round(v, 2) for v in loads[0]] + [round(v, 2) for v in loads[1]]
    print(f"threads {a.threads}, runs {a.runs} x {a.rounds} rounds, load before/after {load}, torch {torch.__version__}")
    print(f"| photo | size | faces (ref / ours) | facenet-pytorch ms | ours ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['photo']} | {r['size'][0]}x{r['size'][1]} | {r['faces_ref']} / {r['faces_ours']} | "
              f"{r['facenet_pytorch_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x |")
    g = statistics.geometric_mean([r["speedup"] for r in rows])
    print(f"geometric mean speed-up: {g:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "runs": a.runs, "rounds": a.rounds, "load": load, "rows": rows, "geomean": g}, f, indent=1)


if __name__ == "__main__":
    main()
