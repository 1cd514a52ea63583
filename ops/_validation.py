"""Boundary checks shared by the ops: shapes, dtypes and devices only, never data (no host sync).

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device or value),
naming the argument and giving the expected and the given value. The ops call these from both their fake
and their real implementation, so a bad call fails at trace time under ``torch.compile`` as well.
"""

from __future__ import annotations

import torch

from ._layout import max_compressed_rows, num_compressed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
# As many query heads as the largest models have (DeepSeek-V3: 128): a q with more whose transpose fits the ops'
# rules is taken for a [B, H, T, D] tensor (see layout_hint).
MAX_HEADS = 128


def layout_hint(q, k) -> str:
    """A sentence for shape errors when q and k read as head-major ``[B, H, T, D]`` fit the ops' rules (Hq a
    multiple of Hkv, Tq <= Tk, at most MAX_HEADS heads), else ''."""
    hq, hkv, num_queries, num_keys = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if 0 < hkv <= hq <= MAX_HEADS and hq % hkv == 0 and num_queries <= num_keys:
        return (f"; q {tuple(q.shape)} and k {tuple(k.shape)} look like [B, H, T, D], but fsa ops take "
                f"token-major [B, T, H, D]: pass q.transpose(1, 2) (and k, v likewise)")
    return ""


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def check_float(name: str, x: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "q") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if like is not None and x.dtype != like.dtype:
        raise TypeError(f"{name}.dtype must equal {like_name}.dtype={like.dtype}, got {x.dtype}")


