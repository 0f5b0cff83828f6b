"""``viq show``: one self-contained HTML page of what a tokenizer keeps and loses.

Per image: the input as encoded, the reconstruction, where the error sits (a heat map of the mean
absolute error over the three channels, 0 to :data:`ERROR_SCALE` of 255 levels, brighter = larger), the
figures ``viq eval-recon`` gives (PSNR / SSIM on the encoded area, bits per pixel of the ``.viq`` file:
the same functions, so the same numbers), and the code maps: every patch's ``codes_per_patch`` codes as
a small grid of cells (slot ``j`` of a patch at row ``j // 2``, column ``j % 2`` for 4 codes), coloured by
their FSQ values (:func:`viq.eval.codebook.code_colours`: equal codes share a colour, close values look
alike), plus one map per head. Hovering a map names the code under the pointer: index, patch, head and
FSQ values. The codes' slots are the head's attention streams, not a spatial 2x2 split of the patch
(:mod:`viq.model.head`); the map draws them side by side because that is where they come from.

Then the codebook: usage, entropy, perplexity and dead codes overall and per head, and the most used
codes, each with a gallery of the image patches that receive it (BEiT-style: the whole patch of the
input, since the slots are heads rather than sub-patches).

The page embeds everything (thumbnails as WebP quality 90, lossless PNG with ``lossless=True``; the error map
at half size, WebP quality 60; code maps as PNG;
the codes themselves as base64 little-endian integers for the hover); nothing is fetched from
elsewhere, so it opens offline and can be sent as one file. Image cards render lazily
(``content-visibility: auto``), so a page of a thousand images stays responsive.

Inputs are image sources (``viq eval-recon``'s) or :class:`~viq.formats.codes.Codes` (a code store's
records: reconstruction and code maps only, there is no original to compare with).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from viq.eval.baselines import bicubic_at_bits, mean_colour
from viq.eval.codebook import CodebookCounter, code_colours, slot_grid
from viq.eval.intervals import mean_ci95
from viq.eval.recon import codes_bits, encode_and_score, psnr_ssim
from viq.formats.codes import Codes
from viq.formats.image import PreparedImage, PreprocessConfig, to_pil
from viq.formats.image import preprocess as prepare_image

__all__ = [
    "ERROR_SCALE",
    "ImageView",
    "inspect_image",
    "inspect_codes",
    "code_map",
    "error_map",
    "render_page",
    "render_codebook_page",
    "codebook_section",
    "show_images",
]

#: Mean absolute error (8-bit levels) drawn at full brightness in the error map; larger errors clip.
ERROR_SCALE = 64
#: Default longest side of an embedded thumbnail, pixels.
THUMB = 256
#: Smallest displayed side: tiny images are shown enlarged (nearest neighbour) so their patches are visible.
MIN_DISPLAY = 160

# An 'inferno'-like ramp (black -> purple -> orange -> yellow), for the error map.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


@dataclass
class ImageView:
    """What the page shows of one image.

    ``size`` is the encoded content ``(H, W)`` in pixels; ``original`` / ``recon`` / ``error`` are
    embedded image files (``None`` without an original); ``psnr`` (dB) / ``ssim`` as ``viq eval-recon``
    computes them; ``bpp``: bits per encoded pixel of the ``.viq`` file; ``item``: the input, kept to
    cut gallery patches from later.
    """

    source: str
    size: tuple[int, int]
    codes: Codes
    recon: bytes
    bpp: float
    payload_bpp: float
    original: bytes | None = None
    error: bytes | None = None
    psnr: float | None = None
    ssim: float | None = None
    mean_abs_error: float | None = None
    #: the baselines that would expose the figures, scored the same way: ``{name: (PSNR dB, SSIM)}`` for
    #: "bicubic at equal bits" (a thumbnail worth the codes' payload bits, scaled back) and "mean colour"
    baselines: dict[str, tuple[float, float]] = field(default_factory=dict)
    item: Any = field(default=None, repr=False)


def _encode(
    image: Image.Image, *, thumb: int, lossless: bool, resample=Image.Resampling.LANCZOS, quality: int = 90
) -> bytes:
    """``image`` shrunk to at most ``thumb`` px on its longest side, as WebP (``quality``) or PNG bytes."""
    if max(image.size) > thumb:
        scale = thumb / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    buf = io.BytesIO()
    if lossless:
        image.save(buf, format="PNG", optimize=True)
    else:
        image.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def error_map(reference: np.ndarray, recon: np.ndarray) -> tuple[Image.Image, float]:
    """``(H, W, 3)`` uint8 input and reconstruction -> the heat map (RGB) and the mean absolute error in
    8-bit levels. The map's brightness is the per-pixel mean over channels of ``|input - recon|``, on a
    fixed scale of 0 ... :data:`ERROR_SCALE` levels, so maps of different images compare."""
    err = np.abs(reference.astype(np.int16) - recon.astype(np.int16)).mean(-1)
    t = np.clip(err / ERROR_SCALE, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return Image.fromarray(np.round(rgb).astype(np.uint8)), float(err.mean())


def code_map(codes: Codes, slot: int | None = None) -> Image.Image:
    """The code map: one pixel per code, coloured by its FSQ values. ``slot=None``: every patch as a
    ``slot_grid(codes_per_patch)`` block of cells (``(h * rows, w * cols)`` pixels; a block's unused cells
    grey); ``slot=j``: head ``j`` alone, ``(h, w)`` pixels."""
    idx = codes.indices.numpy()  # (h, w, c)
    h, w, c = idx.shape
    colours = code_colours(idx, codes.levels)  # (h, w, c, 3)
    if slot is not None:
        return Image.fromarray(np.ascontiguousarray(colours[:, :, slot]))
    rows, cols = slot_grid(c)
    out = np.full((h, w, rows * cols, 3), 128, dtype=np.uint8)
    out[:, :, :c] = colours
    out = out.reshape(h, w, rows, cols, 3).transpose(0, 2, 1, 3, 4).reshape(h * rows, w * cols, 3)
    return Image.fromarray(np.ascontiguousarray(out))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def inspect_image(
    model: Any, item: Any, preprocess: PreprocessConfig | None = None, *, thumb: int = THUMB, lossless: bool = False
) -> ImageView:
    """Encode, reconstruct and score one image exactly as ``viq eval-recon`` does (preprocess with the
    model's resolution policy, ``model.encode_pixels``, ``model.reconstruct``, PSNR / SSIM on the encoded
    area, bpp of the ``.viq`` bytes), and make its pictures."""

    cfg = preprocess or PreprocessConfig(patch_size=model.patch_size)
    scored = encode_and_score(model, item, cfg)
    reference = scored.prepared.pixels
    payload_bits = scored.codes.num_codes * scored.codes.bits_per_code
    baselines = {
        "bicubic at equal bits": psnr_ssim(reference, bicubic_at_bits(reference, payload_bits)),
        "mean colour": psnr_ssim(reference, mean_colour(reference)),
    }
    original = to_pil(scored.prepared.pixels)
    heat, mae = error_map(np.asarray(original), np.asarray(scored.recon))
    return ImageView(
        source=str(scored.prepared.source),
        size=scored.prepared.content_size,
        codes=scored.codes,
        original=_encode(original, thumb=thumb, lossless=lossless),
        recon=_encode(scored.recon, thumb=thumb, lossless=lossless),
        # The heat map is a guide to where the error sits, not a picture to judge: half the resolution
        # (averaged, so no error is lost), lossy, about a quarter of the bytes of a full-size map.
        error=_encode(heat, thumb=max(16, thumb // 2), lossless=False, resample=Image.Resampling.BOX, quality=60),
        psnr=scored.psnr,
        ssim=scored.ssim,
        mean_abs_error=mae,
        baselines=baselines,
        bpp=scored.bpp,
        payload_bpp=scored.payload_bpp,
        item=item,
    )


def inspect_codes(model: Any, codes: Codes, source: str, *, thumb: int = THUMB, lossless: bool = False) -> ImageView:
    """A view of stored codes: the reconstruction and the code maps (no original, so no scores)."""

    recon_img = model.reconstruct([codes])[0]
    h, w = codes.image_size or (recon_img.height, recon_img.width)
    _, bpp, payload_bpp = codes_bits(codes, (h, w))
    return ImageView(
        source=source,
        size=(h, w),
        codes=codes,
        recon=_encode(recon_img, thumb=thumb, lossless=lossless),
        bpp=bpp,
        payload_bpp=payload_bpp,
    )


def show_images(
    model: Any,
    items: Iterable[Any],
    *,
    preprocess: PreprocessConfig | None = None,
    thumb: int = THUMB,
    lossless: bool = False,
    on_error: Callable[[str, Exception], Any] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[ImageView]:
    """:func:`inspect_image` (image sources) or :func:`inspect_codes` (``(source, Codes)`` pairs) of every
    item; with ``on_error`` a failing item is reported and left out, else the first failure raises."""
    views = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Codes):
                views.append(inspect_codes(model, item[1], item[0], thumb=thumb, lossless=lossless))
            else:
                views.append(inspect_image(model, item, preprocess, thumb=thumb, lossless=lossless))
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the others
            if on_error is None:
                raise
            source = (
                os.fspath(item)
                if isinstance(item, (str, os.PathLike))
                else item[0]
                if isinstance(item, tuple) and item and isinstance(item[0], str)
                else f"image {i}"
            )
            on_error(source, e)
        if progress is not None:
            progress(1)
    return views


# ----------------------------------------------------------------------------------------------
# galleries: the patches that receive the most used codes
# ----------------------------------------------------------------------------------------------


def _galleries(
    views: Sequence[ImageView],
    codes: Sequence[int],
    per_code: int,
    patch_size: int,
    preprocess: PreprocessConfig | None,
) -> dict[int, list[dict[str, Any]]]:
    """For each code, the first ``per_code`` patches (in image order, then raster order) that hold it in
    any slot: ``{"png", "source", "patch": (y, x), "slot"}``. Each input image is read again (once) to cut
    its patches, so no pixels are held between the two passes."""
    wanted: dict[int, list[tuple[int, int, int, int]]] = {int(c): [] for c in codes}
    for v, view in enumerate(views):
        if view.item is None:
            continue
        idx = view.codes.indices.numpy()
        for code, hits in wanted.items():
            if len(hits) >= per_code:
                continue
            ys, xs, js = np.nonzero(idx == code)
            for y, x, j in zip(ys[: per_code - len(hits)], xs, js):
                hits.append((v, int(y), int(x), int(j)))
    by_view: dict[int, list[tuple[int, int, int, int]]] = {}
    for code, hits in wanted.items():
        for v, y, x, j in hits:
            by_view.setdefault(v, []).append((code, y, x, j))
    out: dict[int, list[dict[str, Any]]] = {int(c): [] for c in codes}
    p = patch_size
    for v, hits in sorted(by_view.items()):
        item = views[v].item
        cfg = preprocess or PreprocessConfig(patch_size=p)
        prepared = item if isinstance(item, PreparedImage) else prepare_image(item, cfg)
        image = to_pil(prepared.pixels)
        for code, y, x, j in hits:
            patch = image.crop((x * p, y * p, (x + 1) * p, (y + 1) * p))  # past the content: black (padding)
            out[code].append({"png": _png(patch), "source": views[v].source, "patch": (y, x), "slot": j})
    return out


# ----------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em} h3{font-size:1em;margin:.2em 0;word-break:break-all}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eee} td.l,th.l{text-align:left}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0;
      content-visibility:auto;contain-intrinsic-size:auto 420px}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0} figcaption{font-size:12px;color:#555;text-align:center}
img.px{image-rendering:pixelated}
.heads{display:flex;gap:6px;margin-top:6px}
.heads img{width:var(--hw);height:var(--hh)}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #888;vertical-align:middle}
.gallery img{width:32px;height:32px;image-rendering:pixelated;margin:1px;border:1px solid #ccc}
.code{display:flex;gap:8px;align-items:center;margin:3px 0}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:3px 6px;border-radius:3px;
     font:12px monospace;display:none;z-index:10}
.note{color:#555;font-size:12px}
"""

