#!/usr/bin/env bash
# One prepared GPU session (issue #4): parity on the GPU, IR-v2 / v4 inference at b1/32/256 and
# a training step through burn's Vulkan backend, and timm eager on the same card for the ratio.
# Not yet run: no session so far was lent a device. Usage (device tool, from the repo root):
#   prepare here:  cargo build --release --features vulkan   (over an hour cold; start it first)
#                  mkdir -p .dev && cp "$CARGO_TARGET_DIR"/release/inception .dev/inception-vulkan
#                  echo /.dev/ >> .git/info/exclude
#                  Vulkan loader debs into .gl/ (the device README gives the apt-get line)
#   run there:     bash scripts/gpu/device_check.sh   with carry [".gl", ".dev"], timeout_s ~540
# The IR-v2 reference fixture (224 MB of weights, over the 64 MiB a call may carry) is made
# there by scripts/reference/make_full.py: the device image has torch, timm and safetensors.
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
BIN=${BIN:-./.dev/inception-vulkan}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# parity on the GPU (burn path) against timm on the same random weights
FX=/tmp/fixtures
python3 scripts/reference/make_full.py --out $FX --models inception_resnet_v2 2>&1 | tail -3
$BIN --device vulkan --engine burn check --model inception_resnet_v2 \
  --weights $FX/inception_resnet_v2/model.safetensors \
  --inputs $FX/inception_resnet_v2/io_299.safetensors --atol 1e-3 2>&1 | tee "$OUT/parity.txt"
for m in inception_resnet_v2 inception_v4; do
  for b in 1 32 256; do
    timeout 120 $BIN --device vulkan --engine burn bench --model $m --batch $b --runs 5 --json | tee -a "$OUT/ours.jsonl"
  done
  timeout 120 $BIN --device vulkan bench --model $m --batch 64 --mode train --runs 3 --json | tee -a "$OUT/ours.jsonl"
done
# timm on the same card (torch is installed there)
python3 - <<'PY' | tee "$OUT/timm.jsonl"
import json, time, torch, timm
for name in ["inception_resnet_v2", "inception_v4"]:
    m = timm.create_model(name).cuda().eval()
    for dtype, cl in [(torch.float32, False), (torch.bfloat16, True)]:
        mm = m.to(dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
        for b in [1, 32, 256]:
            x = torch.randn(b, 3, 299, 299, device="cuda", dtype=dtype)
            if cl: x = x.to(memory_format=torch.channels_last)
            with torch.inference_mode():
                for _ in range(3): mm(x)
                torch.cuda.synchronize(); t = time.perf_counter()
                for _ in range(10): mm(x)
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / 10
            print(json.dumps(dict(model=name, batch=b, dtype=str(dtype), channels_last=cl, ms=dt * 1e3, img_s=b / dt)))
PY
