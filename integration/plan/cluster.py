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

Optional keys: ``cost_s`` (a measured N x N link cost matrix in seconds; it wins over the links,
which full mode still needs) and ``partition`` (a given placement: stage -> node ids).

Built-in profiles (``geo-12``, ``5-clusters``, ``single-cluster``) come from the SkipPipe network
table; ``skippipe-20`` is SkipPipe's published 20-node setting (cost matrix and partition from the
packaged ``data/skippipe_committed_20node.json``); ``synthetic-<N>[-s<seed>]`` is a seeded
heterogeneous cluster of any size up to ``MAX_NODES``.
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

from .textfile import read_bounded_text

GIB = 1024 ** 3
DEFAULT_OVERHEAD_S = 0.35
NETWORK_FILE = "skippipe_geo_network.json"
BUILTIN_SETTINGS = {"geo-12": "geo-distributed", "5-clusters": "5-clusters", "single-cluster": "single-cluster"}
COMMITTED_FILE = "skippipe_committed_20node.json"
SKIPPIPE_20 = "skippipe-20"


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
    activation_bytes_per_sample: int | None = None  # measured size; wins over bytes x d_model x seq_len

    @property
    def activation_bytes(self) -> int:
        """Bytes of one microbatch's activation: 4 * d_model * seq * samples for fp32, or the given
        per-sample size x samples (SkipPipe's setting: 2 x 16,777,324 bytes)."""
        per = self.activation_bytes_per_sample
        if per is None:
            per = self.bytes_per_value * self.d_model * self.seq_len
        return per * self.samples_per_microbatch

    def stage_param_bytes(self, stage: int) -> int:
        """Gradient bytes all-reduced by one stage group (12 d^2 per block; stage 0 adds the embedding)."""
        blocks = self.layers_per_stage * 12 * self.d_model ** 2
        emb = self.vocab_size * self.d_model if stage == 0 else 0
        return self.bytes_per_value * (blocks + emb)


SKIPPIPE_BYTES_PER_SAMPLE = 16_777_324
SKIPPIPE_WORKLOAD = Workload(activation_bytes_per_sample=SKIPPIPE_BYTES_PER_SAMPLE)  # SkipPipe's transfer size


@dataclass
class Cluster:
    """Nodes, inter-region links and the workload; node ``i`` is rank ``i`` of a training job."""

    name: str
    nodes: list[Node]
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    same_region: Link = Link(0.001, 2.0 * GIB)
    default_link: Link | None = None
    workload: Workload = Workload()
    cost_s: tuple[tuple[float, ...], ...] | None = None  # measured C[x][y] in seconds: wins over the links
    partition: tuple[tuple[int, ...], ...] | None = None  # a given placement (stage -> node ids), optional

    def __post_init__(self) -> None:
        validate_cluster(self)

    @property
    def has_links(self) -> bool:
        """Whether every node pair has a link (latency, bandwidth): full mode needs them."""
        if self.default_link is not None:
            return True
        regions = sorted({n.region for n in self.nodes})
        return all((a, b) in self.links for i, a in enumerate(regions) for b in regions[i + 1:])

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
        """C[x][y] = latency + activation_bytes / bandwidth + overhead (0 on the diagonal); a measured
        ``cost_s`` matrix is returned as is unless other bytes or overhead are asked for."""
        if self.cost_s is not None and activation_bytes is None and overhead_s is None:
            return np.array(self.cost_s, dtype=float)
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
        if self.cost_s is not None:
            out["cost_s"] = [list(r) for r in self.cost_s]
        if self.partition is not None:
            out["partition"] = [list(g) for g in self.partition]
        if self.workload.activation_bytes_per_sample is None:
            del out["workload"]["activation_bytes_per_sample"]
        return out


