"""The branching rollout tree: spec, structure, rollout, advantages, selection, NFE, dump."""
