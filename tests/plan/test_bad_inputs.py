"""Bad plan files, cluster files and planner CLI inputs: one message naming the field, exit 2, no traceback."""

import json
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration.plan.cli import main as cli_main
from integration.plan.cluster import ClusterConfigError, Cluster, parse_cluster_text
from integration.plan.routeplan import PlanFormatError, RoutePlan, grid_stage_nodes
from integration.plan.builders import full_pipeline
from integration.plan.rules import validate

GOOD_PLAN = full_pipeline(grid_stage_nodes(3, 1), 2).to_dict()
GOOD_CLUSTER = {"nodes": [{"region": "a"}, {"region": "a"}]}


def plan_with(path, value):
    d = json.loads(json.dumps(GOOD_PLAN))
    obj = d
    for k in path[:-1]:
        obj = obj[k]
    if value is KeyError:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return json.dumps(d)


PLAN_CASES = [
    ("[]", "JSON object"), ("3", "JSON object"), ('"x"', "JSON object"), ("null", "JSON object"),
    ("{", "not valid JSON"), ("[" * 5000 + "]" * 5000, "nested too deeply"), ("{}", "format"),
    (plan_with(["format"], "other"), "format"), (plan_with(["version"], 2), "version"),
    (plan_with(["version"], KeyError), "version"), (plan_with(["version"], True), "version"),
    (plan_with(["layout"], "zig"), "layout"), (plan_with(["layout"], [1]), "layout"),
    (plan_with(["memory"], "abc"), "memory"), (plan_with(["memory"], 0), "memory"),
    (plan_with(["memory"], 2.5), "memory"), (plan_with(["memory"], True), "memory"),
    (plan_with(["path_length"], "4"), "path_length"), (plan_with(["path_length"], KeyError), "path_length"),
    (plan_with(["stage_nodes"], 5), "stage_nodes"), (plan_with(["stage_nodes"], [[0], "x"]), "stage_nodes[1]"),
    (plan_with(["stage_nodes"], [[0], [1.5]]), "stage_nodes[1][0]"),
    (plan_with(["stage_nodes"], [[0], [-1]]), "stage_nodes[1][0]"),
    (plan_with(["stage_nodes"], [[0], [10 ** 30]]), "stage_nodes[1][0]"),
    (plan_with(["microbatches"], {}), "microbatches"), (plan_with(["microbatches"], [5]), "microbatches[0]"),
    (plan_with(["microbatches", 0, "id"], "a"), "microbatches[0].id"),
    (plan_with(["microbatches", 0, "id"], KeyError), "microbatches[0].id"),
    (plan_with(["microbatches", 0, "home"], 3), "microbatches[0].home"),
    (plan_with(["microbatches", 0, "home", "node"], None), "microbatches[0].home.node"),
    (plan_with(["microbatches", 0, "hops"], "x"), "microbatches[0].hops"),
    (plan_with(["microbatches", 0, "hops", 0], 7), "microbatches[0].hops[0]"),
    (plan_with(["microbatches", 0, "hops", 0, "stage"], "s"), "microbatches[0].hops[0].stage"),
    (plan_with(["microbatches", 0, "hops", 0, "node"], KeyError), "microbatches[0].hops[0].node"),
    (plan_with(["node_order"], [1]), "node_order"), (plan_with(["node_order"], {"a": []}), "node_order"),
    (plan_with(["node_order"], {"0": [[0, "X"]]}), "node_order[0][0]"),
    (plan_with(["node_order"], {"0": 5}), "node_order[0]"), (plan_with(["meta"], 3), "meta"),
]

