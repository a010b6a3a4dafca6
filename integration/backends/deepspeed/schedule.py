"""DeepSpeed schedule for routed microbatches: the compiled program as PipeInstructions.

Each op of the rank's program becomes one instruction (one atomic step); the iteration ends with
DeepSpeed's own ReduceTiedGrads, ReduceGrads and OptimizerStep instructions, so the engine's
reduction and step logic stays upstream's.
"""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds_schedule

from ...runtime import program as prog


class RoutedInstruction(ds_schedule.PipeInstruction):
    """An op of the routed program; ``op`` is a :class:`integration.runtime.program.Op`."""


class RoutedEndIteration(ds_schedule.PipeInstruction):
    """All routed ops are done: wait for outstanding sends and check that no slot is left over."""


class RoutedLoadMicroBatch(RoutedInstruction):
    pass


class RoutedForwardPass(RoutedInstruction):
    pass


class RoutedBackwardPass(RoutedInstruction):
    pass


class RoutedSendActivation(RoutedInstruction):
    pass


class RoutedRecvActivation(RoutedInstruction):
    pass


class RoutedSendGrad(RoutedInstruction):
    pass


class RoutedRecvGrad(RoutedInstruction):
    pass


class RoutedSendLabels(RoutedInstruction):
    pass


class RoutedRecvLabels(RoutedInstruction):
    pass


INSTRUCTION_FOR_KIND = {
    prog.LOAD: RoutedLoadMicroBatch,
    prog.FWD: RoutedForwardPass,
    prog.BWD: RoutedBackwardPass,
    prog.SEND_ACT: RoutedSendActivation,
    prog.RECV_ACT: RoutedRecvActivation,
    prog.SEND_GRAD: RoutedSendGrad,
    prog.RECV_GRAD: RoutedRecvGrad,
    prog.SEND_LABELS: RoutedSendLabels,
    prog.RECV_LABELS: RoutedRecvLabels,
}


class RoutedTrainSchedule(ds_schedule.PipeSchedule):
    """Yields this rank's program, one op per step, then reduce and step."""

    def __init__(self, ops: list[prog.Op], micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
        self.ops = ops

    def steps(self):
        for op in self.ops:
            yield [INSTRUCTION_FOR_KIND[op.kind](op=op)]
        yield [RoutedEndIteration()]
        yield [ds_schedule.ReduceTiedGrads(), ds_schedule.ReduceGrads(), ds_schedule.OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        # Buffers live in the executor's per-microbatch slots, not in DeepSpeed's pipe_buffers.
        return 1
