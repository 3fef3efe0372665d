"""The region walker: every structure walk the passes share, cut by concern.

- `sites`: scale sites (an activation and the linears reading it) and the shared predicates;
- `absorbers`: the constants upstream that take a per-channel factor, the producer's shift
  target and norm constants;
- `migrate`: moving a factor across a site (sinks times s, absorbers divided by s);
- `permute`: channel-permutation regions (linear inputs, the K cache) for reordering;
- `expand`: channel-expansion regions for disassembly;
- `residual`: residual-stream components and the QuaRot layout.
"""

from qpass.graph.regions.absorbers import Absorber, Migration, absorbable_sites, find_absorber
from qpass.graph.regions.sites import Sink, Site, find_sites, is_channel_vector, last_dim

__all__ = [
    "Absorber",
    "Migration",
    "Site",
    "Sink",
    "absorbable_sites",
    "find_absorber",
    "find_sites",
    "is_channel_vector",
    "last_dim",
]
