"""``refldm encode``, ``refldm decode`` and ``refldm sizes``: the VAE from the command line.

    refldm encode photo.png -m path/to/vae -o latent.npy     # writes scaling_factor * mean (U-Net scale)
    refldm decode latent.npy -m path/to/vae -o out.png       # divides by scaling_factor, then decodes
    refldm sizes 512 512                                     # the compression, worked out
"""

from __future__ import annotations

import os

import numpy as np

from refldm.cli.resources import available_memory

SCALING = ("Latents on disk are in the U-Net's scale: encode writes (mean - shift_factor) * scaling_factor "
           "(0.18215 for SD 1.x/2.x, 0.13025 for SDXL, from the VAE's config.json) and decode divides by it "
           "before decoding, as diffusers' pipelines do; --unscaled writes/reads the raw VAE latent instead.")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode", help="encode an image into a VAE latent (.npy)",
        description="Encode an image (height and width divisible by 8) into a latent (N, 4, H/8, W/8) "
                    "saved as .npy. " + SCALING)
    p.add_argument("image", help="input image file (PNG, JPEG, ...); converted to RGB")
    p.add_argument("-m", "--model", default=None, help="VAE folder (config.json + diffusion_pytorch_model."
                   "safetensors) or a pipeline folder with a vae/ subfolder (default: the built-in model's VAE)")
    p.add_argument("-o", "--output", required=True, help="output .npy file")
    p.add_argument("--sample", action="store_true", help="draw z = mean + std * noise instead of the mean")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise for --sample (torch-compatible)")
    p.add_argument("--unscaled", action="store_true", help="write the raw VAE latent (no scaling_factor)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.set_defaults(func=_encode)

    p = subparsers.add_parser(
        "decode", help="decode a VAE latent (.npy) into an image",
        description="Decode a latent (N, 4, h, w) or (4, h, w) .npy file into an image of 8h x 8w pixels. "
                    + SCALING)
    p.add_argument("latent", help="input .npy file (float array; read without pickle)")
    p.add_argument("-m", "--model", default=None, help="VAE folder or pipeline folder with vae/ (default: the "
                   "built-in model's VAE)")
    p.add_argument("-o", "--output", required=True, help="output image (PNG, ...); a batch of N > 1 "
                   "latents writes NAME-0.png, NAME-1.png, ...")
    p.add_argument("--unscaled", action="store_true", help="the latent is a raw VAE latent (no scaling_factor)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.set_defaults(func=_decode)

    p = subparsers.add_parser(
        "sizes", help="how much the VAE compresses an image of a given size",
        description="Print the number of values in an H x W RGB image and in its latent (4 channels at "
                    "H/8 x W/8), the ratio, and the bytes in fp16.")
    p.add_argument("height", type=int)
    p.add_argument("width", type=int)
    p.add_argument("--channels", type=int, default=3, help="image channels (default 3, RGB)")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--factor", type=int, default=8, help="downscale factor per side (default 8)")
    p.set_defaults(func=_sizes)


def _encode(args) -> int:
    from refldm.core import images
    from refldm.backend import to_numpy
    from refldm.models.vae import AutoencoderKL

    output = images.check_output(args.output, (".npy",), "latent")  # before the work, not after
    if args.seed is not None and not 0 <= args.seed <= 2 ** 64 - 1:
        raise ValueError(f"--seed {args.seed} is outside 0..2**64-1")
    image = images.load_image(args.image)
    vae = AutoencoderKL.from_pretrained(_vae_folder(args.model), dtype=args.dtype)
    vae.latent_shape(1, image.height, image.width)  # clear error for a size not divisible by 8
    posterior = vae.encode(images.to_tensor(image, dtype=args.dtype))
    z = posterior.sample(generator=args.seed) if args.sample else posterior.mode()
    if not args.unscaled:
        z = images.scale_latents(z, vae.config)
    array = to_numpy(z)
    images.atomic_write(output, lambda f: np.save(f, array, allow_pickle=False))
    print(f"{output}: latent {tuple(z.shape)} from a {image.width}x{image.height} image"
          + ("" if args.unscaled else f" (scaled by {vae.config.scaling_factor})"))
    return 0


def read_latent(path, max_bytes: int | None = None):
    """A .npy latent, read without pickle; its header is checked before anything is allocated: a float
    dtype, a size the file really holds, at most `max_bytes` (default: the memory available)."""

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unknown .npy version {version}")
        except (ValueError, OSError, SyntaxError) as e:
            raise ValueError(f"{path}: not a plain .npy array ({str(e)[:120]})") from None
        offset = f.tell()
    if dtype.kind != "f" or dtype.hasobject:
        raise ValueError(f"{path}: expected a float latent, got dtype {dtype}")
    count = 1
    for d in shape:
        count *= d
    need = count * dtype.itemsize
    have = os.path.getsize(path) - offset
    if need > have:
        raise ValueError(f"{path}: the header says {tuple(shape)} {dtype} ({_bytes(need)}) but the file holds "
                         f"{_bytes(have)}; truncated or corrupted")
    from refldm.errors import TooLargeError
    limit = available_memory() if max_bytes is None else max_bytes
    if limit is not None and need > limit:
        raise TooLargeError(f"{path}: a {tuple(shape)} latent takes {_bytes(need)}, more than the "
                          f"{_bytes(limit)} of memory available")
    return np.load(path, allow_pickle=False)


def _decode(args) -> int:
    from refldm import backend
    from refldm.core import images
    from refldm.models.vae import AutoencoderKL

    z = read_latent(args.latent)
    if z.ndim == 3:
        z = z[None]
    if z.ndim != 4 or 0 in z.shape:
        raise ValueError(f"{args.latent}: expected a latent of shape (N, C, h, w) or (C, h, w) with no empty "
                         f"axis, got {tuple(z.shape)}")
    if len(z) == 1:
        names = [args.output]
    else:
        stem, ext = os.path.splitext(args.output)
        names = [f"{stem}-{i}{ext}" for i in range(len(z))]
    for name in names:  # before the work, not after
        images.check_output(name)
    vae = AutoencoderKL.from_pretrained(_vae_folder(args.model), dtype=args.dtype)
    c = vae.config.latent_channels
    if z.shape[1] != c:
        raise ValueError(f"{args.latent}: expected a latent of shape (N, {c}, h, w) or ({c}, h, w), "
                         f"got {tuple(z.shape)}")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{args.latent}: the latent holds NaN or inf")
    check_decode_memory(vae, z.shape, args.dtype)
    z = backend.asarray(z, dtype=args.dtype)
    if not args.unscaled:
        z = images.unscale_latents(z, vae.config)
    pictures = images.to_pil(vae.decode(z))
    for name, picture in zip(names, pictures):
        images.save_pil(picture, name)
        print(f"{name}: {picture.width}x{picture.height} image from latent {tuple(z.shape[1:])}")
    return 0


def check_decode_memory(vae, shape, dtype, announce_after_s: float = 30.0) -> None:
    """Refuse a decode that would not fit in memory (estimated from the sizes), before it starts; print
    an estimated time when it looks long."""
    from refldm import backend
    from refldm.analysis.cost import estimate_decode
    from refldm.errors import TooLargeError

    if backend.name() != "numpy":
        return
    cost = estimate_decode(vae.config, shape, np.dtype(dtype).itemsize)  # refldm/analysis/cost.py's decoder walk
    need = cost["bytes"]
    have = available_memory()
    n, _, h, w = shape
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if have is not None and need > have:
        raise TooLargeError(f"decoding {n} latent(s) of {h}x{w} into {w * f}x{h * f} images needs about "
                          f"{_bytes(need)} of memory; this machine has {_bytes(have)} available")
    from refldm.cli.resources import matmul_throughput
    flops = cost["flops"]
    seconds = flops / (0.5 * matmul_throughput())
    if seconds > announce_after_s:
        import sys
        print(f"refldm: decoding {n} latent(s) of {h}x{w} into {w * f}x{h * f}: estimated {seconds / 60:.1f} "
              f"minutes ({flops / 1e12:.3g} TFLOP) and {_bytes(need)} of memory", file=sys.stderr)


def compression(height: int, width: int, channels: int = 3, latent_channels: int = 4, factor: int = 8) -> dict:
    """The worked example: values and fp16 bytes of an image and of its latent, and their ratio."""
    for name, v in (("factor", factor), ("channels", channels), ("latent channels", latent_channels)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    for name, v in (("height", height), ("width", width)):
        if v < 1 or v % factor:
            raise ValueError(f"{name} {v} is not a positive multiple of {factor}; the VAE needs image sides "
                             f"divisible by {factor} (nearest: {max(factor, v // factor * factor)})")
    raw = height * width * channels
    latent = (height // factor) * (width // factor) * latent_channels
    return {"raw": raw, "latent": latent, "ratio": raw / latent, "raw_bytes_fp16": 2 * raw,
            "latent_bytes_fp16": 2 * latent, "latent_shape": (latent_channels, height // factor, width // factor)}


def _bytes(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _sizes(args) -> int:
    c = compression(args.height, args.width, args.channels, args.latent_channels, args.factor)
    ratio = f"{c['ratio']:g}"
    print(f"image  {args.height} x {args.width} x {args.channels} = {c['raw']:,} values "
          f"({_bytes(c['raw_bytes_fp16'])} in fp16)")
    print(f"latent {c['latent_shape'][1]} x {c['latent_shape'][2]} x {args.latent_channels} = {c['latent']:,} "
          f"values ({_bytes(c['latent_bytes_fp16'])} in fp16)")
    f = args.factor
    print(f"{ratio}x fewer values: each latent pixel stands for {f} x {f} pixels x {args.channels} channels = "
          f"{f * f * args.channels} values, kept as {args.latent_channels}")
    return 0


def _vae_folder(model):
    """-m, or the built-in model's VAE when no -m is given (as txt2img and the others default)."""
    import os

    from refldm.about import DEFAULT_MODEL
    return os.path.join(DEFAULT_MODEL, "vae") if model is None else model
