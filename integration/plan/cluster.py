"""Cluster model for planning: nodes, links and the workload that turns them into times.

A cluster is plain data: a list of nodes (region, host, compute speed, memory) and a table of
links between regions. Together with a :class:`Workload` (microbatch and model sizes) it yields

* ``stage_times()``: w per node, the forward time of one microbatch through one stage, and
* ``cost_matrix()``: C[x][y] = latency + activation_bytes / bandwidth + fixed overhead
  (0.35 s by default: the paper's allowance for host/device copies and serialisation).

File schema (YAML or JSON; every key except ``nodes`` is optional)::

    name: my-cluster
    workload: {samples_per_microbatch: 2, seq_len: 1024, d_model: 1024, layers_per_stage: 4,
               bytes_per_value: 4, vocab_size: 50304, overhead_s: 0.35}
    defaults: {memory: 3, compute_s_per_sample_per_layer: 0.055}
    same_region: {latency_ms: 1, bandwidth_GiB_per_s: 2.0}     # pairs inside one region
    default_link: {latency_ms: 50, bandwidth_GiB_per_s: 0.05}  # region pairs not in `links`
    nodes:                                                      # node i = rank i
      - {region: Belgium}
      - {region: Iowa, host: h3, memory: 4, compute_s_per_sample_per_layer: 0.07}
      - {region: Iowa, stage_time_s: 0.5}                       # w given directly
    links:
      - {a: Belgium, b: Iowa, latency_ms: 49, bandwidth_GiB_per_s: 0.028}

Built-in profiles (``geo-12``, ``5-clusters``, ``single-cluster``) come from the SkipPipe network
table; ``synthetic-<N>[-s<seed>]`` is a seeded heterogeneous cluster of any size.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

GIB = 1024 ** 3
DEFAULT_OVERHEAD_S = 0.35
NETWORK_FILE = "skippipe_geo_network.json"
BUILTIN_SETTINGS = {"geo-12": "geo-distributed", "5-clusters": "5-clusters", "single-cluster": "single-cluster"}


class ClusterConfigError(ValueError):
    """A cluster description that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class Link:
    """A network link: one-way latency (s) and bandwidth (bytes/s)."""

    latency_s: float
    bandwidth_Bps: float


@dataclass(frozen=True)
class Node:
    """One pipeline worker. ``stage_time_s`` (w) wins over the per-sample-per-layer speed when set."""

    id: int
    region: str
    host: str | None = None
    memory: int = 3
    compute_s_per_sample_per_layer: float = 0.055
    stage_time_s: float | None = None


@dataclass(frozen=True)
class Workload:
    """Microbatch and model sizes: they turn node speeds and link bandwidths into seconds."""

    samples_per_microbatch: int = 2
    seq_len: int = 1024
    d_model: int = 1024
    layers_per_stage: int = 4
    bytes_per_value: int = 4
    vocab_size: int = 50304
    overhead_s: float = DEFAULT_OVERHEAD_S

    @property
    def activation_bytes(self) -> int:
        """Bytes of one microbatch's activation: 4 * d_model * seq * samples for fp32."""
        return self.bytes_per_value * self.d_model * self.seq_len * self.samples_per_microbatch

    def stage_param_bytes(self, stage: int) -> int:
        """Gradient bytes all-reduced by one stage group (12 d^2 per block; stage 0 adds the embedding)."""
        blocks = self.layers_per_stage * 12 * self.d_model ** 2
        emb = self.vocab_size * self.d_model if stage == 0 else 0
        return self.bytes_per_value * (blocks + emb)


