"""Cluster model: built-in profiles, link costs, file schema and its error messages."""

import json
from pathlib import Path

import numpy as np
import pytest

from integration.plan.cluster import (GIB, ClusterConfigError, builtin_cluster, cluster_from_dict, load_cluster,
                                      load_network, network_file, synthetic_cluster)

COMMITTED = Path(__file__).resolve().parents[2] / "integration" / "plan" / "data" / "skippipe_committed_20node.json"
PKG_DATA = Path(__file__).resolve().parents[2] / "integration" / "plan" / "data" / "skippipe_geo_network.json"


def test_geo12_regions_and_link_cost():
    # geo-12 follows SkipPipe's region order and transfer size: at 20 nodes its cost matrix is their
    # published one (an independent reference: the matrix was computed by their code).
    c = builtin_cluster("geo-12", 20)
    published = json.loads(COMMITTED.read_text())
    assert [n.region for n in c.nodes] == published["locations"]
    assert c.workload.activation_bytes == 2 * 16_777_324
    C = c.cost_matrix()
    assert np.allclose(C, np.array(published["cost_s"]), rtol=1e-12, atol=1e-12)
    regions = published["locations"]
    nl, london = regions.index("NL"), regions.index("London")
    assert C[nl, london] == pytest.approx(0.0048 + 2 * 16_777_324 / (0.00023681640625 * GIB) + 0.35)
    assert np.all(np.diag(C) == 0)
    assert c.stage_times() == pytest.approx([0.44] * 20)


def test_skippipe20_profile_is_their_setting():
    c = load_cluster("skippipe-20")
    published = json.loads(COMMITTED.read_text())
    assert c.num_nodes == 20 and c.has_links
    assert np.array_equal(c.cost_matrix(), np.array(published["cost_s"]))
    assert [list(g) for g in c.partition] == published["partition"]
    assert set(c.memories()) == {3}
    # Other transfer sizes are recomputed from the links (the measured matrix is for 2 x 16,777,324 B).
    assert not np.allclose(c.cost_matrix(activation_bytes=8 * 2 ** 20), c.cost_matrix())
    with pytest.raises(ClusterConfigError, match="exactly 20 nodes"):
        load_cluster("skippipe-20", num_nodes=30)


def test_packaged_committed_copy_matches_shared():
    shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / COMMITTED.name
    if not shared.is_file():
        shared = Path("/work/shared/data") / COMMITTED.name
    if not shared.is_file():
        pytest.skip("no shared data folder next to this checkout")
    assert json.loads(COMMITTED.read_text()) == json.loads(shared.read_text())


def test_cost_matrix_in_a_cluster_file(tmp_path):
    data = {"nodes": [{"region": "x", "stage_time_s": 0.5}, {"region": "y"}],
            "cost_s": [[0, 1.5], [2.0, 0]], "partition": [[0], [1]]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    c = load_cluster(str(p))
    assert c.cost_matrix().tolist() == [[0, 1.5], [2.0, 0]]
    assert not c.has_links
    assert c.stage_times()[0] == 0.5
    back = cluster_from_dict(c.to_dict())
    assert back.cost_matrix().tolist() == c.cost_matrix().tolist() and back.partition == c.partition


@pytest.mark.parametrize("name,regions", [("5-clusters", 5), ("single-cluster", 1)])
def test_other_profiles(name, regions):
    c = load_cluster(name)
    assert c.num_nodes == 20
    assert len({n.region for n in c.nodes}) == regions


def test_packaged_network_copy_matches_shared():
    assert json.loads(PKG_DATA.read_text()) == json.loads(network_file().read_text())


def test_yaml_roundtrip(tmp_path):
    import yaml
    c = builtin_cluster("5-clusters", 7)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(c.to_dict()))
    back = load_cluster(str(p))
    assert np.allclose(back.cost_matrix(), c.cost_matrix())
    assert np.allclose(back.stage_times(), c.stage_times())


def test_stage_time_override_and_defaults():
    c = cluster_from_dict({"defaults": {"memory": 4}, "same_region": {"latency_ms": 1, "bandwidth_GiB_per_s": 1},
                           "nodes": [{"region": "a"}, {"region": "a", "stage_time_s": 0.9}]})
    assert list(c.memories()) == [4, 4]
    assert c.stage_times()[1] == 0.9


@pytest.mark.parametrize("data,needle", [
    ({"nodes": [{"region": "a"}, {"region": "a", "memory": 0}]}, "cluster.nodes[1].memory: must be"),
    ({"nodes": [{"region": "a"}, {"region": "b"}]}, "no link between regions 'a' and 'b'"),
    ({"nodes": [{"region": "a"}, {"memory": 2}]}, "cluster.nodes[1].region: missing"),
    ({"nodes": []}, "cluster.nodes: missing or empty"),
    ({"nodes": [{"region": "a"}], "colour": 1}, "unknown key(s) ['colour']"),
    ({"nodes": [{"region": "a"}, {"region": "b"}],
      "links": [{"a": "a", "b": "b", "latency_ms": 1, "bandwidth_GiB_per_s": 0}]}, "bandwidth_GiB_per_s: must be a finite number > 0"),
    ({"nodes": [{"region": "a", "compute_s_per_sample_per_layer": -1}]}, "compute_s_per_sample_per_layer: must be a finite number > 0"),
    ({"nodes": [{"region": "a"}], "workload": {"d_model": 0}}, "cluster.workload.d_model"),
])
def test_bad_cluster_files_name_the_field(data, needle):
    with pytest.raises(ClusterConfigError) as e:
        cluster_from_dict(data)
    assert needle in str(e.value)


def test_unknown_builtin_and_missing_file():
    with pytest.raises(ClusterConfigError, match="not found"):
        load_cluster("no-such-cluster.yaml")


def test_synthetic_is_seeded_and_heterogeneous():
    a, b = synthetic_cluster(30, seed=4), synthetic_cluster(30, seed=4)
    assert np.allclose(a.cost_matrix(), b.cost_matrix())
    assert np.ptp(a.stage_times()) > 0.05
    assert not np.allclose(a.cost_matrix(), synthetic_cluster(30, seed=5).cost_matrix())
    assert load_cluster("synthetic-12-s3").num_nodes == 12
