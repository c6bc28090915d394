"""Shared helpers for the reference scripts: build the reference models (timm, facenet-pytorch)
with random but non-trivial weights, and the deterministic weight generator that the Rust
block tests reproduce bit for bit (see `tests/common/mod.rs`)."""
import numpy as np
import torch

FULL_MODELS = {
    # name: (sizes, num_classes)
    "inception_v4": ((299, 224), 1000),
    "inception_resnet_v2": ((299, 224), 1000),
    "inception_resnet_v1": ((160, 299), 100),
}


def build(name, num_classes):
    if name == "inception_resnet_v1":
        from facenet_pytorch import InceptionResnetV1
        return InceptionResnetV1(classify=True, num_classes=num_classes)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


@torch.no_grad()
def randomize(model, seed, calib_size):
    """BatchNorm affine params drawn away from (1, 0), then running statistics set from one
    train-mode pass, so activations stay O(1) through the whole net and BN errors cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            m.momentum = None  # cumulative average: one pass = that batch's statistics
            m.reset_running_stats()
    model.train()
    model(torch.rand(4, 3, calib_size, calib_size, generator=g) * 2 - 1)
    model.eval()
    # Unit-gain random nets are chaotic: f32 rounding grows ~10% per layer, and the f32
    # reference itself drifts 2e-3 from float64 by the end of Inception-v4. A BN gain of
    # 1/sqrt(1.4) per layer keeps outputs input-dependent (logits of two inputs differ by ~0.1)
    # while f32 vs float64 stays near 1e-6, so a 1e-4 tolerance tests the port, not the noise.
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_var.mul_(1.4)
    return model


# ---- deterministic weights (must match tests/common/mod.rs) ----
MASK = (1 << 64) - 1


def fnv1a32(s):
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def det_uniform(key, n):
    """n values in [0, 1) with 24-bit resolution, from splitmix64 of (fnv1a32(key) << 32 | i)."""
    i = np.arange(n, dtype=np.uint64)
    z = (np.uint64(fnv1a32(key)) << np.uint64(32)) | i
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def det_value(key, shape):
    """The value of tensor `key`: conv/linear weights U(-1,1)/sqrt(fan_in); BN weight and
    running_var in [0.5, 1.5); BN bias, running_mean and conv biases in [-0.5, 0.5) * 0.5."""
    n = int(np.prod(shape)) if len(shape) else 1
    u = det_uniform(key, n)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        v = (u * 2.0 - 1.0) / np.sqrt(float(fan_in))
    elif leaf in ("running_var",) or (leaf == "weight" and len(shape) == 1):
        v = u + 0.5
    else:
        v = (u - 0.5) * 0.5
    return v.astype(np.float32).reshape(shape)


@torch.no_grad()
def set_deterministic(module):
    for k, t in module.state_dict().items():
        if t.dtype.is_floating_point:
            t.copy_(torch.from_numpy(det_value(k, tuple(t.shape))))
    module.eval()
    return module