CLUSTER_CASES = [
    ("[]", "mapping"), ("3", "mapping"), ("nodes: 3", "cluster.nodes"), ("nodes: []", "cluster.nodes"),
    ("{", "not valid"), ("foo: 1\nnodes: [{region: a}]", "unknown key"),
    ("nodes: [{region: a}, {region: a, memory: abc}]", "cluster.nodes[1].memory"),
    ("nodes: [{region: a}, {region: a, memory: 2.5}]", "cluster.nodes[1].memory"),
    ("nodes: [{region: a}, {region: a, memory: true}]", "cluster.nodes[1].memory"),
    ("nodes: [{region: a, stage_time_s: .inf}, {region: a}]", "stage_time_s"),
    ("nodes: [{region: a, stage_time_s: .nan}, {region: a}]", "stage_time_s"),
    ("nodes: [{region: a, compute_s_per_sample_per_layer: -1}]", "compute_s_per_sample_per_layer"),
    ("nodes: [{region: a}, {region: b}]\nlinks: [{a: a, b: b, latency_ms: .inf, bandwidth_GiB_per_s: 1}]",
     "latency_ms"),
    ("nodes: [{region: a}, {region: b}]\nlinks: [{a: a, b: b, latency_ms: 1, bandwidth_GiB_per_s: 0}]",
     "bandwidth_GiB_per_s"),
    ("nodes: [{region: a}, {region: b}]\nlinks: [{a: a, b: b, latency_ms: x, bandwidth_GiB_per_s: 1}]",
     "latency_ms"),
    ("nodes: [{region: a}, {region: b}]", "no link between regions"),
    ("nodes: [{region: a}]\nlinks: 5", "cluster.links"), ("nodes: [{region: a}]\nworkload: 3", "cluster.workload"),
    ("nodes: [{region: a}]\nworkload: {d_model: 0}", "cluster.workload.d_model"),
    ("nodes: [{region: a}]\nworkload: {d_model: 12.5}", "cluster.workload.d_model"),
    ("nodes: [{region: a}]\nworkload: {overhead_s: .inf}", "overhead_s"),
    ("nodes: [{region: a}]\nworkload: {bogus: 1}", "cluster.workload"),
    ("nodes: [{region: a}]\ndefaults: [1]", "cluster.defaults"), ("nodes: [{region: [1]}]", "region"),
    ("nodes: [{region: a}, {region: b}]\ncost_s: [[0, 1]]", "cluster.cost_s"),
    ("nodes: [{region: a}, {region: b}]\ncost_s: [[0, 1], [.inf, 0]]", "cluster.cost_s[1][0]"),
    ("nodes: [{region: a}, {region: b}]\ncost_s: [[0, 0], [1, 0]]", "cluster.cost_s[0][1]"),
    ("nodes: [{region: a}, {region: a}]\npartition: [[0], [0]]", "cluster.partition"),
    ("nodes: [{region: a}, {region: a}]\npartition: [[0], [7]]", "cluster.partition"),
    ("nodes: [{region: a}, {region: a}]\npartition: 3", "cluster.partition"),
    ("a: &a [1, 1]\n" + "".join(f"a{i}: &a{i} [*{'a' if i == 0 else f'a{i - 1}'}, *{'a' if i == 0 else f'a{i - 1}'}]\n"
                                 for i in range(600)) + "nodes: [{region: a}]", "YAML aliases"),
    ("nodes: " + "[" * 200 + "]" * 200, "nested deeper"),
    ("nodes:\n" + "".join(f"  - {{region: a}}\n" for _ in range(3000)), "nodes > 2048"),
]

CLI_CASES = [
    (["plan", "--cluster", "synthetic-100000"], "2..2048"), (["plan", "--cluster", "nope.yaml"], "not found"),
    (["plan", "--cluster", "geo-12", "--nodes", "1"], "num_nodes"),
    (["plan", "--cluster", "geo-12", "-S", "1"], "num_stages"), (["plan", "--cluster", "geo-12", "-L", "9"],
                                                                 "path_length"),
    (["plan", "--cluster", "geo-12", "--memory", "0"], "memory"),
    (["plan", "--cluster", "geo-12", "-m", "0"], "microbatches_per_home"),
    (["plan", "--cluster", "geo-12", "--stage-sizes", "1,1"], "stage_sizes"),
    (["plan", "--cluster", "skippipe-20", "--nodes", "30"], "exactly 20 nodes"),
    (["validate", "missing.json"], "not found"), (["simulate", "."], "directory"),
]


