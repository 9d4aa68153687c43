"""Search (issue 8): evolution, fast scorer / costs, budgets, Pareto mode, callback, command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from apq_lightning.cli import main as cli_main
from apq_lightning.encoding import get_encoder
from apq_lightning.hardware import get_cost_model
from apq_lightning.predictor import AccuracyPredictor
from apq_lightning.search import (
    Budget,
    BudgetError,
    EvolutionConfig,
    FastCost,
    FunctionScorer,
    MLPScorer,
    ModuleScorer,
    ParetoConfig,
    SearchProblem,
    evolution_search,
    pareto_search,
    parse_budgets,
    parse_constraint,
    random_search,
)
from apq_lightning.search.genes import GeneSpec
from apq_lightning.search.pareto import envelope
from apq_lightning.space import SearchSpace, add_space, get_space

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = EvolutionConfig(generations=20, population=40, parents=10, mutations=20, crossovers=20, top_k=5)


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def enum_space() -> SearchSpace:
    """Three blocks, two choices per gene: 266,240 distinct subnets, few enough to enumerate."""
    return add_space(SearchSpace(
        name="search_enum", image_size=8, stem_channels=8, stem_stride=1, first_block_channels=8,
        stage_channels=(8, 16), stage_strides=(1, 2), stage_blocks=(2, 1), head_channels=16,
        kernel_choices=(3, 5), depth_choices=(1, 2), expand_range=(4, 5), bit_choices=(4, 8)))


@pytest.fixture(scope="module")
def imagenet_cost() -> FastCost:
    return FastCost.of(get_cost_model("bitfusion", "apq_imagenet"))


@pytest.fixture(scope="module")
def mp_predictor() -> AccuracyPredictor:
    torch.manual_seed(0)
    return AccuracyPredictor("apq_imagenet", quantized=True).eval()


def synthetic_scorer(sp: SearchSpace, seed: int = 0) -> FunctionScorer:
    """Accuracy-like objective: larger choices score more (so budgets bind), plus an interaction
    (kernel of block 0 equal to kernel of block 2) that no per-gene greedy choice sees."""
    rng = np.random.default_rng(seed)
    values = [np.sort(rng.random(int(c))) for c in sp.gene_cardinality]
    table = np.zeros((sp.genome_length, int(sp.gene_cardinality.max())))
    for j, v in enumerate(values):
        table[j, : len(v)] = v
    genes = GeneSpec(sp)
    k0, k2 = sp.genome_slices()["kernels"].start, sp.genome_slices()["kernels"].start + 2

    def score(g: np.ndarray) -> np.ndarray:
        active = np.concatenate([sp.genome_active(g), np.ones((len(g), sp.num_stages), bool)], axis=1)
        counts = active[:, genes.block_of_gene]  # genes of skipped blocks do not count
        s = np.where(counts, table[np.arange(sp.genome_length), g], 0.0).sum(axis=1)
        return s + 0.6 * (g[:, k0] == g[:, k2])

    return FunctionScorer(score)


def all_subnets(sp: SearchSpace) -> np.ndarray:
    grid = np.stack([a.ravel() for a in np.indices(tuple(sp.gene_cardinality))], axis=1)
    _, first = np.unique(GeneSpec(sp).hashes(grid), return_index=True)
    return grid[np.sort(first)]


class Recording:
    """A scorer wrapper that records every batch it is asked to score."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner
        self.quantized = inner.quantized
        self.space = getattr(inner, "space", None)
        self.batches: list[np.ndarray] = []

    def __call__(self, genomes: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        self.batches.append(genomes.copy())
        return self.inner(genomes, active)


# --------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------
def test_parse_constraints() -> None:
    assert parse_constraint("latency_ms=4,6,8.4") == ("latency_ms", [4.0, 6.0, 8.4])
    budgets = parse_budgets(["latency_ms=4,6", "energy_mJ=12"])
    assert [b.to_dict() for b in budgets] == [{"latency_ms": 4.0, "energy_mJ": 12.0},
                                              {"latency_ms": 6.0, "energy_mJ": 12.0}]
    assert budgets[0].slug == "latency_ms-4_energy_mJ-12"
    with pytest.raises(ValueError, match="unknown constraint 'latency'.*known: latency_ms, energy_mJ"):
        parse_constraint("latency=8")
    with pytest.raises(ValueError, match="positive"):
        parse_constraint("latency_ms=0")
    with pytest.raises(ValueError, match="not a number"):
        parse_constraint("energy_mJ=abc")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_constraint("latency_ms")
    with pytest.raises(ValueError, match="given twice"):
        parse_budgets(["latency_ms=4", "latency_ms=6"])


def test_fast_cost_matches_the_model(imagenet_cost: FastCost, enum_space: SearchSpace) -> None:
    assert imagenet_cost.exact
    sp = get_space("apq_imagenet")
    g = sp.sample_genomes(3, 2000)
    want, got = imagenet_cost.model.evaluate(g), imagenet_cost.evaluate(g)
    assert not want["feasible"].all() and np.array_equal(want["feasible"], got["feasible"])
    for m in ("latency_ms", "energy_mJ", "size_bytes"):
        np.testing.assert_allclose(got[m], want[m], rtol=1e-9)
    np.testing.assert_array_equal(got["bitops"], want["bitops"])
    # the exact cheapest subnet from the tables = brute force over a space small enough to list
    fast = FastCost.of(get_cost_model("bitops", enum_space))
    every = fast.model.evaluate(all_subnets(enum_space))
    genes = GeneSpec(enum_space)
    assert fast.exact and fast.floor("bitops", genes) == every["bitops"].min()
    assert fast.floor("size_bytes", genes) == pytest.approx(every["size_bytes"].min())


def test_unreachable_budget_names_the_cheapest(imagenet_cost: FastCost, mp_predictor: AccuracyPredictor) -> None:
    scorer = MLPScorer(mp_predictor)
    with pytest.raises(BudgetError, match=r"latency_ms <= 1 .* cheapest runnable subnet needs 2\.9\d* ms"):
        SearchProblem.build(scorer, imagenet_cost, Budget.of({"latency_ms": 1.0}))
    with pytest.raises(ValueError, match="does not report latency_ms"):
        SearchProblem.build(scorer, get_cost_model("bitops", "apq_imagenet"), Budget.of({"latency_ms": 8.0}))
    with pytest.raises(ValueError, match="FP predictor cannot rank bit policies"):
        SearchProblem.build(MLPScorer(AccuracyPredictor("apq_imagenet", False)), imagenet_cost,
                            Budget.of({"latency_ms": 8.4}))


# --------------------------------------------------------------------------------------
# evolution
# --------------------------------------------------------------------------------------
def test_evolution_finds_the_true_optimum(enum_space: SearchSpace) -> None:
    scorer = synthetic_scorer(enum_space)
    cost = FastCost.of(get_cost_model("bitops", enum_space))
    every = all_subnets(enum_space)
    c = cost.model.evaluate(every)
    limit = float(np.median(c["bitops"]))
    ok = c["bitops"] <= limit
    best = float(scorer(every)[ok].max())
    assert best < float(scorer(every).max())  # the budget binds
    problem = SearchProblem.build(scorer, cost, Budget.of({"bitops": limit}))
    cfg = EvolutionConfig(generations=80, seed=0)  # finds it for 71 of 72 (scorer, budget, seed) tried
    res = evolution_search(problem, cfg)
    assert res.scored == cfg.scored < len(every) / 30
    assert res.best.predicted_acc == pytest.approx(best, abs=1e-12)
    assert all(r.bitops <= limit for r in res.results)
    assert np.all(np.diff(res.history) >= 0) and len(res.history) == cfg.generations + 1
    # random search at equal predictor calls does not get there
    assert random_search(problem, cfg).best.predicted_acc < best


def test_constraints_hold_for_every_candidate(imagenet_cost: FastCost, mp_predictor: AccuracyPredictor) -> None:
    budget = Budget.of({"latency_ms": 7.0, "energy_mJ": 10.0, "bitops": 14e9, "size_bytes": 3.5e6})
    problem = SearchProblem.build(MLPScorer(mp_predictor), imagenet_cost, budget)
    res = evolution_search(problem, SMALL)
    model = imagenet_cost.model
    for cand in res.results + res.front:  # checked subnet by subnet on the layer-by-layer path
        costs = model.costs(cand.subnet)
        assert costs["feasible"]
        for metric, limit in budget.limits:
            assert costs[metric] <= limit, (metric, costs[metric])
    s = res.samples  # every candidate ever scored
    assert len(s["predicted_acc"]) == SMALL.scored
    assert np.isfinite(s["latency_ms"]).all() and (s["latency_ms"] <= 7.0).all()
    assert (s["energy_mJ"] <= 10.0).all() and (s["bitops"] <= 14e9).all() and (s["size_bytes"] <= 3.5e6).all()
    assert len({c.subnet for c in res.results}) == len(res.results)  # distinct


def test_same_seed_same_result(imagenet_cost: FastCost, mp_predictor: AccuracyPredictor) -> None:
    problem = SearchProblem.build(MLPScorer(mp_predictor), imagenet_cost, Budget.of({"latency_ms": 8.4}))

    def doc(seed: int) -> dict:
        d = evolution_search(problem, dataclasses.replace(SMALL, seed=seed)).to_dict()
        d.pop("wall_time_s")
        return d

    assert doc(1) == doc(1)
    assert doc(1) != doc(2)


def test_all_children_scored_with_their_real_bits(imagenet_cost: FastCost, mp_predictor: AccuracyPredictor) -> None:
    enc = get_encoder("apq_imagenet")
    inputs: list[torch.Tensor] = []
    hook = mp_predictor.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
    try:
        scorer = Recording(ModuleScorer(mp_predictor))
        problem = SearchProblem.build(scorer, imagenet_cost, Budget.of({"latency_ms": 8.4}))
        cfg = EvolutionConfig(generations=6)  # the paper's 100 + 25 parents, 50 + 50 children
        evolution_search(problem, cfg)
    finally:
        hook.remove()
    assert [len(b) for b in scorer.batches] == [cfg.population] + [cfg.children] * cfg.generations
    assert len(inputs) == len(scorer.batches)
    bit_values = set()
    for genomes, x in zip(scorer.batches, inputs):
        want = enc.encode_genomes(genomes)
        np.testing.assert_array_equal(x.numpy()[:, enc.fp_dim:], want[:, enc.fp_dim:])  # the real policy
        sl = problem.space.genome_slices()
        active = problem.space.genome_active(genomes)
        bit_values |= set(np.unique(genomes[:, sl["pw_w"]][active]))
    assert bit_values == {0, 1, 2}  # 4, 6 and 8 bits all seen: not an all-8-bit encoding


def test_fast_scorer_equals_the_predictor(mp_predictor: AccuracyPredictor) -> None:
    sp = get_space("apq_imagenet")
    g = sp.sample_genomes(7, 300)
    dense = mp_predictor(torch.from_numpy(get_encoder(sp).encode_genomes(g))).detach().numpy()
    np.testing.assert_allclose(MLPScorer(mp_predictor)(g), dense, atol=2e-6)
    fp = AccuracyPredictor("apq_imagenet", quantized=False).eval()
    dense_fp = fp(torch.from_numpy(get_encoder(sp).encode_genomes(g, quantized=False))).detach().numpy()
    np.testing.assert_allclose(MLPScorer(fp)(g), dense_fp, atol=2e-6)


@pytest.mark.parametrize("bits", [8, None])
def test_fp_predictor_with_fixed_bits(imagenet_cost: FastCost, bits: int | None) -> None:
    fp = AccuracyPredictor("apq_imagenet", quantized=False).eval()
    problem = SearchProblem.build(MLPScorer(fp), imagenet_cost, Budget.of({"latency_ms": 8.4}), bits=bits)
    res = evolution_search(problem, SMALL)
    for c in res.results:
        if bits is None:
            assert c.subnet.bits is None
        else:
            active = c.subnet.active_mask
            assert {v for f in ("pw_w", "pw_a", "dw_w", "dw_a") for v, a in zip(c.subnet.bits.get(f), active)
                    if a} == {bits}
        assert c.latency_ms <= 8.4


# --------------------------------------------------------------------------------------
# Pareto mode
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("objectives", [("latency_ms",), ("latency_ms", "energy_mJ")])
def test_pareto_front_is_non_dominated(imagenet_cost: FastCost, mp_predictor: AccuracyPredictor,
                                       objectives: tuple[str, ...]) -> None:
    budgets = parse_budgets(["latency_ms=5,6.5,8.4"])
    problem = SearchProblem.build(MLPScorer(mp_predictor), imagenet_cost, envelope(budgets))
    res = pareto_search(problem, ParetoConfig(generations=12, population=40), objectives, budgets)
    pts = np.array([[-c.predicted_acc, *(getattr(c, m) for m in objectives)] for c in res.front])
    assert len(pts) >= 3
    for i, p in enumerate(pts):
        dominated = np.all(pts <= p, axis=1) & np.any(pts < p, axis=1)
        assert not dominated.any(), f"front point {i} is dominated"
    assert all(c.latency_ms <= 8.4 for c in res.front)
    assert res.scored == 40 * 13
    # one answer per budget from the same run, each inside its budget, better with more budget
    assert [a.budget.to_dict()["latency_ms"] for a in res.answers] == [5.0, 6.5, 8.4]
    for a in res.answers:
        assert all(c.latency_ms <= a.budget.to_dict()["latency_ms"] for c in a.results)
    accs = [a.best.predicted_acc for a in res.answers]
    assert accs == sorted(accs)


# --------------------------------------------------------------------------------------
# callback and command
# --------------------------------------------------------------------------------------
class _PredictorFit(L.LightningModule):
    """The smallest module with a ``.predictor`` that a Trainer can fit."""

    def __init__(self) -> None:
        super().__init__()
        self.predictor = AccuracyPredictor("apq_imagenet", quantized=True)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return torch.nn.functional.mse_loss(self.predictor(x), y)

    def train_dataloader(self):  # noqa: ANN201
        enc = get_encoder("apq_imagenet")
        x = torch.from_numpy(enc.encode_genomes(get_space("apq_imagenet").sample_genomes(0, 8)))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.rand(8)), batch_size=4)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_callback_writes_its_files(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from apq_lightning.callbacks import EvolutionSearch

    logged: dict[str, object] = {}

    class RecordingWandb(WandbLogger):  # the real logger, offline; records what the callback logs
        def log_table(self, key, columns=None, data=None, **kw):  # noqa: ANN001, ANN201
            logged[key] = (columns, data)

        def log_image(self, key, images, **kw):  # noqa: ANN001, ANN201
            logged[key] = images

    cb = EvolutionSearch(constraints=[{"latency_ms": 8.4}, {"latency_ms": 6.0, "energy_mJ": 12}, {"latency_ms": 1}],
                         generations=4, population=20, out_dir=str(tmp_path / "search"))
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        logger=RecordingWandb(offline=True, save_dir=str(tmp_path)))
    with pytest.warns(UserWarning, match="skipping latency_ms <= 1"):
        trainer.fit(_PredictorFit())
    files = sorted(p.name for p in (tmp_path / "search").iterdir())
    assert files == ["latency_ms-6_energy_mJ-12.json", "latency_ms-8.4.json", "search.png"]
    doc = json.loads((tmp_path / "search" / "latency_ms-6_energy_mJ-12.json").read_text())
    assert set(doc) == {"best", "results", "history", "wall_time_s", "settings", "front"}
    assert doc["best"]["latency_ms"] <= 6.0 and doc["best"]["energy_mJ"] <= 12
    assert len(doc["history"]) == 5
    columns, rows = logged["search/results"]
    assert "predicted_acc" in columns and len(rows) == sum(len(r.results) for r in cb.results)
    assert logged["search/front"] == [str(tmp_path / "search" / "search.png")]


