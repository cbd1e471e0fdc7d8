"""torchaudio.functional.resample through libsoxr (a different filter than torchaudio's sinc: only the shape of the
call matches; no golden fixture depends on it)."""

from __future__ import annotations

import numpy as np
import soxr
import torch


def resample(waveform: torch.Tensor, orig_freq, new_freq, *args, **kwargs) -> torch.Tensor:
    src, dst = int(orig_freq), int(new_freq)
    if src == dst:
        return waveform
    array = waveform.detach().to("cpu", torch.float32).numpy()
    rows = array.reshape(-1, array.shape[-1])
    out = np.stack([soxr.resample(row, src, dst, quality="HQ") for row in rows]).astype(np.float32)
    out = out.reshape(*array.shape[:-1], out.shape[-1])
    return torch.from_numpy(out).to(device=waveform.device, dtype=waveform.dtype)
