"""M-FAC: matrix-free inverse-Fisher-vector products (Frantar, Kurtic & Alistarh, NeurIPS 2021, arXiv:2107.03356).

The damped empirical Fisher of m gradients g_1..g_m (the rows of G, m x d) is

    F = damp * I + (1/m) * G^T G.

With the m x m matrix K = m * damp * I + G G^T, Woodbury gives

    F^-1 x = (x - G^T K^-1 G x) / damp,          [F^-1]_qq = (1 - G[:, q]^T K^-1 G[:, q]) / damp,

the same products as the paper's recursion (its v_k / d_k are the columns of a triangular factorization of K^-1),
at the cost of two products with the window (G x, then G^T c) and m x m algebra.

Precision. For a gradient inside the window the two terms of F^-1 g nearly cancel (their ratio is about
(|g|^2 / m) / damp, 1e6 and more in practice), so float32 arithmetic loses everything. Here the m x m algebra is
done in float64, and:

- ``SlidingInverseFisher.update_ihvp(g)`` (the preconditioner's path) uses the cancellation-free form for the
  gradient just pushed as row k: F^-1 g_k = m * G^T K^-1 e_k, one product with the window, no subtraction;
- ``ihvp(x)`` for any x forms G x and x - G^T c with float64 accumulation (through a reused cache-sized float64
  chunk) and K^-1 of the exact float64 Gram: a float32 ``SlidingInverseFisher`` keeps K from float32 products for
  its updates, so ``ihvp`` computes the float64 Gram once per window state (O(m^2 d)) and caches it; x inside the
  window's span is then as accurate as any other x.

Block-diagonal mode (``block_size=B``): the coordinates are split into consecutive blocks of B (the last one padded
with zeros) and each block gets its own m x m system, as in the reference's blocked pruner; memory m x d for the
window plus 2 * (d / B) * m^2 float64 values for the systems.

Memory of a window: m x d values of its dtype (float32 by default; float64 once it is ``exact``, when that fits),
plus O(m^2) float64 values (O(d m^2 / B) with blocks); a window that does not fit the device's free memory is
refused before it is allocated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_lightning.core.errors import ConfigError, ConfigTypeError, check_int

CHUNK = 1 << 18  # float64 values per chunk of a window product (2 MiB: the float32 -> float64 copy stays in cache)


def check_damp(damp: float) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ConfigError(f"`damp` must be a finite number > 0, got {damp!r}.")
    return float(damp)


def _layout(dim: int, block_size: int | None, num_grads: int) -> tuple[int, int]:
    """(number of blocks, block length) for ``dim`` coordinates; one block when ``block_size`` is None."""
    if block_size is None or block_size >= dim:
        return 1, dim
    if block_size < num_grads:
        raise ConfigError(
            f"`block_size` {block_size} is smaller than the {num_grads} gradients: each block would hold an "
            f"{num_grads} x {num_grads} system of rank at most {block_size}. Use `block_size` >= `num_grads`."
        )
    return math.ceil(dim / block_size), block_size


def _split(x: Tensor, blocks: int, length: int) -> Tensor:
    """A d-vector as (blocks, length), zero-padded at the end."""
    pad = blocks * length - x.numel()
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(blocks, length)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA allocator's view, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def window_bytes(num_grads: int, dim: int, block_size: int | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Memory of a sliding window: m x d values of ``dtype`` and two m x m float64 matrices per block."""
    blocks, length = (math.ceil(dim / block_size), block_size) if block_size and block_size < dim else (1, dim)
    return num_grads * blocks * length * dtype.itemsize + 2 * blocks * num_grads**2 * 8


