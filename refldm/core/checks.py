"""The ops' argument checks: one small checker per op, named after it, shared by the reference
(`refldm.core.ops`) and the dispatcher (`refldm.core.functional`), so the same bad call gets the same
message whichever of them runs.

Each checker raises one ``ValueError`` naming the op and the shapes (or dtypes) it got, e.g.
``conv2d: x (1, 3, 8, 8) has 3 channels but weight (4, 2, 3, 3) expects 2``, and returns what the op
needs in normalised form (conv2d's stride and padding as plain ints, attention's mask as an additive
float mask), or None.

May import: refldm.backend (part of refldm.core; see its __init__).
"""

from __future__ import annotations

from refldm.backend import array_namespace

__all__ = ["fail", "floating", "conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu",
           "softmax", "scaled_dot_product_attention", "split_heads", "merge_heads", "upsample_nearest2x",
           "embedding", "timestep_embedding"]


def fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def floating(op: str, *arrays):
    """The arrays (None skipped) share one floating-point dtype."""
    dtypes = {a.dtype for a in arrays if a is not None}
    if len(dtypes) > 1:
        fail(op, f"dtypes differ: {', '.join(sorted(str(d) for d in dtypes))} (shapes "
                 f"{', '.join(str(tuple(a.shape)) for a in arrays if a is not None)})")
    for d in dtypes:
        if d.kind != "f":
            fail(op, f"expected floating-point arrays, got {d} (shapes "
                     f"{', '.join(str(tuple(a.shape)) for a in arrays if a is not None)})")


def _pair(v, op, what):
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    fail(op, f"{what} must be an int or a pair of ints, got {v!r}")


def _padding(padding, op):
    """int | (ph, pw) | ((top, bottom), (left, right)) -> (top, bottom, left, right)."""
    if isinstance(padding, int):
        return (padding,) * 4
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        if all(isinstance(p, int) for p in padding):
            return padding[0], padding[0], padding[1], padding[1]
        if all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(i, int) for i in p)
               for p in padding):
            (t, b), (l, r) = padding
            return int(t), int(b), int(l), int(r)
    fail(op, f"padding must be an int, (ph, pw) or ((top, bottom), (left, right)), got {padding!r}")