@pytest.mark.parametrize("text,field", PLAN_CASES)
def test_bad_plan_json_names_the_field(text, field):
    with pytest.raises(PlanFormatError) as e:
        RoutePlan.from_json(text)
    assert field in str(e.value)


@pytest.mark.parametrize("text,field", CLUSTER_CASES)
def test_bad_cluster_text_names_the_field(text, field):
    t = time.perf_counter()
    with pytest.raises(ClusterConfigError) as e:
        parse_cluster_text(text, "yaml")
    assert field in str(e.value)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("argv,field", CLI_CASES)
def test_bad_cli_input_exits_2_with_one_line(argv, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = time.perf_counter()
    assert cli_main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "plan" else [])) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert time.perf_counter() - t < 10
    assert not (tmp_path / "o").exists()


def test_hop_to_a_missing_stage_is_a_rule_violation():
    d = json.loads(json.dumps(GOOD_PLAN))
    d["microbatches"][0]["hops"][0] = {"stage": 7, "replica": 0, "node": 1}
    plan = RoutePlan.from_dict(d)
    assert any(v.rule == "CC2" and "stage 7" in v.reason for v in validate(plan))
    d["stage_nodes"] = []
    assert any(v.rule == "LAYOUT" for v in validate(RoutePlan.from_dict(d)))


def test_cli_as_a_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("[1, 2]")
    r = subprocess.run([sys.executable, "-m", "integration.plan", "validate", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "JSON object" in r.stderr


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) |
                           st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                           lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                           max_leaves=20)
plan_like = st.fixed_dictionaries({"format": st.just("routeplan"), "version": st.just(1),
                                   "layout": st.sampled_from(["ring", "linear", "x"]), "path_length": json_values,
                                   "stage_nodes": json_values, "microbatches": json_values},
                                  optional={"memory": json_values, "node_order": json_values, "meta": json_values})
cluster_like = st.fixed_dictionaries({"nodes": st.lists(st.dictionaries(
    st.sampled_from(["region", "memory", "stage_time_s", "host", "x"]), json_values, max_size=3), max_size=4)},
    optional={"links": json_values, "workload": json_values, "cost_s": json_values, "partition": json_values,
              "defaults": json_values, "same_region": json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(json_values, plan_like))
def test_plan_loader_never_raises_anything_else(data):
    t = time.perf_counter()
    try:
        plan = RoutePlan.from_json(json.dumps(data))
    except PlanFormatError:
        return
    assert isinstance(plan, RoutePlan)
    validate(plan)  # a loaded plan can always be checked
    assert time.perf_counter() - t < 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(json_values, cluster_like), fmt=st.sampled_from(["json", "yaml"]))
def test_cluster_loader_never_raises_anything_else(data, fmt):
    import yaml
    text = json.dumps(data) if fmt == "json" else yaml.safe_dump(data)
    t = time.perf_counter()
    try:
        c = parse_cluster_text(text, fmt)
    except ClusterConfigError:
        return
    assert isinstance(c, Cluster)
    assert time.perf_counter() - t < 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.one_of(json_values, plan_like))
def test_cli_validate_and_simulate_on_random_json_exit_cleanly(data, tmp_path_factory, capsys):
    p = tmp_path_factory.mktemp("h") / "p.json"
    p.write_text(json.dumps(data))
    assert cli_main(["validate", str(p)]) in (0, 1, 2)
    assert cli_main(["simulate", str(p), "--cluster", "single-cluster", "--mode", "paper"]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("path", [None, "", 3])
def test_routing_file_without_a_path_names_the_field(path):
    from omegaconf import OmegaConf

    from integration.plan.from_config import plan_from_config
    with pytest.raises(PlanFormatError, match="routing.path"):
        plan_from_config(OmegaConf.create({"kind": "file", "path": path}), grid_stage_nodes(3, 1), 2, "ring")