def _apq_state_dict(path: Path) -> Path:
    """Random weights in the APQ reference's key layout (``torch.save(mlp.state_dict())``)."""
    torch.manual_seed(0)
    shapes = {"layers.0.0": (400, 520), "layers.1.0": (400, 400), "layers.2.0": (400, 400),
              "quantize_fc": (400, 252), "regressor": (1, 400)}
    state = {}
    for key, (o, i) in shapes.items():
        state[f"{key}.weight"] = torch.randn(o, i) * i ** -0.5
        state[f"{key}.bias"] = torch.zeros(o)
    torch.save(state, path)
    return path


def test_command_on_an_apq_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _apq_state_dict(tmp_path / "acc_quant.pt")
    out = tmp_path / "result.json"
    rc = cli_main(["search", "--predictor", str(ckpt), "--hardware", "bitfusion", "--constraint", "latency_ms=8.4",
                   "--constraint", "energy_mJ=12", "--generations", "5", "--population", "20", "--seed", "0",
                   "--top-k", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"best", "results", "history", "wall_time_s", "settings", "front"}
    assert set(doc["best"]) == {"subnet", "predicted_acc", "latency_ms", "energy_mJ", "bitops", "size_bytes"}
    assert doc["best"]["subnet"]["space"] == "apq_imagenet" and "bits" in doc["best"]["subnet"]
    assert len(doc["results"]) == 3 and len(doc["history"]) == 6
    assert doc["best"]["latency_ms"] <= 8.4 and doc["best"]["energy_mJ"] <= 12
    assert doc["settings"]["constraint"] == {"latency_ms": 8.4, "energy_mJ": 12.0}
    assert "pred.acc" in capsys.readouterr().out
    # several budgets in one call (Pareto mode: one run, read off for each budget)
    rc = cli_main(["search", "--predictor", str(ckpt), "--constraint", "latency_ms=6,8.4", "--mode", "pareto",
                   "--generations", "3", "--population", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [s["settings"]["constraint"] for s in doc["searches"]] == [{"latency_ms": 6.0}, {"latency_ms": 8.4}]


@pytest.mark.parametrize("args, message", [
    (["--constraint", "latncy_ms=8"], "unknown constraint 'latncy_ms'; known: latency_ms, energy_mJ"),
    (["--constraint", "latency_ms=-1"], "must be a positive"),
    (["--constraint", "latency_ms=1"], "cheapest runnable subnet needs 2.9"),
    (["--constraint", "latency_ms=8", "--space", "apq_cifar"], "trained for space 'tiny', not 'apq_cifar'"),
    (["--constraint", "latency_ms=8", "--predictor", "missing.pt"], "predictor checkpoint not found: missing.pt"),
    # outputs and counts are checked before the search (a result used to be lost in a traceback)
    (["--constraint", "latency_ms=8", "--out", "{tmp}"], "is a directory"),
    (["--constraint", "latency_ms=8", "--out", "{tmp}/afile/result.json"], "afile is a file, not a folder"),
    (["--constraint", "latency_ms=8", "--plot", "{tmp}/afile/x"], "afile is a file, not a folder"),
    (["--constraint", "latency_ms=8", "--top-k", "0"], "--top-k 0: must be >= 1"),
    (["--constraint", "latency_ms=8", "--threads", "0"], "--threads 0: must be >= 1"),
])
def test_command_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                   message: str) -> None:
    (tmp_path / "afile").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    ckpt = AccuracyPredictor("tiny", quantized=True).save(tmp_path / "tiny.pt")
    if "latency_ms=1" in args or "latency_ms=-1" in args:
        ckpt = _apq_state_dict(tmp_path / "acc_quant.pt")
    argv = ["search", "--predictor", str(ckpt), *args, "--generations", "2", "--no-progress"]
    if "--predictor" in args:
        argv = ["search", *args, "--no-progress"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_plot_without_suffix_is_written_and_named_as_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = AccuracyPredictor("tiny", quantized=True).save(tmp_path / "tiny.pt")
    rc = cli_main(["search", "--predictor", str(ckpt), "--constraint", "latency_ms=8", "--generations", "2",
                   "--population", "20", "--plot", str(tmp_path / "front"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "front.png").is_file() and not (tmp_path / "front").exists()
    assert f"wrote {tmp_path / 'front.png'}" in capsys.readouterr().out