def conv2d(x, weight, bias, stride, padding):
    """conv2d's checks; returns (s_h, s_w, top, bottom, left, right)."""
    op = "conv2d"
    if x.ndim != 4 or weight.ndim != 4:
        fail(op, f"expected x (N, C, H, W) and weight (C_out, C_in, kH, kW), got x {tuple(x.shape)}, "
                 f"weight {tuple(weight.shape)}")
    n, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c != c_in:
        fail(op, f"x {tuple(x.shape)} has {c} channels but weight {tuple(weight.shape)} expects {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        fail(op, f"bias shape {tuple(bias.shape)} != ({c_out},) for weight {tuple(weight.shape)}")
    floating(op, x, weight, bias)
    sh, sw = _pair(stride, op, "stride")
    if sh < 1 or sw < 1:
        fail(op, f"stride must be >= 1, got {stride!r}")
    top, bottom, left, right = _padding(padding, op)
    if min(top, bottom, left, right) < 0:
        fail(op, f"padding must be >= 0, got {padding!r}")
    hp, wp = h + top + bottom, w + left + right
    if hp < kh or wp < kw:
        fail(op, f"padded input {hp}x{wp} (x {tuple(x.shape)}, padding {padding!r}) is smaller than "
                 f"the {kh}x{kw} kernel")
    return sh, sw, top, bottom, left, right


def group_norm(x, num_groups, weight, bias):
    op = "group_norm"
    if x.ndim < 2:
        fail(op, f"expected x (N, C, ...), got {tuple(x.shape)}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        fail(op, f"x {tuple(x.shape)}: {c} channels cannot be split into {num_groups!r} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            fail(op, f"{name} shape {tuple(p.shape)} != ({c},) for x {tuple(x.shape)}")
    floating(op, x, weight, bias)


def layer_norm(x, weight, bias):
    op = "layer_norm"
    if x.ndim < 1:
        fail(op, "expected at least a 1-d array, got a 0-d array")
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            fail(op, f"{name} shape {tuple(p.shape)} != ({d},) for x {tuple(x.shape)}")
    floating(op, x, weight, bias)


def linear(x, weight, bias):
    op = "linear"
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        fail(op, f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (expected x (..., "
                 f"{weight.shape[1] if weight.ndim == 2 else '?'}) and weight (D_out, D_in))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        fail(op, f"bias shape {tuple(bias.shape)} != ({weight.shape[0]},) for weight {tuple(weight.shape)}")
    floating(op, x, weight, bias)


def silu(x):
    floating("silu", x)


def quick_gelu(x):
    floating("quick_gelu", x)


def _approximate(op, approximate):
    if approximate not in ("none", "tanh"):
        fail(op, f"approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu(x, approximate):
    _approximate("gelu", approximate)
    floating("gelu", x)


def geglu(x, weight, approximate):
    """geglu's own checks (its projection x W^T + b is checked by `linear`)."""
    op = "geglu"
    if weight.ndim != 2 or weight.shape[0] % 2:
        fail(op, f"weight must be (2 * D_out, D_in), got {tuple(weight.shape)} (x {tuple(x.shape)})")
    _approximate(op, approximate)


def softmax(x, axis):
    op = "softmax"
    floating(op, x)
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        fail(op, f"axis {axis!r} is out of range for x {tuple(x.shape)}")


def scaled_dot_product_attention(q, k, v, mask):
    """Attention's checks; returns the mask as an additive float mask broadcast (a view) to
    (..., Lq, Lk), or None. A boolean mask (True = keep) becomes 0 / -inf."""
    op = "scaled_dot_product_attention"
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        fail(op, f"q, k, v must have the same rank >= 2, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                 f"v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[:-2] != k.shape[:-2] \
            or k.shape[:-2] != v.shape[:-2]:
        fail(op, f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                 "(expected (..., Lq, d), (..., Lk, d), (..., Lk, d_v))")
    if mask is not None and mask.dtype.kind == "b":
        xp = array_namespace(q, mask)
        mask = xp.where(mask, xp.asarray(0, dtype=q.dtype), xp.asarray(-xp.inf, dtype=q.dtype))
    floating(op, q, k, v, mask)
    xp = array_namespace(q, k, v, mask)
    lead, lq, lk = q.shape[:-2], q.shape[-2], k.shape[-2]
    if mask is not None:
        try:
            mask = xp.broadcast_to(mask, lead + (lq, lk))  # a view: nothing is copied
        except ValueError:
            fail(op, f"mask {tuple(mask.shape)} does not broadcast to {lead + (lq, lk)} (q {tuple(q.shape)}, "
                     f"k {tuple(k.shape)})")
    return mask


def split_heads(x, heads):
    if x.ndim != 3:
        fail("split_heads", f"expected x (B, L, H*d), got {tuple(x.shape)}")
    hd = x.shape[2]
    if not isinstance(heads, int) or heads < 1 or hd % heads:
        fail("split_heads", f"x {tuple(x.shape)}: {hd} features cannot be split into {heads!r} heads")


def merge_heads(x):
    if x.ndim != 4:
        fail("merge_heads", f"expected x (B, H, L, d), got {tuple(x.shape)}")


def upsample_nearest2x(x):
    if x.ndim != 4:
        fail("upsample_nearest2x", f"expected x (N, C, H, W), got {tuple(x.shape)}")


def embedding(ids, table):
    op = "embedding"
    if table.ndim != 2:
        fail(op, f"table must be (V, D), got {tuple(table.shape)}")
    if ids.dtype.kind not in "iu":
        fail(op, f"ids must be integers, got {ids.dtype} (ids {tuple(ids.shape)})")
    xp = array_namespace(ids, table)
    if ids.size and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= table.shape[0]):
        fail(op, f"ids must lie in [0, {table.shape[0]}) for table {tuple(table.shape)}, got range "
                 f"[{int(xp.min(ids))}, {int(xp.max(ids))}]")


def timestep_embedding(t, dim, downscale_freq_shift):
    """timestep_embedding's checks, on the timesteps already made at least 1-d."""
    op = "timestep_embedding"
    if t.ndim != 1:
        fail(op, f"timesteps must be a scalar or 1-d, got shape {tuple(t.shape)}")
    if not isinstance(dim, int) or dim < 2:
        fail(op, f"dim must be an int >= 2, got {dim!r}")
    if dim // 2 - downscale_freq_shift == 0:
        fail(op, f"half - downscale_freq_shift is zero (dim={dim}, shift={downscale_freq_shift})")
