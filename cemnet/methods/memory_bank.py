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

__all__ = ["KeyQueue", "effective_rank"]


def effective_rank(x: Tensor) -> Tensor:
    """Effective rank of the rows of ``x`` (``(n, d)``): ``exp(H(p))`` with ``p`` the normalised
    eigenvalues of ``x^T x`` (1 for rows on one line, ``d`` for an isotropic cloud; 0 if ``x`` is 0)."""
    ev = torch.linalg.eigvalsh(x.T.double() @ x.double()).clamp_min(0)
    total = ev.sum()
    if total <= 0:
        return x.new_tensor(0.0)
    p = ev / total
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()).to(x.dtype)


class KeyQueue(nn.Module):
    """FIFO ring of ``size`` L2-normalised ``dim``-d keys (MoCo's ``queue`` / ``queue_ptr``).

    Starts, as in MoCo, with random unit vectors; ``n_enqueued`` counts real keys so the fill
    fraction can be logged and, unlike MoCo, the random vectors are not used as negatives once a
    real key exists (:meth:`snapshot`). Any batch size works (the ring wraps; MoCo required K % batch == 0).
    """

    def __init__(self, size: int = 65536, dim: int = 128) -> None:
        super().__init__()
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("keys", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_enqueued", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> Tensor:
        """A copy of the negatives to compute logits with: the buffer is updated in place by
        :meth:`enqueue` before backward, and autograd must see the pre-update values.

        Only *real* keys once there are any. MoCo scores queries against the whole ring, random
        initial vectors included, until it has filled (K / batch steps); random unit vectors are
        nearly orthogonal to every query while real keys share the encoder's common direction,
        so during the fill the loss is lowered by pulling all projections towards that common
        direction (a rise of ``key_cos``) rather than by telling images apart. Negligible over
        MoCo's 200 epochs, it is a large share of a few-hundred-step run (32 steps of 300 at
        K = 1024, batch 32). Only the very first step, with no key yet, sees the random ring.
        """
        n = self.n_real()
        if n == 0 or n == self.size:
            return self.keys.clone()
        return self.keys[self._real_index(n)]  # advanced indexing copies

    def n_real(self) -> int:
        """Number of real keys in the ring (``min(n_enqueued, size)``)."""
        return int(min(int(self.n_enqueued), self.size))

    def _real_index(self, n: int) -> Tensor:
        # real keys are the n rows before ptr (ring order), newest first
        return (self.ptr - 1 - torch.arange(n, device=self.keys.device)) % self.size

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
        the real keys, from ``|sum k|^2`` in O(K D); ``key_rank``: effective rank (Roy & Vetterli
        2007: exp of the entropy of the normalised eigenvalues) of the *centred* keys, in O(K D^2).

        Read them together: ``key_cos`` is the size of the direction all keys share (already
        ~0.8 for a randomly initialised ResNet, whose pooled ReLU features are all positive), which
        InfoNCE neither needs nor removes; ``key_rank`` is how many directions the keys vary along
        around it (1 = collapse to a line, D = isotropic). Collapse is ``key_rank`` falling, not
        ``key_cos`` alone rising."""
        n = self.n_real()
        fill = self.keys.new_tensor(n / self.size)
        if n < 2:
            return {"fill": fill, "key_cos": self.keys.new_tensor(0.0), "key_rank": self.keys.new_tensor(0.0)}
        k = self.keys[self._real_index(n)].float() if n < self.size else self.keys.float()
        s = k.sum(dim=0)
        key_cos = (s @ s - (k * k).sum()) / (n * (n - 1))
        return {"fill": fill, "key_cos": key_cos, "key_rank": effective_rank(k - k.mean(dim=0))}

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
