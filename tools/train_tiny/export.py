"""Write the trained parts as a diffusers Stable Diffusion folder (what refldm ships as its default model).

    refldm/default_model/
        model_index.json          StableDiffusionPipeline, no safety checker / feature extractor
        scheduler/scheduler_config.json      DDIMScheduler, SD 1.x's scaled_linear betas
        text_encoder/config.json + model.safetensors    CLIPTextModel
        tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
        unet/config.json + diffusion_pytorch_model.safetensors   UNet2DConditionModel (EMA weights)
        vae/config.json + diffusion_pytorch_model.safetensors    AutoencoderKL

Weights are stored in float16 (half the size; loaders cast them to their compute dtype). The
folder is written by diffusers' own StableDiffusionPipeline.save_pretrained, then stripped of
anything the model does not need (e.g. a tokenizer.json duplicate of vocab.json + merges.txt).

    python tools/train_tiny/export.py --workdir runs/train_tiny --out refldm/default_model
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import common

KEEP = {
    "": {"model_index.json"},
    "scheduler": {"scheduler_config.json"},
    "text_encoder": {"config.json", "model.safetensors"},
    "tokenizer": {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"},
    "unet": {"config.json", "diffusion_pytorch_model.safetensors"},
    "vae": {"config.json", "diffusion_pytorch_model.safetensors"},
}


def export(work: Path, out: Path, dtype: str = "float16", vae: str = "vae_ft") -> int:
    """Assemble the pipeline from WORKDIR's parts, save it to `out`; returns the folder's size in bytes.
    `vae` names the VAE folder in WORKDIR: vae_ft (decoder fine-tuned) or vae (first stage only)."""
    torch = common.setup_torch(0, 2)
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / vae),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=DDIMScheduler(**common.SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(getattr(torch, dtype))
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)

    # the tokenizer files exactly as bpe.py wrote them (save_pretrained may add or rewrite some)
    for name in KEEP["tokenizer"]:
        shutil.copyfile(work / "tokenizer" / name, out / "tokenizer" / name)
    # strip everything else
    for path in sorted(out.rglob("*"), reverse=True):
        rel = path.relative_to(out)
        folder = str(rel.parent) if str(rel.parent) != "." else ""
        if path.is_file() and (folder not in KEEP or rel.name not in KEEP[folder]):
            path.unlink()
        elif path.is_dir() and str(rel) not in KEEP:
            shutil.rmtree(path)
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    index = json.loads((out / "model_index.json").read_text())
    index.pop("image_encoder", None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/train_tiny")
    p.add_argument("--out", default=str(common.HERE.parent.parent / "refldm" / "default_model"))
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--vae", default="vae_ft", help="VAE folder inside WORKDIR")
    args = p.parse_args(argv)
    size = export(Path(args.workdir), Path(args.out), args.dtype, args.vae)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
