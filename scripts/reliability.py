"""The bad-input and fault suite against the release binary, as a table: case, what we promise,
exit code, peak RSS of the process, whether the promise held. Writes RELIABILITY.md.

    cargo build --release
    scripts/fuzz.sh 1000000 | tee /tmp/fuzz.log
    python3 scripts/reliability.py --fuzz-log /tmp/fuzz.log

Needs numpy and safetensors (for the corrupted weight files); nothing else.
"""
import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import zlib

import numpy as np
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/inception-target")), "release", "inception")
DEMO = os.path.join(ROOT, "assets/demo/model.safetensors")
PHOTO = os.path.join(ROOT, "tests/fixtures/preprocess/small_astronaut.png")


def run_rss(args, timeout=300):
    t0 = time.time()
    env = dict(os.environ, INCEPTION_REPORT_RSS="1")
    p = subprocess.Popen([BIN] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = t0 + timeout
    out = b""
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        try:
            chunk = p.stdout.read()
            if chunk:
                out += chunk
        except (BlockingIOError, TypeError):
            pass
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            try:
                rest = p.stdout.read()
                out += rest or b""
            except (BlockingIOError, TypeError):
                pass
            code = os.waitstatus_to_exitcode(status)
            p.returncode = code
            text = out.decode(errors="replace")
            # the child reports its own VmHWM (ru_maxrss would include the forked Python's)
            rss = [float(l.split("=")[1]) for l in text.splitlines() if l.startswith("peak_rss_mib=")]
            text = "\n".join(l for l in text.splitlines() if not l.startswith("peak_rss_mib="))
            return code, (rss[-1] if rss else float("nan")), time.time() - t0, text
        if time.time() > deadline:
            p.kill()
            os.wait4(p.pid, 0)
            return "hang", 0.0, time.time() - t0, out.decode(errors="replace")
        time.sleep(0.01)


def png_gray(path, w, h):
    raw = zlib.compressobj(9)
    data = b"".join(raw.compress(b"\x00" + bytes(w)) for _ in range(h)) + raw.flush()

    def chunk(kind, payload):
        c = kind + payload
        return struct.pack(">I", len(payload)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def corrupt_weights(src, dst, key, value, index=1):
    with safe_open(src, "np") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    flat = t[key].reshape(-1).copy()
    flat[index] = value
    t[key] = flat.reshape(t[key].shape)
    save_file(t, dst, metadata=meta)


def tiny_data(d):
    from PIL import Image
    for cls, v in (("bright", 220), ("dark", 30)):
        os.makedirs(os.path.join(d, cls), exist_ok=True)
        for i in range(12):
            a = (np.indices((40, 40)).sum(0) * (i + 3) % 40 + v - 20).clip(0, 255).astype(np.uint8)
            Image.fromarray(np.stack([a, a, a], -1)).save(os.path.join(d, cls, f"{i}.png"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz-log", help="output of scripts/fuzz.sh")
    ap.add_argument("--out", default=os.path.join(ROOT, "RELIABILITY.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="inception-reliability-")
    t = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    rows = []

    def case(name, promise, argv, ok, timeout=300):
        code, rss, secs, out = run_rss(argv, timeout)
        held = code != "hang" and "panicked" not in out and ok(code, out)
        rows.append((name, promise, code, rss, secs, held, out.strip().splitlines()[-1:] or [""]))
        print(f"{'ok ' if held else 'BAD'} {name}: exit {code}, {rss:.0f} MiB, {secs:.1f} s")

    exit2 = lambda want=None: (lambda c, o: c == 2 and (want is None or want in o))  # noqa: E731
    exit1 = lambda want=None: (lambda c, o: c == 1 and (want is None or want in o))  # noqa: E731

    # images
    os.makedirs(t("img"))
    open(t("img", "corrupt.jpg"), "wb").write(b"\xff\xd8\xff not a jpeg")
    open(t("img", "trunc.png"), "wb").write(open(PHOTO, "rb").read()[:2000])
    png_gray(t("img", "big.png"), 20000, 20000)
    png_gray(t("img", "long.png"), 1, 100000)
    png_gray(t("img", "longer.png"), 1, 2000000)
    png_gray(t("img", "wide.png"), 30000, 2)
    for f, what in [("corrupt.jpg", "not an image"), ("trunc.png", "truncated PNG"),
                    ("big.png", "20000 x 20000 gray PNG (389 KB)"), ("long.png", "1 x 100000 PNG"),
                    ("longer.png", "1 x 2000000 PNG"), ("wide.png", "30000 x 2 PNG (within limits)")]:
        good = f == "wide.png"
        case(f"classify: {what} + a good photo", "the bad image is one error line, the good one is classified"
             if not good else "classified, memory bounded", ["classify", "--json", t("img", f), PHOTO],
             (lambda c, o: c == 0) if good else exit1())
    # folders
    os.makedirs(t("loop", "sub"))
    for i in range(8):
        shutil.copy(PHOTO, t("loop", f"{i}.png"))
    os.symlink(t("loop"), t("loop", "sub", "l1"))
    os.symlink(t("loop", "sub"), t("loop", "sub", "l2"))
    open(t("loop", "x.gif"), "wb").write(b"GIF89a")
    case("embed: folder with two symlink loops and a .gif", "8 files embedded once each, no hang",
         ["embed", "--out", t("e.safetensors"), t("loop")], lambda c, o: c == 0 and "wrote 8 embeddings" in o)
    case("embed --out DIR/", "error, no temp file left", ["embed", "--out", t("loop") + "/", PHOTO], exit2())
    # weights
    open(t("garbage.safetensors"), "wb").write(b"garbage")
    open(t("trunc.safetensors"), "wb").write(open(DEMO, "rb").read()[:100000])
    corrupt_weights(DEMO, t("nan.safetensors"), "conv2d_1a.conv.weight", np.nan)
    corrupt_weights(DEMO, t("inf.safetensors"), "repeat_1.0.conv2d.bias", np.inf)
    corrupt_weights(DEMO, t("negvar.safetensors"), "conv2d_2a.bn.running_var", -1.0)
    corrupt_weights(DEMO, t("nanbias.safetensors"), "logits.bias", np.nan, 0)
    for f, what in [("garbage", "garbage file"), ("trunc", "truncated file"), ("nan", "NaN in a conv weight"),
                    ("inf", "inf in a bias"), ("negvar", "negative running_var"), ("nanbias", "NaN classifier bias")]:
        case(f"classify --weights: {what}", "exit 2 naming the file (and the tensor)",
             ["classify", "--weights", t(f + ".safetensors"), PHOTO], exit2())
    case("classify --model inception_v4 --weights <IR-v1 file>", "exit 2 naming both models",
         ["classify", "--model", "inception_v4", "--weights", DEMO, PHOTO], exit2("inception_resnet_v1"))
    case("classify --weights /missing", "exit 2, the OS error once",
         ["classify", "--weights", t("missing.safetensors"), PHOTO],
         lambda c, o: c == 2 and o.count("No such file") == 1)
    # values
    os.makedirs(t("data"))
    tiny_data(t("data"))
    for argv, what in [
        (["train", "--data", t("data"), "--out", t("r0"), "--batch", "0"], "train --batch 0"),
        (["train", "--data", t("data"), "--out", t("r0"), "--epochs", "0"], "train --epochs 0"),
        (["train", "--data", t("data"), "--out", t("r0"), "--width", "0"], "train --width 0"),
        (["train", "--data", t("data"), "--out", t("r0"), "--width", "NaN"], "train --width NaN"),
        (["train", "--data", t("data"), "--out", t("r0"), "--width", "1000"], "train --width 1000"),
        (["train", "--data", t("data"), "--out", t("r0"), "--size", "100000"], "train --size 100000"),
        (["eval", "--weights", DEMO, "--data", t("data"), "--size", "10"], "eval --size 10"),
        (["eval", "--weights", DEMO, "--data", t("data"), "--crop-pct", "0"], "eval --crop-pct 0"),
        (["eval", "--weights", DEMO, "--data", t("data"), "--crops", "7"], "eval --crops 7"),
        (["summary", "--size", "100000"], "summary --size 100000"),
        (["bench", "--mode", "train", "--batch", "0"], "bench --mode train --batch 0"),
        (["bench", "--batch", "4096", "--size", "2048"], "bench --batch 4096 --size 2048"),
        (["classify", "--top", "0", PHOTO], "classify --top 0"),
    ]:
        case(what, "exit 2 with the allowed range, nothing allocated", argv, exit2())
    # training setups
    os.makedirs(t("bad", "a"))
    os.makedirs(t("bad", "b"))
    open(t("bad", "a", "x.png"), "wb").write(b"no")
    open(t("bad", "b", "y.png"), "wb").write(b"no")
    case("train: every image unreadable", "exit 2: nothing to train on",
         ["train", "--data", t("bad"), "--out", t("r1"), "--width", "0.1", "--size", "75"], exit2("could be read"))
    os.makedirs(t("one", "only"))
    shutil.copy(PHOTO, t("one", "only", "a.png"))
    case("train: a single class", "exit 2: refused with the reason",
         ["train", "--data", t("one"), "--out", t("r2")], exit2("at least 2"))
    tiny = ["--data", t("data"), "--width", "0.1", "--size", "75", "--batch", "6"]
    os.makedirs(t("r3"))
    open(t("r3", ".lock"), "w").write(f"{os.getpid()}\n")
    case("train into a folder another live run holds", "exit 2 naming the holder's pid",
         ["train", "--out", t("r3"), "--epochs", "1"] + tiny, exit2(f"pid {os.getpid()}"))
    open(t("r3", ".lock"), "w").write("4194000\n")
    case("train with a lock left by a dead process", "taken over, run completes",
         ["train", "--out", t("r3"), "--epochs", "1", "--max-steps", "1"] + tiny, lambda c, o: c == 0)
    # kill -9 and resume
    base = ["train", "--epochs", "4", "--checkpoint-every", "1", "--seed", "5"] + tiny
    code, _, _, _ = run_rss(base + ["--out", t("ka")])
    p = subprocess.Popen([BIN] + base + ["--out", t("kb")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(t("kb", "checkpoint.safetensors")):
        time.sleep(0.02)
    time.sleep(0.15)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = json.loads(safe_open(t("kb", "checkpoint.safetensors"), "np").metadata()["progress"])["global_step"]
    case(f"kill -9 after checkpoint at step {killed_at}, then --resume", "final model bit-identical to an "
         "uninterrupted run; no temp or lock file left", base + ["--out", t("kb"), "--resume"],
         lambda c, o: c == 0 and same_model(t("ka", "model.safetensors"), t("kb", "model.safetensors"))
         and not [f for f in os.listdir(t("kb")) if f.endswith(".tmp") or f == ".lock"])

    # a full disk (a small tmpfs, root only): the failed write leaves no partial file, and the
    # run resumes once space is freed
    disk = t("disk")
    os.makedirs(disk)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", disk], capture_output=True).returncode == 0:
        try:
            filler = os.path.join(disk, "filler")
            with open(filler, "wb") as f:
                f.write(b"\0" * (10 << 20))
            argv = ["train", "--out", os.path.join(disk, "run"), "--epochs", "1", "--max-steps", "2"] + tiny
            case("train onto a full disk", "exit 2 naming the file; no temp file left behind", argv,
                 lambda c, o: c == 2 and not [f for f in os.listdir(os.path.join(disk, "run")) if f.endswith(".tmp")])
            os.remove(filler)
            case("... then --resume after freeing space", "the run completes", argv + ["--resume"],
                 lambda c, o: c == 0 and os.path.exists(os.path.join(disk, "run", "model.safetensors")))
        finally:
            subprocess.run(["umount", disk], capture_output=True)

    fuzz = ""
    if args.fuzz_log and os.path.exists(args.fuzz_log):
        fuzz = "".join(line for line in open(args.fuzz_log) if line.startswith("fuzz:")).strip()
    write(args.out, rows, fuzz)
    shutil.rmtree(tmp, ignore_errors=True)


def same_model(a, b):
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def write(path, rows, fuzz):
    held = sum(r[5] for r in rows)
    load = open("/proc/loadavg").read().split()[:3]
    lines = [
        "# Reliability",
        "",
        "Generated by `python3 scripts/reliability.py --fuzz-log LOG` against the release binary "
        f"(this run: {held} of {len(rows)} promises held; load {' '.join(load)}). Exit codes: 0 ok, 1 some "
        "inputs failed and were reported (the others have their results), 2 error with a message. Peak RSS is "
        "the process's own `VmHWM` (it reports it when `INCEPTION_REPORT_RSS` is set).",
        "",
        "| case | what we promise | exit | peak RSS | time | held |",
        "|---|---|---|---|---|---|",
    ]
    for name, promise, code, rss, secs, ok, _ in rows:
        lines.append(f"| {name} | {promise} | {code} | {rss:.0f} MiB | {secs:.1f} s | {'yes' if ok else '**no**'} |")
    lines += [
        "",
        "## Limits",
        "",
        "- Images: at most 2^26 pixels (e.g. 8192 x 8192) and 32768 px a side, checked from the header "
        "before any pixel is decoded; only the crop is resampled, so extreme aspect ratios stay small.",
        "- Input sizes 75 to 2048 px; batch >= 1; width in (0, 4]; crop_pct in (0, 1]; crops 1, 12, 144; "
        "a forward or training step whose estimated memory exceeds the available memory is refused.",
        "- Weight files: strict keys and shapes, every float finite, BatchNorm variances >= 0.",
        "",
        "## What kill -9 at any moment guarantees",
        "",
        "- Every file we write (checkpoints, model, metrics, config, embeddings) goes to a temporary file in "
        "the same folder, is synced, then renamed: under its final name a file is always complete, old or new.",
        "- A temporary file of a killed writer is removed by the next write into that folder (its pid is "
        "dead); a failed write removes its own. The run folder's `.lock` of a dead process is taken over.",
        "- `train --resume` continues from the last checkpoint (every epoch, and every `--checkpoint-every` "
        "steps): at most the steps since that checkpoint are lost, and the resumed run is bit-identical to "
        "an uninterrupted one with the same thread count (weights, optimizer slots, EMA, BatchNorm "
        "statistics, schedule, data order, augmentation and dropout draws are all restored or pure "
        "functions of seed and step).",
        "",
        "## Fuzzing",
        "",
        "`tests/fuzz.rs` is a seeded mutation fuzzer on stable Rust over the safetensors reader and our "
        "metadata, image decoding + preprocessing (PNG 8/16-bit, gray, RGBA, JPEG RGB/gray/CMYK through "
        "libjpeg-turbo, BMP, WebP) + face detection on small images, and config "
        "parsing + validation: bit flips, interesting bytes, truncation, inserted and deleted runs, splices "
        "between inputs, huge numbers in headers. `cargo test` runs 20,000 cases; `scripts/fuzz.sh N` runs N.",
        "cargo-fuzz / libFuzzer needs a nightly toolchain, which cannot be installed from the package "
        "registries here, so there are no libFuzzer targets.",
        "",
        f"Last long run: `{fuzz or 'not run'}`",
        "",
    ]
    open(path, "w").write("\n".join(lines))
    print(f"wrote {path}: {held}/{len(rows)} held")


if __name__ == "__main__":
    main()
