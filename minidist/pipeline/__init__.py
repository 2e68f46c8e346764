"""Pipeline parallelism (chapter 07): the model cut into stages on ranks, micro-batches flowing through them.

    schedule.py   schedules as plain data: GPipe, 1F1B, interleaved 1F1B, ZB-H1; validate, simulate, grid
    stages.py     the tiny GPT cut into stages (partition); tied embeddings shared by the first and last stage
    backward.py   the backward split into B (input gradient) and W (weight gradients) for zero-bubble schedules
    messages.py   the plan of a schedule's messages: batches in one clock's order, so that NCCL cannot hang
    runtime.py    PipelineRuntime: runs a schedule with point-to-point messages; its timeline and memory measured
"""
