"""The cheapest preview: a linear map from each latent pixel's channels to a colour.

    rgb[n, :, i, j] = z[n, :, i, j] W + b        W (C, 3), b (3,);  z: the sampler's (scaled) latents

one colour per latent pixel, so the preview is 1/f the image's size along a side (8x smaller for SD);
image-range values in about [-1, 1], shown as round(255 clip((rgb + 1) / 2)). The VAE decoder is far from
linear, so this is a sketch of the colours and the layout, not the image.

The factors per family:

    sd1             SD 1.x / 2.x (the KL-f8 VAE, scaling factor 0.18215): the factors AUTOMATIC1111's web UI
                    ("Approx cheap" preview, modules/sd_samplers_common.py) and ComfyUI
                    (comfy/latent_formats.py, class SD15) carry; no bias.
    sdxl            SDXL's VAE (scaling factor 0.13025): ComfyUI's comfy/latent_formats.py, class SDXL,
                    latent_rgb_factors and latent_rgb_factors_bias.
    sd3             SD3 / SD3.5's 16-channel VAE (scaling factor 1.5305, shift 0.0609): ComfyUI's
                    comfy/latent_formats.py, class SD3 (16 x 3 factors and a bias), for the latents the sampler
                    sees, (z - shift) * scale.
    flux            FLUX's 16-channel VAE (scaling factor 0.3611, shift 0.1159): the same file, class Flux; the
                    latents unpacked from FLUX's 2x2 patches first (C = 16, not 64).
    refldm-default  refldm's built-in model: fitted by least squares on its own VAE decodes by
                    tools/fit_latent_rgb.py (48 images drawn by the model, DDIM 12 steps, guidance 3; the
                    decodes average-pooled to the 8x8 latent grid). Held-out RMS error 0.508 in the [-1, 1]
                    image range, against a spread (std) of the pooled images of 0.669: the tiny VAE is much
                    less linear than SD's, and the preview shows the layout more than the colours.
"""

from __future__ import annotations

import os

import numpy

from refldm import backend

__all__ = ["LATENT_RGB", "latent_to_rgb", "family_of"]

LATENT_RGB = {
    "sd1": {"factors": [[0.3512, 0.2297, 0.3227],
                        [0.3250, 0.4974, 0.2350],
                        [-0.2829, 0.1762, 0.2721],
                        [-0.2120, -0.2616, -0.7177]],
            "bias": [0.0, 0.0, 0.0],
            "source": "AUTOMATIC1111 modules/sd_samplers_common.py; ComfyUI comfy/latent_formats.py SD15"},
    "sdxl": {"factors": [[0.3651, 0.4232, 0.4341],
                         [-0.2533, -0.0042, 0.1068],
                         [0.1076, 0.1111, -0.0362],
                         [-0.3165, -0.2492, -0.2188]],
             "bias": [0.1084, -0.0175, -0.0011],
             "source": "ComfyUI comfy/latent_formats.py SDXL (latent_rgb_factors, latent_rgb_factors_bias)"},
    "sd3": {"factors": [[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
                        [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
                        [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
                        [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
                        [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
                        [-0.1448, -0.1463, -0.1189]],
            "bias": [0.2394, 0.2135, 0.1925],
            "source": "ComfyUI comfy/latent_formats.py SD3 (latent_rgb_factors, latent_rgb_factors_bias)"},
    "flux": {"factors": [[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
                         [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
                         [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
                         [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
                         [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
                         [-0.1262, -0.0982, -0.0778]],
             "bias": [-0.0329, -0.0718, -0.0851],
             "source": "ComfyUI comfy/latent_formats.py Flux (latent_rgb_factors, latent_rgb_factors_bias)"},
    "refldm-default": {"factors": [[-0.4819, -0.4582, -0.4177],
                                   [-0.0906, -0.1772, -0.1838],
                                   [-0.2605, -0.2509, -0.2105],
                                   [0.4007, 0.4849, 0.4994]],
                       "bias": [0.0451, 0.0300, -0.0087],
                       "source": "tools/fit_latent_rgb.py (least squares, held-out RMS 0.508)"},
}


def family_of(vae_config, name: str | None = None) -> str:
    """Which factors fit a model: the built-in model's own (`name` "refldm-default", as its pipeline is named, or
    its folder); for 4 latent channels SDXL's (scaling factor 0.13025), else SD 1.x's; for 16, FLUX's (scaling
    factor 0.3611), else SD3's."""
    from refldm.about import DEFAULT_MODEL
    if name == "refldm-default" or (name is not None and os.path.isdir(name)
                                    and os.path.realpath(name) == os.path.realpath(DEFAULT_MODEL)):
        return "refldm-default"
    channels = getattr(vae_config, "latent_channels", 4)
    scaling = float(getattr(vae_config, "scaling_factor", 0.18215))
    if channels == 16:
        return "flux" if abs(scaling - 0.3611) < 1e-6 else "sd3"
    if channels != 4:
        raise ValueError(f"no linear latent-to-RGB factors for {channels} latent channels (refldm has them for "
                         "the 4-channel SD 1.x / 2.x / SDXL and the 16-channel SD3 / FLUX latents); use preview='vae'")
    return "sdxl" if abs(scaling - 0.13025) < 1e-6 else "sd1"


def latent_to_rgb(latents, family: str = "sd1"):
    """(N, C, h, w) latents -> (N, 3, h, w) colours in about [-1, 1]: rgb = z W + b per latent pixel."""
    if family not in LATENT_RGB:
        raise ValueError(f"latent_to_rgb: unknown family {family!r}; choose one of {', '.join(LATENT_RGB)}")
    z = numpy.asarray(backend.to_numpy(latents), numpy.float64)
    w = numpy.asarray(LATENT_RGB[family]["factors"])                # (C, 3)
    b = numpy.asarray(LATENT_RGB[family]["bias"])                   # (3,)
    if z.ndim != 4 or z.shape[1] != w.shape[0]:
        raise ValueError(f"latent_to_rgb: latents of shape {tuple(z.shape)}; expected (N, {w.shape[0]}, h, w)")
    return numpy.einsum("nchw,cr->nrhw", z, w) + b[None, :, None, None]