@dataclass
class Cluster:
    """Nodes, inter-region links and the workload; node ``i`` is rank ``i`` of a training job."""

    name: str
    nodes: list[Node]
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    same_region: Link = Link(0.001, 2.0 * GIB)
    default_link: Link | None = None
    workload: Workload = Workload()

    def __post_init__(self) -> None:
        validate_cluster(self)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def link(self, a: int, b: int) -> Link:
        """The link between nodes ``a`` and ``b`` (looked up by their regions)."""
        ra, rb = self.nodes[a].region, self.nodes[b].region
        if ra == rb:
            return self.same_region
        key = (ra, rb) if ra < rb else (rb, ra)
        if key in self.links:
            return self.links[key]
        if self.default_link is not None:
            return self.default_link
        raise ClusterConfigError(f"cluster.links: no link between regions {ra!r} and {rb!r}; add one or set "
                                 f"cluster.default_link")

    def latency_matrix(self) -> np.ndarray:
        n = self.num_nodes
        out = np.zeros((n, n))
        for a in range(n):
            for b in range(n):
                if a != b:
                    out[a, b] = self.link(a, b).latency_s
        return out

    def bandwidth_matrix(self) -> np.ndarray:
        """Bytes/s per node pair (inf on the diagonal)."""
        n = self.num_nodes
        out = np.full((n, n), np.inf)
        for a in range(n):
            for b in range(n):
                if a != b:
                    out[a, b] = self.link(a, b).bandwidth_Bps
        return out

    def cost_matrix(self, activation_bytes: int | None = None, overhead_s: float | None = None) -> np.ndarray:
        """C[x][y] = latency + activation_bytes / bandwidth + overhead (0 on the diagonal)."""
        nbytes = self.workload.activation_bytes if activation_bytes is None else activation_bytes
        over = self.workload.overhead_s if overhead_s is None else overhead_s
        c = self.latency_matrix() + nbytes / self.bandwidth_matrix() + over
        np.fill_diagonal(c, 0.0)
        return c

    def stage_times(self) -> np.ndarray:
        """w per node: forward time of one microbatch through one stage."""
        wl = self.workload
        return np.array([n.stage_time_s if n.stage_time_s is not None else
                         n.compute_s_per_sample_per_layer * wl.samples_per_microbatch * wl.layers_per_stage
                         for n in self.nodes])

    def memories(self) -> np.ndarray:
        return np.array([n.memory for n in self.nodes], dtype=int)

    def with_workload(self, **changes: Any) -> "Cluster":
        """A copy with some workload fields changed (e.g. ``layers_per_stage=2``)."""
        return replace(self, workload=replace(self.workload, **changes))

    def to_dict(self) -> dict[str, Any]:
        """The file schema form (round-trips through :func:`cluster_from_dict`)."""
        def link(l: Link) -> dict:
            return {"latency_ms": l.latency_s * 1e3, "bandwidth_GiB_per_s": l.bandwidth_Bps / GIB}
        out: dict[str, Any] = {
            "name": self.name,
            "workload": dict(self.workload.__dict__),
            "same_region": link(self.same_region),
            "nodes": [{k: v for k, v in n.__dict__.items() if k != "id" and v is not None} for n in self.nodes],
            "links": [{"a": a, "b": b, **link(l)} for (a, b), l in sorted(self.links.items())],
        }
        if self.default_link is not None:
            out["default_link"] = link(self.default_link)
        return out


def validate_cluster(c: Cluster) -> None:
    """Raise :class:`ClusterConfigError` for the first field that cannot work."""
    if not c.nodes:
        raise ClusterConfigError("cluster.nodes: empty; list at least 2 nodes")
    for i, n in enumerate(c.nodes):
        if n.id != i:
            raise ClusterConfigError(f"cluster.nodes[{i}].id: is {n.id}; node ids are positions (rank i = node i)")
        if not isinstance(n.memory, int) or n.memory < 1:
            raise ClusterConfigError(f"cluster.nodes[{i}].memory: must be an integer >= 1 (got {n.memory!r}); it "
                                     f"is how many microbatch activations the node holds at once")
        if not n.compute_s_per_sample_per_layer > 0:
            raise ClusterConfigError(f"cluster.nodes[{i}].compute_s_per_sample_per_layer: must be > 0 "
                                     f"(got {n.compute_s_per_sample_per_layer!r})")
        if n.stage_time_s is not None and not n.stage_time_s > 0:
            raise ClusterConfigError(f"cluster.nodes[{i}].stage_time_s: must be > 0 (got {n.stage_time_s!r}); "
                                     f"omit it to use compute_s_per_sample_per_layer")
        if not n.region:
            raise ClusterConfigError(f"cluster.nodes[{i}].region: missing; give every node a region name")
    for where, l in [("same_region", c.same_region), ("default_link", c.default_link)] + \
            [(f"links[{a}-{b}]", l) for (a, b), l in c.links.items()]:
        if l is None:
            continue
        if not l.latency_s >= 0:
            raise ClusterConfigError(f"cluster.{where}.latency_ms: must be >= 0 (got {l.latency_s * 1e3!r})")
        if not l.bandwidth_Bps > 0:
            raise ClusterConfigError(f"cluster.{where}.bandwidth_GiB_per_s: must be > 0 "
                                     f"(got {l.bandwidth_Bps / GIB!r})")
    regions = {n.region for n in c.nodes}
    if c.default_link is None:
        rs = sorted(regions)
        for i, a in enumerate(rs):
            for b in rs[i + 1:]:
                if (a, b) not in c.links:
                    raise ClusterConfigError(f"cluster.links: no link between regions {a!r} and {b!r}; add "
                                             f"{{a: {a}, b: {b}, latency_ms: ..., bandwidth_GiB_per_s: ...}} or "
                                             f"set cluster.default_link")
    wl = c.workload
    for k in ("samples_per_microbatch", "seq_len", "d_model", "layers_per_stage", "bytes_per_value", "vocab_size"):
        if not isinstance(getattr(wl, k), int) or getattr(wl, k) < 1:
            raise ClusterConfigError(f"cluster.workload.{k}: must be an integer >= 1 (got {getattr(wl, k)!r})")
    if not wl.overhead_s >= 0:
        raise ClusterConfigError(f"cluster.workload.overhead_s: must be >= 0 (got {wl.overhead_s!r})")


