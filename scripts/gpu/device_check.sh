#!/usr/bin/env bash
# The one-shot GPU check (issue #16): parity of IR-v2 and v4 on the card against timm, our
# inference at batch 1 / 32 / 256 and a training step at batch 32 / 64 through burn's Vulkan
# backend, and timm eager (f32, and bf16 channels_last) on the same card, into one JSON
# ($OUT/gpu.json) that scripts/gpu/table.py turns into the BENCHMARKS / README table.
#
#   here, once:     bash scripts/gpu/device_check.sh prepare
#                   (release build with --features vulkan, stripped + gzipped into .dev/, the
#                    Vulkan loader debs into .gl/, and the size of what a device call carries)
#   here, rehearse: bash scripts/gpu/device_check.sh --rehearse
#                   (the whole flow on this CPU with --device cpu and small batches)
#   on the device:  run tool, command `bash scripts/gpu/device_check.sh`, carry [".gl", ".dev"],
#                   timeout_s 540; then python3 scripts/gpu/table.py <files_at>/gpu.json
#
# The reference fixtures (224 MB of weights, over the 64 MiB a call may carry) are made there
# by scripts/reference/make_full.py: the device image has torch, timm and safetensors.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-device}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

if [ "$MODE" = prepare ]; then
  set -e
  export CARGO_TARGET_DIR="${VK_TARGET_DIR:-$HOME/.cache/inception-target-vk}"
  cargo build --release --features vulkan
  mkdir -p .dev
  grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo /.dev/ >> .git/info/exclude
  grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >> .git/info/exclude
  strip -o .dev/inception-vulkan "$CARGO_TARGET_DIR/release/inception"
  gzip -9 -f .dev/inception-vulkan
  if ! ls .gl/*.deb >/dev/null 2>&1; then
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
  fi
  tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carried=$(du -cb .dev .gl | tail -1 | cut -f1)
  echo "binary $(du -h .dev/inception-vulkan.gz | cut -f1) gzipped; tree $((tree >> 20)) MiB + carried $((carried >> 20)) MiB = $(((tree + carried) >> 20)) MiB (limit 64 MiB)"
  [ $((tree + carried)) -lt $((64 << 20)) ] || { echo "over the 64 MiB carry limit"; exit 1; }
  exit 0
fi

if [ "$MODE" = --rehearse ]; then
  DEVICE=cpu; BATCHES="1 2"; TRAIN_BATCHES="2"; TORCH_DEVICE=cpu; TIMM_BATCHES="1"
  BIN=${BIN:-$(mktemp -d)/inception}
  if [ -f .dev/inception-vulkan.gz ]; then gzip -dc .dev/inception-vulkan.gz > "$BIN"; else cp "${CARGO_TARGET_DIR:-$HOME/.cache/inception-target}/release/inception" "$BIN"; fi
else
  DEVICE=vulkan; BATCHES="1 32 256"; TRAIN_BATCHES="32 64"; TORCH_DEVICE=cuda; TIMM_BATCHES="1 32 256"
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  BIN=/tmp/inception-vulkan
  gzip -dc .dev/inception-vulkan.gz > "$BIN"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
chmod +x "$BIN"
export DEVICE BATCHES TRAIN_BATCHES TORCH_DEVICE TIMM_BATCHES BIN OUT
"$BIN" devices | tee "$OUT/devices.txt"

# parity on the device (burn path) against timm on the same random weights
FX=/tmp/fixtures
python3 scripts/reference/make_full.py --out $FX --models inception_resnet_v2 inception_v4 2>&1 | tail -2
for m in inception_resnet_v2 inception_v4; do
  timeout 240 "$BIN" --device $DEVICE --engine burn check --weights $FX/$m/model.safetensors \
    --inputs $FX/$m/io_299.safetensors --atol 1e-3 2>&1 | sed "s/^/$m /" | tee -a "$OUT/parity.txt"
done

# ours: inference (f32) and a training step
: > "$OUT/ours.jsonl"
for m in inception_resnet_v2 inception_v4; do
  for b in $BATCHES; do
    timeout 120 "$BIN" --device $DEVICE --engine burn bench --model $m --batch $b --runs 5 --json >> "$OUT/ours.jsonl" || echo "{\"model\": \"$m\", \"batch\": $b, \"error\": \"exit $?\"}" >> "$OUT/ours.jsonl"
  done
  for b in $TRAIN_BATCHES; do
    timeout 150 "$BIN" --device $DEVICE bench --model $m --batch $b --mode train --warmup 1 --runs 3 --json >> "$OUT/ours.jsonl" || echo "{\"model\": \"$m\", \"batch\": $b, \"mode\": \"train\", \"error\": \"exit $?\"}" >> "$OUT/ours.jsonl"
  done
done

# timm eager on the same device
python3 - <<'PY' > "$OUT/timm.jsonl"
import json, os, time, torch, timm
dev = os.environ["TORCH_DEVICE"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for name in ["inception_resnet_v2", "inception_v4"]:
    base = timm.create_model(name).to(dev).eval()
    for dtype, cl in [(torch.float32, False), (torch.bfloat16, True)]:
        m = base.to(dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
        for b in map(int, os.environ["TIMM_BATCHES"].split()):
            x = torch.randn(b, 3, 299, 299, device=dev, dtype=dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            with torch.inference_mode():
                for _ in range(2): m(x)
                sync(); t = time.perf_counter()
                for _ in range(5): m(x)
                sync()
            dt = (time.perf_counter() - t) / 5
            print(json.dumps(dict(model=name, batch=b, dtype=str(dtype), channels_last=cl, ms=dt * 1e3, img_s=b / dt)))
PY

python3 - <<'PY'
import json, os
out = os.environ["OUT"]
rows = lambda f: [json.loads(l) for l in open(os.path.join(out, f)) if l.strip()]
doc = {"device": os.environ["DEVICE"], "ours": rows("ours.jsonl"), "timm": rows("timm.jsonl"),
       "parity": open(os.path.join(out, "parity.txt")).read().splitlines(),
       "devices": open(os.path.join(out, "devices.txt")).read().splitlines()}
if os.path.exists(os.path.join(out, "gpu.txt")):
    doc["gpu"] = open(os.path.join(out, "gpu.txt")).read().splitlines()
json.dump(doc, open(os.path.join(out, "gpu.json"), "w"), indent=1)
print("wrote", os.path.join(out, "gpu.json"), len(doc["ours"]), "of ours,", len(doc["timm"]), "of timm")
PY
