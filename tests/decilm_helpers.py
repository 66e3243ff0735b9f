"""The tiny DeciLM model the heterogeneous-layer and import tests share: six blocks holding every
kind of part a DeciLM block has (attention with 2 and with 4 K/V groups, attention replaced by one
linear layer, no attention; MLPs of three widths, an MLP replaced by one linear layer, no MLP; a
block with neither part), in ``config.json``'s ``block_configs`` form, read from
``configs/tiny_decilm.blocks.json``."""

import json
from pathlib import Path


def block(attention: str, ffn: str, heads_in_group: int | None = None, ffn_mult: float | None = None) -> dict:
    """One ``block_configs`` entry: ``attention`` / ``ffn`` "full", "linear" (replace_with_linear) or "none" (no_op)."""
    return {"attention": {"no_op": attention == "none", "replace_with_linear": attention == "linear",
                          "n_heads_in_group": heads_in_group},
            "ffn": {"no_op": ffn == "none", "replace_with_linear": ffn == "linear", "ffn_mult": ffn_mult}}


HIDDEN, HEADS, HEAD_DIM, VOCAB = 256, 4, 64, 512

BLOCKS_FILE = Path(__file__).resolve().parents[1] / "configs" / "tiny_decilm.blocks.json"
BLOCKS = json.loads(BLOCKS_FILE.read_text())["block_configs"]
"""Block i: 0 attention (n_heads_in_group 2) + MLP (ffn_mult 5.25); 1 no attention + MLP (1.3125);
2 linear attention + MLP (2.625); 3 attention (n_heads_in_group 1) + no MLP; 4 no attention + linear
MLP; 5 neither."""
# Independently of the file: int(2 * mult * 256 / 3) = 896, 224, 448, rounded up to multiples of 256.
FFN_WIDTHS = [1024, 256, 512, None, None, None]
QUERY_GROUPS = [2, None, None, 4, None, None]
