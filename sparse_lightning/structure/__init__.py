"""Channel groups, channel masks and physical compaction (torch-pruning behind one adapter, :mod:`.tracer`)."""

from sparse_lightning.structure.compact import compact, compact_in_place, count_flops, layer_flops
from sparse_lightning.structure.groups import ChannelCost, ChannelGroup, Member, channel_keeps, channel_masks
from sparse_lightning.structure.latency import LatencyTable, load_latency_table, measure_latency
from sparse_lightning.structure.tracer import TraceError, trace_groups

__all__ = [
    "ChannelCost",
    "ChannelGroup",
    "LatencyTable",
    "Member",
    "TraceError",
    "channel_keeps",
    "channel_masks",
    "compact",
    "compact_in_place",
    "count_flops",
    "layer_flops",
    "load_latency_table",
    "measure_latency",
    "trace_groups",
]
