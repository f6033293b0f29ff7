"""One page that shows a generation from noise to image: `refldm explain -p PROMPT -o explain.html`.

`explain(pipe, prompt, ...)` runs the pipeline once with the recording hook on (`refldm.core.record`): per step
it keeps the U-Net's input x_t, its two predictions (unconditional and conditional, one batch of 2B), the
scheduler's estimate of x_0, and the queries and keys of every cross-attention layer (for the maps of
`refldm.analysis.attention_maps`). `render_html` turns that into one self-contained HTML page: PNG images as
data URIs, plots as inline SVG, no scripts, no fonts, no links to fetch. What the page shows and why is
docs/watching-the-loop.md.

    per step i, at timestep t_i (noise level sigma_i):
      x_t                 the noisy latent as the U-Net sees it (scheduler.scale_model_input), decoded
      x_0 estimate        what the scheduler expects the image to be:  x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
      eps_u, eps_c        the predictions without and with the prompt
      eps_c - eps_u       what the prompt changes; guidance adds (w - 1)(eps_c - eps_u) to eps_c:
                          eps = eps_u + w (eps_c - eps_u)
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import time

import numpy

from refldm.analysis.attention_maps import ATTENTION_PATTERNS, from_recording, map_tokenizer, prompt_ids, prompt_tokens
from refldm.core import record

__all__ = ["Explanation", "explain", "family_of", "render_html", "write_html", "DEFAULT_STEPS", "DEFAULT_CFG"]

DEFAULT_STEPS = 10
DEFAULT_CFG = 3.0   # the built-in model's best guidance for colour (docs/default-model.md)
STEP_PATTERNS = ("steps.*.model_input", "steps.*.noise_pred", "steps.*.guided", "steps.*.pred_original_sample",
                 "steps.*.timestep")


@dataclasses.dataclass
class Explanation:
    """What one generation did, ready to render (see the module docstring)."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    model: str
    image_size: tuple            # (height, width) pixels
    latent_shape: tuple          # (B, C, h, w)
    text_shape: tuple            # (tokens, width) of the text embeddings
    tokens: list                 # the prompt's token strings
    shown_tokens: list           # the token slots shown (1 = the first word)
    notes: list                  # what was ignored, and why
    timesteps: list
    sigmas: list
    cost: dict                   # sizes and FLOPs (refldm.analysis.cost)
    step_images: list            # per step: {"x_t", "x0", "eps_u", "eps_c", "diff": uint8 (H, W, 3) or None}
    step_stats: list             # per step: {"rms_u", "rms_c", "rms_diff", "scale", "diff_scale"}
    attention: dict              # {(h, w): (S, h, w) mean over steps}
    attention_layers: dict
    image: object                # the final PIL image
    parameters: str              # its PNG parameters text
    timings: dict
    conditioning: list = dataclasses.field(default_factory=list)  # extra (name, what) rows: SDXL's text parts
    family: str = "sd"           # "sd", "sdxl", "sd3" or "flux" (`family_of`)


# -- colour maps --------------------------------------------------------------------------------------------------

def _diverging(x, scale):
    """Signed values -> blue (negative), white (0), red (positive), |x| = scale at full colour; uint8 (..., 3)."""
    u = numpy.clip(numpy.asarray(x, numpy.float64) / (scale or 1.0), -1, 1)[..., None]
    white, red, blue = numpy.array([1.0, 1.0, 1.0]), numpy.array([0.80, 0.10, 0.10]), numpy.array([0.10, 0.25, 0.80])
    rgb = numpy.where(u >= 0, white + u * (red - white), white - u * (blue - white))
    return numpy.round(255 * rgb).astype(numpy.uint8)


_HEAT = numpy.array([[0.05, 0.03, 0.20], [0.45, 0.10, 0.50], [0.90, 0.35, 0.25], [1.0, 0.85, 0.30], [1.0, 1.0, 0.9]])