MAX_NODES = 2048          # loader bound: larger clusters need a planner budget this project does not give
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_YAML_ALIASES = 1000   # an alias bomb is refused before it expands
MAX_DEPTH = 32            # nesting of a cluster file (the schema needs 3)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_cluster(c: Cluster) -> None:
    """Raise :class:`ClusterConfigError` for the first field that cannot work."""
    if not c.nodes:
        raise ClusterConfigError("cluster.nodes: empty; list at least 2 nodes")
    if len(c.nodes) > MAX_NODES:
        raise ClusterConfigError(f"cluster.nodes: {len(c.nodes)} nodes > {MAX_NODES}, the most this planner handles; "
                                 f"split the job or plan a part of the cluster")
    for i, n in enumerate(c.nodes):
        if n.id != i:
            raise ClusterConfigError(f"cluster.nodes[{i}].id: is {n.id}; node ids are positions (rank i = node i)")
        if isinstance(n.memory, bool) or not isinstance(n.memory, int) or not 1 <= n.memory <= 10 ** 6:
            raise ClusterConfigError(f"cluster.nodes[{i}].memory: must be an integer in 1..1000000 (got {n.memory!r}); "
                                     f"it is how many microbatch activations the node holds at once")
        if not (_finite(n.compute_s_per_sample_per_layer) and n.compute_s_per_sample_per_layer > 0):
            raise ClusterConfigError(f"cluster.nodes[{i}].compute_s_per_sample_per_layer: must be a finite number > 0 "
                                     f"(got {n.compute_s_per_sample_per_layer!r})")
        if n.stage_time_s is not None and not (_finite(n.stage_time_s) and n.stage_time_s > 0):
            raise ClusterConfigError(f"cluster.nodes[{i}].stage_time_s: must be a finite number > 0 (got "
                                     f"{n.stage_time_s!r}); omit it to use compute_s_per_sample_per_layer")
        if not isinstance(n.region, str) or not n.region:
            raise ClusterConfigError(f"cluster.nodes[{i}].region: missing; give every node a region name")
    for where, l in [("same_region", c.same_region), ("default_link", c.default_link)] + \
            [(f"links[{a}-{b}]", l) for (a, b), l in c.links.items()]:
        if l is None:
            continue
        if not (_finite(l.latency_s) and l.latency_s >= 0):
            raise ClusterConfigError(f"cluster.{where}.latency_ms: must be a finite number >= 0 "
                                     f"(got {l.latency_s * 1e3!r})")
        if not (_finite(l.bandwidth_Bps) and l.bandwidth_Bps > 0):
            raise ClusterConfigError(f"cluster.{where}.bandwidth_GiB_per_s: must be a finite number > 0 "
                                     f"(got {l.bandwidth_Bps / GIB!r})")
    if c.cost_s is None and not c.has_links:
        rs = sorted({n.region for n in c.nodes})
        for i, a in enumerate(rs):
            for b in rs[i + 1:]:
                if (a, b) not in c.links:
                    raise ClusterConfigError(f"cluster.links: no link between regions {a!r} and {b!r}; add "
                                             f"{{a: {a}, b: {b}, latency_ms: ..., bandwidth_GiB_per_s: ...}}, "
                                             f"set cluster.default_link or give cluster.cost_s")
    N = len(c.nodes)
    if c.cost_s is not None:
        if len(c.cost_s) != N or any(len(r) != N for r in c.cost_s):
            raise ClusterConfigError(f"cluster.cost_s: must be a {N} x {N} matrix of seconds (one row and column "
                                     f"per node)")
        for a, row in enumerate(c.cost_s):
            for b, v in enumerate(row):
                if not (_finite(v) and v >= 0) or (a != b and v <= 0):
                    raise ClusterConfigError(f"cluster.cost_s[{a}][{b}]: must be a finite number of seconds "
                                             f"{'> 0' if a != b else '>= 0'} (got {v!r})")
    if c.partition is not None:
        seen: set[int] = set()
        if len(c.partition) < 2:
            raise ClusterConfigError("cluster.partition: needs at least 2 stages (home + body), each a list of node ids")
        for s, g in enumerate(c.partition):
            if not g:
                raise ClusterConfigError(f"cluster.partition[{s}]: empty; every stage needs a node")
            for n in g:
                if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < N or n in seen:
                    raise ClusterConfigError(f"cluster.partition[{s}]: node {n!r} is not a new node id in 0..{N - 1}; "
                                             f"list every node at most once")
                seen.add(n)
    wl = c.workload
    for k in ("samples_per_microbatch", "seq_len", "d_model", "layers_per_stage", "bytes_per_value", "vocab_size"):
        v = getattr(wl, k)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10 ** 9:
            raise ClusterConfigError(f"cluster.workload.{k}: must be an integer in 1..10^9 (got {v!r})")
    v = wl.activation_bytes_per_sample
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10 ** 15):
        raise ClusterConfigError(f"cluster.workload.activation_bytes_per_sample: must be an integer >= 1 or omitted "
                                 f"(got {v!r})")
    if not (_finite(wl.overhead_s) and wl.overhead_s >= 0):
        raise ClusterConfigError(f"cluster.workload.overhead_s: must be a finite number >= 0 (got {wl.overhead_s!r})")


