"""`profile(model=m)`: which weights each thread actually ran, from a forward pre-hook on the model.

Why from the threads and not from the objects: a server that hands every worker
`copy.deepcopy(model)`, or reloads it per thread, still holds "a model" per
worker; only what each thread's calls touched says whether they share one. The
hook costs one set lookup per forward call (it records (thread, module) once),
and the weight storages are read once per module when the profile stops, with
the one weight-pointer logic of profiler/measure/models.py.

A deep copy of a registered model carries its hooks, so copies made after
registration are seen too; a model built separately and never registered is
not: the summary names threads that served marked requests without running a
registered model, and sharing is not verified while any did.
"""
from __future__ import annotations

import threading
from typing import Any

from gpuscope.measure.models import weight_storages

MAX_SEEN = 65536  # (thread, module) pairs remembered: a thread-per-request server reuses thread ids


class _Hook:
    """The forward pre-hook: a good guest in the user's module. `copy.deepcopy(model)` keeps the same hook (so
    a copy is seen running, not failing on the tracker's lock), and `torch.save(model)` pickles an inert one."""

    __slots__ = ("owner",)

    def __init__(self, owner: "ServedModels | None") -> None:
        self.owner = owner

    def __call__(self, module: Any, args: Any) -> None:
        owner = self.owner
        if owner is not None:
            owner.saw(module)
        return None

    def __copy__(self) -> "_Hook":
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Hook":
        return self

    def __reduce__(self) -> tuple[Any, tuple[None]]:
        return (_Hook, (None,))


class ServedModels:
    """Forward pre-hooks on the registered modules; a summary of which weights each thread ran."""

    def __init__(self, models: Any) -> None:
        modules = list(models) if isinstance(models, (list, tuple)) else [models]
        for module in modules:
            if not hasattr(module, "register_forward_pre_hook"):
                raise TypeError(f"profile(model=...): {type(module).__name__} is not a torch.nn.Module "
                                "(pass the module your threads call, or a list of them)")
        self.registered = modules
        self._lock = threading.Lock()
        self._seen: set[tuple[int, int]] = set()
        self._modules: dict[int, Any] = {}      # id -> module seen running (held until the summary)
        self._names: dict[int, str] = {}        # thread id -> name when first seen
        self._handles: list[Any] = []
        self.active = False

    def attach(self) -> None:
        self.active = True
        hook = _Hook(self)
        self._handles = [module.register_forward_pre_hook(hook) for module in self.registered]

    def detach(self) -> None:
        """Remove the hooks (copies made meanwhile keep theirs, inert once `active` is False)."""
        self.active = False
        for handle in self._handles:
            try:
                handle.remove()
            except Exception:
                pass
        self._handles = []

    def saw(self, module: Any) -> None:
        """A forward call of `module` on this thread (the hook's whole work: one set lookup after the first)."""
        if not self.active:
            return None
        key = (threading.get_ident(), id(module))
        if key not in self._seen:
            with self._lock:
                if len(self._seen) < MAX_SEEN:
                    self._seen.add(key)
                    self._modules.setdefault(id(module), module)
                    self._names.setdefault(key[0], threading.current_thread().name)
        return None

    def summary(self, device_type: str, request_threads: set[int] | None = None) -> dict[str, Any]:
        """record.sharing and the model's weights (bytes on `device_type`) from what the threads ran.

        distinct_weight_sets counts the different sets of weight storages the threads ran (each thread's
        set is the union over the modules it called: an encoder and a head shared by all threads are 1)."""
        with self._lock:
            seen = set(self._seen)
            modules = dict(self._modules)
            names = dict(self._names)
        pointers = {key: frozenset(weight_storages(module)) for key, module in modules.items()}
        per_thread: dict[int, frozenset[int]] = {}
        for thread, module_id in seen:
            per_thread[thread] = per_thread.get(thread, frozenset()) | pointers.get(module_id, frozenset())
        distinct = len({weights for weights in per_thread.values() if weights})
        on_device: dict[int, int] = {}
        for module in self.registered:
            on_device.update(weight_storages(module, device_type))
        model_bytes = sum(on_device.values())
        without = sorted((request_threads or set()) - set(per_thread))
        verified = distinct == 1 and not without
        if not per_thread:
            why = "no thread called a registered model while the profile ran"
        elif distinct > 1:
            why = f"{len(per_thread)} threads ran {distinct} distinct sets of weights"
        elif without:
            why = (f"{len(without)} thread(s) served marked requests without calling a registered model "
                   "(a copy built separately and not registered?)")
        else:
            why = f"all {len(per_thread)} thread(s) that ran the model ran the same weights"
        copies = [key for key in modules if not any(key == id(m) for m in self.registered)]
        return {
            "source": "threads",
            "verified": verified,
            "distinct_weight_sets": distinct,
            "detail": why,
            "threads": [{"thread": names.get(t, str(t)), "weight_storages": len(w)} for t, w in
                        sorted(per_thread.items(), key=lambda item: names.get(item[0], ""))],
            "request_threads_without_model": len(without),
            "unregistered_copies_seen": len(copies),
            "model_bytes": model_bytes,
            "model_device": device_type,
            "registered_models": [type(m).__name__ for m in self.registered],
        }

    def release(self) -> None:
        """Drop the references to modules seen running (after the summary)."""
        with self._lock:
            self._modules.clear()
