"""Pure-torch CellPLM network and its parts."""

from ._module import CellPLMModule, dense
from ._norm import SampleNorm
from ._perturbation import CellPLMPerturbationModule
from .attention import FlowAttention, SoftmaxAttention
from .decoder import NBDecoder
from .embedder import GeneEmbedder
from .encoder import CellEncoder
from .latent import GMVAELatent, VAELatent
from .masking import sample_input_mask, sample_kept_cells
from .neighbourhood import NeighbourhoodAttention
from .positional import PositionalEncoding, normalize_coordinates

__all__ = [
    "CellPLMModule",
    "CellPLMPerturbationModule",
    "CellEncoder",
    "FlowAttention",
    "GMVAELatent",
    "GeneEmbedder",
    "NBDecoder",
    "NeighbourhoodAttention",
    "PositionalEncoding",
    "SampleNorm",
    "SoftmaxAttention",
    "VAELatent",
    "dense",
    "normalize_coordinates",
    "sample_input_mask",
    "sample_kept_cells",
]
