"""A PNG timeline of a simulated run (members, ops, faults over time), written with zlib + struct only.

Lanes, top to bottom: a time axis; one lane per peer (green: live, yellow: stopped, orange: cut off; end
mark red: killed / crashed, grey: left / finished); an "OPS" lane (green tick per committed op, its height
growing with the number of members; red tick per aborted op); fault markers (purple lines, listed below
with their time, kind and target). No plotting library is needed: matplotlib is not installed here, and a
timeline needs only rectangles and a 3x5 pixel font.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import Any

RGB = tuple[int, int, int]
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
GREEN, YELLOW, ORANGE, RED, PURPLE = (60, 170, 80), (230, 200, 40), (240, 130, 30), (200, 30, 30), (140, 60, 170)

# 3x5 glyphs: five rows of three pixels, top to bottom ('#' = ink).
_GLYPHS = """
A .#./#.#/###/#.#/#.#  B ##./#.#/##./#.#/##.  C .##/#../#../#../.##  D ##./#.#/#.#/#.#/##.
E ###/#../##./#../###  F ###/#../##./#../#..  G .##/#../#.#/#.#/.##  H #.#/#.#/###/#.#/#.#
I ###/.#./.#./.#./###  J ..#/..#/..#/#.#/.#.  K #.#/#.#/##./#.#/#.#  L #../#../#../#../###
M #.#/###/###/#.#/#.#  N ##./#.#/#.#/#.#/#.#  O .#./#.#/#.#/#.#/.#.  P ##./#.#/##./#../#..
Q .#./#.#/#.#/##./.##  R ##./#.#/##./#.#/#.#  S .##/#../.#./..#/##.  T ###/.#./.#./.#./.#.
U #.#/#.#/#.#/#.#/###  V #.#/#.#/#.#/#.#/.#.  W #.#/#.#/###/###/#.#  X #.#/#.#/.#./#.#/#.#
Y #.#/#.#/.#./.#./.#.  Z ###/..#/.#./#../###  0 ###/#.#/#.#/#.#/###  1 .#./##./.#./.#./###
2 ##./..#/.#./#../###  3 ##./..#/.#./..#/##.  4 #.#/#.#/###/..#/..#  5 ###/#../##./..#/##.
6 .##/#../###/#.#/###  7 ###/..#/.#./.#./.#.  8 ###/#.#/###/#.#/###  9 ###/#.#/###/..#/##.
. .../.../.../.../.#.  : .../.#./.../.#./...  - .../.../###/.../...  _ .../.../.../.../###
/ ..#/..#/.#./#../#..  ( .#./#../#../#../.#.  ) .#./..#/..#/..#/.#.  + .../.#./###/.#./...
"""
_FONT = {ch: rows.replace("/", "") for ch, rows in re.findall(r"(\S) ([.#]{3}(?:/[.#]{3}){4})", _GLYPHS)}
_FONT[" "] = "." * 15


class Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(WHITE * (w * h))

    def rect(self, x0: float, y0: float, x1: float, y1: float, c: RGB) -> None:
        xa, xb = max(0, int(x0)), min(self.w, max(int(x1), int(x0) + 1))
        ya, yb = max(0, int(y0)), min(self.h, max(int(y1), int(y0) + 1))
        row = bytes(c) * (xb - xa)
        for y in range(ya, yb):
            i = (y * self.w + xa) * 3
            self.px[i:i + len(row)] = row

    def text(self, x: int, y: int, s: str, c: RGB = BLACK, scale: int = 2) -> None:
        for ch in s.upper():
            g = _FONT.get(ch, _FONT["."])
            for k, bit in enumerate(g):
                if bit == "#":
                    self.rect(x + (k % 3) * scale, y + (k // 3) * scale, x + (k % 3 + 1) * scale,
                              y + (k // 3 + 1) * scale, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_timeline(path: str | Path, history: list[dict[str, Any]], width: int = 1400) -> None:
    peers: list[str] = []
    for h in history:
        if h.get("type") == "peer" and h["peer"] not in peers:
            peers.append(h["peer"])
    times = [h["t"] for h in history if "t" in h]
    if not times:
        raise ValueError("empty history")
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1e-3)
    left, right, lane, top = 130, 20, 22, 40
    ops_y = top + lane * len(peers) + 10
    fault_y = ops_y + 50
    faults = [h for h in history if h.get("type") == "fault"]
    height = fault_y + 20 + 14 * min(len(faults), 40)
    cv = Canvas(width, height)

    def x(t: float) -> float:
        return left + (t - t0) / span * (width - left - right)

    # time axis
    step = next(s for s in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600) if span / s <= 12)
    k = 0.0
    while k <= span:
        cv.rect(x(t0 + k), top - 6, x(t0 + k) + 1, fault_y, GREY)
        cv.text(int(x(t0 + k)) + 2, top - 20, f"{k:g}S")
        k += step
    # peer lanes
    for i, p in enumerate(peers):
        y = top + i * lane
        cv.text(5, y + 4, p[:15])
        state, since = "", t0
        for h in sorted((h for h in history if h.get("type") == "peer" and h["peer"] == p), key=lambda h: h["t"]):
            _paint(cv, x, y, state, since, h["t"], lane)
            state, since = h["state"], h["t"]
            if h["state"] == "down":
                ended = h.get("how") in ("exited", "left")
                cv.rect(x(h["t"]) - 2, y, x(h["t"]) + 2, y + lane - 4, GREY if ended else RED)
        _paint(cv, x, y, state, since, t1, lane)
    # ops lane
    cv.text(5, ops_y + 10, "OPS")
    for o in (h for h in history if h.get("type") == "op"):
        if o["verdict"] == "commit":
            hgt = 8 + 4 * len(o["members"])
            cv.rect(x(o["t_end"]), ops_y + 40 - hgt, x(o["t_end"]) + 1, ops_y + 40, GREEN)
        else:
            cv.rect(x(o["t_end"]), ops_y, x(o["t_end"]) + 2, ops_y + 40, RED)
    # faults
    cv.text(5, fault_y, "FAULTS")
    for f in faults:  # full-height lines while they stay readable, else ticks over the ops lane
        cv.rect(x(f["t"]), top if len(faults) <= 40 else ops_y - 8, x(f["t"]) + 1, ops_y + 40, PURPLE)
    for j, f in enumerate(faults[:40]):  # the first 40 get a label
        cv.text(int(x(f["t"])) + 3, fault_y + 14 * j, f"{f['t'] - t0:.1f} {f['kind']} {f.get('who', '')}"[:40],
                PURPLE)
    if len(faults) > 40:
        cv.text(5, fault_y + 14, f"+{len(faults) - 40} MORE", PURPLE)
    Path(path).write_bytes(cv.png())


def _paint(cv: Canvas, x: Any, y: int, state: str, a: float, b: float, lane: int) -> None:
    color = {"up": GREEN, "resumed": GREEN, "healed": GREEN, "stopped": YELLOW, "cut": ORANGE}.get(state)
    if color is not None:
        cv.rect(x(a), y + 2, x(b), y + lane - 6, color)
