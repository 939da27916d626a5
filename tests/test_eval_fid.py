"""FID: Fréchet distance maths, the reference Inception's state dict, weight loading and the cache."""

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation import fid, inception
from pipeline.evaluation.fid import feature_statistics, frechet_distance
from tests.test_eval_fixtures import demo_data, tiny_generator  # noqa: F401 - fixtures
from pipeline.evaluation.inception import (
    FIDInceptionV3,
    InceptionWeightsUnavailable,
    check_state_dict,
    expected_state_shapes,
    load_inception,
)

# Listed independently of the implementation, from the TF graph / pytorch-fid's port
# (pt_inception-2015-12-05-6726825d.pth): name -> shape.
KNOWN_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# Tensors in the reference file (94 conv+BN units x 5 tensors + fc weight and bias) and their total size:
# the same totals the JAX port of these weights checks (472 leaves, 23,885,392 values).
REFERENCE_TENSORS = 472
REFERENCE_VALUES = 23_885_392


def random_reference_state(seed=0):
    """A state dict with the reference file's keys and shapes, random values (as the test's own fixture)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_state_shapes().items():
        value = torch.randn(shape, generator=gen) * 0.05
        if key.endswith("running_var"):
            value = value.abs() + 1.0
        state[key] = value
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """(path, state) of a random state dict with the reference keys, saved once for the module (95 MB)."""
    state = random_reference_state()
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(state, path)
    return path, state


# --- Fréchet distance ------------------------------------------------------------------------------------

def test_fid_of_identical_statistics_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = feature_statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)


def _eigen_frechet(mu1, s1, mu2, s2):
    """Independent computation: Tr((S1 S2)^1/2) = Tr((A S2 A)^1/2) with A = S1^1/2, via eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = a @ s2 @ a
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def test_matches_an_eigendecomposition_computation():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 12))
    b = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_eigen_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_singular_covariances_stay_finite():
    # Fewer samples than dimensions: both covariances are singular, as with small FID sample counts.
    rng = np.random.default_rng(3)
    mu1, s1 = feature_statistics(rng.normal(size=(5, 20)))
    mu2, s2 = feature_statistics(rng.normal(size=(5, 20)) + 1.0)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(value) and value > 0


def test_large_imaginary_component_raises():
    # A non-PSD "covariance" gives sqrtm a genuinely complex result: must be refused, not silently dropped.
    s = np.array([[1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), s, np.zeros(2), np.eye(2))


# --- the reference network and its weights -----------------------------------------------------------------

def test_architecture_has_the_reference_keys_and_size():
    shapes = expected_state_shapes()
    for key, shape in KNOWN_KEYS.items():
        assert shapes.get(key) == shape, key
    assert len(shapes) == REFERENCE_TENSORS
    assert sum(math.prod(s) for s in shapes.values()) == REFERENCE_VALUES


def test_reference_state_dict_loads_strictly_from_path_and_env(weights_file, monkeypatch):
    path, state = weights_file
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(path))
    model, digest = load_inception(None)  # from $SPARSEGEN_INCEPTION_WEIGHTS
    assert len(digest) == 64
    for key in ("Mixed_7c.branch_pool.conv.weight", "fc.bias", "Conv2d_1a_3x3.bn.running_var"):
        assert torch.equal(model.state_dict()[key], state[key]), key
    assert not model.training
    assert inception.resolve_weights_source("elsewhere.pth") == "elsewhere.pth"  # the argument wins
    # Files from newer PyTorch carry BatchNorm step counters: accepted too.
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    check_state_dict(state)


