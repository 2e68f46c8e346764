"""minidist: large-model distributed training techniques, built from scratch on torch.distributed.

Start with `python -m minidist tour`, or open notebooks/00_memory.ipynb. A technique of one file is a module, one of
several files a folder (the README's module map lists them all). The ones everything else stands on:
    launch        run a function on N ranks          mesh          (dp, pp, cp, tp) process groups
    comm/         the communication layer: collectives and their differentiable duals, point-to-point, ring
                  algorithms from send/recv and their cost model, the byte ledger, the flight recorder
    models        tiny GPT, Hugging Face builders    data          corpus, tokenizer
    memory/       memory formulas, measurement, offload    testing   train-against-a-reference harness
"""
from .launch import RankError, device, launch, run_under_torchrun
from .mesh import Mesh

__all__ = ["launch", "run_under_torchrun", "device", "RankError", "Mesh"]
__version__ = "0.1.0"
