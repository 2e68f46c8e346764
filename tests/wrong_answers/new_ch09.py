"""Plausible wrong answers to chapter 09's new exercise (capture_state): each must score below full marks."""
import torch


def capture_state__default_device_autocast(tensors):
    """Asks torch.is_autocast_enabled() with no device (CUDA's): a CPU segment is recomputed in fp32."""
    return {"cpu": torch.get_rng_state(), "devices": {},
            "autocast": ("cpu", torch.is_autocast_enabled(), torch.get_autocast_dtype("cpu"))}


def capture_state__a_new_generator(tensors):
    """A fresh generator's state, not dropout's (common mistakes: recomputing without the random state)."""
    return {"cpu": torch.Generator().get_state(), "devices": {},
            "autocast": ("cpu", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))}
