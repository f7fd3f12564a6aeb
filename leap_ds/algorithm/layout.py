"""How prunable units tile one weight matrix.

Every granularity is a tiling of the (out_features, in_features) matrix by
``tile_rows x tile_cols`` tiles, and a unit is one tile:

==============  =======================  ===========================
granularity     tile                     units
==============  =======================  ===========================
unstructured    1 x 1                    every weight
block           b_r x b_c                every tile
row             1 x in                   every output row
column          out x 1                  every input column
head (Q, K, V)  head_dim x in            every head's rows
head (output)   out x head_dim           every head's input columns
channel (in)    1 x in                   every FFN hidden channel's row
channel (out)   out x 1                  every FFN hidden channel's column
==============  =======================  ===========================

With grouped-query attention a head unit is one key/value group: rows /
kv_heads rows of Q, K and V each and cols / kv_heads columns of the output
(:mod:`selection` builds those layouts directly).

One class serves all of them, so scores, masks and shard arithmetic are
written once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileLayout:
    rows: int          # logical out_features
    cols: int          # logical in_features
    tile_rows: int
    tile_cols: int
    transposed: bool = False  # stored as (in, out), e.g. GPT-2's Conv1D

    def __post_init__(self):
        if self.rows % self.tile_rows or self.cols % self.tile_cols:
            raise ValueError(f"tile {self.tile_rows}x{self.tile_cols} does not divide a "
                             f"{self.rows}x{self.cols} weight")

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows // self.tile_rows, self.cols // self.tile_cols

    @property
    def num_units(self) -> int:
        r, c = self.grid
        return r * c

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def weights_per_unit(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def masks_bias(self) -> bool:
        """A unit that spans whole output rows removes their bias too."""
        return self.tile_cols == self.cols

    def unit_sq_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """Squared L2 norm of every unit of a logical (rows, cols) weight."""
        gr, gc = self.grid
        w = weight.detach().float().reshape(gr, self.tile_rows, gc, self.tile_cols)
        return w.pow(2).sum(dim=(1, 3)).flatten()

    def unit_sq_norms_of_slice(self, flat_values: torch.Tensor, start: int) -> torch.Tensor:
        """Partial squared norms from a contiguous slice of the *stored* flattened weight.

        This is what a rank holding one ZeRO-3 partition can compute alone;
        summing the results over ranks gives :meth:`unit_sq_norms` exactly.
        The slice is placed in a zero matrix of the full size, so the sum is
        the same vectorised reduction as for a whole weight.
        """
        squares = torch.zeros(self.numel, dtype=torch.float32, device=flat_values.device)
        squares[start:start + flat_values.numel()] = flat_values.detach().float().pow(2)
        if self.transposed:  # stored (cols, rows)
            logical = squares.view(self.cols, self.rows).t()
        else:
            logical = squares.view(self.rows, self.cols)
        gr, gc = self.grid
        return logical.reshape(gr, self.tile_rows, gc, self.tile_cols).sum(dim=(1, 3)).flatten()

    def expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """Unit mask (num_units,) -> weight mask, broadcastable to (rows, cols)."""
        gr, gc = self.grid
        if self.tile_cols == self.cols:   # whole rows: a column vector broadcasts
            return unit_mask.view(gr, 1).repeat_interleave(self.tile_rows, dim=0)
        if self.tile_rows == self.rows:   # whole columns: a row vector broadcasts
            return unit_mask.view(1, gc).repeat_interleave(self.tile_cols, dim=1)
        m = unit_mask.view(gr, 1, gc, 1).expand(gr, self.tile_rows, gc, self.tile_cols)
        return m.reshape(self.rows, self.cols)

    def bias_mask(self, unit_mask: torch.Tensor) -> torch.Tensor | None:
        if not self.masks_bias:
            return None
        return unit_mask.repeat_interleave(self.tile_rows)


def layout_for(granularity: str, rows: int, cols: int, *, block=None, head_dim=None,
               head_role=None, transposed=False) -> TileLayout:
    """The tiling of a (rows, cols) weight for a named granularity."""
    tiles = {
        "unstructured": lambda: (1, 1),
        "block": lambda: tuple(block),
        "row": lambda: (1, cols),
        "column": lambda: (rows, 1),
        "head": lambda: (head_dim, cols) if head_role == "qkv" else (rows, head_dim),
    }[granularity]()
    return TileLayout(rows, cols, tiles[0], tiles[1], transposed)
