"""Plausible wrong answers to chapter 09's new exercise (capture_state): each must score below full marks."""
import torch


def capture_state__default_device_autocast(tensors):
    """Asks the default device type's autocast (torch.is_autocast_enabled() with no argument: CUDA's), not the one
    the segment runs on: a CPU segment under autocast is recomputed in fp32."""
    return {"cpu": torch.get_rng_state(), "devices": {},
            "autocast": ("cpu", torch.is_autocast_enabled(), torch.get_autocast_dtype("cpu"))}


def capture_state__a_new_generator(tensors):
    """The state of a fresh generator instead of the one dropout draws from: the recomputation draws other masks
    (the chapter's common mistake, recomputing without the random state)."""
    return {"cpu": torch.Generator().get_state(), "devices": {},
            "autocast": ("cpu", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))}