# ----------------------------------------------------------------------------- parsing
def _num(obj: Mapping, key: str, where: str, default: Any = None) -> Any:
    if key not in obj:
        if default is None:
            raise ClusterConfigError(f"{where}.{key}: missing")
        return default
    v = obj[key]
    if not _finite(v):
        raise ClusterConfigError(f"{where}.{key}: must be a finite number (got {v!r})")
    return v


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ClusterConfigError(f"{where}: must be an integer (got {v!r})")
    return v


def _mapping(v: Any, where: str, hint: str) -> Mapping:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ClusterConfigError(f"{where}: must be a mapping ({hint}), got {type(v).__name__}")
    return v


def _name(v: Any, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)) or str(v) == "":
        raise ClusterConfigError(f"{where}: must be a non-empty name (got {v!r})")
    return str(v)


def _link(obj: Any, where: str) -> Link:
    if not isinstance(obj, Mapping):
        raise ClusterConfigError(f"{where}: must be a mapping with latency_ms and bandwidth_GiB_per_s")
    unknown = set(obj) - {"a", "b", "latency_ms", "bandwidth_GiB_per_s"}
    if unknown:
        raise ClusterConfigError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; use latency_ms, "
                                 f"bandwidth_GiB_per_s")
    return Link(_num(obj, "latency_ms", where) / 1e3, _num(obj, "bandwidth_GiB_per_s", where) * GIB)


