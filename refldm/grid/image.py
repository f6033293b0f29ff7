"""The labelled grid image, as the web UI's X/Y/Z plot draws it: the x axis' values above the columns, the y
axis' values left of the rows, the z value (one image per z value) as a title; a failed cell is a grey tile
crossed in red with "failed". Labels use Pillow's default font. Tiles smaller than `MIN_TILE` pixels are
enlarged by a whole factor (nearest neighbour) so the labels fit; tiles of different sizes (a size axis) sit
top-left in slots of the largest.

May import: as the grid package (refldm/grid/__init__.py).
"""

from __future__ import annotations

__all__ = ["draw_grid"]

MIN_TILE = 128
PAD = 6
WHITE, BLACK, GREY, RED = (255, 255, 255), (0, 0, 0), (200, 200, 200), (200, 0, 0)


def _wrap(draw, text, font, width):
    """`text` in lines no wider than `width` pixels (a long word is cut by characters)."""
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:
            if line and draw.textlength(line + ch, font=font) > width:
                lines.append(line)
                line = ""
            line += ch
    return lines + [line] if line or not lines else lines


def draw_grid(tiles: dict, columns: list, rows: list, title: str | None = None):
    """One PIL image: tiles {(row, column): PIL image or None (failed)}, column and row labels (strings)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    images = [t for t in tiles.values() if t is not None]
    tw = max((t.width for t in images), default=64)
    th = max((t.height for t in images), default=64)
    scale = max(1, -(-MIN_TILE // max(tw, th)))
    tw, th = tw * scale, th * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top, bottom = measure.textbbox((0, 0), "Ag", font=font)[1::2]
    line_h = bottom - top + 3
    row_w = min(max([measure.textlength(r, font=font) for r in rows if r] + [0]) + 2 * PAD, 2 * tw) if any(rows) \
        else 0
    row_w = int(row_w)
    col_lines = [_wrap(measure, c, font, tw - 2) for c in columns]
    row_lines = [_wrap(measure, r, font, max(row_w - 2 * PAD, 8)) for r in rows]
    head = line_h * max(len(lines) for lines in col_lines) + 2 * PAD if any(columns) else PAD
    title_lines = _wrap(measure, title, font, max(row_w + len(columns) * (tw + PAD), 64)) if title else []
    title_h = line_h * len(title_lines) + PAD if title_lines else 0
    width = row_w + len(columns) * (tw + PAD) + PAD
    height = title_h + head + len(rows) * (th + PAD)
    grid = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(grid)
    for j, line in enumerate(title_lines):
        draw.text((PAD, PAD // 2 + j * line_h), line, fill=BLACK, font=font)
    for c, lines in enumerate(col_lines):
        x0 = row_w + PAD + c * (tw + PAD)
        y0 = title_h + head - PAD - line_h * len(lines)
        for j, line in enumerate(lines):
            draw.text((x0 + (tw - draw.textlength(line, font=font)) // 2, y0 + j * line_h), line, fill=BLACK,
                      font=font)
    for r, lines in enumerate(row_lines):
        y0 = title_h + head + r * (th + PAD) + (th - line_h * len(lines)) // 2
        for j, line in enumerate(lines):
            draw.text((PAD, y0 + j * line_h), line, fill=BLACK, font=font)
    for (r, c), tile in sorted(tiles.items()):
        x0, y0 = row_w + PAD + c * (tw + PAD), title_h + head + r * (th + PAD)
        if tile is None:
            draw.rectangle((x0, y0, x0 + tw - 1, y0 + th - 1), fill=GREY, outline=RED, width=2)
            draw.line((x0, y0, x0 + tw - 1, y0 + th - 1), fill=RED, width=2)
            draw.line((x0, y0 + th - 1, x0 + tw - 1, y0), fill=RED, width=2)
            label = "failed"
            draw.rectangle((x0 + tw // 2 - 24, y0 + th // 2 - line_h // 2 - 2, x0 + tw // 2 + 24,
                            y0 + th // 2 + line_h // 2 + 2), fill=WHITE)
            draw.text((x0 + (tw - draw.textlength(label, font=font)) // 2, y0 + (th - line_h) // 2 + 1), label,
                      fill=RED, font=font)
        else:
            grid.paste(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST), (x0, y0))
    return grid
