"""Shared fixtures: small REAL-image corpora, built once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """sklearn digits as 32x32 RGB JPEGs: <root>/train/<0..9>/*.jpg, <root>/val/..., manifest.json."""
    pytest.importorskip("sklearn")
    from fastairl.data.bundled import make_digits

    root = tmp_path_factory.mktemp("bundled") / "digits"
    make_digits(root, size=32)
    return root


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory):
    """40 ImageNet-like JPEGs (~500x375) from real photos, 10 classes: <root>/train/<class>/*.jpg."""
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from fastairl.data.bundled import make_photo_corpus

    root = tmp_path_factory.mktemp("bundled") / "photos"
    make_photo_corpus(root, n_images=40)
    return root


def pytest_collection_modifyitems(config, items):
    """The GPU tier (`@pytest.mark.cuda`) skips cleanly where CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
