"""Run `inception bench` and the Python baselines back to back on this machine and write the
generated table of BENCHMARKS.md (between its `<!-- generated:begin -->` and
`<!-- generated:end -->` markers) with ratios ours / theirs. Dev tool; needs torch, timm,
onnxruntime, onnx, openvino (and facenet-pytorch for the demo row).

    cargo build --release
    python3 scripts/bench/run_all.py --threads 2

Rows: f32 inference at batch 1 and 8 against PyTorch eager (NCHW, channels_last), ONNX Runtime
and OpenVINO; int8 inference against ONNX Runtime's static int8 (and against our own f32: the
speed-up); a training step at batch 8 (our CPU engine, TF-RMSProp + EMA) against PyTorch eager;
the demo's training configuration (IR-v1 x0.25, 75 px, batch 32). Each row alternates ours and
theirs `--rounds` times and keeps each system's best median (the host drifts by tens of percent
within minutes); the load averages are recorded before each side.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "../.."))
FLOOR_GFLOP = {"inception_resnet_v2": 26.31, "inception_v4": 24.51}  # per 299 px image, 2 x MACs
BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"


def ours(binary, model, batch, mode, threads, runs, precision="f32", size=299, width=1.0, engine="fast"):
    cmd = [binary, "--engine", engine, "bench", "--model", model, "--batch", str(batch), "--mode", mode,
           "--threads", str(threads), "--runs", str(runs), "--warmup", "2" if mode == "train" else "1",
           "--precision", precision, "--size", str(size), "--width", str(width), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def theirs(model, batch, mode, threads, runs, systems, size=299, width=1.0):
    cmd = [sys.executable, os.path.join(HERE, "baseline.py"), "--model", model, "--batch", str(batch), "--mode", mode,
           "--threads", str(threads), "--runs", str(runs), "--warmup", "2" if mode == "train" else "1",
           "--size", str(size), "--width", str(width), "--systems", *systems]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags():
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            f = line.split()
            return ", ".join(x for x in ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"] if x in f)
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                     "release/inception"))
    ap.add_argument("--models", nargs="*", default=["inception_resnet_v2", "inception_v4"])
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--json-out", default=os.path.join(HERE, f"results_{datetime.date.today()}.json"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-demo", action="store_true", help="skip the demo-configuration training row")
    ap.add_argument("--modes", nargs="*", default=["infer", "train"], help="which rows: infer and/or train")
    ap.add_argument("--from-json", help="measure nothing: render the table from the raw numbers of an earlier run "
                    "(pass that run's --rounds too; the CPU line is read from this machine)")
    args = ap.parse_args()
    # (label, model, mode, batch, precision, baselines, size, width)
    plan = []
    for model in args.models:
        for batch, runs in [(1, 10), (8, 4)] if "infer" in args.modes else []:
            plan.append((model, "infer", batch, "f32", ["torch", "torch_cl", "ort", "openvino"], 299, 1.0, runs))
            plan.append((model, "infer", batch, "int8", ["ort_int8"], 299, 1.0, runs))
        if "train" in args.modes:
            plan.append((model, "train", 8, "f32", ["torch"], 299, 1.0, 3))
    if not args.no_demo and "train" in args.modes:
        plan.append(("inception_resnet_v1", "train", 32, "f32", ["torch"], 75, 0.25, 5))
    raw = []
    if args.from_json:
        try:
            with open(args.from_json) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--from-json {args.from_json}: {e}")
        if not isinstance(raw, list) or not raw:
            ap.error(f"--from-json {args.from_json}: not a list of rows from run_all.py")
    else:
        for model, mode, batch, precision, systems, size, width, runs in plan:
            o, ts = None, {}
            for _ in range(args.rounds):
                r = ours(args.binary, model, batch, mode, args.threads, runs, precision, size, width)
                if o is None or r["median_ms"] < o["median_ms"]:
                    o = r
                for t in theirs(model, batch, mode, args.threads, runs, systems, size, width):
                    if t["system"] not in ts or t["median_ms"] < ts[t["system"]]["median_ms"]:
                        ts[t["system"]] = t
            raw.append({"ours": o, "theirs": list(ts.values())})
            print(model, mode, batch, precision, o["median_ms"], [(k, round(t["median_ms"], 1)) for k, t in ts.items()],
                  flush=True)
        with open(args.json_out, "w") as f:
            json.dump(raw, f, indent=1)
    rows, own_f32 = [], {}
    for entry in raw:
        o, ts = entry["ours"], entry["theirs"]
        c = o["config"]
        model, mode, batch, precision, size, width = c["model"], c["mode"], c["batch"], c["precision"], c["size"], \
            c["width"]
        if precision == "f32" and mode == "infer":
            own_f32[(model, batch)] = o
        label = model if width == 1.0 else f"{model} x{width} ({size} px)"
        for t in ts:
            rows.append((label, mode, batch, precision, t["system"], o["median_ms"], t["median_ms"], o["peak_rss_mb"],
                         t["peak_rss_mb"], o["loadavg_before"], t["loadavg"], model, size))
        if precision == "int8" and (model, batch) in own_f32:
            f = own_f32[(model, batch)]
            rows.append((label, mode, batch, precision, "ours f32", o["median_ms"], f["median_ms"], o["peak_rss_mb"],
                         f["peak_rss_mb"], o["loadavg_before"], f["loadavg_before"], model, size))
    threads = raw[0]["ours"]["config"]["threads"]
    json_path = args.from_json or args.json_out
    day = datetime.date.fromtimestamp(os.path.getmtime(json_path))
    peak = max(e["ours"]["fma_peak_gflops_per_core"] for e in raw) * threads
    torch_version = next((t["torch"] for e in raw for t in e["theirs"] if "torch" in t), "?")
    lines = [
        f"Generated by `python3 scripts/bench/run_all.py --threads {threads}` on {day}: "
        f"{cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores, {threads} threads, random weights with "
        f"non-trivial BatchNorm. torch {torch_version}. Ours: inference on the `fast` engine (f32, or int8 "
        "from `--precision int8`), training on our CPU training engine. Each row alternates ours and theirs "
        f"{args.rounds} times and keeps each system's best median; ratio = ours / theirs (< 1: we are faster). "
        f"Raw numbers: `{os.path.relpath(json_path, ROOT)}`.",
        "",
        "| model | mode | batch | precision | baseline | ours ms | theirs ms | ratio | ours RSS MiB | theirs RSS MiB "
        "| floor ms | load (ours / theirs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, mode, batch, precision, system, om, tm, orss, trss, lo, lt, model, size) in rows:
        floor = FLOOR_GFLOP.get(model)
        floor_ms = "-" if floor is None or size != 299 or precision != "f32" else \
            "{:.0f}".format(floor * batch * (3 if mode == "train" else 1) / peak * 1e3)
        lines.append(f"| {label} | {mode} | {batch} | {precision} | {system} | {om:.1f} | {tm:.1f} | **{om / tm:.2f}** "
                     f"| {orss:.0f} | {trss:.0f} | {floor_ms} | {lo} / {lt} |")
    lines += ["", f"Floor: 2 x MACs at the measured f32 FMA peak of {threads} cores, {peak:.0f} GFLOP/s "
              "(`inception bench` times 12 independent FMA chains per core with the widest vectors the GEMM "
              "uses); x3 FLOPs for a training step. `ours f32` rows: the int8 time against our own f32 time "
              "(the speed-up is its inverse)."]
    text = "\n".join(lines)
    doc = open(args.out).read() if os.path.exists(args.out) else ""
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        doc = f"{head}{BEGIN}\n{text}\n{END}{tail}"
    else:
        doc = f"# Benchmarks\n\n{BEGIN}\n{text}\n{END}\n" + doc
    with open(args.out, "w") as f:
        f.write(doc)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
