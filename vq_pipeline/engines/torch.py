"""Chunked GEMM engine in plain torch.

Squared distances are expanded as ``|x|^2 - 2 x.c + |c|^2`` so that a matrix product does the work.
That expansion loses precision when the data sit far from the origin (a relative error of about
``eps * |x|^2`` swamps small differences), so both sides are first shifted by the centroids' mean,
which leaves every distance unchanged. The GEMM only *ranks* the candidates; the distances returned
for the chosen centroids are recomputed in the direct ``sum((x - c)**2)`` form.
"""

from __future__ import annotations

import torch


# The (rows, n_codes) block of one GEMM is kept about this size: a block that stays in cache makes
# the argmin that reads it back several times faster than one that spills to memory.
_BLOCK_BYTES = 8 * 2**20


class TorchEngine:
    name = "torch"

    def preferred_chunk_rows(self, n_codes: int, dim: int) -> int:
        """Rows per chunk that keep the distance block near cache size (see ``_BLOCK_BYTES``)."""
        return max(256, _BLOCK_BYTES // (4 * max(n_codes, dim)))

    def nearest(self, x: torch.Tensor, c: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`vq_pipeline.engines.Engine.nearest`."""
        shift = c.mean(dim=0)  # (dim,)
        xs = x - shift  # (n, dim)
        cs = c - shift  # (m, dim)
        # |c|^2 - 2 x.c: the row's own |x|^2 does not change its ranking, so it is left out.
        partial = torch.addmm(cs.square().sum(dim=1), xs, cs.T, alpha=-2.0)  # (n, m)
        if k == 1:
            idx = partial.min(dim=1, keepdim=True).indices  # (n, 1); measured ~25% faster than argmin
        else:
            idx = partial.topk(k, dim=1, largest=False, sorted=True).indices  # (n, k)
        del partial
        sqdist = (xs[:, None, :] - cs[idx]).square().sum(dim=2)  # (n, k)
        if k > 1:
            sqdist, order = sqdist.sort(dim=1, stable=True)  # (n, k)
            idx = idx.gather(1, order)  # (n, k)
        return sqdist, idx

    def sqdist(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """See :meth:`vq_pipeline.engines.Engine.sqdist` (centred GEMM form, clamped at 0)."""
        shift = c.mean(dim=0)  # (dim,)
        xs = x - shift  # (n, dim)
        cs = c - shift  # (m, dim)
        d = torch.addmm(cs.square().sum(dim=1), xs, cs.T, alpha=-2.0)  # (n, m)
        return d.add_(xs.square().sum(dim=1, keepdim=True)).clamp_min_(0.0)

    def bytes_per_row(self, n_codes: int, dim: int, k: int) -> int:
        # partial (n_codes) + topk/argmin temporaries (k) + shifted row (dim) + gathered diffs (k * dim)
        return 4 * n_codes * 2 + 16 * k + 4 * dim * (2 + 2 * k)
