"""``ModuleList[M]``: an ``nn.ModuleList`` whose items keep their class for the type checker.

torch types every item of an ``nn.ModuleList`` as a bare ``nn.Module``, so ``layers[0].weight``
reads as ``Tensor | Module`` and a ``layers[i]`` passed where an ``FFLayer`` is expected is a
type error. This subclass only narrows those types: at run time it is an ``nn.ModuleList``
(same class name, state-dict keys and repr).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar, cast, overload

from torch import nn

M = TypeVar("M", bound=nn.Module)


class ModuleList(nn.ModuleList, Generic[M]):
    """An ``nn.ModuleList`` holding modules of one class ``M``."""

    def __init__(self, modules: Iterable[M] | None = None) -> None:
        super().__init__(modules)

    def __iter__(self) -> Iterator[M]:
        return cast("Iterator[M]", super().__iter__())

    @overload
    def __getitem__(self, idx: slice) -> ModuleList[M]: ...

    @overload
    def __getitem__(self, idx: int) -> M: ...

    def __getitem__(self, idx: int | slice) -> M | ModuleList[M]:
        # nn.ModuleList builds a slice as self.__class__(...), so a slice stays a ModuleList[M]
        return cast("M | ModuleList[M]", super().__getitem__(idx))
