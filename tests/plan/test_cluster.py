"""Cluster model: built-in profiles, link costs, file schema and its error messages."""

import json
from pathlib import Path

import numpy as np
import pytest

from integration.plan.cluster import (GIB, ClusterConfigError, builtin_cluster, cluster_from_dict, load_cluster,
                                      load_network, network_file, synthetic_cluster)

PKG_DATA = Path(__file__).resolve().parents[2] / "integration" / "plan" / "data" / "skippipe_geo_network.json"


def test_geo12_regions_and_link_cost():
    c = builtin_cluster("geo-12", 20)
    regions = load_network()["settings"]["geo-distributed"]
    assert [n.region for n in c.nodes] == [regions[i % 12] for i in range(20)]
    C = c.cost_matrix()
    nl, london = regions.index("NL"), regions.index("London")
    act = 4 * 1024 * 1024 * 2
    assert c.workload.activation_bytes == act
    assert C[nl, london] == pytest.approx(0.0048 + act / (0.00023681640625 * GIB) + 0.35)
    assert C[0, 12] == pytest.approx(0.001 + act / (2.0 * GIB) + 0.35)  # both in Australia
    assert np.all(np.diag(C) == 0)
    assert c.stage_times() == pytest.approx([0.44] * 20)


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
      "links": [{"a": "a", "b": "b", "latency_ms": 1, "bandwidth_GiB_per_s": 0}]}, "bandwidth_GiB_per_s: must be > 0"),
    ({"nodes": [{"region": "a", "compute_s_per_sample_per_layer": -1}]}, "compute_s_per_sample_per_layer: must be > 0"),
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
