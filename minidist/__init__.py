"""minidist: large-model distributed training techniques, built from scratch on torch.distributed.

Start with `python -m minidist tour`, or open notebooks/00_memory.ipynb. One technique per module:
    launch        run a function on N ranks          mesh          (dp, pp, tp) process groups
    comm          differentiable collectives, ledger collectives   ring algorithms from send/recv, cost model
    models        tiny GPT, Hugging Face builders    data          corpus, tokenizer
    memory        memory formulas and measurement    testing       train-against-a-reference harness
"""
from .launch import RankError, device, launch, run_under_torchrun
from .mesh import Mesh

__all__ = ["launch", "run_under_torchrun", "device", "RankError", "Mesh"]
__version__ = "0.1.0"
