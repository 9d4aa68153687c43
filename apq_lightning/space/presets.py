"""The preset spaces, registered on import (``get_space("apq_cifar")``).

The elastic dimensions are APQ's defaults of :class:`~apq_lightning.space.spec.SearchSpace`;
a preset only sets the macro layout. A recipe's own space goes through
:func:`~apq_lightning.space.spec.add_space` instead.
"""

from __future__ import annotations

from .spec import SearchSpace, register_space


@register_space
def apq_imagenet() -> SearchSpace:
    """APQ's ImageNet space at 224px, exactly matching the paper and its BitFusion table."""
    return SearchSpace(
        name="apq_imagenet",
        image_size=224,
        stem_channels=32,
        stem_stride=2,
        first_block_channels=16,
        stage_channels=(24, 40, 80, 96, 192, 320),
        stage_strides=(2, 2, 2, 1, 2, 1),
        stage_blocks=(4, 4, 4, 4, 4, 1),
        head_channels=1280,
        description="APQ / ProxylessNAS ImageNet space (CVPR 2020)",
    )


@register_space
def apq_cifar() -> SearchSpace:
    """32x32 images on CPU: same structure, narrower channels, stride-1 stem.

    Sized so that the largest subnet trains at >= 250 img/s on 2 CPU cores (see README).
    """
    return SearchSpace(
        name="apq_cifar",
        image_size=32,
        stem_channels=16,
        stem_stride=1,
        first_block_channels=8,
        stage_channels=(16, 24, 32, 48, 64, 96),
        stage_strides=(2, 2, 2, 1, 2, 1),
        stage_blocks=(4, 4, 4, 4, 4, 1),
        head_channels=512,
        description="CIFAR-sized APQ space for CPU work",
    )


@register_space
def tiny() -> SearchSpace:
    """A few-hundred-KFLOP space for tests and the offline digits demo (16x16 inputs)."""
    return SearchSpace(
        name="tiny",
        image_size=16,
        stem_channels=8,
        stem_stride=1,
        first_block_channels=8,
        stage_channels=(8, 16, 16, 24, 24, 32),
        stage_strides=(1, 2, 1, 2, 1, 1),
        stage_blocks=(4, 4, 4, 4, 4, 1),
        head_channels=96,
        description="tiny space for tests and the digits demo",
    )
