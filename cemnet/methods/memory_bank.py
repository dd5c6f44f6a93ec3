"""MoCo's queue of negative keys as a module with *persistent* buffers.

Why not lightly's ``MemoryBankModule``: it keeps its bank in a non-persistent buffer, so a
checkpoint does not contain it and a resumed run silently restarts with a queue of random noise
(65,536 keys take 512 steps to refill at batch 128, during which the loss is computed against
noise and the logged curves have a visible kink).
Here ``keys``, ``ptr`` and ``n_enqueued`` are registered persistent buffers: they are in every
checkpoint and restored bit-for-bit on resume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KeyQueue"]


class KeyQueue(nn.Module):
    """FIFO ring of ``size`` L2-normalised ``dim``-d keys (MoCo's ``queue`` / ``queue_ptr``).

    Starts, as in MoCo, with random unit vectors; ``n_enqueued`` counts real keys so the fill
    fraction can be logged. Any batch size works (the ring wraps; MoCo required K % batch == 0).
    """

    def __init__(self, size: int = 65536, dim: int = 128) -> None:
        super().__init__()
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("keys", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_enqueued", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> Tensor:
        """A copy of the keys to compute logits with: the buffer is updated in place by
        :meth:`enqueue` before backward, and autograd must see the pre-update values."""
        return self.keys.clone()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replace the oldest entries with ``keys`` (``(n, dim)``, normalised; already gathered
        across ranks, so every rank writes the same rows)."""
        keys = keys.detach().to(self.keys.dtype)[-self.size :]
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[idx] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
        self.n_enqueued.add_(n)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """``fill``: fraction of the queue holding real keys; ``key_cos``: mean pairwise cosine of
        the real keys, from ``|sum k|^2`` in O(K D) (a collapse detector: -> 1 if keys collapse)."""
        n = int(min(int(self.n_enqueued), self.size))
        fill = self.keys.new_tensor(n / self.size)
        if n < 2:
            return {"fill": fill, "key_cos": self.keys.new_tensor(0.0)}
        if n < self.size:  # real keys are the n rows before ptr (ring order)
            idx = (self.ptr - 1 - torch.arange(n, device=self.keys.device)) % self.size
            k = self.keys[idx].float()
        else:
            k = self.keys.float()
        s = k.sum(dim=0)
        key_cos = (s @ s - (k * k).sum()) / (n * (n - 1))
        return {"fill": fill, "key_cos": key_cos}

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
