"""One cost model for every op of a microbatch, in units of w (a stage forward on that node).

Used by the simulator (predicted seconds: multiply by the node's w) and by
``integration/runtime/program.py`` (the unit-cost list schedule that orders every rank's
program), so the order a run executes and the order the planner predicts come from the same
numbers. The factors are SkipPipe's: backward 1.5x forward, head + loss w/4 on the home node
(spec ``shared/spec/skippipe.md`` section 3).

Parts: ``embed`` (ring home: stage-0 forward), ``head`` (ring home: norm + LM head + loss),
``first`` / ``last`` (linear layout ends), ``body`` (a body stage). The head's backward is folded
into the loss op (the w/4 covers head, loss and its gradient), so its own backward costs 0 and the
home's backward is the stage-0 backward alone.
"""

from __future__ import annotations

FORWARD = {"embed": 1.0, "head": 0.25, "first": 1.0, "body": 1.0, "last": 1.25}
BACKWARD_FACTOR = 1.5
BACKWARD = {"embed": 1.5, "head": 0.0, "first": 1.5, "body": 1.5, "last": 1.5}


def op_cost(part: str, backward: bool) -> float:
    """Cost of one op of ``part`` in units of w."""
    return (BACKWARD if backward else FORWARD)[part]


# The simulator's three home-node ops and two body-node ops (ring layout), in units of w.
HOME_F = FORWARD["embed"]
LOSS = FORWARD["head"] + BACKWARD["head"]
HOME_B = BACKWARD["embed"]
BODY_F = FORWARD["body"]
BODY_B = BACKWARD["body"]
HOME_TOTAL = HOME_F + LOSS + HOME_B   # 2.75 w per microbatch on its home
BODY_TOTAL = BODY_F + BODY_B          # 2.5 w per visit of a body node

__all__ = ["FORWARD", "BACKWARD", "BACKWARD_FACTOR", "op_cost", "HOME_F", "LOSS", "HOME_B", "BODY_F", "BODY_B",
           "HOME_TOTAL", "BODY_TOTAL"]
