"""Baselines for `inception bench`: the same workloads in timm / PyTorch eager (NCHW and
channels_last, `inference_mode`), ONNX Runtime and OpenVINO (both from the same ONNX export of
the timm model), same threads and shapes. Prints one JSON object per line. Dev tool only.

    python3 scripts/bench/baseline.py --model inception_resnet_v2 --batch 1 --threads 2

Fairness: torch and ORT both get `--threads` intra-op threads (inter-op 1); flush-to-zero /
denormals-are-zero is switched on in torch (`torch.set_flush_denormal(True)`) and recorded;
BatchNorm statistics are made non-trivial (as in the Rust bench the activations stay O(1)).
`ort_int8`: ONNX Runtime on the model quantized by `onnxruntime.quantization.quantize_static`
(QDQ, per-channel int8 weights, uint8 activations, Percentile 99.99 calibration on the same 16
synthetic images `inception bench --precision int8` calibrates on).
OpenVINO runs f32 (`INFERENCE_PRECISION_HINT=f32`: on CPUs with AVX512-BF16 it would otherwise
pick bf16) with the LATENCY hint at batch 1 and THROUGHPUT at larger batches (its streams then
share the threads; a run is as many requests as it asks for, the time per batch reported).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def build(name, width=1.0):
    if width != 1.0:
        if name != "inception_resnet_v1":
            raise SystemExit("--width: only inception_resnet_v1 (facenet layout) has a scaled PyTorch twin")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ir_v1_scaled import ir_v1
        m = ir_v1(width, 1000)
    elif name == "inception_resnet_v1":
        from facenet_pytorch import InceptionResnetV1
        m = InceptionResnetV1(classify=True, num_classes=1000)
        m.dropout.p = 0.0
    else:
        import timm
        m = timm.create_model(name, pretrained=False, num_classes=1000)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def peak_rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def report(system, args, ts, extra=None):
    med = statistics.median(ts)
    r = dict(system=system, model=args.model, mode=args.mode, batch=args.batch, size=args.size, threads=args.threads,
             median_ms=med, min_ms=min(ts), max_ms=max(ts), images_per_s=args.batch / (med / 1e3),
             peak_rss_mb=peak_rss_mb(), torch=torch.__version__, flush_denormal=True,
             loadavg=" ".join(open("/proc/loadavg").read().split()[:3]))
    r.update(extra or {})
    print(json.dumps(r))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="inception_resnet_v2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["infer", "train"], default="infer")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (inception_resnet_v1 only)")
    ap.add_argument("--systems", nargs="*", default=["torch", "torch_cl", "ort", "openvino"],
                    help="torch torch_cl ort openvino ort_int8")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    if args.mode == "train":
        m = build(args.model, args.width).train()
        opt = torch.optim.RMSprop(m.parameters(), lr=0.045, alpha=0.9, eps=1.0, momentum=0.9)
        y = torch.arange(args.batch) * 37 % 1000

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

        report("torch", args, timed(step, args.warmup, args.runs))
        return
    m = build(args.model, args.width).eval()
    if "torch" in args.systems:
        with torch.inference_mode():
            report("torch", args, timed(lambda: m(x), args.warmup, args.runs))
    if "torch_cl" in args.systems:
        mc = m.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            report("torch_channels_last", args, timed(lambda: mc(xc), args.warmup, args.runs))
        m = m.to(memory_format=torch.contiguous_format)
    path = os.path.join(tempfile.gettempdir(), f"{args.model}_{args.size}.onnx")
    if {"ort", "openvino", "ort_int8"} & set(args.systems) and not os.path.exists(path):
        with torch.no_grad():
            torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    if "ort" in args.systems:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        report("onnxruntime", args, timed(lambda: sess.run(None, {"x": xn}), args.warmup, args.runs),
               {"onnxruntime": ort.__version__})
    if "openvino" in args.systems:
        openvino(args, path, x.numpy())
    if "ort_int8" in args.systems:
        ort_int8(args, path, x.numpy())


def calibration_images(size):
    """The 16 synthetic images `inception bench --precision int8` calibrates on (4 batches of 4)."""
    import numpy as np
    per = 3 * size * size
    i = np.arange(16 * per, dtype=np.int64)
    return (((i * 7919) % 2001).astype(np.float32) / 1000.0 - 1.0).reshape(16, 3, size, size)


def ort_int8(args, path, xn):
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    qpath = path.replace(".onnx", "_int8.onnx")
    if not os.path.exists(qpath):
        pre = path.replace(".onnx", "_pre.onnx")
        quant_pre_process(path, pre)
        imgs = calibration_images(args.size)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"x": imgs[i:i + 1]} for i in range(len(imgs))])

            def get_next(self):
                return next(self.it, None)

        quantize_static(pre, qpath, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": 99.99})
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(qpath, so, providers=["CPUExecutionProvider"])
    report("onnxruntime_int8", args, timed(lambda: sess.run(None, {"x": xn}), args.warmup, args.runs),
           {"onnxruntime": ort.__version__, "quantization": "QDQ per-channel s8 weights, u8 activations, percentile 99.99"})


def openvino(args, path, xn):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(path)
    model.reshape([args.batch, 3, args.size, args.size])
    hint = "LATENCY" if args.batch == 1 else "THROUGHPUT"
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": args.threads,
                                                 "INFERENCE_PRECISION_HINT": "f32"})
    nreq = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") if hint == "THROUGHPUT" else 1
    queue = ov.AsyncInferQueue(compiled, nreq)

    def run():
        for _ in range(nreq):
            queue.start_async({0: xn})
        queue.wait_all()

    ts = [t / nreq for t in timed(run, args.warmup, args.runs)]
    report("openvino", args, ts, {"openvino": ov.__version__, "hint": hint, "requests": nreq,
                                  "streams": compiled.get_property("NUM_STREAMS"),
                                  "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT"))})


if __name__ == "__main__":
    main()
