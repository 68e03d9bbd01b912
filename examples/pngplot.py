"""A tiny line-chart renderer that writes PNG files with zlib and struct only (no matplotlib).

    line_plot("loss.png", [Series("sync", [0, 100, 200], [5.5, 2.4, 2.1], (0, 0, 0))],
              title="...", xlabel="...", ylabel="...", marks=[Mark(150, "KILL PEER1", (200, 0, 0))])

Text uses a built-in 3x5 pixel font (upper case, digits, a little punctuation) drawn at twice the size.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

RGB = tuple[int, int, int]

# 3x5 glyphs: five rows of three bits, top row first ("#" = ink).
_FONT_ROWS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###", "3": "### ..# .## ..# ###",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###", "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.",
    "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ###",
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..", "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..",
    "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#", "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    " ": "... ... ... ... ...", ".": "... ... ... ... .#.", ",": "... ... ... .#. #..", ":": "... .#. ... .#. ...",
    "-": "... ... ### ... ...", "+": "... .#. ### .#. ...", "=": "... ### ... ### ...", "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.", "/": "..# ..# .#. #.. #..", "%": "#.# ..# .#. #.. #.#", "_": "... ... ... ... ###",
    "[": "##. #.. #.. #.. ##.", "]": ".## ..# ..# ..# .##", ">": "#.. .#. ..# .#. #..", "<": "..# .#. #.. .#. ..#",
    "?": "##. ..# .#. ... .#.", "!": ".#. .#. .#. ... .#.", "|": ".#. .#. .#. .#. .#.", "*": "#.# .#. ### .#. #.#",
    "'": ".#. .#. ... ... ...", "#": "#.# ### #.# ### #.#",
}
FONT = {ch: [[c == "#" for c in row] for row in rows.split()] for ch, rows in _FONT_ROWS.items()}
SCALE = 2
CHAR_W, CHAR_H = 4 * SCALE, 5 * SCALE  # advance (glyph + one column of space), height

PALETTE: list[RGB] = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                      (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: RGB = (31, 119, 180)
    dashed: bool = False


@dataclass
class Mark:
    """A vertical line at ``x`` with a label (e.g. a fault)."""
    x: float
    label: str
    color: RGB = (200, 0, 0)


@dataclass
class Canvas:
    width: int
    height: int
    pixels: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.pixels = bytearray(b"\xff" * (self.width * self.height * 3))

    def set(self, x: int, y: int, c: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c: RGB) -> None:
        for y in range(max(0, y0), min(self.height, y1)):
            for x in range(max(0, x0), min(self.width, x1)):
                self.set(x, y, c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c: RGB, width: int = 1, dash: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for i in range(n + 1):
            if dash and (i // dash) % 2:
                continue
            t = i / n
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(width):
                for dy in range(width):
                    self.set(x + dx - width // 2, y + dy - width // 2, c)

    def text(self, x: int, y: int, s: str, c: RGB = (0, 0, 0), vertical: bool = False) -> None:
        """Draw ``s`` with its top-left corner at (x, y); vertical text reads bottom to top."""
        for k, ch in enumerate(s.upper()):
            glyph = FONT.get(ch, FONT["?"])
            for r, row in enumerate(glyph):
                for col, on in enumerate(row):
                    if not on:
                        continue
                    for sy in range(SCALE):
                        for sx in range(SCALE):
                            gx, gy = k * CHAR_W + col * SCALE + sx, r * SCALE + sy
                            if vertical:
                                self.set(x + gy, y - gx, c)
                            else:
                                self.set(x + gx, y + gy, c)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + \
            chunk(b"IEND", b"")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.3g}"


def line_plot(path: str | Path, series: Sequence[Series], title: str = "", xlabel: str = "", ylabel: str = "",
              marks: Sequence[Mark] = (), width: int = 900, height: int = 560,
              ylim: tuple[float, float] | None = None) -> None:
    cv = Canvas(width, height)
    left, right, top, bottom = 80, width - 20, 40, height - 60
    xs = [x for s in series for x in s.xs] + [m.x for m in marks]
    ys = [y for s in series for y in s.ys if math.isfinite(y)]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = ylim if ylim else ((min(ys), max(ys)) if ys else (0.0, 1.0))
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    if x1 <= x0:
        x1 = x0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    grid, axis = (230, 230, 230), (60, 60, 60)
    for t in nice_ticks(y0, y1):
        cv.line(left, py(t), right, py(t), grid)
        label = _fmt(t)
        cv.text(left - 6 - len(label) * CHAR_W, int(py(t)) - CHAR_H // 2, label, axis)
    for t in nice_ticks(x0, x1, 8):
        cv.line(px(t), top, px(t), bottom, grid)
        label = _fmt(t)
        cv.text(int(px(t)) - len(label) * CHAR_W // 2, bottom + 6, label, axis)
    cv.line(left, bottom, right, bottom, axis)
    cv.line(left, top, left, bottom, axis)
    below_legend = top + 20 + len(series) * (CHAR_H + 6)
    for k, m in enumerate(marks):
        cv.line(px(m.x), top, px(m.x), bottom, m.color, dash=6)
        cv.text(int(px(m.x)) + 4, below_legend + (k % 4) * (CHAR_H + 4), m.label, m.color)
    for s in series:
        pts = [(px(x), py(y)) for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            cv.line(ax, ay, bx, by, s.color, width=2, dash=5 if s.dashed else 0)
        if len(pts) == 1:
            cv.rect(int(pts[0][0]) - 2, int(pts[0][1]) - 2, int(pts[0][0]) + 3, int(pts[0][1]) + 3, s.color)
    # legend (top right, inside the plot)
    lw = max((len(s.label) for s in series), default=0) * CHAR_W + 40
    lx, ly = right - lw - 10, top + 10
    if series:
        cv.rect(lx - 6, ly - 6, right - 4, ly + len(series) * (CHAR_H + 6) + 2, (255, 255, 255))
    for k, s in enumerate(series):
        yy = ly + k * (CHAR_H + 6)
        cv.line(lx, yy + CHAR_H // 2, lx + 24, yy + CHAR_H // 2, s.color, width=2, dash=5 if s.dashed else 0)
        cv.text(lx + 32, yy, s.label, (20, 20, 20))
    cv.text((width - len(title) * CHAR_W) // 2, 12, title)
    cv.text((left + right - len(xlabel) * CHAR_W) // 2, height - 24, xlabel, axis)
    cv.text(18, (top + bottom + len(ylabel) * CHAR_W) // 2, ylabel, axis, vertical=True)
    Path(path).write_bytes(cv.png())
