"""Model adapters behind one small protocol (:mod:`branchgrpo.models.protocol`)."""
