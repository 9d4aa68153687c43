"""Search space, Subnet value type, JSON / APQ formats and genomes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import apq_lightning.space as space_pkg
from apq_lightning.space import (
    BIT_FIELDS,
    Subnet,
    get_space,
    list_spaces,
    load_subnet,
    load_subnets,
    save_subnets,
    to_genomes,
)

SPACES = ["apq_imagenet", "apq_cifar", "tiny"]


def test_apq_imagenet_matches_paper():
    sp = get_space("apq_imagenet")
    assert sp.num_blocks == 21
    assert [len(b.width_choices) for b in sp.blocks] == [5] + [7] * 4 + [11] * 4 + [21] * 4 + [25] * 4 + [49] * 4
    assert sum(len(b.width_choices) for b in sp.blocks) == 457
    assert [b.in_channels for b in sp.blocks][:6] == [16, 24, 24, 24, 24, 40]
    n = sp.num_architectures()
    assert 9.0e35 < n < 9.1e35
    # Independent count: per stage, sum over depths of prod(3 kernels x widths) of the first d blocks.
    widths = [[5, 7, 7, 7], [7, 11, 11, 11], [11, 21, 21, 21], [21, 25, 25, 25], [25, 49, 49, 49]]
    expect = 3 * 49
    for ws in widths:
        expect *= sum(math.prod(3 * w for w in ws[:d]) for d in (2, 3, 4))
    assert n == expect
    # Spatial sizes as in the BitFusion table: 112 → 56 → 28 → 14 → 14 → 7 → 7.
    assert [sp.blocks[i].input_size for i in (0, 4, 8, 12, 16, 20)] == [112, 56, 28, 14, 14, 7]
    assert sp.final_size == 7


@pytest.mark.parametrize("name", SPACES)
def test_sampling_is_seeded_and_valid(name):
    sp = get_space(name)
    a = [sp.sample(np.random.default_rng(3), quantized=True) for _ in range(2)]
    assert a[0] == a[1]
    subnets = {sp.sample(np.random.default_rng(i)) for i in range(50)}
    assert len(subnets) > 45
    for s in subnets:
        for i, blk in enumerate(sp.blocks):
            if s.active_mask[i]:
                assert s.widths[i] in blk.width_choices and s.kernels[i] in sp.kernel_choices
            else:
                assert s.widths[i] == 0 and s.kernels[i] == 0


@pytest.mark.parametrize("name", SPACES)
def test_extremes(name):
    sp = get_space(name)
    big, small = sp.largest(), sp.smallest()
    assert all(big.active_mask) and big.widths == tuple(b.width_choices[-1] for b in sp.blocks)
    assert sum(small.active_mask) == 2 * 5 + 1
    assert set(small.kernels) - {0} == {3}


def test_skipped_blocks_are_canonicalised():
    sp = get_space("apq_cifar")
    s = sp.sample(np.random.default_rng(0), quantized=True).to_dict()
    depths = [2, 2, 2, 2, 2, 1]
    s["depths"] = depths
    other = json.loads(json.dumps(s))
    # Change every skipped block's values to something else (even invalid): same subnet.
    for i, blk in enumerate(sp.blocks):
        if blk.position >= depths[blk.stage]:
            other["kernels"][i] = 5 if s["kernels"][i] != 5 else 7
            other["widths"][i] = 12345
            for f in BIT_FIELDS:
                other["bits"][f][i] = 99
    a, b = Subnet.from_dict(s), Subnet.from_dict(other)
    assert a == b and hash(a) == hash(b) and a.key() == b.key()
    assert len({a, b}) == 1


@pytest.mark.parametrize("name", SPACES)
def test_json_round_trip(name, tmp_path):
    sp = get_space(name)
    rng = np.random.default_rng(1)
    subnets = [sp.sample(rng, quantized=q) for q in (False, True, True)]
    for s in subnets:
        assert Subnet.from_json(s.to_json()) == s
    save_subnets(tmp_path / "many.jsonl", subnets)
    assert load_subnets(tmp_path / "many.jsonl") == subnets
    save_subnets(tmp_path / "one.json", subnets[:1])
    assert load_subnet(tmp_path / "one.json") == subnets[0]


def test_apq_reference_format_round_trip():
    sp = get_space("apq_imagenet")
    rng = np.random.default_rng(2)
    for _ in range(20):
        s = sp.sample(rng, quantized=True)
        spec = s.to_apq()
        assert set(spec) >= {"ks", "e", "d", "pw_w_bits_setting", "dw_a_bits_setting"}
        assert len(spec["d"]) == 6 and len(spec["ks"]) == 21
        assert Subnet.from_dict(spec) == s


def test_apq_reference_spec_import_with_rounding():
    # A spec as the reference writes it: expand ratios as floats, d for 6 stages (last ignored).
    spec = {
        "wid": None,
        "ks": [3, 5, 7] * 7,
        "e": [4, 4.333333333333333, 6, 5, 4.5] + [4.0] * 16,
        "d": [4, 3, 2, 4, 2, 3],
    }
    s = Subnet.from_apq(spec)
    assert s.depths == (4, 3, 2, 4, 2, 1)
    assert s.widths[:5] == (64, 104, 144, 120, 112)
    assert s.bits is None
    # mid = make_divisible(e * Cin, 8): 4.6 * 24 = 110.4 -> 112; rejects values not in the space
    spec["e"][1] = 4.6
    assert Subnet.from_apq(spec).widths[1] == 112
    spec["e"][1] = 7.0
    with pytest.raises(ValueError, match=r"block 1 .*widths=168.*allowed: \[96, 104"):
        Subnet.from_apq(spec)


def test_validation_messages():
    sp = get_space("apq_imagenet")
    good = sp.largest(8).to_dict()

    def bad(**change):
        d = json.loads(json.dumps(good))
        for k, v in change.items():
            if k in BIT_FIELDS:
                d["bits"][k] = v
            else:
                d[k] = v
        return d

    with pytest.raises(ValueError, match=r"kernels has 20 entries, expected 21"):
        Subnet.from_dict(bad(kernels=[3] * 20))
    with pytest.raises(ValueError, match=r"block 2 \(stage 0\): kernels=4 is not allowed; allowed: \[3, 5, 7\]"):
        Subnet.from_dict(bad(kernels=[3, 3, 4] + [3] * 18))
    with pytest.raises(ValueError, match=r"block 0 \(stage 0\): widths=100 .*allowed: \[64, 72, 80, 88, 96\]"):
        Subnet.from_dict(bad(widths=[100] + good["widths"][1:]))
    with pytest.raises(ValueError, match=r"stage 1: depths=5 is not allowed; allowed: \[2, 3, 4\]"):
        Subnet.from_dict(bad(depths=[4, 5, 4, 4, 4, 1]))
    with pytest.raises(ValueError, match=r"block 20 \(stage 5\): bits.dw_a=5 is not allowed; allowed: \[4, 6, 8\]"):
        Subnet.from_dict(bad(dw_a=[8] * 20 + [5]))
    with pytest.raises(ValueError, match=r"unknown search space 'nope'"):
        Subnet.from_dict(bad(space="nope"))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        Subnet.from_dict({**good, "colour": 1})
    cifar = get_space("apq_cifar")
    with pytest.raises(ValueError, match=r"belongs to space 'apq_imagenet', but this is space 'apq_cifar'"):
        cifar.check(sp.largest())
    with pytest.raises(ValueError, match=r"expected space 'apq_cifar'"):
        Subnet.from_dict(good, space="apq_cifar")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_subnets(tmp_path / "nope.json")
    p = tmp_path / "bad.jsonl"
    p.write_text(get_space("tiny").largest().to_json() + "\n{\"space\": \"tiny\"}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: subnet JSON: missing keys"):
        load_subnets(p)


@pytest.mark.parametrize("name", SPACES)
def test_genomes(name):
    sp = get_space(name)
    genomes = sp.sample_genomes(0, 200)
    assert genomes.shape == (200, sp.genome_length)
    assert (genomes < sp.gene_cardinality).all() and (genomes >= 0).all()
    active = sp.genome_active(genomes)
    for g, act in zip(genomes[:50], active[:50]):
        s = sp.from_genome(g)
        assert list(act) == s.active_mask
        assert sp.from_genome(sp.to_genome(s)) == s
    with pytest.raises(ValueError, match="genome must have"):
        sp.from_genome(genomes[0][:-1])


def test_registry():
    assert set(SPACES) <= set(list_spaces())
    with pytest.raises(ValueError, match="registered spaces"):
        get_space("imagenet")


def test_package_exports_every_public_name():
    assert sorted(space_pkg.__all__) == sorted(set(space_pkg.__all__))
    for name in space_pkg.__all__:
        assert getattr(space_pkg, name) is not None, name
    # the preset factories build the registered objects
    assert space_pkg.apq_cifar() == get_space("apq_cifar") and space_pkg.tiny().name == "tiny"


def test_to_genomes_equals_to_genome_for_every_form():
    sp = get_space("apq_cifar")
    subnets = [sp.sample(i, quantized=i % 2 == 0) for i in range(50)]
    want = np.stack([sp.to_genome(s) for s in subnets])
    dicts, specs = [s.to_dict() for s in subnets], [s.to_apq() for s in subnets]
    mixed = [[s, d, a][i % 3] for i, (s, d, a) in enumerate(zip(subnets, dicts, specs))]
    for form in (subnets, dicts, specs, mixed, [{k: v for k, v in d.items() if k != "space"} for d in dicts]):
        got = to_genomes(sp, form)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(to_genomes("apq_cifar", want.astype(np.int16)), want)
    assert to_genomes(sp, dicts, dtype=np.int16).dtype == np.int16
    np.testing.assert_array_equal(to_genomes(sp, subnets[7]), want[7:8])
    np.testing.assert_array_equal(to_genomes(sp, dicts[7]), want[7:8])
    assert to_genomes(sp, []).shape == (0, sp.genome_length)
    # a float subnet codes its bits as the largest choice, unless bits are needed
    float_dict = subnets[1].to_dict()
    assert to_genomes(sp, [float_dict])[0, sp.genome_slices()["pw_w"]].max() == len(sp.bit_choices) - 1
    for form in ([float_dict], [subnets[1]]):
        with pytest.raises(ValueError, match=r"^item 0: a float subnet"):
            to_genomes(sp, form, need_bits=True)


def test_to_genomes_names_the_bad_item():
    sp = get_space("apq_cifar")
    subnets = [sp.sample(i, quantized=True) for i in range(3)]
    bad = subnets[1].to_dict()
    bad["widths"] = list(bad["widths"])
    bad["widths"][0] = 33
    with pytest.raises(ValueError, match=r"^f:2: invalid subnet: .*block 0.*widths=33.*allowed"):
        to_genomes(sp, [subnets[0].to_dict(), bad], ["f:1", "f:2"])
    with pytest.raises(ValueError, match=r"^item 1: invalid subnet: .*widths=33"):
        to_genomes(sp, [subnets[0], bad])  # the slow path (a Subnet in the list) names it alike
    tiny = get_space("tiny").sample(0, quantized=True)
    for other in (tiny, tiny.to_dict()):  # another space, even where the fast path could read it
        with pytest.raises(ValueError, match=r"^item 1: .*space 'tiny'.*expected space 'apq_cifar'"):
            to_genomes(sp, [subnets[0].to_dict(), other])
    relabelled = {**subnets[2].to_dict(), "space": "tiny"}  # valid values of apq_cifar, labelled tiny
    with pytest.raises(ValueError, match=r"^item 1: .*'tiny'"):
        to_genomes(sp, [subnets[0].to_dict(), relabelled])
    with pytest.raises(ValueError, match=r"^item 0: a str is not a subnet; expected a Subnet"):
        to_genomes(sp, ["depths"])
    with pytest.raises(ValueError, match=r"1 labels in 'where' for 3 subnets"):
        to_genomes(sp, subnets, ["f:1"])
    genomes = sp.sample_genomes(0, 4)
    genomes[2, 5] = 99
    with pytest.raises(ValueError, match=r"genome 2, gene 5 = 99 outside"):
        to_genomes(sp, genomes)
    with pytest.raises(ValueError, match=r"genomes must have shape \(N, 132\)"):
        to_genomes(sp, genomes[:, :-1])