# The hover: decode the section's codes once, map the pointer to (patch, slot), name the code.
_JS = """
const tip=document.getElementById('tip');
const LEVELS=JSON.parse(document.body.dataset.levels);
function codesOf(sec){
  if(!sec._codes){const b=atob(sec.dataset.codes), n=+sec.dataset.bytes, a=new Array(b.length/n);
    for(let i=0;i<a.length;i++){let v=0;for(let k=n-1;k>=0;k--)v=v*256+b.charCodeAt(i*n+k);a[i]=v;}
    sec._codes=a;}
  return sec._codes;}
function values(i){const out=[];for(const L of LEVELS){const h=Math.floor(L/2);out.push(((i%L)-h)/h);i=Math.floor(i/L);}
  return out.map(v=>v.toFixed(2)).join(', ');}
document.addEventListener('mousemove',e=>{
  const t=e.target;
  if(!(t instanceof HTMLImageElement)||!t.classList.contains('codemap')){tip.style.display='none';return;}
  const sec=t.closest('section'), h=+sec.dataset.h, w=+sec.dataset.w, c=+sec.dataset.c;
  const sr=+sec.dataset.sr, sc=+sec.dataset.sc, slot=+t.dataset.slot, r=t.getBoundingClientRect();
  const fx=Math.min(Math.max((e.clientX-r.left)/r.width,0),0.999999), fy=Math.min(Math.max((e.clientY-r.top)/r.height,0),0.999999);
  let y,x,j;
  if(slot<0){const cy=Math.floor(fy*h*sr), cx=Math.floor(fx*w*sc);y=Math.floor(cy/sr);x=Math.floor(cx/sc);j=(cy%sr)*sc+(cx%sc);}
  else{y=Math.floor(fy*h);x=Math.floor(fx*w);j=slot;}
  if(j>=c){tip.style.display='none';return;}
  const code=codesOf(sec)[c*(y*w+x)+j];
  tip.textContent=`code ${code} · patch (${y}, ${x}) · head ${j} · FSQ (${values(code)})`;
  tip.dataset.code=code;tip.dataset.patch=`${y},${x},${j}`;
  tip.style.display='block';
  const left=e.clientX+12+tip.offsetWidth>innerWidth?e.clientX-12-tip.offsetWidth:e.clientX+12;
  tip.style.left=Math.max(0,left)+'px';tip.style.top=(e.clientY+12)+'px';
});
"""