def check_fits(num_grads: int, dim: int, block_size: int | None, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a window of ``num_grads`` x ``dim`` values that would not fit the free memory of ``device``."""
    need = window_bytes(num_grads, dim, block_size, dtype)
    free = free_memory(device)
    if need > 0.9 * free:
        raise ConfigError(
            f"An M-FAC window of {num_grads} gradients x {dim:,} coordinates ({dtype}) needs {need / 2**30:.2f} GiB, "
            f"but {device} has {free / 2**30:.2f} GiB free: lower `num_grads` or select fewer parameters."
        )


def _column_slices(window: Tensor) -> list[slice]:
    """Slices of a (blocks, m, length) window's columns holding about ``CHUNK`` values each."""
    blocks, m, length = window.shape
    step = max(1, CHUNK // max(1, blocks * m))
    return [slice(a, a + step) for a in range(0, length, step)]


def _chunks64(window: Tensor):
    """(columns, float64 copy of those columns) for consecutive chunks of a (blocks, m, length) window.

    One scratch buffer of ``CHUNK`` values (2 MiB) is reused for every chunk, so the copy stays in cache and no
    memory is allocated per chunk (allocating each chunk anew cost five times the product itself)."""
    if window.dtype == torch.float64:
        yield slice(None), window
        return
    slices = _column_slices(window)
    blocks, m, _ = window.shape
    width = slices[0].stop - slices[0].start if slices else 0
    scratch = torch.empty(blocks, m, width, dtype=torch.float64, device=window.device)
    for cols in slices:
        piece = window[:, :, cols]
        chunk = scratch[:, :, : piece.shape[2]]
        chunk.copy_(piece)
        yield cols, chunk


def _window_matvec64(window: Tensor, xb: Tensor) -> Tensor:
    """G x per block, accumulated in float64: (blocks, m)."""
    out = torch.zeros(window.shape[:2], dtype=torch.float64, device=window.device)
    x64 = xb.double()
    for cols, chunk in _chunks64(window):
        out += torch.bmm(chunk, x64[:, cols].unsqueeze(-1)).squeeze(-1)
    return out


def _window_rmatvec64(window: Tensor, coef: Tensor) -> Tensor:
    """G^T c per block, accumulated in float64: (blocks, length)."""
    blocks, _, length = window.shape
    out = torch.empty(blocks, length, dtype=torch.float64, device=window.device)
    for cols, chunk in _chunks64(window):
        out[:, cols] = torch.bmm(coef.unsqueeze(1), chunk).squeeze(1)
    return out


def _damped_gram64(window: Tensor, damp: float) -> Tensor:
    """K = m * damp * I + G G^T per block, float64: (blocks, m, m)."""
    m = window.shape[1]
    return _gram64(window) + m * damp * torch.eye(m, dtype=torch.float64, device=window.device)


def _gram64(window: Tensor) -> Tensor:
    """G G^T per block with float64 accumulation: (blocks, m, m)."""
    blocks, m, _ = window.shape
    out = torch.zeros(blocks, m, m, dtype=torch.float64, device=window.device)
    for _, chunk in _chunks64(window):
        out += chunk @ chunk.transpose(1, 2)
    return out


class StaticInverseFisher:
    """F^-1 for a fixed set of gradients: ``StaticInverseFisher(grads, damp).ihvp(x)`` and ``.diag()``.

    Args:
        grads: the m x d gradient matrix G (float32 or float64, any device); kept as a view, not copied (unless
            d is not a multiple of ``block_size``: then a zero-padded copy).
        damp: the dampening lambda of F = lambda * I + (1/m) G^T G (the paper's default 1e-5).
        block_size: if set, F is block-diagonal over consecutive blocks of this many coordinates.

    Blocks at least as long as the window: built in O(m^2 d) with float64 accumulation (a Cholesky factor of the
    m x m K per block, Woodbury); ``ihvp`` costs two products with G, ``diag`` O(m^2 d). Blocks shorter than the
    window (oBERT's blocks of 50 with 1024 gradients, Kurtic et al. 2022): each block's b x b F is formed and
    inverted explicitly (float64, O(m b d) to build, d b values held), as oBERT does.
    """

    def __init__(self, grads: Tensor, damp: float = 1e-5, block_size: int | None = None) -> None:
        if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.numel() == 0:
            raise ConfigError(f"`grads` must be a non-empty m x d tensor, got {getattr(grads, 'shape', grads)!r}.")
        if not grads.is_floating_point():
            raise ConfigTypeError(f"`grads` must be floating point, got {grads.dtype}.")
        if not torch.isfinite(grads).all():
            raise ConfigError("`grads` holds NaN or infinite values.")
        self.damp = check_damp(damp)
        check_int("block_size", block_size, 1, allow_none=True)
        self.num_grads, self.dim = grads.shape
        self.explicit = block_size is not None and block_size < min(self.num_grads, self.dim)
        if self.explicit:
            self.blocks, self.length = math.ceil(self.dim / block_size), block_size  # type: ignore[operator]
        else:
            self.blocks, self.length = _layout(self.dim, block_size, self.num_grads)
        pad = self.blocks * self.length - self.dim
        padded = torch.nn.functional.pad(grads, (0, pad)) if pad else grads
        self.window = padded.view(self.num_grads, self.blocks, self.length).transpose(0, 1)
        if self.explicit:
            eye = torch.eye(self.length, dtype=torch.float64, device=grads.device)
            fisher = torch.zeros(self.blocks, self.length, self.length, dtype=torch.float64, device=grads.device)
            for rows in range(0, self.num_grads, 256):
                chunk = self.window[:, rows : rows + 256].double()
                fisher += chunk.transpose(1, 2) @ chunk
            self.factor = torch.linalg.cholesky(fisher / self.num_grads + self.damp * eye)
        else:
            self.factor = torch.linalg.cholesky(_damped_gram64(self.window, self.damp))

    def ihvp(self, x: Tensor) -> Tensor:
        """F^-1 x for a d-vector, in x's dtype."""
        xb = _split(x.reshape(-1), self.blocks, self.length)
        if self.explicit:
            out = torch.cholesky_solve(xb.double().unsqueeze(-1), self.factor).squeeze(-1)
            return out.reshape(-1)[: self.dim].to(x.dtype)
        coef = torch.cholesky_solve(_window_matvec64(self.window, xb).unsqueeze(-1), self.factor).squeeze(-1)
        out = (xb.double() - _window_rmatvec64(self.window, coef)) / self.damp
        return out.reshape(-1)[: self.dim].to(x.dtype)

    def diag(self) -> Tensor:
        """The diagonal of F^-1 (a d-vector, float64)."""
        if self.explicit:
            return torch.cholesky_inverse(self.factor).diagonal(dim1=1, dim2=2).reshape(-1)[: self.dim]
        out = torch.empty(self.blocks, self.length, dtype=torch.float64, device=self.window.device)
        for cols in _column_slices(self.window):
            w = torch.linalg.solve_triangular(self.factor, self.window[:, :, cols].double(), upper=False)
            out[:, cols] = (1.0 - w.square().sum(1)) / self.damp
        return out.reshape(-1)[: self.dim]


class SlidingInverseFisher:
    """F^-1 over a sliding window of the last ``num_grads`` gradients (the M-FAC optimizer's dynamic algorithm).

    ``update(g)`` replaces the oldest gradient (zeros until ``num_grads`` have arrived, as in the reference);
    ``update_ihvp(g)`` does that and returns F^-1 g; ``ihvp(x)`` multiplies any vector.

    Per update: the two window products (G g for K's new row, G^T y for the result) and O(m^2) float64 work — K^-1
    is kept and changed by a rank-two downdate/update when row k is replaced (refreshed from a Cholesky factor of
    K every ``num_grads`` updates, so rounding cannot drift), never refactored per step. A float32 window computes
    K's new row with float32 products while each new gradient keeps at least 1e-3 of its norm outside the span of
    the others; the first time one does not (more gradients than coordinates, nearly collinear gradients), it
    switches to float64-accumulated products for good (``exact``), since float32 would leave K^-1 wrong.

    Args:
        dim: d, the number of coordinates.
        num_grads: m, the window length (the paper uses 1024).
        damp: lambda (the paper's default 1e-5).
        device, dtype: of the window (float32 by default; the m x m algebra is float64 regardless).
        block_size: block-diagonal F over blocks of this many coordinates.

    Memory: ``num_grads * dim`` values of ``dtype`` plus 2 * blocks * m^2 float64; refused with a ``ValueError``
    when that does not fit the device's free memory.
    """

    def __init__(
        self,
        dim: int,
        num_grads: int,
        damp: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        block_size: int | None = None,
    ) -> None:
        self.dim = check_int("dim", dim, 1)
        self.num_grads = check_int("num_grads", num_grads, 1)
        self.damp = check_damp(damp)
        check_int("block_size", block_size, 1, allow_none=True)
        self.dtype = dtype or torch.float32
        if not self.dtype.is_floating_point:
            raise ConfigTypeError(f"`dtype` must be a floating-point dtype, got {self.dtype}.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.blocks, self.length = _layout(self.dim, block_size, self.num_grads)
        check_fits(self.num_grads, self.dim, block_size, self.dtype, self.device)
        m = self.num_grads
        self.window = torch.zeros(self.blocks, m, self.length, dtype=self.dtype, device=self.device)
        eye = torch.eye(m, dtype=torch.float64, device=self.device).expand(self.blocks, m, m)
        self.gram = (m * self.damp) * eye.clone()
        self.inverse = eye / (m * self.damp)
        self.position = 0
        self.updates = 0
        self.exact = self.dtype == torch.float64
        self._exact_cache: tuple[int, Tensor] | None = None

    def update(self, g: Tensor) -> None:
        """Replace the oldest gradient of the window with ``g``."""
        self._push(g)

    def update_ihvp(self, g: Tensor) -> Tensor:
        """Push ``g`` into the window, then return F^-1 g (cancellation-free: m * G^T K^-1 e_k)."""
        k = self._push(g)
        coef = self.num_grads * self._unit_solve(k)
        if self.exact:
            out = _window_rmatvec64(self.window, coef)
        else:
            out = torch.bmm(coef.to(self.dtype).unsqueeze(1), self.window).squeeze(1)
        return out.reshape(-1)[: self.dim].to(g.dtype)

    def ihvp(self, x: Tensor) -> Tensor:
        """F^-1 x for any d-vector, to float64 accuracy whatever x is (see the module docstring on precision).

        Two float64-accumulated products with the window, and K^-1 of the exact float64 Gram of the window: kept
        up to date in ``exact`` mode; otherwise (a float32 window, whose K comes from float32 products) computed
        from the window once, O(m^2 d), and cached until the next update.
        """
        xb = _split(x.reshape(-1).to(self.device), self.blocks, self.length)
        rhs = _window_matvec64(self.window, xb)
        coef = _bmv(self._exact_inverse(), rhs)
        out = (xb.double() - _window_rmatvec64(self.window, coef)) / self.damp
        return out.reshape(-1)[: self.dim].to(x.dtype)

    def _exact_inverse(self) -> Tensor:
        if self.exact:
            return self.inverse
        if self._exact_cache is None or self._exact_cache[0] != self.updates:
            gram = _damped_gram64(self.window, self.damp)
            self._exact_cache = (self.updates, _spd_inverse(gram, self.num_grads * self.damp))
        return self._exact_cache[1]

    def _push(self, g: Tensor) -> int:
        if g.numel() != self.dim:
            raise ConfigError(f"A gradient of {g.numel()} values does not match the window's dim {self.dim}.")
        k, m = self.position, self.num_grads
        gb = _split(g.reshape(-1).to(device=self.device, dtype=self.dtype), self.blocks, self.length)
        self.window[:, k] = gb
        if self.exact:
            column = _window_matvec64(self.window, gb)
        else:
            column = torch.bmm(self.window, gb.unsqueeze(-1)).squeeze(-1).double()
        column[:, k] += m * self.damp
        self.gram[:, k, :] = column
        self.gram[:, :, k] = column
        self.updates += 1
        inverse, schur = _replace_row(self.inverse, column, k)
        if not self.exact and bool((schur < 1e-3 * column[:, k]).any()):
            self._become_exact()
        elif self.updates % m == 0:
            self._refresh_inverse()
        else:
            self.inverse = inverse
        self.position = (k + 1) % m
        return k

    def _unit_solve(self, k: int) -> Tensor:
        """y = K^-1 e_k per block, from the kept K^-1 with two steps of iterative refinement against K.

        Accepted when the result's residual in F, F r - g_k = G^T (K y - e_k) with r = m G^T y, is below 1e-12 of
        |g_k| (its norm is computed in m-space: |G^T rho|^2 = rho^T (K - m damp I) rho); otherwise K^-1 has drifted
        (an ill-conditioned K) and is refreshed from a Cholesky factor first.
        """
        unit = torch.zeros(self.blocks, self.num_grads, dtype=torch.float64, device=self.device)
        unit[:, k] = 1.0
        shift = self.num_grads * self.damp
        for attempt in range(2):
            y = self.inverse[:, :, k].clone()
            for _ in range(2):
                y -= _bmv(self.inverse, _bmv(self.gram, y) - unit)
            rho = _bmv(self.gram, y) - unit
            error = (rho * _bmv(self.gram, rho)).sum(1) - shift * rho.square().sum(1)
            if attempt or bool((error <= 1e-24 * (self.gram[:, k, k] - shift).clamp_min(0)).all()):
                return y
            self._refresh_inverse()
        return y

    def _refresh_inverse(self) -> None:
        """K^-1 anew from K (O(m^3)); a float32-built K that is no longer positive definite makes the window exact
        (once); an exact one is inverted through its eigenvalues, which are at least m * damp."""
        if self.exact:
            self.inverse = _spd_inverse(self.gram, self.num_grads * self.damp)
            return
        factor, info = torch.linalg.cholesky_ex(self.gram)
        if bool(info.any()):
            self._become_exact()
        else:
            self.inverse = torch.cholesky_inverse(factor)

    def _become_exact(self) -> None:
        """Switch to float64-accumulated window products, rebuilding K and K^-1 from the window (once).

        Taken when a new gradient is (numerically) almost inside the span of the window: its Schur complement in K
        falls below 1e-3 of its squared norm, so float32 products would leave K^-1 with no correct digit (a window
        longer than the number of coordinates, repeated or nearly collinear gradients). The window is then stored
        in float64 when that copy takes at most half the device's free memory, so an update costs about two float32
        products (one float64 pass reads twice the bytes); otherwise it stays float32 and each product converts it
        in cache-sized chunks (about four float32 products an update on one CPU thread).
        """
        self.exact = True
        if self.window.dtype != torch.float64 and 2 * self.window.numel() * 8 <= free_memory(self.device):
            self.window = self.window.double()
        self.gram = _damped_gram64(self.window, self.damp)
        self.inverse = _spd_inverse(self.gram, self.num_grads * self.damp)

    def state_dict(self) -> dict:
        """Tensors and ints only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "window": self.window,
            "gram": self.gram,
            "inverse": self.inverse,
            "position": self.position,
            "updates": self.updates,
            "exact": self.exact,
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["window"].shape) != tuple(self.window.shape):
            raise ConfigError(
                f"The saved M-FAC window has shape {tuple(state['window'].shape)}, this one "
                f"{tuple(self.window.shape)}: use the same `num_grads`, `block_size` and parameters."
            )
        if state["window"].dtype != self.window.dtype:  # a window saved after it became exact (float64)
            self.window = self.window.to(state["window"].dtype)
        self.window.copy_(state["window"])
        self._exact_cache = None
        self.gram = state["gram"].to(self.device, torch.float64).clone()
        self.inverse = state["inverse"].to(self.device, torch.float64).clone()
        self.position, self.updates, self.exact = int(state["position"]), int(state["updates"]), bool(state["exact"])

    def clear_coordinates(self, coordinates: Tensor) -> None:
        """Remove coordinates (a bool d-vector) from the window: their columns become 0 and K^-1 is refreshed.

        Used when weights are pruned (sparse M-FAC): F then splits into the kept coordinates and damp * I, so
        products over the kept coordinates are those of the Fisher restricted to them.
        """
        cols = _split(coordinates.reshape(-1).to(self.device), self.blocks, self.length)
        if not cols.any():
            return
        removed = self.window * cols.unsqueeze(1)
        self.gram -= _gram64(removed)
        self.window.masked_fill_(cols.unsqueeze(1), 0)
        self._refresh_inverse()


def _spd_inverse(gram: Tensor, floor: float) -> Tensor:
    """The inverse of a batch of symmetric matrices whose eigenvalues are at least ``floor`` in exact arithmetic:
    Cholesky when it succeeds, otherwise through eigenvalues clamped at ``floor`` (a K = m damp I + G G^T that
    rounding left slightly indefinite)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if not bool(info.any()):
        return torch.cholesky_inverse(factor)
    values, vectors = torch.linalg.eigh(gram)
    return (vectors / values.clamp_min(floor).unsqueeze(-2)) @ vectors.transpose(-1, -2)


def _replace_row(inverse: Tensor, column: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """K^-1 after row and column k of K are replaced by ``column`` (per block), in O(m^2), and the Schur
    complement s of the new entry (s >= m * damp in exact arithmetic).

    Downdate: P = K^-1 - w w^T / w_k (w = K^-1 e_k) is the inverse of K without index k (zero at k). Update with
    the new column a: b = P a, s = a_k - a^T b (a_k the diagonal entry, b_k = 0), v = b - e_k; K'^-1 = P + v v^T / s.
    """
    w = inverse[:, :, k]
    p = inverse - w.unsqueeze(2) * w.unsqueeze(1) / w[:, k, None, None]
    b = torch.bmm(p, column.unsqueeze(-1)).squeeze(-1)
    s = column[:, k] - (column * b).sum(1)
    b[:, k] = -1.0
    return p + b.unsqueeze(2) * b.unsqueeze(1) / s[:, None, None], s


def _bmv(matrices: Tensor, vectors: Tensor) -> Tensor:
    return torch.bmm(matrices, vectors.unsqueeze(-1)).squeeze(-1)


def obs_saliency(weights: Tensor, inverse_diag: Tensor) -> Tensor:
    """OBS saliency w_q^2 / (2 [F^-1]_qq): the predicted loss increase of removing w_q alone (Hassibi & Stork)."""
    return weights.double().square() / (2.0 * inverse_diag.double())


def obs_update(
    fisher: StaticInverseFisher | SlidingInverseFisher, weights: Tensor, pruned: Tensor, inverse_diag: Tensor
) -> Tensor:
    """The weight change dw = -F^-1 sum_q (w_q / [F^-1]_qq) e_q over the ``pruned`` coordinates (WoodFisher / M-FAC).

    For one pruned weight (or one per block of a block-diagonal F) this is the exact OBS update: it sets w_q to 0
    and changes the quadratic model of the loss by the saliency. For several, the per-weight updates are summed as
    in the reference; the caller then sets the pruned weights to exactly 0.
    """
    x = torch.zeros_like(weights, dtype=torch.float64)
    x[pruned] = weights.double()[pruned] / inverse_diag.double()[pruned]
    return -fisher.ihvp(x)


def flat_gradient(params: Sequence[Tensor]) -> Tensor:
    """The gradients of ``params`` as one float32 vector (zeros where a gradient is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def split_flat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive pieces of ``flat`` shaped as the tensors of ``like`` (views, no copy)."""
    pieces = flat.split([t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like, strict=True)]


class MFAC(torch.optim.Optimizer):
    """The M-FAC optimizer (Frantar et al. 2021) with the reference's update rule, for plain PyTorch loops.

    Each step pushes g = grad + ``weight_decay`` * w (all parameters, flattened) into a
    :class:`SlidingInverseFisher` and moves w -= lr * v with v = ``momentum`` * v + (1 - ``momentum``) * F^-1 g (the
    reference's averaging momentum; v = F^-1 g when ``momentum`` is 0). Defaults are the reference's: lr 1e-3, no
    momentum or weight decay, 1024 gradients, damp 1e-5. Unlike the reference, a ``closure`` is accepted (Lightning
    passes one), the window and momentum are in ``state_dict``, and a step whose gradient is not finite is skipped
    with the window left untouched (``skipped_steps`` counts them). Inside Lightning, prefer
    :class:`~sparse_lightning.callbacks.mfac.MFACPreconditioner` with any optimizer: it also excludes masked weights.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_grads: int = 1024,
        damp: float = 1e-5,
        block_size: int | None = None,
    ) -> None:
        for name, value, high in (
            ("lr", lr, math.inf),
            ("momentum", momentum, 1.0),
            ("weight_decay", weight_decay, math.inf),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < high:
                raise ConfigError(f"`{name}` must be a number in [0, {high}), got {value!r}.")
        super().__init__(params, {"lr": float(lr)})
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        first = self.param_groups[0]["params"][0]
        dim = sum(p.numel() for group in self.param_groups for p in group["params"])
        self.fisher = SlidingInverseFisher(dim, num_grads, damp, first.device, block_size=block_size)
        self.velocity = torch.zeros(dim, device=first.device)
        self.skipped_steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        g = flat_gradient(params)
        if self.weight_decay:
            g += self.weight_decay * torch.cat([p.detach().reshape(-1).float() for p in params])
        if not torch.isfinite(g).all():
            self.skipped_steps += 1
            return loss
        direction = self.fisher.update_ihvp(g)
        if self.momentum:
            self.velocity.mul_(self.momentum).add_(direction, alpha=1.0 - self.momentum)
            direction = self.velocity
        lrs = [group["lr"] for group in self.param_groups for _ in group["params"]]
        for p, piece, lr in zip(params, split_flat(direction, params), lrs, strict=True):
            p.add_(piece.to(p.dtype), alpha=-lr)
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mfac"] = {**self.fisher.state_dict(), "velocity": self.velocity, "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac")
        super().load_state_dict(state_dict)
        self.fisher.load_state_dict(extra)
        self.velocity.copy_(extra["velocity"])
        self.skipped_steps = int(extra["skipped_steps"])
