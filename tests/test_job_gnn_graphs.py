"""gnn_graphs: matched graph families, no feature leak, invariances of the GNN, a short run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jobs import gnn_graphs as job
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.job import job_config, load_job
from orchestrator.loop import run

SMALL = ["job.graphs_per_class=40"]


def config(*overrides: str):
    cfg = compose_config(["job=gnn_graphs", *SMALL, *overrides])
    return cfg, job_config(load_job("gnn_graphs"), cfg["job"])


@pytest.fixture(scope="module")
def packed():
    return job.generate(config()[1])


def test_short_run_trains_to_a_finite_loss_and_reports_accuracy():
    cfg, _ = config("trainer.max_epochs=2", "trainer.batch_size=32")
    result = run(cfg, LocalContext())
    assert result.status == "finished" and result.step > 0
    assert math.isfinite(result.metrics["train/loss_epoch"])
    assert 0.0 <= result.metrics["val/acc"] <= 1.0


def test_families_share_node_and_edge_counts_and_features(packed):
    x, y = packed
    n_max = x.shape[1]
    assert x.shape == (120, 36, 37) and np.bincount(y).tolist() == [40, 40, 40]
    adj, features = x[..., :n_max], x[..., n_max]
    np.testing.assert_array_equal(adj, adj.transpose(0, 2, 1))  # undirected, no self-loops
    assert not np.diagonal(adj, axis1=1, axis2=2).any()
    nodes, edges = features.sum(1), adj.sum((1, 2)) / 2
    for i in range(0, len(y), 3):  # one graph of each family per size, in class order
        assert y[i : i + 3].tolist() == [0, 1, 2]
        assert len(set(nodes[i : i + 3])) == 1 and len(set(edges[i : i + 3])) == 1
        # The only node feature (constant 1 on real nodes) is identical across the families.
        assert (features[i] == features[i + 1]).all() and (features[i] == features[i + 2]).all()
    assert set(nodes) == {n for n, _, _ in job.SIZES}


def test_generation_is_deterministic_and_seeded(packed):
    again = job.generate(config()[1])
    np.testing.assert_array_equal(again[0], packed[0])
    other = job.generate(config("job.data_seed=1")[1])
    assert not np.array_equal(other[0], packed[0])


def test_split_is_stratified_and_fixed():
    a, b = job.build_data(config()[1]), job.build_data(config()[1])
    assert len(a.val) == 24 and np.bincount(a.val[:][1].numpy()).tolist() == [8, 8, 8]
    assert torch.equal(a.val[:][0], b.val[:][0])


@pytest.mark.parametrize("triangles", [True, False])
def test_gnn_is_invariant_to_node_order_and_padding(triangles, packed):
    _, jcfg = config(f"job.triangles={str(triangles).lower()}")
    torch.manual_seed(0)
    model = job.GraphClassifier(jcfg, 36).eval()
    x = torch.tensor(packed[0][:6])
    n = int(x[0, :, 36].sum())
    perm = torch.cat([torch.randperm(n), torch.arange(n, 36)])  # shuffle the real nodes only
    shuffled = x[:, perm][:, :, torch.cat([perm, torch.tensor([36])])]
    with torch.no_grad():
        assert torch.allclose(model(x[:1]), model(shuffled[:1]), atol=1e-5)
        assert torch.allclose(model(x)[0], model(x[:1])[0], atol=1e-5)  # batch-independent


def test_triangle_switch_changes_the_model():
    with_tri = job.GraphClassifier(config("job.triangles=true")[1], 36)
    without = job.GraphClassifier(config("job.triangles=false")[1], 36)
    count = sum(p.numel() for p in with_tri.parameters())
    assert count > sum(p.numel() for p in without.parameters())


def test_degree_histograms_count_real_nodes_only_and_baseline_uses_the_split():
    x = np.zeros((1, 5, 6), dtype=np.float32)
    x[0, 0, 1] = x[0, 1, 0] = 1  # a 3-node graph (one edge, one isolated node) padded to 5
    x[0, :3, 5] = 1
    np.testing.assert_allclose(job.degree_histograms(x)[0], [1 / 3, 2 / 3, 0, 0, 0])
    splits = job.build_data(config()[1])
    refs = job.references(config()[1], splits)
    assert set(refs) == {"degree_hist_logreg_acc"}
    assert refs["degree_hist_logreg_acc"] * len(splits.val) == pytest.approx(
        round(refs["degree_hist_logreg_acc"] * len(splits.val))
    )  # a fraction of the 24 held-out graphs
