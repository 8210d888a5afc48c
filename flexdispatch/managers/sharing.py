"""One manager object serving several dispatchers, each with its own per-layer state.

Automodel shares one manager across all MoE layers (``moe_share_token_dispatcher``, and the
first generation's ``shared_comm_manager``), and code and tests rely on that identity
(``d1._comm_manager is d2._comm_manager``). Its managers keep each call's metadata on the
manager, so two layers with calls in flight overwrite each other's. Here a shared manager keeps
the state of the layer it serves in its attributes (named in ``LAYER_STATE``) and the other
layers' states aside: a dispatcher calls :meth:`serve` before each step, which swaps its state
in when another layer used the manager last. Calls of different layers may then interleave in
any order, as with unshared managers, at the cost of a few attribute swaps per layer switch.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch


class LayerStates:
    """Mixin: per-layer state of a manager that several dispatchers share.

    Subclasses list every attribute that belongs to one layer (a call in flight, and what
    outlives it: the step count, the last counts, dropped-token counters) in ``LAYER_STATE``
    and set them all to a new layer's values in :meth:`_new_layer_state`.
    """

    LAYER_STATE: tuple = ()
    serving_key = None  # id() of the dispatcher whose state is in the attributes
    _aside = None  # id(dispatcher) -> its state, for the others (None until a dispatcher is served)
    _known = None  # ids of the dispatchers served, each with a finalizer that drops its state
    _dead = None  # ids of collected dispatchers not yet dropped (see _forget)

    def _new_layer_state(self) -> None:
        raise NotImplementedError

    @torch._disable_dynamo  # (a layer switch is host bookkeeping: torch.compile breaks its graph there)
    def serve(self, owner) -> None:
        """Put ``owner``'s layer state in this manager's attributes. Callers skip the call when
        ``serving_key == id(owner)`` (a plain int compare: no cost, and nothing for
        torch.compile to trace, while one layer uses the manager)."""
        key = id(owner)
        if self.serving_key == key:
            return
        if self._aside is None:  # the first dispatcher served: the state in place is its own
            self._aside = {}
        else:
            if self.serving_key is not None:  # (None: its dispatcher is gone, and its state with it)
                self._aside[self.serving_key] = {name: self.__dict__.get(name) for name in self.LAYER_STATE}
            state = self._aside.pop(key, None)
            if state is None:
                self._new_layer_state()
            else:
                for name, value in state.items():
                    setattr(self, name, value)
        self.serving_key = key
        if key not in (self._known or ()):
            self.watch(owner)

    def watch(self, owner) -> None:
        """Drop ``owner``'s state once it is collected. A dispatcher calls this when it takes the
        manager, so that :meth:`serve` never registers a finalizer inside a compiled graph
        (torch.compile cannot trace one)."""
        key = id(owner)
        if self._known is None:
            self._known, self._dead = set(), []
        self._drop_dead()  # (before taking a new owner, whose id may be a collected one's)
        if key not in self._known:
            self._known.add(key)
            weakref.finalize(owner, self._forget, key)

    def _in_place(self, key: Optional[int]) -> bool:
        """Whether the state of the layer of dispatcher ``key`` is in the attributes (None: the
        layer served now, or the one of an unshared manager)."""
        return key is None or self.serving_key == key or self._aside is None

    def layer_value(self, key: Optional[int], name: str):
        """Attribute ``name`` of the layer whose dispatcher's id is ``key``, wherever that
        layer's state is now (None for a layer whose dispatcher is gone)."""
        return getattr(self, name) if self._in_place(key) else self._aside.get(key, {}).get(name)

    def set_layer_value(self, key: Optional[int], name: str, value) -> None:
        """Set attribute ``name`` of the layer whose dispatcher's id is ``key``, wherever that
        layer's state is now (nothing for a layer whose dispatcher is gone)."""
        if self._in_place(key):
            setattr(self, name, value)
        elif key in self._aside:
            self._aside[key][name] = value

    def adopt(self, owner) -> None:
        """Make ``owner`` (the dispatcher that built this manager) the one served now, with the
        state in place, so a manager only one layer uses never swaps (nor breaks a compiled graph)."""
        if self._aside is None:
            self._aside, self.serving_key = {}, id(owner)
        self.watch(owner)

    def _forget(self, key: int) -> None:
        """A dispatcher was collected: drop its state (its id may be reused by a new one). A
        finalizer runs whenever the collector does, also while torch.compile traces serve(),
        whose guards must not see its containers change: then the next watch() drops it."""
        self._dead.append(key)
        if not torch.compiler.is_compiling():
            self._drop_dead()

    def _drop_dead(self) -> None:
        while self._dead:
            dead = self._dead.pop()
            self._known.discard(dead)
            (self._aside or {}).pop(dead, None)
            if self.serving_key == dead:
                self.serving_key = None
