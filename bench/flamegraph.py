"""A flame graph SVG of folded stacks (``bench/stacks.py``), written here in a page of code.

py-spy renders one SVG per process; the bench merges every worker's samples first, so
it draws the merged stacks itself. The layout is the usual one: the root at the bottom,
callees above their caller, siblings in name order, each box as wide as its samples.
Boxes are coloured by layer (a legend on top), so the costs the tables name can be found
in the picture; hovering a box shows its full frame and sample count (``<title>``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from bench.stacks import LAYER_NAMES, Stack, layer_of

WIDTH = 1200.0
ROW = 17.0
MARGIN = 10.0
LEGEND = 44.0
MIN_WIDTH = 0.3  # px: narrower boxes are not drawn (their samples stay in their parents)
PALETTE = ("#e4572e", "#f3a712", "#a8c256", "#29335c", "#669bbc", "#8e5572", "#c0d6df",
           "#4f6d7a", "#dd6e42", "#e8dab2", "#b5838d", "#6d597a", "#b0b0b0", "#d9d9d9")
COLOURS = dict(zip(LAYER_NAMES, PALETTE))


@dataclass
class Node:
    name: str
    count: int = 0
    children: dict[str, Node] = field(default_factory=dict)


def tree(stacks: Counter[Stack]) -> Node:
    """The call tree of the stacks: each node counts the samples that passed through it."""
    root = Node("all")
    for stack, count in stacks.items():
        node = root
        node.count += count
        for frame in stack:
            node = node.children.setdefault(frame, Node(frame))
            node.count += count
    return root


def depth(node: Node) -> int:
    return 1 + max((depth(child) for child in node.children.values()), default=0)


def render(stacks: Counter[Stack], title: str) -> str:
    """The SVG document of ``stacks`` under ``title``."""
    root = tree(stacks)
    height = LEGEND + depth(root) * ROW + 2 * MARGIN
    scale = (WIDTH - 2 * MARGIN) / max(root.count, 1)
    boxes: list[str] = []
    _boxes(root, MARGIN, height - MARGIN - ROW, scale, root.count, boxes)
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH:g}" height="{height:g}" '
        f'viewBox="0 0 {WIDTH:g} {height:g}" font-family="Verdana, sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{WIDTH:g}" height="{height:g}" fill="#ffffff"/>',
        f'<text x="{MARGIN:g}" y="16" font-size="14">{escape(title)}</text>',
        *_legend(),
        *boxes,
        "</svg>",
        "",
    ])


def _boxes(node: Node, x: float, y: float, scale: float, total: int, out: list[str]) -> None:
    """``node``'s box at (x, y), then its children's, left to right, one row up."""
    width = node.count * scale
    if width < MIN_WIDTH:
        return
    share = 100.0 * node.count / total
    colour = COLOURS[layer_of(node.name)] if node.name != "all" else "#ffffff"
    label = _fit(node.name, width)
    out.append(
        f'<g><title>{escape(node.name)} ({node.count} samples, {share:.2f}%)</title>'
        f'<rect x="{x:.2f}" y="{y:.2f}" width="{width:.3f}" height="{ROW - 1:g}" fill="{colour}" '
        f'stroke="#ffffff" stroke-width="0.3" data-samples="{node.count}"/>'
        + (f'<text x="{x + 3:.2f}" y="{y + ROW - 5:.2f}">{escape(label)}</text>' if label else "")
        + "</g>"
    )
    for name in sorted(node.children):
        child = node.children[name]
        _boxes(child, x, y - ROW, scale, total, out)
        x += child.count * scale


def _fit(name: str, width: float) -> str:
    """As much of ``name`` as fits in ``width`` px (about 6.5 px a character), '' if too little."""
    room = int((width - 6) / 6.5)
    if room < 3:
        return ""
    return name if len(name) <= room else name[: room - 2] + ".."


def _legend() -> list[str]:
    """One swatch per layer, in two rows."""
    items, per_row = [], (len(LAYER_NAMES) + 1) // 2
    for index, name in enumerate(LAYER_NAMES):
        x = MARGIN + (index % per_row) * (WIDTH - 2 * MARGIN) / per_row
        y = 24 + (index // per_row) * 14
        items.append(f'<rect x="{x:.1f}" y="{y:g}" width="10" height="10" fill="{COLOURS[name]}"/>'
                     f'<text x="{x + 14:.1f}" y="{y + 9:g}" font-size="9">{escape(name)}</text>')
    return items

