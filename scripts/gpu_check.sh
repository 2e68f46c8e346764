#!/usr/bin/env bash
# `make gpu-check`: for anyone with NVIDIA GPUs. Runs the tour's checks over NCCL with one rank per GPU (the rank
# functions build their models and tensors on their own GPU), then the example training script under torchrun.
# Needs a CUDA build of torch (README: "Installing on a GPU machine").
set -euo pipefail
PY=${PYTHON:-python}
NGPU=$("$PY" -c "from minidist.launch import gpu_count; print(gpu_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "gpu-check: no GPU visible to torch (a CPU build of torch, or no NVIDIA driver)" >&2
    exit 1
fi
TOUR=$(( NGPU < 4 ? NGPU : 4 ))  # the tour is sized for up to 4 ranks
if [ "$TOUR" -ge 2 ]; then
    echo "== the tour over NCCL on $TOUR of $NGPU GPU(s), one rank per GPU"
    MINIDIST_BACKEND=nccl "$PY" -m minidist tour --world-size "$TOUR" --backend nccl --quiet
else
    echo "== one GPU: the tour needs 2 ranks with a GPU each; skipped"
fi
echo "== what only a GPU shows (issue 22): the ring at 2 ranks with 64 MiB, completion times, ZeRO-Offload's devices"
"$PY" scripts/gpu_checks.py "$TOUR"
echo "== the ring backend's rows at 2 ranks (a ring whose left and right neighbour are one peer)"
if [ "$NGPU" -ge 2 ]; then
    MINIDIST_BACKEND=nccl "$PY" -m minidist tour --world-size 2 --backend nccl --quiet --only ring
fi
echo "== the example script under torchrun, one rank per GPU"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m minidist.examples.train --strategy ddp \
    --steps 50 --quiet
echo "gpu-check passed on $NGPU GPU(s)"