def check_device(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if x.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like q, got {x.device}")


def check_positive(name: str, value, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_argument_types(tensors=(), optional_tensors=(), ints=(), optional_ints=(), scale=None) -> None:
    """Python-level types of the public functions' arguments (the dispatcher would raise RuntimeError).

    Each of tensors/optional_tensors/ints/optional_ints is a sequence of (name, value).
    """
    for name, value in tensors:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in optional_tensors:
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    for name, value in ints:
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    for name, value in optional_ints:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, torch.SymInt))):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def check_qkv(q, k, v, k_name: str = "k", v_name: str = "v") -> None:
    """q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] with Hq % Hkv == 0."""
    check_tensor("q", q, 4, "[B, Tq, Hq, D]")
    check_tensor(k_name, k, 4, "[B, Tk, Hkv, D]")
    check_tensor(v_name, v, 4, "[B, Tk, Hkv, Dv]")
    check_float("q", q)
    check_float(k_name, k, q)
    check_float(v_name, v, q)
    check_device(k_name, k, q)
    check_device(v_name, v, q)
    batch, _, hq, d = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: q has B={batch}, {k_name} has B={k.shape[0]}, {v_name} has B={v.shape[0]}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{k_name} and {v_name} must have the same length, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{k_name} and {v_name} must have the same Hkv, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != d:
        raise ValueError(f"{k_name} head dim must equal q's D={d}, got {k.shape[3]}")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"Hq={hq} (q.shape[2]) is not a multiple of Hkv={hkv} ({k_name}.shape[2]){layout_hint(q, k)}"
        )
    if hq > MAX_HEADS and layout_hint(q, k):
        raise ValueError(f"q has Hq={hq} heads (q.shape[2]), more than {MAX_HEADS}{layout_hint(q, k)}")
    for name, dim in (("q", d), (v_name, v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim must be in [1, {MAX_HEAD_DIM}], got {dim}")


def check_cu_seqlens_tensor(cu_seqlens, name: str = "cu_seqlens") -> None:
    """cu_seqlens is an int32 tensor [N+1], N >= 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, num_keys: int, cu_seqlens_k=None) -> None:
    """cu_seqlens int32 [N+1] with B == 1; as many keys as queries, unless ``cu_seqlens_k`` (int32 [N+1]) packs
    the keys on their own (each sequence's queries are the last of its keys).

    Their values (start at 0, non-decreasing, last = T) can only be checked by reading them; the CPU kernels
    do that (``SequenceLayout.segments``), the CUDA kernels make them safe to index with instead, so as not to
    synchronise.
    """
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k needs cu_seqlens, the offsets of the packed queries")
        return
    check_cu_seqlens_tensor(cu_seqlens)
    check_device("cu_seqlens", cu_seqlens, q)
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q must be packed with B=1, got B={q.shape[0]}")
    if cu_seqlens_k is not None:
        check_cu_seqlens_tensor(cu_seqlens_k, "cu_seqlens_k")
        check_device("cu_seqlens_k", cu_seqlens_k, q)
        if cu_seqlens_k.shape[0] != cu_seqlens.shape[0]:
            raise ValueError(f"cu_seqlens_k must have as many sequences as cu_seqlens: [N+1] = "
                             f"[{cu_seqlens.shape[0]}], got [{cu_seqlens_k.shape[0]}]")
    elif num_keys != q.shape[1]:
        raise ValueError(
            f"with cu_seqlens alone, keys and queries must be the same packed tokens: Tq={q.shape[1]}, "
            f"Tk={num_keys} (pass cu_seqlens_k for packed keys of their own)"
        )


def check_seqlens_k(seqlens_k, q: torch.Tensor, cu_seqlens) -> None:
    """seqlens_k int32 [B]: the filled keys of each row of a batch of caches (batched, not packed).

    Values (in [Tq, Tk]) are read on the CPU path only; the CUDA paths clamp them into that range."""
    if seqlens_k is None:
        return
    if not isinstance(seqlens_k, torch.Tensor):
        raise TypeError(f"seqlens_k must be a torch.Tensor or None, got {type(seqlens_k).__name__}")
    if seqlens_k.dtype != torch.int32:
        raise TypeError(f"seqlens_k must be int32, got {seqlens_k.dtype}")
    check_device("seqlens_k", seqlens_k, q)
    if tuple(seqlens_k.shape) != (q.shape[0],):
        raise ValueError(f"seqlens_k must have shape [B] = [{q.shape[0]}], got {tuple(seqlens_k.shape)}")
    if cu_seqlens is not None:
        raise ValueError("seqlens_k is for a batch of caches [B, Tk, ...]; packed sequences take cu_seqlens_k")


def check_seqlen_k(seqlen_k, num_queries: int, cu_seqlens, cu_seqlens_k=None, seqlens_k=None) -> int:
    """Number of uncompressed keys: ``seqlen_k`` or, when None, the number of queries. With cu_seqlens_k it is the
    packed keys' total, with seqlens_k the length of the key buffers, and must be given."""
    if seqlen_k is None:
        if cu_seqlens_k is not None:
            raise ValueError("with cu_seqlens_k, seqlen_k must be the number of packed keys, got None")
        if seqlens_k is not None:
            raise ValueError("with seqlens_k, seqlen_k must be the length Tk of the key buffers, got None")
        return num_queries
    if cu_seqlens is not None and cu_seqlens_k is None:
        raise ValueError("seqlen_k must be None with cu_seqlens alone (packed sequences have Tq == Tk); "
                         "pass cu_seqlens_k for packed keys of their own")
    check_positive("seqlen_k", seqlen_k, minimum=0)
    if seqlen_k < num_queries:
        raise ValueError(f"seqlen_k must be >= Tq={num_queries} (queries are the last Tq keys), got {seqlen_k}")
    return seqlen_k


def check_compression(kernel_size, kernel_stride) -> None:
    check_positive("kernel_size", kernel_size)
    check_positive("kernel_stride", kernel_stride)
    if kernel_stride > kernel_size:
        raise ValueError(
            f"kernel_stride must be <= kernel_size (windows may overlap but not leave gaps), "
            f"got kernel_stride={kernel_stride}, kernel_size={kernel_size}"
        )


def check_compressed_keys(name: str, k_cmp, q: torch.Tensor, num_keys, kernel_size, kernel_stride) -> None:
    """k_cmp holds at least Tc and at most ``max_compressed_rows`` rows; rows past Tc are never read."""
    rows = k_cmp.shape[1]
    most = max_compressed_rows(num_keys, kernel_stride)
    # The layer's row count first: under torch.export it is the same symbolic expression, known equal without a
    # guard, where the range check below would guard on T (Tc <= rows <=> Tk - kernel_size < rows * stride).
    if rows != most and (num_keys - kernel_size >= rows * kernel_stride or rows > most):
        expected = num_compressed(num_keys, kernel_size, kernel_stride)
        raise ValueError(
            f"{name} must have Tc = max(0, (Tk - kernel_size) // kernel_stride + 1) = {expected} rows, or up to "
            f"Tk // kernel_stride + 2 = {most} with zero rows after them "
            f"(Tk={num_keys}, kernel_size={kernel_size}, kernel_stride={kernel_stride}), got {rows}"
        )


def check_keys_cover_queries(q: torch.Tensor, k: torch.Tensor) -> None:
    """Tq <= Tk: queries are the last Tq of the Tk keys."""
    if k.shape[1] < q.shape[1]:
        raise ValueError(
            f"k must have at least as many tokens as q: Tq={q.shape[1]}, Tk={k.shape[1]}{layout_hint(q, k)}"
        )


def check_indices(indices, q: torch.Tensor, k: torch.Tensor) -> None:
    """indices int32 [B, Tq, Hkv, topk]."""
    check_tensor("indices", indices, 4, "[B, Tq, Hkv, topk]")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    check_device("indices", indices, q)
    expected = (q.shape[0], q.shape[1], k.shape[2])
    if tuple(indices.shape[:3]) != expected:
        raise ValueError(
            f"indices must have shape [B, Tq, Hkv, topk] = [{expected[0]}, {expected[1]}, {expected[2]}, topk], "
            f"got {tuple(indices.shape)}{layout_hint(q, k)}"
        )
