"""``refldm control KIND IN.png -o OUT.png``: make a ControlNet control image without OpenCV.

    refldm control canny photo.png -o edges.png --low 100 --high 200     (cv2.Canny's edges, pixel for pixel)
    refldm control scribble | blur | tile | shuffle | color photo.png -o out.png

The preprocessors are refldm/core/control_images.py; this module only parses and prints.
"""

from __future__ import annotations

import os

KINDS = ("canny", "scribble", "blur", "tile", "shuffle", "color")


def register(subparsers) -> None:
    p = subparsers.add_parser("control", help="make a control image (canny edges, scribble, blur, tile, "
                                              "shuffle, color) for a ControlNet",
                              description="Turn a picture into a ControlNet control image; Canny agrees with "
                                          "cv2.Canny to the pixel (docs/control.md).")
    p.add_argument("kind", choices=KINDS, help="the preprocessor")
    p.add_argument("input", help="input image (PNG, JPEG, ...)")
    p.add_argument("-o", "--output", default=None, help="output PNG (default: refldm-control-KIND.png)")
    p.add_argument("--low", type=float, default=100.0, help="canny/scribble: low hysteresis threshold (100)")
    p.add_argument("--high", type=float, default=200.0, help="canny/scribble: high hysteresis threshold (200)")
    p.add_argument("--l2", action="store_true", help="canny: L2 gradient magnitude (cv2's L2gradient=True)")
    p.add_argument("--blur", type=float, default=None, metavar="SIGMA",
                   help="canny: Gaussian blur of this sigma first (cv2.Canny itself does not blur)")
    p.add_argument("--sigma", type=float, default=3.0, help="blur/scribble: Gaussian sigma in pixels (3)")
    p.add_argument("--factor", type=int, default=8, help="tile: shrink factor (8)")
    p.add_argument("--block", type=int, default=64, help="color: cell size in pixels (64)")
    p.add_argument("--seed", type=int, default=0, help="shuffle: the seed of the random flow (0)")
    p.set_defaults(func=run_control)


def run_control(args) -> int:
    from PIL import Image, UnidentifiedImageError
    from refldm.core import control_images as ci
    from refldm.core.images import check_output, save_pil
    path = check_output(args.output or f"refldm-control-{args.kind}.png", suffixes=(".png",))
    if not os.path.isfile(args.input):
        raise OSError(f"{args.input}: no such image file")
    try:
        with Image.open(args.input) as im:
            image = im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{args.input}: not an image file PIL can read") from None
    if args.kind == "canny":
        out = ci.canny(image, args.low, args.high, L2gradient=args.l2, blur_sigma=args.blur)
    elif args.kind == "scribble":
        out = ci.scribble(image, args.low, args.high, sigma=args.sigma)
    elif args.kind == "blur":
        out = ci.blur(image, args.sigma)
    elif args.kind == "tile":
        out = ci.tile(image, args.factor)
    elif args.kind == "shuffle":
        out = ci.shuffle(image, seed=args.seed)
    else:
        out = ci.color(image, args.block)
    save_pil(Image.fromarray(out), path)
    print(f"wrote {path} ({out.shape[1]}x{out.shape[0]}, {args.kind})")
    return 0
