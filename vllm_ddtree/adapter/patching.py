"""The one way ddtree changes vLLM's objects: every patch goes through :func:`wrap` (a function, method
or property of a class, or a method of one instance), :func:`replace` (an object vLLM keeps in an
instance attribute), :func:`swapped` (a module attribute, for the length of a block) or
:func:`extend_config_class` (new fields of a pydantic config dataclass).

Each of them names the vLLM internal it changes by its dotted path, and refuses one that the
compatibility table (:data:`vllm_ddtree.adapter.compat.REQUIRED`) does not list: what is patched is
what :func:`vllm_ddtree.plugin.register` checked on the installed vLLM before patching anything.
A patched function carries :data:`MARK`, so patching twice (vLLM loads plugins in every process,
sometimes twice) changes nothing; :func:`is_patched` reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable

MARK = "__ddtree_patch__"


def is_patched(function) -> bool:
    """Whether ``function`` (or a property's getter) is one of ddtree's wrappers."""
    if isinstance(function, property):
        function = function.fget
    return getattr(function, MARK, False)


def vllm_path(owner, name: str) -> str:
    """The dotted path by which the compatibility table names ``owner.name``: for a module, the
    module's; for a class or an instance, that of the first class along the MRO that defines
    ``name`` and is in the table (a subclass of a vLLM class is checked as that vLLM class). Refuses
    a name the table does not list."""
    from vllm_ddtree.adapter.compat import REQUIRED

    if inspect.ismodule(owner):
        candidates = [f"{owner.__name__}.{name}"]
    else:
        classes = owner.__mro__ if isinstance(owner, type) else type(owner).__mro__
        candidates = [f"{cls.__module__}.{cls.__qualname__}.{name}" for cls in classes if name in vars(cls)]
    for path in candidates:
        if path in REQUIRED:
            return path
    raise RuntimeError(f"ddtree patches {candidates[0] if candidates else name}, which its compatibility table does "
                       "not list (vllm_ddtree/adapter/compat.py)")


def wrap(owner, name: str, make: Callable[[Any], Callable]) -> bool:
    """``owner.name = make(original)``, once (False if it was already patched).

    ``owner`` is a class (the patch applies to every instance) or one instance (an instance attribute
    shadows the class's method; ``original`` is then the bound method). For a property, ``original`` is
    its getter and ``make`` returns the new getter.
    """
    vllm_path(owner, name)
    defined = vars(owner).get(name) if isinstance(owner, type) else None
    if isinstance(defined, property):
        if is_patched(defined):
            return False
        getter = _marked(make(defined.fget), defined.fget)
        setattr(owner, name, property(getter))
        return True
    original = getattr(owner, name)  # on an instance, its own attribute first: a patch of ours
    if is_patched(original):
        return False
    setattr(owner, name, _marked(make(original), original))
    return True


def _marked(wrapper, original):
    """``wrapper`` with the name and docstring of ``original`` (unless it took them already) and MARK."""
    if getattr(wrapper, "__wrapped__", None) is None:
        functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, True)
    return wrapper


def replace(instance, name: str, value, stands_in_for: str) -> None:
    """``instance.name = value`` for an object vLLM built and keeps in an instance attribute (V2's
    runner calls its rejection sampler by attribute, not through a method ddtree could wrap).
    ``stands_in_for``: the dotted path, in the compatibility table, of the call ``value`` takes over
    (``<class>.__call__``); the attribute must hold an instance of that class (or be ours already)."""
    from vllm_ddtree.adapter.compat import REQUIRED, resolve

    if stands_in_for not in REQUIRED:
        raise RuntimeError(f"ddtree stands in for {stands_in_for}, which its compatibility table does not list "
                           "(vllm_ddtree/adapter/compat.py)")
    current = getattr(instance, name)
    if getattr(current, MARK, False):
        return
    cls = resolve(stands_in_for.rsplit(".", 1)[0])
    if not isinstance(current, cls):
        raise RuntimeError(f"ddtree expected {type(instance).__name__}.{name} to be a {cls.__name__}, found "
                           f"{type(current).__name__}")
    setattr(value, MARK, True)
    setattr(instance, name, value)


@contextlib.contextmanager
def swapped(owner, name: str, value):
    """``owner.name`` is ``value`` inside the block and its own value again after it (also on errors).
    ``owner`` is a module, or a vLLM config instance (written in its ``__dict__``, past the config's
    validation: the value is ours and temporary)."""
    vllm_path(owner, name)
    namespace = vars(owner)
    original = namespace[name]
    namespace[name] = value
    try:
        yield
    finally:
        namespace[name] = original


def extend_config_class(cls, types: dict[str, Any], new_fields: dict[str, tuple[Any, Any]]) -> None:
    """Gives a vLLM pydantic config dataclass wider types for existing fields (``types``: name -> type)
    and new fields of ddtree's own (``new_fields``: name -> (type, default)), then rebuilds its
    validator. Called once, before its ``__post_init__`` is wrapped (through :func:`wrap`, which makes
    registering twice a no-op)."""
    from pydantic.dataclasses import rebuild_dataclass

    for name, kind in types.items():
        vllm_path(cls, name)
        cls.__annotations__[name] = kind
        cls.__dataclass_fields__[name].type = kind
    for name, (kind, default) in new_fields.items():
        field = dataclasses.field(default=default)
        field.name, field.type, field._field_type = name, kind, dataclasses._FIELD
        cls.__annotations__[name] = kind
        cls.__dataclass_fields__[name] = field
        setattr(cls, name, default)
    rebuild_dataclass(cls, force=True)
