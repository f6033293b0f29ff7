"""Retrain refldm's default model from scratch, from one seed, and write it into refldm/default_model/.

    python tools/train_tiny/train_all.py --seed 0

runs, in order (each step resumes from its checkpoint in WORKDIR if interrupted; delete WORKDIR to
start over):

1. train_vae.py          the AutoencoderKL                        -> WORKDIR/vae
2. train_unet.py         tokenizer, latent cache, text encoder + U-Net
                                                                  -> WORKDIR/{tokenizer,text_encoder,unet}
3. finetune_decoder.py   the VAE decoder alone, encoder frozen    -> WORKDIR/vae_ft
4. export.py             the diffusers folder                     -> refldm/default_model
5. evaluate.py           colour / shape / position accuracy, VAE PSNR -> WORKDIR/eval.json
6. figures.py            the PNGs of docs/default-model.md        -> docs/img

(Steps 2 and 3 only depend on step 1; the shipped model ran them side by side, in two processes.)

The defaults of each script are the settings the shipped model was trained with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/train_tiny")
    p.add_argument("--out", default=str(common.HERE.parent.parent / "refldm" / "default_model"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-figures", action="store_true")
    args = p.parse_args(argv)
    work, seed, threads = args.workdir, str(args.seed), str(args.threads)

    import evaluate
    import export
    import figures
    import finetune_decoder
    import train_unet
    import train_vae

    if not (Path(work) / "vae").exists():
        train_vae.main(["--workdir", work, "--seed", seed, "--threads", threads])
    if not (Path(work) / "unet").exists():
        train_unet.main(["--workdir", work, "--seed", seed, "--threads", threads])
    if not (Path(work) / "vae_ft").exists():
        finetune_decoder.main(["--workdir", work, "--seed", seed, "--threads", threads])
    export.main(["--workdir", work, "--out", args.out])
    evaluate.main(["--model", args.out, "--out", str(Path(work) / "eval.json")])
    if not args.skip_figures:
        figures.main(["--model", args.out])


if __name__ == "__main__":
    main()
