"""Structured pruning: group Wald tests of whole neurons, channels and coupled groups, and their
physical removal through Torch-Pruning's dependency graph, giving smaller dense models that are
faster on any hardware (:mod:`~mustat.structured.units` states the statistics)."""

from mustat.structured.ffn import ffn_blocks, prune_ffn
from mustat.structured.groups import (
    BASELINES,
    Group,
    WaldImportance,
    dependency_graph,
    groups,
    output_layers,
)
from mustat.structured.heads import attention_blocks, prune_heads, sync_config
from mustat.structured.macs import count
from mustat.structured.surgery import (
    IMPORTANCES,
    StructuredReport,
    export,
    fdr_keep,
    group_tests,
    prune_channels,
    prune_channels_fdr,
)
from mustat.structured.timing import latency, paired_latency
from mustat.structured.units import UnitStatistics, unit_statistics

__all__ = [
    "BASELINES", "IMPORTANCES", "Group", "StructuredReport", "UnitStatistics", "WaldImportance", "attention_blocks",
    "count", "dependency_graph", "export", "fdr_keep", "ffn_blocks", "group_tests", "groups", "latency",
    "output_layers", "paired_latency", "prune_channels", "prune_channels_fdr", "prune_ffn", "prune_heads",
    "sync_config", "unit_statistics",
]
