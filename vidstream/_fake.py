"""Fake (meta) kernels of the C++ ops, so torch.compile and FakeTensor tracing see their shapes.
Imported only once ``vidstream._C`` has defined the schemas."""

import torch


@torch.library.register_fake("vidstream::rope3d")
def _rope3d_fake(x, frames, height, width, frame_offset=0.0, theta=10000.0, t_theta=None):
    return torch.empty_like(x)


@torch.library.register_fake("vidstream::rope3d_shift_")
def _rope3d_shift_fake(k_pool, ranges, delta_frames, theta=10000.0, t_theta=None):
    return None