def _matrix(v: Any, n: int, where: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(v, list) or len(v) != n or any(not isinstance(r, list) or len(r) != n for r in v):
        raise ClusterConfigError(f"{where}: must be a {n} x {n} list of lists of seconds (one row per node)")
    for a, r in enumerate(v):
        for b, x in enumerate(r):
            if not _finite(x):
                raise ClusterConfigError(f"{where}[{a}][{b}]: must be a finite number of seconds (got {x!r})")
    return tuple(tuple(float(x) for x in r) for r in v)


def _partition(v: Any, where: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(v, list) or any(not isinstance(g, list) for g in v):
        raise ClusterConfigError(f"{where}: must be a list of stages, each a list of node ids (stage 0 = homes)")
    return tuple(tuple(_int(n, f"{where}[{s}]") for n in g) for s, g in enumerate(v))


def cluster_from_dict(data: Mapping[str, Any], name: str = "cluster") -> Cluster:
    """Build a cluster from the file schema (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise ClusterConfigError("cluster: the file must hold a mapping with at least 'nodes'")
    known = {"name", "workload", "defaults", "same_region", "default_link", "nodes", "links", "cost_s", "partition"}
    unknown = set(data) - known
    if unknown:
        raise ClusterConfigError(f"cluster: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(known)}")
    wl_in = dict(_mapping(data.get("workload"), "cluster.workload", "e.g. {samples_per_microbatch: 2}"))
    wl_fields = set(Workload.__dataclass_fields__)
    if set(wl_in) - wl_fields:
        raise ClusterConfigError(f"cluster.workload: unknown key(s) {sorted(map(str, set(wl_in) - wl_fields))}; "
                                 f"known: {sorted(wl_fields)}")
    for k, v in wl_in.items():
        if k == "overhead_s":
            _num(wl_in, k, "cluster.workload")
        elif not (k == "activation_bytes_per_sample" and v is None):
            _int(v, f"cluster.workload.{k}")
    workload = Workload(**wl_in)
    defaults = dict(_mapping(data.get("defaults"), "cluster.defaults", "e.g. {memory: 3}"))
    node_fields = {"region", "host", "memory", "compute_s_per_sample_per_layer", "stage_time_s"}
    if set(defaults) - node_fields:
        raise ClusterConfigError(f"cluster.defaults: unknown key(s) {sorted(map(str, set(defaults) - node_fields))}; "
                                 f"known: {sorted(node_fields)}")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ClusterConfigError("cluster.nodes: missing or empty; give a list of {region: ...} mappings")
    if len(raw_nodes) > MAX_NODES:
        raise ClusterConfigError(f"cluster.nodes: {len(raw_nodes)} nodes > {MAX_NODES}, the most this planner "
                                 f"handles; split the job or plan a part of the cluster")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        where = f"cluster.nodes[{i}]"
        if not isinstance(raw, Mapping):
            raise ClusterConfigError(f"{where}: must be a mapping like {{region: Belgium}}")
        bad = set(raw) - node_fields
        if bad:
            raise ClusterConfigError(f"{where}: unknown key(s) {sorted(map(str, bad))}; known: {sorted(node_fields)}")
        merged = {**defaults, **raw}
        if "region" not in merged:
            raise ClusterConfigError(f"{where}.region: missing; give every node a region name")
        st = merged.get("stage_time_s")
        nodes.append(Node(id=i, region=_name(merged["region"], f"{where}.region"),
                          host=None if merged.get("host") is None else _name(merged["host"], f"{where}.host"),
                          memory=_int(merged.get("memory", 3), f"{where}.memory"),
                          compute_s_per_sample_per_layer=float(_num(merged, "compute_s_per_sample_per_layer", where,
                                                                    0.055)),
                          stage_time_s=None if st is None else float(_num(merged, "stage_time_s", where))))
    raw_links = data.get("links") or []
    if not isinstance(raw_links, list):
        raise ClusterConfigError("cluster.links: must be a list of {a, b, latency_ms, bandwidth_GiB_per_s}")
    links = {}
    for i, raw in enumerate(raw_links):
        where = f"cluster.links[{i}]"
        if not isinstance(raw, Mapping) or "a" not in raw or "b" not in raw:
            raise ClusterConfigError(f"{where}: needs a, b, latency_ms, bandwidth_GiB_per_s")
        a, b = _name(raw["a"], f"{where}.a"), _name(raw["b"], f"{where}.b")
        links[(a, b) if a < b else (b, a)] = _link(raw, where)
    same = _link(data["same_region"], "cluster.same_region") if "same_region" in data else Link(0.001, 2.0 * GIB)
    default = _link(data["default_link"], "cluster.default_link") if data.get("default_link") else None
    cost = _matrix(data["cost_s"], len(nodes), "cluster.cost_s") if data.get("cost_s") is not None else None
    part = _partition(data["partition"], "cluster.partition") if data.get("partition") is not None else None
    return Cluster(name=_name(data.get("name", name), "cluster.name"), nodes=nodes, links=links, same_region=same,
                   default_link=default, workload=workload, cost_s=cost, partition=part)


class _BoundedLoader:
    """A YAML SafeLoader that refuses alias bombs and deep nesting before anything expands."""

    @staticmethod
    def make():
        import yaml

        class Loader(yaml.SafeLoader):
            def __init__(self, stream):
                super().__init__(stream)
                self._aliases = 0
                self._depth = 0

            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    self._aliases += 1
                    if self._aliases > MAX_YAML_ALIASES:
                        raise ClusterConfigError(f"cluster file: more than {MAX_YAML_ALIASES} YAML aliases (*ref); "
                                                 f"write the values out")
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise ClusterConfigError(f"cluster file: nested deeper than {MAX_DEPTH} levels; the schema needs "
                                             f"3 (docs/planner.md)")
                try:
                    return super().compose_node(parent, index)
                finally:
                    self._depth -= 1

        return Loader


def parse_cluster_text(text: str, fmt: str, name: str = "cluster") -> Cluster:
    """Parse cluster file text (``fmt`` 'json' or 'yaml'); any malformed input becomes one
    :class:`ClusterConfigError` naming the problem, never another exception."""
    if len(text) > MAX_FILE_BYTES:
        raise ClusterConfigError(f"cluster file: {len(text)} characters > {MAX_FILE_BYTES}; this is not a cluster file")
    try:
        if fmt == "json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.load(text, Loader=_BoundedLoader.make())  # noqa: S506 (a SafeLoader subclass)
    except ClusterConfigError:
        raise
    except RecursionError:
        raise ClusterConfigError(f"cluster file: nested too deeply to be a cluster file (limit {MAX_DEPTH})") from None
    except Exception as exc:  # json/yaml syntax errors of every kind
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ClusterConfigError(f"cluster file: not valid {fmt.upper()} ({first[:200]})") from None
    try:
        return cluster_from_dict(data, name=name)
    except ClusterConfigError:
        raise
    except RecursionError:
        raise ClusterConfigError(f"cluster file: nested too deeply to be a cluster file (limit {MAX_DEPTH})") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ClusterConfigError(f"cluster file: a value has the wrong type ({exc}); see the schema in "
                                 f"docs/planner.md") from None


def load_cluster_file(path: str | Path) -> Cluster:
    """Read a cluster from a ``.yaml``/``.yml``/``.json`` file."""
    p = Path(path)
    text = read_bounded_text(p, MAX_FILE_BYTES, ClusterConfigError, "cluster file",
                             f"; give a built-in name ({', '.join(builtin_names())}) or a YAML/JSON path")
    return parse_cluster_text(text, "json" if p.suffix.lower() == ".json" else "yaml", name=p.stem)



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
    return list(BUILTIN_SETTINGS) + [SKIPPIPE_20, "synthetic-<N>[-s<seed>]"]


def committed_setting_file() -> Path:
    """SkipPipe's published 20-node setting (packaged data copy)."""
    return Path(__file__).resolve().parent / "data" / COMMITTED_FILE


def load_committed_setting() -> dict[str, Any]:
    """The published 20-node setting: locations, partition, memory, cost_s, published times and paths."""
    return json.loads(committed_setting_file().read_text())


def _network_links(net: Mapping[str, Any]) -> tuple[dict[tuple[str, str], Link], Link]:
    links = {}
    for raw in net["links"]:
        a, b = raw["a"], raw["b"]
        links[(a, b) if a < b else (b, a)] = Link(raw["latency_ms"] / 1e3, raw["bandwidth_GiB_per_s"] * GIB)
    sd = net["same_region_default"]
    return links, Link(sd["latency_ms"] / 1e3, sd["bandwidth_GiB_per_s"] * GIB)


def builtin_cluster(name: str, num_nodes: int = 20, memory: int = 3, workload: Workload | None = None) -> Cluster:
    """A profile of the SkipPipe network table: node i sits in region i mod (regions of the setting).

    ``geo-12`` follows SkipPipe's own region order (their ``locations`` list) and workload
    (2 samples x 16,777,324 bytes per transfer); ``skippipe-20`` is their published setting itself."""
    if name == SKIPPIPE_20:
        return skippipe20_cluster(num_nodes)
    if name not in BUILTIN_SETTINGS:
        raise ClusterConfigError(f"cluster: unknown built-in {name!r}; use one of {', '.join(builtin_names())}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or not 2 <= num_nodes <= MAX_NODES:
        raise ClusterConfigError(f"cluster.num_nodes: must be an integer in 2..{MAX_NODES} (got {num_nodes!r})")
    net = load_network()
    if name == "geo-12":
        regions = load_committed_setting()["locations"][:12]
        workload = workload or SKIPPIPE_WORKLOAD
    else:
        regions = net["settings"][BUILTIN_SETTINGS[name]]
    compute = float(net["compute_s_per_sample_per_layer"])
    nodes = [Node(id=i, region=regions[i % len(regions)], memory=memory, compute_s_per_sample_per_layer=compute)
             for i in range(num_nodes)]
    links, same = _network_links(net)
    return Cluster(name=name, nodes=nodes, links=links, same_region=same, workload=workload or Workload())


def skippipe20_cluster(num_nodes: int | None = 20) -> Cluster:
    """SkipPipe's published 20-node setting: their node regions, link cost matrix (seconds), partition
    and per-node compute 0.44 s; the network table's links make full mode available too."""
    if num_nodes not in (None, 20):
        raise ClusterConfigError(f"cluster {SKIPPIPE_20!r}: has exactly 20 nodes (asked for {num_nodes}); use geo-12 "
                                 f"for other sizes")
    d = load_committed_setting()
    net = load_network()
    links, same = _network_links(net)
    nodes = [Node(id=i, region=r, memory=int(d["memory"]),
                  compute_s_per_sample_per_layer=float(net["compute_s_per_sample_per_layer"]))
             for i, r in enumerate(d["locations"])]
    return Cluster(name=SKIPPIPE_20, nodes=nodes, links=links, same_region=same, workload=SKIPPIPE_WORKLOAD,
                   cost_s=tuple(tuple(float(x) for x in r) for r in d["cost_s"]),
                   partition=tuple(tuple(g) for g in d["partition"]))


def synthetic_cluster(num_nodes: int, seed: int = 0, num_regions: int | None = None, memory: int = 3,
                      workload: Workload | None = None) -> Cluster:
    """Seeded heterogeneous cluster: regions on a 2-D map (latency ~ distance, bandwidth falls with it),
    node speeds spread 0.7x-1.6x around the paper's 0.055 s per sample per layer."""
    if not 2 <= num_nodes <= MAX_NODES:
        raise ClusterConfigError(f"cluster.num_nodes: must be in 2..{MAX_NODES} (got {num_nodes})")
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
    if s in BUILTIN_SETTINGS or s == SKIPPIPE_20:
        return builtin_cluster(s, num_nodes or 20)
    m = _SYNTH.match(s)
    if m:
        n = int(m.group(1))
        if not 2 <= n <= MAX_NODES:
            raise ClusterConfigError(f"cluster {s!r}: {n} nodes; synthetic clusters have 2..{MAX_NODES} nodes")
        if num_nodes is not None and num_nodes > n:
            raise ClusterConfigError(f"cluster {s!r} has {n} nodes but {num_nodes} are needed")
        return synthetic_cluster(n, seed=int(m.group(2) or 0))
    return load_cluster_file(s)
