"""What autograd keeps for backward, measured: the resource tests check their saved-activation
estimates (src/branchgrpo/resources) against it, byte for byte where the walk is exact."""

from __future__ import annotations

import torch


class SavedStorages:
    """Inside ``with SavedStorages(model) as saved:``, every distinct storage autograd saves for
    backward is recorded once with its size; the model's parameters (and, with ``buffers=True``,
    its buffers) are not counted. :meth:`pack` can also be called directly, for tensors that a
    checkpoint holds as a non-tensor argument (RoPE tables in a tuple) and so never reach the hook."""

    def __init__(self, model: torch.nn.Module, *, buffers: bool = False):
        owned = [*model.parameters(), *(model.buffers() if buffers else ())]
        self._owned = {p.untyped_storage().data_ptr() for p in owned}
        self._sizes: dict[int, int] = {}
        self._flags: set[int] = set()  # storages of bool tensors (masks)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._owned:
            self._sizes[storage.data_ptr()] = storage.nbytes()
            if tensor.dtype == torch.bool:
                self._flags.add(storage.data_ptr())
        return tensor

    def __enter__(self) -> "SavedStorages":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        """Bytes of every recorded storage."""
        return sum(self._sizes.values())

    @property
    def bool_bytes(self) -> int:
        """Bytes of the recorded storages of bool tensors (one byte per element)."""
        return sum(self._sizes[ptr] for ptr in self._flags)