def _data_uri(data: bytes) -> str:
    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "webp"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def _display_size(h: int, w: int, thumb: int) -> tuple[int, int]:
    """Displayed (height, width) of a picture of ``h x w`` pixels: at most ``thumb`` on the longest side,
    tiny images enlarged to :data:`MIN_DISPLAY`."""
    scale = min(thumb / max(h, w), max(1.0, MIN_DISPLAY / max(h, w)))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _card(i: int, view: ImageView, thumb: int) -> str:
    codes = view.codes
    gh, gw, c = codes.indices.shape
    p = codes.patch_size
    h, w = view.size
    dh, dw = _display_size(h, w, thumb)
    scale = dh / h
    mh, mw = round(gh * p * scale), round(gw * p * scale)  # the code map covers the padded grid
    rows, cols = slot_grid(c)
    nbytes = 2 if codes.codebook_size <= 1 << 16 else 4
    payload = codes.indices.numpy().astype(f"<u{nbytes}").tobytes()
    small = dh < 2 * h or dh <= MIN_DISPLAY
    px = ' class="px"' if small else ""

    def fig(data: bytes | None, caption: str, extra: str = "") -> str:
        if data is None:
            return ""
        return (
            f'<figure><img{px} src="{_data_uri(data)}" width="{dw}" height="{dh}" alt="{caption}"{extra}>'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    metrics = f"{h}×{w} px, grid {gh}×{gw} patches, {codes.num_codes} codes · {_fmt(view.bpp, '.4f')} bpp" + (
        f" · PSNR {_fmt(view.psnr, '.2f')} dB · SSIM {_fmt(view.ssim, '.3f')} · mean |error| "
        f"{_fmt(view.mean_abs_error, '.1f')} of 255"
        + "".join(f" · {name}: {_fmt(p, '.2f')} dB, SSIM {_fmt(s, '.3f')}" for name, (p, s) in view.baselines.items())
        if view.psnr is not None
        else " · no original"
    )
    heads = (
        "".join(
            f'<figure><img class="codemap px" data-slot="{j}" src="{_data_uri(_png(code_map(codes, j)))}" '
            f'alt="head {j}"><figcaption>head {j}</figcaption></figure>'
            for j in range(c)
        )
        if c > 1
        else ""
    )
    hw, hh = max(48, mw // 2), max(48, mh // 2)
    return (
        f'<section class="card" id="img{i}" data-h="{gh}" data-w="{gw}" data-c="{c}" data-sr="{rows}" '
        f'data-sc="{cols}" data-bytes="{nbytes}" data-codes="{base64.b64encode(payload).decode()}" '
        f'data-psnr="{view.psnr!r}" data-ssim="{view.ssim!r}" data-bpp="{view.bpp!r}" '
        f'data-bicubic="{view.baselines.get("bicubic at equal bits", (None,))[0]!r}">'
        f'<h3>{i + 1}. {html.escape(view.source)}</h3><div class="note">{metrics}</div><div class="row">'
        + fig(view.original, "input (as encoded)")
        + fig(view.recon, "reconstruction")
        + fig(view.error, f"|error|, 0 … {ERROR_SCALE}+ levels")
        + f'<figure><img class="codemap px" data-slot="-1" src="{_data_uri(_png(code_map(codes)))}" width="{mw}" '
        f'height="{mh}" alt="codes"><figcaption>codes ({rows}×{cols} per patch; hover)</figcaption></figure>'
        + f'</div><div class="heads" style="--hw:{hw}px;--hh:{hh}px">{heads}</div></section>'
    )


def _health_table(summary: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, Any]) -> str:
        return (
            f'<tr><td class="l">{name}</td><td>{s["codes"]}</td><td>{s["usage"]:.2%}</td><td>{s["used"]}</td>'
            f"<td>{s['dead']}</td><td>{s['entropy_bits']:.2f}</td><td>{s['perplexity']:.1f}</td></tr>"
        )

    rows = [row("all heads", summary["overall"])] + [row(f"head {j}", s) for j, s in enumerate(summary["heads"])]
    return (
        '<table><tr><th class="l"></th><th>codes</th><th>usage</th><th>used</th><th>dead</th>'
        f"<th>entropy bits (of {summary['log2_codebook']:.1f})</th><th>perplexity</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def codebook_section(
    summary: dict[str, Any], galleries: dict[int, list[dict[str, Any]]] | None = None, note: str = ""
) -> str:
    """The codebook part of the page: health per head, and the most used codes with their galleries."""
    items = []
    for t in summary["top"]:
        gallery = "".join(
            f'<img src="{_data_uri(g["png"])}" title="{html.escape(g["source"])} patch {g["patch"]} head {g["slot"]}" '
            f'alt="patch">'
            for g in (galleries or {}).get(t["index"], [])
        )
        items.append(
            f'<div class="code"><span class="swatch" style="background:{t["colour"]}"></span>'
            f"<b>{t['index']}</b> {t['count']} ({t['share']:.2%}) FSQ ({', '.join(f'{v:.2f}' for v in t['values'])})"
            f'<span class="gallery">{gallery}</span></div>'
        )
    return (
        f'<h2>Codebook</h2><div class="note">{summary["images"]} image(s), {summary["codes"]} codes; K = '
        f"{summary['codebook_size']} (levels {tuple(summary['levels'])}). Usage: share of the K codes seen; dead: "
        f"never seen; entropy of the empirical code distribution in bits per code; perplexity = 2^entropy. "
        f"{note}</div>"
        + _health_table(summary)
        + '<h2>Most used codes</h2><div class="note">Each with the patches that receive it (the whole patch: '
        "the codes of a patch are its heads, not sub-patches).</div>" + "".join(items)
    )


def render_page(
    views: Sequence[ImageView],
    *,
    title: str,
    model_name: str = "",
    thumb: int = THUMB,
    top_codes: int = 16,
    gallery: int = 8,
    preprocess: PreprocessConfig | None = None,
    counter: CodebookCounter | None = None,
) -> str:
    """The HTML page of ``views`` (see the module docstring); ``counter`` (default: the views' own codes)
    gives the codebook figures."""
    if not views and counter is None:
        raise ValueError("nothing to show: no images")
    first = views[0].codes if views else None
    if counter is None:
        counter = CodebookCounter(first.levels, first.codes_per_patch)
        for v in views:
            counter.add(v.codes)
    summary = counter.summary(top=top_codes)
    patch = first.patch_size if first is not None else 16
    galleries = _galleries(views, [t["index"] for t in summary["top"]], gallery, patch, preprocess) if gallery else {}
    scored = [v for v in views if v.psnr is not None]
    lines = []
    if scored:
        for name, vals, spec in (
            ("PSNR dB", [v.psnr for v in scored], ".2f"),
            ("SSIM", [v.ssim for v in scored], ".3f"),
            ("bpp", [v.bpp for v in scored], ".4f"),
            *(
                (f"PSNR dB, {name}", [v.baselines[name][0] for v in scored if name in v.baselines], ".2f")
                for name in scored[0].baselines
            ),
        ):
            mean, ci = mean_ci95(vals)
            ci_text = f" (95 % CI {_fmt(ci[0], spec)} … {_fmt(ci[1], spec)})" if ci[0] is not None else ""
            lines.append(f'<tr><td class="l">{name}</td><td>{_fmt(mean, spec)}{ci_text}</td></tr>')
    index_rows = "".join(
        f'<tr><td class="l"><a href="#img{i}">{html.escape(v.source)}</a></td><td>{v.size[0]}×{v.size[1]}</td>'
        f"<td>{_fmt(v.psnr, '.2f')}</td><td>{_fmt(v.ssim, '.3f')}</td><td>{_fmt(v.bpp, '.4f')}</td></tr>"
        for i, v in enumerate(views)
    )
    cards = "".join(_card(i, v, thumb) for i, v in enumerate(views))
    levels = list(counter.levels)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        f"style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<style>{_CSS}</style></head><body data-levels='{levels}'><div id=\"tip\"></div>"
        f'<h1>{html.escape(title)}</h1><div class="note">model {html.escape(model_name)} · {len(views)} image(s) · '
        f"PSNR / SSIM on the encoded area, bpp of the .viq file (as viq eval-recon)</div>"
        + (f"<table>{''.join(lines)}</table>" if lines else "")
        + codebook_section(summary, galleries)
        + f'<h2>Images</h2><table><tr><th class="l">image</th><th>H×W</th><th>PSNR dB</th><th>SSIM</th><th>bpp</th></tr>'
        f"{index_rows}</table>{cards}<script>{_JS}</script></body></html>"
    )


def render_codebook_page(counter: CodebookCounter, *, title: str, note: str = "", top_codes: int = 16) -> str:
    """A page with the codebook part only (``viq store stats --page``: codes without images or a model)."""
    summary = counter.summary(top=top_codes)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        f"style-src 'unsafe-inline'\"><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + codebook_section(summary, None, html.escape(note))
        + "</body></html>"
    )
