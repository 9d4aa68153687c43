"""Shared fixtures. Data beside the project is passed in by environment, never hard-coded."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")  # tests never talk to the W&B service

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """The shared CIFAR-10 JPEG archive from ``$APQ_CIFAR_ARCHIVE``.

    Skips when it is absent (a user's checkout), but fails under ``APQ_REQUIRE_SHARED=1`` (CI,
    ``make test``), so a mis-set path cannot silently turn the real-data tests into skips.
    """
    value = os.environ.get("APQ_CIFAR_ARCHIVE")
    if value and Path(value).is_file():
        return Path(value).resolve()
    reason = (
        "APQ_CIFAR_ARCHIVE is not set"
        if not value
        else f"APQ_CIFAR_ARCHIVE={value!r}: no such file"
    )
    if os.environ.get("APQ_REQUIRE_SHARED") == "1":
        pytest.fail(
            f"{reason}, and APQ_REQUIRE_SHARED=1 requires it (missing path: {value!r}); "
            "point APQ_CIFAR_ARCHIVE at cifar10-jpeg.tar.gz",
            pytrace=False,
        )
    pytest.skip(f"{reason} (set it to the path of cifar10-jpeg.tar.gz to run real-data tests)")


@pytest.fixture(scope="session", autouse=True)
def _reproducible_torch():
    """Deterministic kernels, and the thread count from ``APQ_TEST_THREADS`` when set.

    Floating-point sums differ between CPUs and thread counts, so tests with thresholds assert
    with margins (docs/testing.md lists them); this fixture lets anyone rerun the suite under
    another thread count to check those margins (``APQ_TEST_THREADS=1 make test``).
    """
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    threads = os.environ.get("APQ_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    yield


@pytest.fixture(scope="session")
def seed() -> int:
    """Seed of the tests that train and assert on accuracy (``APQ_TEST_SEED``, default 0): their
    margins must hold for other seeds too, which ``APQ_TEST_SEED=1 make test`` checks."""
    return int(os.environ.get("APQ_TEST_SEED", "0"))


@pytest.fixture(scope="module")
def single_thread():
    """Small tensors on a shared CPU: intra-op threads only add contention. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("APQ_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that takes the CIFAR-10 archive is marked ``shared`` (``make test-fast`` skips them)."""
    for item in items:
        if "cifar_archive" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)