def test_wrong_keys_or_shapes_are_refused(tmp_path):
    state = random_reference_state()
    del state["fc.bias"]
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 2, 3, 3)
    state["AuxLogits.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(InceptionWeightsUnavailable) as info:
        check_state_dict(state)
    text = str(info.value)
    assert "fc.bias" in text and "AuxLogits.fc.weight" in text and "Mixed_5b.branch1x1.conv.weight" in text


def test_checksum_in_file_name_is_verified(tmp_path, weights_file):
    path = tmp_path / inception.REFERENCE_WEIGHTS_NAME  # claims sha256 prefix 6726825d
    path.symlink_to(weights_file[0])
    with pytest.raises(InceptionWeightsUnavailable, match="does not match the checksum"):
        load_inception(str(path))


def test_missing_weights_message(monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsUnavailable) as info:
        load_inception(None)
    message = str(info.value)
    assert "FID unavailable" in message and "--inception-weights" in message and inception.WEIGHTS_ENV in message
    with pytest.raises(InceptionWeightsUnavailable, match="not found"):
        load_inception("/nonexistent/pt_inception.pth")


def test_weights_load_from_s3(weights_file, s3_env):
    from pipeline.data import storage

    path = weights_file[0]
    url = f"{s3_env.url}/weights/w.pth"
    storage.write_bytes(url, path.read_bytes())
    _, digest = load_inception(url)
    assert digest == storage.sha256_file(path)


def test_pool3_features_shape_and_tf_pooling(weights_file):
    with torch.device("meta"):  # skip the default init of 24M parameters: the state dict overwrites them
        model = FIDInceptionV3()
    model = model.to_empty(device="cpu")
    model.load_state_dict(weights_file[1], strict=False)
    features = model(torch.rand(2, 3, 75, 75) * 2 - 1, resize=False)  # 75 px: the smallest the graph takes
    assert features.shape == (2, 2048) and torch.isfinite(features).all()

    # By default the input is resized to 299 x 299 (bilinear) before the first convolution; the hook stops the
    # forward pass right there, so this costs nothing.
    class Seen(Exception):
        pass

    def stop(_module, inputs):
        raise Seen(tuple(inputs[0].shape))

    handle = model.Conv2d_1a_3x3.register_forward_pre_hook(stop)
    with pytest.raises(Seen) as seen:
        model(torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert seen.value.args[0] == (1, 3, 299, 299)
    # The TF quirks: padding-excluding average pools in A/C/E_1, a max pool in E_2.
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    x = torch.ones(1, 1, 4, 4)
    assert torch.allclose(inception._tf_avg_pool(x), x)  # zero padding would lower the border


# --- reference statistics cache and the evaluate() wiring ---------------------------------------------------

class TinyFeatures(torch.nn.Module):
    """A stand-in feature network (8-d), so the FID plumbing is tested without the 24M-parameter network."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.proj(torch.stack([images.mean((2, 3)), images.std((2, 3))], 1).mean(1))


def test_reference_statistics_are_cached_by_manifest(tmp_path, monkeypatch, demo_data):
    monkeypatch.setenv("SPARSEGEN_CACHE_DIR", str(tmp_path / "cache"))
    model = TinyFeatures()
    mu, sigma, count, path = fid.reference_statistics(demo_data, model, "ab" * 32, image_size=32, progress=False)
    from pipeline.data import open_dataset

    info = open_dataset(demo_data)
    assert count == info.num_train and path.exists() and info.manifest_sha256[:16] in path.name
    calls = model.calls
    mu2, sigma2, _, path2 = fid.reference_statistics(demo_data, model, "ab" * 32, image_size=32, progress=False)
    assert model.calls == calls and path2 == path and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)


def test_evaluate_fid_defaults_to_training_set_size(tmp_path, monkeypatch, demo_data, tiny_generator):
    from pipeline.evaluation import orchestration as evaluate_module

    monkeypatch.setenv("SPARSEGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "load_inception", lambda weights, device="cpu": (TinyFeatures(), "cd" * 32))
    cfg, generator = tiny_generator
    metrics, artifacts = evaluate_module.evaluate(cfg, generator, demo_data, ["fid"], out_dir=tmp_path / "out",
                                                  progress=False)
    from pipeline.data import open_dataset

    assert metrics["fid_generated_samples"] == open_dataset(demo_data).num_train
    assert math.isfinite(metrics["fid"]) and metrics["fid"] >= 0
    metrics2, _ = evaluate_module.evaluate(cfg, generator, demo_data, ["fid"], samples=7, out_dir=tmp_path / "out",
                                           progress=False)
    assert metrics2["fid_generated_samples"] == 7


def test_evaluate_without_weights_reports_or_raises(tmp_path, monkeypatch, tiny_generator):
    from pipeline.evaluation.orchestration import MetricUnavailable, evaluate

    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    cfg, generator = tiny_generator
    metrics, artifacts = evaluate(cfg, generator, None, ["fid", "tree"], out_dir=tmp_path, progress=False)
    assert "fid" not in metrics and "tree_nodes" in metrics
    import json

    assert "FID unavailable" in json.loads(open(artifacts["summary"]).read())["unavailable"]["fid"]
    with pytest.raises(MetricUnavailable, match="FID unavailable"):
        evaluate(cfg, generator, None, ["fid", "tree"], out_dir=tmp_path, progress=False, strict=True)
