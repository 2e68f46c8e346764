"""Pipeline parallelism (chapter 07): the model cut into stages on ranks, micro-batches flowing through them.

    actions.py    an Action, and where each (rank, chunk) sits: the looped placement, or the V
    schedule.py   schedules as plain data: GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-V, DualPipeV; validate, simulate
    vshape.py     the V schedules, ZB-V and DualPipeV, in torch's action order
    stages.py     the tiny GPT cut into stages (partition); tied embeddings shared by the first and last stage
    backward.py   the backward split into B (input gradient) and W (weight gradients) for zero-bubble schedules
    messages.py   the plan of a schedule's messages: batches in one clock's order, so that NCCL cannot hang
    runtime.py    PipelineRuntime: runs a schedule with point-to-point messages; its timeline and memory measured
"""
