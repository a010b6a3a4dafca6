"""SkipPipe's committed 20-node plans replayed in our simulator reproduce their published times."""

import pytest

from integration.plan.cluster import load_cluster, load_committed_setting
from integration.plan.published import PUBLISHED, full_pipeline_27, published_plan
from integration.plan.rules import Rules, validate
from integration.plan.simulator import simulate


@pytest.mark.parametrize("name", PUBLISHED)
def test_their_paths_reproduce_their_times_within_1pct(name):
    published = load_committed_setting()["published_iteration_s"][name]
    plan = published_plan(name)
    assert validate(plan, Rules(memory=3)) == []
    assert plan.num_microbatches == 30
    got = simulate(plan, load_cluster("skippipe-20"), mode="paper").iteration_s
    assert got == pytest.approx(published, rel=0.01)


def test_their_full_pipeline_baseline_within_1pct():
    published = load_committed_setting()["published_iteration_s"]["full_pipeline_baseline"]
    plan = full_pipeline_27()
    assert plan.num_microbatches == 27 and len(plan.stage_nodes[0]) == 3
    assert simulate(plan, load_cluster("skippipe-20"), mode="paper").iteration_s == pytest.approx(published, rel=0.01)