def _heat(x):
    """Values in [0, 1] -> a dark-to-bright heat colour map (uint8 (..., 3))."""
    u = numpy.clip(numpy.asarray(x, numpy.float64), 0, 1) * (len(_HEAT) - 1)
    i = numpy.minimum(numpy.floor(u).astype(int), len(_HEAT) - 2)
    f = (u - i)[..., None]
    return numpy.round(255 * (_HEAT[i] * (1 - f) + _HEAT[i + 1] * f)).astype(numpy.uint8)


def _stretch(m):
    """A map scaled from its minimum (0) to its maximum (1)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else m * 0


def _upscale(pixels, factor: int):
    return numpy.repeat(numpy.repeat(pixels, factor, axis=0), factor, axis=1)


def _channels(z, scale, factor: int):
    """(C, h, w) signed latent -> the C channels side by side, diverging colours, upscaled (uint8)."""
    tiles = [_upscale(_diverging(c, scale), factor) for c in z]
    gap = numpy.full((tiles[0].shape[0], 2, 3), 255, numpy.uint8)
    out = [tiles[0]]
    for t in tiles[1:]:
        out += [gap, t]
    return numpy.concatenate(out, axis=1)


# -- the run ------------------------------------------------------------------------------------------------------

def _sigmas(sched, timesteps) -> list:
    """sigma_t per step: the scheduler's own sigmas, or sqrt((1 - abar_t) / abar_t) from its alphas_cumprod."""
    n = len(timesteps)
    sig = getattr(sched, "sigmas", None)
    if sig is not None and len(sig) >= n:
        return [float(s) for s in numpy.asarray(sig, numpy.float64)[:n]]
    abar = numpy.asarray(sched.alphas_cumprod, numpy.float64)
    return [float(math.sqrt((1 - abar[int(t)]) / abar[int(t)])) for t in numpy.asarray(timesteps)]


def family_of(pipe) -> str:
    """"sd" (SD 1.x / 2.x and the built-in model), "sdxl", "sd3" or "flux", from the pipeline's parts."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return "flux" if hasattr(pipe, "latent_size") else "sd3"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def _call_arguments(pipe, family: str, negative_prompt, guidance_scale, sampler, notes) -> dict:
    """The family's own keyword arguments for one call (the rest are shared)."""
    if family != "flux":
        return dict(negative_prompt=negative_prompt or None, guidance_scale=guidance_scale, sampler=sampler)
    if sampler is not None:
        raise ValueError(f"sampler={sampler!r}: the FLUX pipeline runs its own flow Euler sampler; leave it out")
    if negative_prompt:
        notes.append("the negative prompt is ignored: FLUX is guidance-distilled (one prediction per step, no "
                     "unconditional half)")
    if pipe.transformer.config.guidance_embeds:              # dev: the guidance value is an input; schnell: none
        notes.append(f"guidance {guidance_scale:g} enters the transformer as an input (FLUX-dev is guidance-"
                     "distilled): one prediction per step, no unconditional half to subtract")
        return dict(guidance_scale=guidance_scale)
    notes.append("no guidance: this FLUX transformer takes no guidance input (schnell) and the page runs no "
                 "unconditional half")
    return {}


