"""The KV page map as a rich table (--kv-report) and as a PNG picture (--kv-report-png), without extra packages."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from rich.table import Table

from infopt.runtime.engine import PageMap

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
FREE, EMPTY_SLOT, SHARED_EDGE = (235, 235, 235), (250, 250, 250), (0, 0, 0)


def summary(page_map: PageMap) -> dict:
    allocated = page_map.used_blocks * page_map.block_size
    return {"blocks": page_map.num_blocks, "used_blocks": page_map.used_blocks,
            "utilisation": page_map.used_blocks / page_map.num_blocks, "allocated_slots": allocated,
            "filled_slots": page_map.filled_slots, "internal_fragmentation": page_map.internal_fragmentation,
            "shared_blocks": page_map.shared_blocks, "sequences": len(page_map.sequences)}


def page_table(page_map: PageMap) -> Table:
    """One row per sequence: its request, tokens, blocks (shared ones marked *) and unused slots."""
    s = summary(page_map)
    table = Table(title=(f"KV page map at peak use: {s['used_blocks']}/{s['blocks']} blocks of {page_map.block_size} "
                         f"({s['utilisation']:.1%}), internal fragmentation {s['internal_fragmentation']:.2%}, "
                         f"{s['shared_blocks']} shared"))
    for column in ("sequence", "request", "tokens", "blocks", "unused slots in last block"):
        table.add_column(column, justify="right" if column != "blocks" else "left")
    for seq_id, (request, tokens, blocks) in sorted(page_map.sequences.items()):
        shown = " ".join(f"{b}*" if len(page_map.owners[b]) > 1 else str(b) for b in blocks)
        unused = len(blocks) * page_map.block_size - tokens
        table.add_row(str(seq_id), str(request), str(tokens), shown, str(unused))
    return table


def _color(page_map: PageMap, block: int) -> tuple[int, int, int]:
    owners = page_map.owners.get(block)
    if not owners:
        return FREE
    request = page_map.sequences[owners[0]][0]
    return PALETTE[request % len(PALETTE)]


MAX_DRAWN_BLOCKS = 4096


def drawn_blocks(page_map: PageMap, columns: int = 32) -> int:
    """Blocks in the picture: up to the highest one in use (whole rows), at most MAX_DRAWN_BLOCKS."""
    highest = max(page_map.owners, default=0) + 1
    return min(page_map.num_blocks, MAX_DRAWN_BLOCKS, -(-highest // columns) * columns)


def render(page_map: PageMap, columns: int = 32, cell: int = 14) -> list[list[tuple[int, int, int]]]:
    """Pixels: one cell per block in a grid, coloured by request; the filled share of a block is drawn as that
    many of its block_size stripes; shared blocks get a black frame. Blocks past drawn_blocks() are all free."""
    count = drawn_blocks(page_map, columns)
    rows = -(-count // columns)
    image = [[(255, 255, 255)] * (columns * cell) for _ in range(rows * cell)]
    stripe = max(1, (cell - 2) / page_map.block_size)
    for block in range(count):
        top, left = (block // columns) * cell, (block % columns) * cell
        color = _color(page_map, block)
        filled = page_map.fill.get(block, 0)
        shared = len(page_map.owners.get(block, ())) > 1
        for y in range(1, cell - 1):
            for x in range(1, cell - 1):
                edge = y in (1, cell - 2) or x in (1, cell - 2)
                if shared and edge:
                    pixel = SHARED_EDGE
                elif color is FREE:
                    pixel = FREE
                else:
                    pixel = color if (x - 1) < filled * stripe else EMPTY_SLOT
                image[top + y][left + x] = pixel
    return image


def write_png(page_map: PageMap, path: Path) -> None:
    """An 8-bit RGB PNG (signature, IHDR, one zlib IDAT, IEND; layout per the PNG specification, RFC 2083)."""
    image = render(page_map)
    height, width = len(image), len(image[0])
    raw = b"".join(b"\x00" + bytes(c for pixel in row for c in pixel) for row in image)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
