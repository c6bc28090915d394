"""The GPU table from device_check.sh's gpu.json: our img/s against timm eager f32 and bf16
channels_last per model and batch, the training step, and the parity lines.

    python3 scripts/gpu/table.py gpu.json
"""
import json
import sys

doc = json.load(open(sys.argv[1]))
print(f"device: {doc.get('gpu', [doc['device']])[-1]}\n")
print("| model | batch | ours f32 img/s | timm f32 img/s | timm bf16 channels_last img/s | ours / timm bf16 |")
print("|---|---|---|---|---|---|")
timm = {(r["model"], r["batch"], r["dtype"]): r["img_s"] for r in doc["timm"]}
for r in doc["ours"]:
    if r.get("error") or r.get("config", {}).get("mode") == "train":
        continue
    m, b = r["config"]["model"], r["config"]["batch"]
    t32 = timm.get((m, b, "torch.float32"), float("nan"))
    t16 = timm.get((m, b, "torch.bfloat16"), float("nan"))
    print(f"| {m} | {b} | {r['images_per_s']:.1f} | {t32:.1f} | {t16:.1f} | {r['images_per_s'] / t16:.2f} |")
print("\n| model | train batch | ours step ms | img/s |")
print("|---|---|---|---|")
for r in doc["ours"]:
    if r.get("config", {}).get("mode") == "train":
        print(f"| {r['config']['model']} | {r['config']['batch']} | {r['median_ms']:.0f} | {r['images_per_s']:.1f} |")
errors = [r for r in doc["ours"] if r.get("error")]
if errors:
    print("\nfailed:", errors)
print("\nparity:\n" + "\n".join(doc["parity"]))
