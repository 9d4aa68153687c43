"""The predictor's input encoding (docs/design.md §5): sizes, layout, round trips, genomes vs subnets."""

from __future__ import annotations

import numpy as np
import pytest

from apq_lightning.encoding import PARTS, get_encoder
from apq_lightning.space import BIT_FIELDS, Subnet, get_space

SPACES = ("apq_imagenet", "apq_cifar", "tiny")


def test_apq_imagenet_dims():
    enc = get_encoder("apq_imagenet")
    assert enc.fp_dim == 63 + 457 == 520
    assert enc.dim == 772 and enc.quant_dim == 21 * 4 * 3 == 252
    assert enc.dims(quantized=False) == 520 and enc.dims() == 772


def reference_features(spec: dict) -> np.ndarray:
    """The APQ layout written out by hand for apq_imagenet from a reference spec (ks / e / d /
    *_bits_setting), independent of the encoder's offset tables."""
    cin = [16] + [24] * 4 + [40] * 4 + [80] * 4 + [96] * 4 + [192] * 4
    n_width = [len(range(4 * c, 6 * c + 1, 8)) for c in cin]
    out = np.zeros(772, dtype=np.float32)
    active = [i % 4 < spec["d"][i // 4] for i in range(21)]
    col = 0
    for i in range(21):  # kernels
        if active[i]:
            out[col + [3, 5, 7].index(spec["ks"][i])] = 1
        col += 3
    for i in range(21):  # widths: mid = e * Cin
        if active[i]:
            out[col + list(range(4 * cin[i], 6 * cin[i] + 1, 8)).index(round(spec["e"][i] * cin[i]))] = 1
        col += n_width[i]
    assert col == 520
    for f in BIT_FIELDS:
        for i in range(21):
            if active[i]:
                out[col + [4, 6, 8].index(spec[f"{f}_bits_setting"][i])] = 1
            col += 3
    return out


def test_layout_matches_a_hand_written_reference_encoding():
    sp = get_space("apq_imagenet")
    enc = get_encoder(sp)
    for subnet in (sp.sample(i, quantized=True) for i in range(20)):
        spec = subnet.to_apq()
        np.testing.assert_array_equal(enc.encode(subnet)[0], reference_features(spec))
        np.testing.assert_array_equal(enc.encode(spec)[0], reference_features(spec))


@pytest.mark.parametrize("name", SPACES)
def test_genomes_and_subnets_give_identical_features(name):
    sp = get_space(name)
    enc = get_encoder(sp)
    genomes = sp.sample_genomes(1, 64)
    subnets = [sp.from_genome(g) for g in genomes]
    for quantized in (True, False):
        a = enc.encode_genomes(genomes, quantized)
        assert a.shape == (64, enc.dims(quantized)) and a.dtype == np.float32
        np.testing.assert_array_equal(a, enc.encode(subnets, quantized))
        np.testing.assert_array_equal(a, enc.encode([s.to_dict() for s in subnets], quantized))
        np.testing.assert_array_equal(a, enc.encode([s.to_apq() for s in subnets], quantized))


@pytest.mark.parametrize("name", SPACES)
def test_round_trip(name):
    sp = get_space(name)
    enc = get_encoder(sp)
    subnets = [sp.sample(i, quantized=True) for i in range(30)] + [sp.largest(bits=4), sp.smallest(bits=8)]
    assert enc.decode(enc.encode(subnets)) == subnets
    floats = [s.with_bits(None) for s in subnets]
    assert enc.decode(enc.encode(floats, quantized=False)) == floats


@pytest.mark.parametrize("name", SPACES)
def test_one_hot_counts_and_skipped_blocks_all_zero(name):
    sp = get_space(name)
    enc = get_encoder(sp)
    genomes = sp.sample_genomes(2, 100)
    x = enc.encode_genomes(genomes)
    active = sp.genome_active(genomes)
    assert (x.sum(axis=1) == active.sum(axis=1) * len(PARTS)).all()
    sl = sp.genome_slices()
    for p, part in enumerate(PARTS):
        for b in range(sp.num_blocks):
            width = len(sp.gene_choices[sl[part].start + b])
            group = x[:, enc.offsets[p, b]: enc.offsets[p, b] + width]
            np.testing.assert_array_equal(group.sum(axis=1), active[:, b].astype(np.float32))
            assert (group[~active[:, b]] == 0).all()


def test_skipped_block_values_do_not_change_the_encoding():
    sp = get_space("apq_imagenet")
    small = sp.smallest(bits=4)
    spec = small.to_apq()
    spec["ks"][3], spec["e"][3] = 7, 6  # block 3 is skipped at depth 2
    enc = get_encoder(sp)
    np.testing.assert_array_equal(enc.encode(spec), enc.encode(small))


def test_feature_indices_point_at_the_ones_and_pad_skipped_blocks():
    sp = get_space("tiny")
    enc = get_encoder(sp)
    genomes = sp.sample_genomes(3, 16)
    for quantized in (True, False):
        idx = enc.feature_indices(genomes, quantized)
        dense = enc.encode_genomes(genomes, quantized)
        pad = enc.dims(quantized)
        for row, cols in zip(dense, idx):
            assert sorted(np.flatnonzero(row)) == sorted(c for c in cols if c != pad)


def test_bad_genomes_are_named():
    enc = get_encoder("tiny")
    with pytest.raises(ValueError, match="shape"):
        enc.encode_genomes(np.zeros((2, 5), dtype=np.int64))
    g = np.zeros((1, enc.space.genome_length), dtype=np.int64)
    g[0, 0] = 9
    with pytest.raises(ValueError, match="gene 0"):
        enc.encode_genomes(g)
    with pytest.raises(ValueError, match="space 'tiny'"):
        get_encoder("apq_cifar").encode(get_space("tiny").largest())
    with pytest.raises(ValueError, match="columns"):
        enc.decode(np.zeros((1, 3)))


def test_float_subnet_encodes_bits_as_largest_choice():
    sp = get_space("tiny")
    enc = get_encoder(sp)
    s = sp.sample(5)
    np.testing.assert_array_equal(enc.encode(s), enc.encode(s.with_bits(8)))
    assert isinstance(s, Subnet) and s.bits is None