def explain(pipe, prompt: str, *, negative_prompt: str = "", num_inference_steps: int = DEFAULT_STEPS,
            guidance_scale: float = DEFAULT_CFG, seed: int = 0, sampler: str | None = None, tokens=None,
            decoder: str = "vae", height: int | None = None, width: int | None = None) -> Explanation:
    """Run `pipe` once on `prompt` with the recording on and collect what the page shows.

    pipe: an SD 1.x / 2.x, SDXL, SD3 or FLUX text-to-image pipeline. tokens: the token slots to map (1 = the
    first token of the prompt); default all of the prompt's. Slots beyond the prompt are left out with a note.
    decoder: how latents become pictures ("vae", "linear", "tiny", as `refldm.pipelines.preview`).

    The flow-matching families (SD3, FLUX) predict a velocity v with x_t = (1 - sigma) x_0 + sigma e, so
    x_0 = x_t - sigma v and sigma = t / 1000; their attention is joint (text and image tokens in one softmax,
    after per-head norms and, in FLUX, rotary positions), and the page says that its maps are not drawn."""
    from refldm.pipelines.preview import decode_preview
    if map_tokenizer(pipe) is None:
        raise ValueError(f"{getattr(pipe, 'name', 'the model')}: has no tokenizer; explain names the prompt's "
                         "tokens and needs one (an SD 1.x / 2.x, SDXL, SD3 or FLUX pipeline with tokenizer/)")
    family = family_of(pipe)
    flow = family in ("sd3", "flux")
    words = prompt_tokens(pipe, prompt)
    notes, conditioning = [], _sdxl_conditioning(pipe, prompt) if family == "sdxl" else []
    if family == "sdxl" and not negative_prompt and getattr(pipe, "force_zeros_for_empty_prompt", False):
        notes.append("no negative prompt: the unconditional half gets zero text embeddings, not the encoding of "
                     "\"\" (SDXL's force_zeros_for_empty_prompt, as diffusers)")
    if tokens is None:
        shown = list(range(1, len(words) + 1))
    else:
        shown = []
        for k in tokens:
            if 1 <= int(k) <= len(words):
                shown.append(int(k))
            else:
                notes.append(f"token {k} ignored: the prompt has {len(words)} tokens (1..{len(words)})")
    family_kw = _call_arguments(pipe, family, negative_prompt, guidance_scale, sampler, notes)
    start = time.perf_counter()
    with record.Recorder(include=(() if flow else ATTENTION_PATTERNS) + STEP_PATTERNS) as rec:
        out = pipe(prompt, num_inference_steps=num_inference_steps, seed=seed, progress=False, height=height,
                   width=width, **family_kw)
    run_s = time.perf_counter() - start
    a = rec.activations
    H, W = out.images[0].height, out.images[0].width
    if family == "flux":                       # packed (B, h/2 * w/2, 4C) -> (B, C, h, w)
        from refldm.models.flux_transformer import unpack_latents
        h_lat, w_lat = pipe.latent_size(H, W)

        def unpack(z):
            return unpack_latents(numpy.asarray(z), h_lat, w_lat)
    else:
        def unpack(z):
            return numpy.asarray(z)
    latents = unpack(out.latents)
    b, c, h, w = latents.shape
    timesteps = [float(numpy.asarray(a[f"steps.{i}.timestep"])) for i in range(num_inference_steps)
                 if f"steps.{i}.timestep" in a]
    n = len(timesteps)
    guided = n > 0 and numpy.asarray(a["steps.0.noise_pred"]).shape[0] == 2 * b     # a [uncond; cond] batch
    if flow:                                   # sigma = t / T: diffusers' flow timesteps are sigma * T
        big_t = float(getattr(getattr(pipe.make_scheduler(), "config", None), "num_train_timesteps", 1000))
        sigmas = [t / big_t for t in timesteps]
    else:
        sched = pipe.make_scheduler(sampler)
        sched.set_timesteps(num_inference_steps)
        sigmas = _sigmas(sched, sched.timesteps)[:n]
    images, stats = [], []
    for i in range(n):
        x_in = unpack(numpy.asarray(a[f"steps.{i}.model_input"])[:b])
        pred = unpack(numpy.asarray(a[f"steps.{i}.noise_pred"], numpy.float64))
        eps_u, eps_c = (pred[:b], pred[b:]) if guided else (None, pred)
        if flow:                               # x_0 = x_t - sigma v, with the guided v the sampler steps with
            x0 = x_in - sigmas[i] * unpack(numpy.asarray(a[f"steps.{i}.guided"], numpy.float64))
        else:
            x0 = a.get(f"steps.{i}.pred_original_sample")
        row = {"x_t": decode_preview(pipe, x_in, decoder)[0],
               "x0": None if x0 is None else decode_preview(pipe, numpy.asarray(x0, x_in.dtype), decoder)[0]}
        scale = float(numpy.abs(pred).max())
        factor = max(1, 64 // max(h, w))
        row["eps_c"] = _channels(eps_c[0], scale, factor)
        st = {"rms_c": float(numpy.sqrt(numpy.mean(eps_c[0] ** 2))), "scale": scale}
        if guided:
            d = eps_c[0] - eps_u[0]
            dscale = float(numpy.abs(d).max())
            row["eps_u"] = _channels(eps_u[0], scale, factor)
            row["diff"] = _channels(d, dscale, factor)
            st.update(rms_u=float(numpy.sqrt(numpy.mean(eps_u[0] ** 2))), rms_diff=float(numpy.sqrt(numpy.mean(d ** 2))),
                      diff_scale=dscale)
        images.append(row)
        stats.append(st)
    if flow:
        attention, layers = {}, {}
        notes.append(f"attention maps are not drawn for {FAMILY_NAMES[family]}: its attention is joint (one softmax "
                     "over the text and image tokens together, after per-head norms"
                     + (" and rotary positions" if family == "flux" else "") + "), which this page does not "
                     "take apart yet; the tokens are listed")
    else:
        maps, layers = from_recording(a, pipe.unet, (h, w), slice(b, 2 * b) if guided else None)
        attention = {hw: m[:, 0].mean(axis=0) for hw, m in maps.items()}      # (S, h, w), mean over the steps
    del rec, a
    cost, text_shape = _cost(pipe, family, prompt, h, w, H, W, b, guided)
    cost["run_s"] = run_s
    gen = out.generation[0] if getattr(out, "generation", None) else None
    sampler_label = gen.sampler if gen is not None else "Euler (flow)"
    return Explanation(prompt, negative_prompt or "", n, float(guidance_scale), int(out.seed), sampler_label,
                       pipe.name, (H, W), (b, c, h, w), text_shape, words, shown, notes, timesteps, sigmas, cost,
                       images, stats, attention, layers, out.images[0], out.parameters[0], dict(out.timings),
                       conditioning, family)


FAMILY_NAMES = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"}


def _cost(pipe, family: str, prompt: str, h: int, w: int, H: int, W: int, b: int, guided: bool):
    """(the cost dict, the text embeddings' (tokens, width)) of one model call and the decode."""
    from refldm.analysis.cost import count_sd3, count_unet, count_vae
    batch = 2 * b if guided else b
    _, decode_count = count_vae(pipe.vae.config, H, W, b)
    cost = {"decode_flops": decode_count.flops, "unet_batch": batch, "model": "U-Net", "unet_flops": None,
            "unet_by_kind": {}, "unet_by_block": {}, "largest_scores": None}
    if family in ("sd", "sdxl"):
        n_text = len(prompt_ids(pipe, prompt))                                  # 77 for CLIP
        count = count_unet(pipe.unet.config, h, w, batch, n_text)
        dim = pipe.unet.config.cross_attention_dim
        text_shape = (n_text, int(dim[0] if isinstance(dim, (list, tuple)) else dim))
    else:
        config = pipe.transformer.config
        t5 = 256 if family == "sd3" else 512               # the pipelines' default max_sequence_length
        text_shape = (77 + t5 if family == "sd3" else t5, int(config.joint_attention_dim))
        cost["model"] = "MMDiT" if family == "sd3" else "FLUX transformer"
        if family != "sd3":
            return cost, text_shape                        # refldm cost walks U-Nets and SD3's MMDiT only
        count = count_sd3(dataclasses.asdict(config), h, w, batch, text_shape[0])
    cost.update(unet_flops=count.flops, unet_by_kind=count.flops_by_kind(), unet_by_block=count.flops_by_block(),
                largest_scores=count.largest_scores)
    return cost, text_shape


def _sdxl_conditioning(pipe, prompt: str) -> list:
    """SDXL's text parts as (name, what) rows for the sizes table (empty for SD 1.x / 2.x), and a check that
    the second tokenizer splits the prompt as the first does (the maps name the first one's tokens)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return []
    parts = [(tok, enc) for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
             if enc is not None]
    widths = [int(enc.config.hidden_size) for _, enc in parts]
    rows = [("text encoders", " + ".join(f"{type(enc).__name__} ({w} wide)" for (_, enc), w in zip(parts, widths))
             + f": their penultimate layers side by side, {sum(widths)} features per token "
             "(docs/sdxl.md); the maps below are over the first tokenizer's tokens"),
            ("pooled text", f"{pipe.text_encoder_2.config.projection_dim} features (text_encoder_2's projection) "
             + ("plus the 5 time ids (size, crop, aesthetic score)" if getattr(pipe, "requires_aesthetics_score", False)
                else "plus the 6 time ids (sizes and crop)") + ", added to the timestep embedding")]
    if len(parts) == 2:
        ids = [[int(i) for i in tok([prompt], padding="max_length", truncation=True, return_tensors="np")
                ["input_ids"][0]] for tok, _ in parts]
        cut = [row[:row.index(tok.eos_token_id, 1) + 1] if tok.eos_token_id in row[1:] else row
               for row, (tok, _) in zip(ids, parts)]
        if cut[0] != cut[1]:
            rows.append(("note", "the two tokenizers split this prompt differently; the maps follow the first"))
    return rows


# -- the page -----------------------------------------------------------------------------------------------------

def _png(pixels, alt: str, width: int | None = None, css: str = "") -> str:
    from PIL import Image
    buf = io.BytesIO()
    image = pixels if hasattr(pixels, "save") else Image.fromarray(numpy.asarray(pixels, numpy.uint8))
    image.save(buf, format="PNG", optimize=True)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{size}{css}>'


def _plot(xs, series, title: str, ylabel: str, log: bool = False, w: int = 420, h: int = 220) -> str:
    """A line plot as inline SVG: series = [(label, ys, colour)]; x axis: the step number."""
    left, right, top, bottom = 56, 12, 24, 34
    ys_all = [y for _, ys, _ in series for y in ys if y is not None and (not log or y > 0)]
    fy = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = min(map(fy, ys_all)), max(map(fy, ys_all))
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return top + (hi - fy(y)) / (hi - lo) * (h - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>',
             f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="#fafafa" '
             'stroke="#999"/>',
             f'<text x="{w / 2}" y="15" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
             f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle" font-size="11">step</text>',
             f'<text x="12" y="{h / 2}" font-size="11" transform="rotate(-90 12 {h / 2})" '
             f'text-anchor="middle">{html.escape(ylabel)}</text>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        label = f"{10 ** v:.3g}" if log else f"{v:.3g}"
        y = top + (hi - v) / (hi - lo) * (h - top - bottom)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{label}</text>')
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{h - bottom + 13}" text-anchor="middle" font-size="10">{x}</text>')
    for k, (label, ys, colour) in enumerate(series):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if y is not None and (not log or y > 0))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{w - right - 4}" y="{top + 14 + 13 * k}" text-anchor="end" font-size="11" '
                     f'fill="{colour}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _gflops(n) -> str:
    return f"{n / 1e9:.3g} GFLOP"


CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}img{image-rendering:pixelated}figure{display:inline-block;margin:4px;text-align:center}
figcaption{font-size:12px}pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}.note{color:#a40}"""


def render_html(ex: Explanation) -> str:
    """The page (a str): sizes and cost, schedule, the steps, the attention maps, the image and its parameters."""
    e = html.escape
    H, W = ex.image_size
    show = max(128, W)                         # displayed width of an image (pixelated upscaling)
    b, c, h, w = ex.latent_shape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>refldm explain: {e(ex.prompt)}</title><style>{CSS}</style></head><body>",
           f"<h1>From noise to image: {e(ex.prompt)}</h1>",
           f'<p id="summary">Prompt: <b id="prompt">{e(ex.prompt)}</b>. Negative prompt: '
           f'"{e(ex.negative_prompt)}". Steps: <b id="steps">{ex.steps}</b>. Sampler: {e(ex.sampler)}. '
           f"Guidance scale w = {ex.guidance_scale:g}. Seed: {ex.seed}. Model: {e(ex.model)}.</p>"]
    for note in ex.notes:
        out.append(f'<p class="note">Note: {e(note)}</p>')
    # sizes and cost
    cost = ex.cost
    net = e(cost.get("model", "U-Net"))
    flow = ex.family in ("sd3", "flux")
    kinds = ", ".join(f"{k} {_gflops(v)}" for k, v in cost["unet_by_kind"].items())
    blocks = "".join(f"<tr><td>{e(k)}</td><td>{_gflops(v)}</td></tr>" for k, v in cost["unet_by_block"].items())
    out += ["<h2>Sizes and cost</h2><table>",
            f"<tr><th>image</th><td>{W} x {H} pixels, 3 channels</td></tr>",
            f"<tr><th>latents</th><td>{b} x {c} x {h} x {w} (the VAE's factor {H // h} per side)</td></tr>",
            f"<tr><th>text embeddings</th><td>{ex.text_shape[0]} tokens x {ex.text_shape[1]}</td></tr>",
            *(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in ex.conditioning),
            f"<tr><th>{net} batch</th><td>{cost['unet_batch']} "
            + ("(unconditional and conditional together)" if cost['unet_batch'] > b else "(no unconditional half)")
            + "</td></tr>"]
    if cost["unet_flops"] is None:
        out.append(f"<tr><th>{net}, per step</th><td>not counted (refldm cost walks the U-Nets and SD3's MMDiT)"
                   "</td></tr>")
    else:
        out += [f"<tr><th>{net}, per step</th><td>{_gflops(cost['unet_flops'])} ({kinds})</td></tr>",
                f"<tr><th>{net}, all {ex.steps} steps</th><td>{_gflops(cost['unet_flops'] * ex.steps)}</td></tr>"]
    out += [f"<tr><th>VAE decode</th><td>{_gflops(cost['decode_flops'])}</td></tr>",
            *([f"<tr><th>largest attention matrix</th><td>{cost['largest_scores']:,} probabilities</td></tr>"]
              if cost["largest_scores"] is not None else []),
            f"<tr><th>time (this run, recording on)</th><td>{cost['run_s']:.2f} s</td></tr>",
            "</table>"]
    if blocks:
        out.append(f"<details><summary>{net} FLOPs per block, one step (refldm cost)</summary><table>"
                   f"<tr><th>block</th><th>FLOPs</th></tr>{blocks}</table></details>")
    # schedule
    xs = list(range(1, ex.steps + 1))
    out += ["<h2>The schedule</h2>",
            ("<p>The timestep t and the noise level sigma = t / 1000 the transformer sees at each step (flow "
             "matching: x_t = (1 - sigma) x_0 + sigma e, a straight line from the image to the noise): sigma = 1 "
             "first (pure noise), small last.</p>" if flow else
             "<p>The timestep t and the noise level sigma = sqrt((1 - abar_t) / abar_t) the U-Net sees at each "
             "step: large sigma first (mostly noise), small last.</p>"),
            _plot(xs, [("t", ex.timesteps, "#1f5fa8")], "timestep t per step", "t"), " ",
            _plot(xs, [("sigma", ex.sigmas, "#b0301c")], "noise level sigma per step (log scale)", "sigma",
                  log=True)]
    # the steps
    p = "v" if flow else "eps"               # what the network predicts (the flow families: a velocity)
    out += ["<h2>Every step</h2>",
            f"<p>Per step: the noisy latent x_t as the {'transformer' if flow else 'U-Net'} sees it and the "
            + ("estimate of the clean image x_0 = x_t - sigma v (both decoded); " if flow else
               "scheduler's estimate of the clean image x_0 (both decoded); ")
            + f"the unconditional prediction {p}_u and the conditional {p}_c (the "
            f"{c} latent channels side by side, blue negative, red positive, one scale per step); and "
            f"{p}_c - {p}_u, what the prompt changes (its own scale). Guidance adds (w - 1)({p}_c - {p}_u) to "
            f"{p}_c: {p} = {p}_u + w ({p}_c - {p}_u).</p>",
            f"<table><tr><th>step</th><th>x_t</th><th>x_0 estimate</th><th>{p}_u</th><th>{p}_c</th>"
            f"<th>{p}_c - {p}_u</th></tr>"]
    for i, (row, st) in enumerate(zip(ex.step_images, ex.step_stats)):
        t = ex.timesteps[i]
        cells = [f"<td>{i + 1}<br>t = {t:g}<br>sigma = {ex.sigmas[i]:.3g}</td>",
                 f"<td>{_png(row['x_t'], f'step {i + 1}: noisy latent x_t, decoded', show // 2)}</td>",
                 "<td>" + (_png(row['x0'], f"step {i + 1}: predicted x_0, decoded", show // 2)
                           if row["x0"] is not None else "(this sampler gives no x_0 estimate)") + "</td>"]
        for key, label, rms in (("eps_u", f"unconditional prediction {p}_u", "rms_u"),
                                ("eps_c", f"conditional prediction {p}_c", "rms_c"),
                                ("diff", f"{p}_c - {p}_u", "rms_diff")):
            if key in row:
                cells.append(f"<td>{_png(row[key], f'step {i + 1}: {label}')}<br>rms {st[rms]:.3g}</td>")
            else:
                cells.append("<td>(no guidance)</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    if ex.step_stats and "rms_diff" in ex.step_stats[0]:
        out.append(_plot(xs, [(f"rms {p}_c", [s["rms_c"] for s in ex.step_stats], "#1f5fa8"),
                              (f"rms ({p}_c - {p}_u)", [s["rms_diff"] for s in ex.step_stats], "#b0301c")],
                         "how much the prompt changes the prediction", "rms", log=True))
    # attention
    if not ex.attention:                     # the flow families: joint attention, not taken apart here
        out += ["<h2>Where each word looks</h2>",
                f'<p id="no-maps">Attention maps are not shown for {FAMILY_NAMES.get(ex.family, ex.family)} models: '
                "the text and image tokens share one softmax (joint attention), so a map per word would need the "
                "image-to-text block of it taken apart, which this page does not do yet. The prompt's tokens (the "
                "first tokenizer's): " + ", ".join(f"{k} {e(t)}" for k, t in enumerate(ex.tokens, 1)) + ".</p>"]
    finest = sorted(ex.attention, key=lambda hw: -hw[0] * hw[1])
    out += [] if not ex.attention else ["<h2>Where each word looks</h2>",
            "<p>The cross-attention probabilities softmax(Q K^T / sqrt(d)) from every pixel to each prompt token, "
            "averaged over the heads, over the layers at one resolution and over the steps (brighter: more "
            "attention; each map stretched from its own minimum to its maximum, which the caption gives). Resolutions: "
            + ", ".join(f"{a} x {bb} ({len(ex.attention_layers[(a, bb)])} layers)" for a, bb in finest) + ".</p>"]
    final = numpy.asarray(ex.image.convert("RGB"), numpy.float64)
    for slot in ex.shown_tokens if ex.attention else ():
        word = ex.tokens[slot - 1]
        figs = []
        for hw in finest:
            m = ex.attention[hw][slot]
            heat = _upscale(_heat(_stretch(m)), max(1, H // hw[0]))[:H, :W]
            figs.append(f"<figure>{_png(heat, f'attention of token {slot} ({word}) at {hw[0]}x{hw[1]}', show // 2)}"
                        f"<figcaption>{hw[0]} x {hw[1]}: {m.min():.3f} to {m.max():.3f}</figcaption></figure>")
        up = _upscale(_stretch(ex.attention[finest[0]][slot]), max(1, H // finest[0][0]))[:H, :W, None]
        blend = numpy.round(final * (0.25 + 0.75 * up)).astype(numpy.uint8)
        figs.append(f"<figure>{_png(blend, f'the image weighted by the attention of token {slot} ({word})', show // 2)}"
                    "<figcaption>on the image</figcaption></figure>")
        out.append(f"<h3>token {slot}: {e(word)}</h3>" + "".join(figs))
    # the image
    out += ["<h2>The image</h2>", _png(ex.image, f"the final image: {ex.prompt}", show),
            "<p>PNG parameters (the text the image file carries, as the web UIs write it):</p>",
            f'<pre id="parameters">{e(ex.parameters)}</pre>',
            "<p>Made by refldm explain; the math: docs/watching-the-loop.md, docs/pipeline.md, "
            "docs/schedulers.md, docs/unet.md.</p></body></html>"]
    return "\n".join(out)


def write_html(ex: Explanation, path) -> int:
    """Write the page to `path` (atomically); returns its size in bytes."""
    from refldm.files import atomic_write
    data = render_html(ex).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
    return len(data)