# ----------------------------------------------------------------------------- parsing
def _num(obj: Mapping, key: str, where: str, default: Any = None) -> Any:
    if key not in obj:
        if default is None:
            raise ClusterConfigError(f"{where}.{key}: missing")
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ClusterConfigError(f"{where}.{key}: must be a number (got {v!r})")
    return v


def _link(obj: Any, where: str) -> Link:
    if not isinstance(obj, Mapping):
        raise ClusterConfigError(f"{where}: must be a mapping with latency_ms and bandwidth_GiB_per_s")
    unknown = set(obj) - {"a", "b", "latency_ms", "bandwidth_GiB_per_s"}
    if unknown:
        raise ClusterConfigError(f"{where}: unknown key(s) {sorted(unknown)}; use latency_ms, bandwidth_GiB_per_s")
    return Link(_num(obj, "latency_ms", where) / 1e3, _num(obj, "bandwidth_GiB_per_s", where) * GIB)


def cluster_from_dict(data: Mapping[str, Any], name: str = "cluster") -> Cluster:
    """Build a cluster from the file schema (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise ClusterConfigError("cluster: the file must hold a mapping with at least 'nodes'")
    known = {"name", "workload", "defaults", "same_region", "default_link", "nodes", "links"}
    unknown = set(data) - known
    if unknown:
        raise ClusterConfigError(f"cluster: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    wl_in = dict(data.get("workload") or {})
    wl_fields = set(Workload.__dataclass_fields__)
    if set(wl_in) - wl_fields:
        raise ClusterConfigError(f"cluster.workload: unknown key(s) {sorted(set(wl_in) - wl_fields)}; "
                                 f"known: {sorted(wl_fields)}")
    workload = Workload(**wl_in)
    defaults = dict(data.get("defaults") or {})
    node_fields = {"region", "host", "memory", "compute_s_per_sample_per_layer", "stage_time_s"}
    if set(defaults) - node_fields:
        raise ClusterConfigError(f"cluster.defaults: unknown key(s) {sorted(set(defaults) - node_fields)}")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterConfigError("cluster.nodes: missing or empty; give a list of {region: ...} mappings")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        if not isinstance(raw, Mapping):
            raise ClusterConfigError(f"cluster.nodes[{i}]: must be a mapping like {{region: Belgium}}")
        bad = set(raw) - node_fields
        if bad:
            raise ClusterConfigError(f"cluster.nodes[{i}]: unknown key(s) {sorted(bad)}; known: {sorted(node_fields)}")
        merged = {**defaults, **raw}
        if "region" not in merged:
            raise ClusterConfigError(f"cluster.nodes[{i}].region: missing; give every node a region name")
        nodes.append(Node(id=i, region=str(merged["region"]), host=merged.get("host"),
                          memory=merged.get("memory", 3),
                          compute_s_per_sample_per_layer=float(merged.get("compute_s_per_sample_per_layer", 0.055)),
                          stage_time_s=merged.get("stage_time_s")))
    links = {}
    for i, raw in enumerate(data.get("links") or []):
        where = f"cluster.links[{i}]"
        if not isinstance(raw, Mapping) or "a" not in raw or "b" not in raw:
            raise ClusterConfigError(f"{where}: needs a, b, latency_ms, bandwidth_GiB_per_s")
        a, b = str(raw["a"]), str(raw["b"])
        links[(a, b) if a < b else (b, a)] = _link(raw, where)
    same = _link(data["same_region"], "cluster.same_region") if "same_region" in data else Link(0.001, 2.0 * GIB)
    default = _link(data["default_link"], "cluster.default_link") if data.get("default_link") else None
    return Cluster(name=str(data.get("name", name)), nodes=nodes, links=links, same_region=same,
                   default_link=default, workload=workload)


def load_cluster_file(path: str | Path) -> Cluster:
    """Read a cluster from a ``.yaml``/``.yml``/``.json`` file."""
    p = Path(path)
    if not p.is_file():
        raise ClusterConfigError(f"cluster file not found: {p}; give a built-in name ({', '.join(builtin_names())}) "
                                 f"or a YAML/JSON path")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml  # only needed for YAML files
        data = yaml.safe_load(text)
    return cluster_from_dict(data, name=p.stem)


# ----------------------------------------------------------------------------- built-ins
def network_file() -> Path:
    """The SkipPipe network table: the shared copy next to the repository, else the packaged copy."""
    shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / NETWORK_FILE
    if shared.is_file():
        return shared.resolve()
    return Path(__file__).resolve().parent / "data" / NETWORK_FILE


def load_network(path: str | Path | None = None) -> dict[str, Any]:
    return json.loads(Path(path or network_file()).read_text())


def builtin_names() -> list[str]:
    return list(BUILTIN_SETTINGS) + ["synthetic-<N>[-s<seed>]"]


def builtin_cluster(name: str, num_nodes: int = 20, memory: int = 3, workload: Workload | None = None) -> Cluster:
    """A profile of the SkipPipe network table: node i sits in region i mod (regions of the setting)."""
    if name not in BUILTIN_SETTINGS:
        raise ClusterConfigError(f"cluster: unknown built-in {name!r}; use one of {', '.join(builtin_names())}")
    if num_nodes < 2:
        raise ClusterConfigError(f"cluster.num_nodes: must be >= 2 (got {num_nodes})")
    net = load_network()
    regions = net["settings"][BUILTIN_SETTINGS[name]]
    compute = float(net["compute_s_per_sample_per_layer"])
    nodes = [Node(id=i, region=regions[i % len(regions)], memory=memory, compute_s_per_sample_per_layer=compute)
             for i in range(num_nodes)]
    links = {}
    for raw in net["links"]:
        a, b = raw["a"], raw["b"]
        links[(a, b) if a < b else (b, a)] = Link(raw["latency_ms"] / 1e3, raw["bandwidth_GiB_per_s"] * GIB)
    sd = net["same_region_default"]
    return Cluster(name=name, nodes=nodes, links=links,
                   same_region=Link(sd["latency_ms"] / 1e3, sd["bandwidth_GiB_per_s"] * GIB),
                   workload=workload or Workload())


def synthetic_cluster(num_nodes: int, seed: int = 0, num_regions: int | None = None, memory: int = 3,
                      workload: Workload | None = None) -> Cluster:
    """Seeded heterogeneous cluster: regions on a 2-D map (latency ~ distance, bandwidth falls with it),
    node speeds spread 0.7x-1.6x around the paper's 0.055 s per sample per layer."""
    if num_nodes < 2:
        raise ClusterConfigError(f"cluster.num_nodes: must be >= 2 (got {num_nodes})")
    rng = random.Random(seed)
    k = num_regions or max(2, min(16, num_nodes // 6))
    pos = [(rng.uniform(0, 1), rng.uniform(0, 1)) for _ in range(k)]
    names = [f"r{i}" for i in range(k)]
    links = {}
    for i in range(k):
        for j in range(i + 1, k):
            d = math.dist(pos[i], pos[j])
            # 5-130 ms and 0.01-0.25 GiB/s: the span of the measured SkipPipe table.
            key = (names[i], names[j]) if names[i] < names[j] else (names[j], names[i])
            links[key] = Link(0.005 + 0.125 * d / math.sqrt(2),
                                               GIB * (0.01 + 0.24 * math.exp(-4.0 * d)) * rng.uniform(0.7, 1.3))
    nodes = [Node(id=i, region=names[rng.randrange(k)], memory=memory,
                  compute_s_per_sample_per_layer=0.055 * rng.uniform(0.7, 1.6)) for i in range(num_nodes)]
    return Cluster(name=f"synthetic-{num_nodes}-s{seed}", nodes=nodes, links=links, workload=workload or Workload())


_SYNTH = re.compile(r"^synthetic-(\d+)(?:-s(\d+))?$")


def load_cluster(name_or_path: str | Path | Cluster, num_nodes: int | None = None) -> Cluster:
    """A built-in profile name, ``synthetic-<N>[-s<seed>]``, or a YAML/JSON file path.

    ``num_nodes`` sizes the built-in profiles (default 20); files and synthetic names fix their own.
    """
    if isinstance(name_or_path, Cluster):
        return name_or_path
    s = str(name_or_path)
    if s in BUILTIN_SETTINGS:
        return builtin_cluster(s, num_nodes or 20)
    m = _SYNTH.match(s)
    if m:
        n = int(m.group(1))
        if num_nodes is not None and num_nodes > n:
            raise ClusterConfigError(f"cluster {s!r} has {n} nodes but {num_nodes} are needed")
        return synthetic_cluster(n, seed=int(m.group(2) or 0))
    return load_cluster_file(s)
