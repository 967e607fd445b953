"""BranchGRPO: tree-structured GRPO for flow-matching generators."""

__version__ = "0.1.0"
