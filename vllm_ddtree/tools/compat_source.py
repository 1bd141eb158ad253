"""The compatibility tables (:mod:`vllm_ddtree.adapter.compat`) checked against a vLLM release's
source, without installing or importing it: ``python -m vllm_ddtree.tools.compat_source SOURCE``,
SOURCE a vLLM wheel (``pip download vllm==0.33.0 --no-deps``) or the folder holding its ``vllm``
package. The release's tables are chosen as the plugin chooses them on an installed vLLM (0.34+,
which has the custom-method interface: its tables; else 0.32/0.33's), and every name in them is
looked up in the source with Python's ``ast``: modules, classes (their bases followed across
modules, as ``inspect`` follows the MRO), functions and methods with their parameter names,
properties, class attributes and imported names. Prints one line per mismatch and a summary; exits 1
if any name does not match.

It is the static counterpart of :func:`vllm_ddtree.adapter.compat.incompatibilities`, which the
plugin runs on the installed vLLM at every start: what it reports for a release is what the plugin
would refuse on it.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from pathlib import PurePosixPath

from vllm_ddtree.adapter import compat

CUSTOM_METHODS_MODULE = "vllm/v1/worker/gpu/spec_decode/speculator_config.py"


class Source:
    """The ``vllm`` package's files, from a wheel or a folder, parsed on demand."""

    def __init__(self, path: str):
        if path.endswith(".whl"):
            with zipfile.ZipFile(path) as wheel:
                self.files = {name: wheel.read(name).decode() for name in wheel.namelist()
                              if name.startswith("vllm/") and name.endswith(".py")}
        else:
            from pathlib import Path

            root = Path(path)
            if (root / "vllm").is_dir():
                root = root / "vllm"
            self.files = {f"vllm/{p.relative_to(root).as_posix()}": p.read_text() for p in root.rglob("*.py")}
        if "vllm/__init__.py" not in self.files:
            raise ValueError(f"{path} holds no vllm package")
        self._trees: dict[str, ast.Module] = {}

    @property
    def has_custom_methods(self) -> bool:
        return CUSTOM_METHODS_MODULE in self.files

    def module(self, dotted: str) -> ast.Module | None:
        base = dotted.replace(".", "/")
        for name in (f"{base}.py", f"{base}/__init__.py"):
            if name in self.files:
                if name not in self._trees:
                    self._trees[name] = ast.parse(self.files[name])
                return self._trees[name]
        return None


def _defined(tree: ast.Module | ast.ClassDef, name: str):
    """The last top-level statement of ``tree`` that defines ``name``: a def, a class, an
    assignment, or (modules) an import; None if none does."""
    found = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            found = node
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            found = node
        elif isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            found = node
    return found


def _import_target(node: ast.ImportFrom, name: str, module: str) -> str:
    """The dotted path an ``from X import name`` in ``module`` refers to."""
    alias = next(a for a in node.names if (a.asname or a.name) == name)
    source = node.module or ""
    if node.level:  # relative import
        package = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
        source = ".".join(package + ([source] if source else []))
    return f"{source}.{alias.name}"


def _lookup(source: Source, dotted: str, depth: int = 0):
    """(the defining AST node, the module it sits in) for a dotted path, following imports and
    class bases; raises LookupError."""
    if depth > 20:
        raise LookupError(dotted)
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        tree = source.module(module_name)
        if tree is None:
            continue
        if split == len(parts):
            return tree, module_name
        node = _defined(tree, parts[split])
        if node is None:
            raise LookupError(dotted)
        if isinstance(node, ast.ImportFrom):
            target = _import_target(node, parts[split], module_name)
            return _lookup(source, ".".join([target, *parts[split + 1:]]), depth + 1)
        for attr in parts[split + 1:]:
            if not isinstance(node, ast.ClassDef):
                raise LookupError(dotted)
            node = _member(source, node, module_name, attr, depth)
        return node, module_name
    raise LookupError(dotted)


def _member(source: Source, cls: ast.ClassDef, module: str, name: str, depth: int):
    """``cls.name`` as the MRO finds it: the class body first, then each base's."""
    node = _defined(cls, name)
    if node is not None:
        return node
    for base in cls.bases:
        base_name = ast.unparse(base)
        if "." in base_name or "[" in base_name:
            base_name = base_name.split("[")[0]
        tree = source.module(module)
        defined = _defined(tree, base_name.split(".")[0])
        if isinstance(defined, ast.ClassDef):
            path = f"{module}.{base_name}"
        elif isinstance(defined, ast.ImportFrom):
            path = _import_target(defined, base_name.split(".")[0], module)
            path = ".".join([path, *base_name.split(".")[1:]])
        else:
            continue
        try:
            base_node, base_module = _lookup(source, path, depth + 1)
        except LookupError:
            continue
        if isinstance(base_node, ast.ClassDef):
            try:
                return _member(source, base_node, base_module, name, depth + 1)
            except LookupError:
                continue
    raise LookupError(name)


def _parameters(node) -> tuple[str, ...] | None:
    """Parameter names in ``inspect.signature`` order, or None where there is no function."""
    if isinstance(node, _DataclassInit):
        return node.parameters
    if isinstance(node, ast.ClassDef):  # a dataclass-like constructor: its fields, in order
        init = _defined(node, "__init__")
        if isinstance(init, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return _parameters(init)[1:]
        return tuple(s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
                     and isinstance(s.target, ast.Name) and "ClassVar" not in ast.unparse(s.annotation))
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args]
    if a.vararg:
        names.append(a.vararg.arg)
    names += [p.arg for p in a.kwonlyargs]
    if a.kwarg:
        names.append(a.kwarg.arg)
    return tuple(names)


class _DataclassInit:
    """The ``__init__`` a dataclass generates: ``self``, then the class's fields."""

    def __init__(self, cls: ast.ClassDef):
        self.parameters = ("self", *_parameters(cls))


def _generated_init(source: Source, path: str):
    """``Class.__init__`` of a dataclass that defines none (nor do its bases), else None."""
    if not path.endswith(".__init__"):
        return None
    try:
        cls, _ = _lookup(source, path[: -len(".__init__")])
    except LookupError:
        return None
    dataclass = isinstance(cls, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in cls.decorator_list)
    return _DataclassInit(cls) if dataclass else None


def _is_property(node) -> bool:
    return isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "property" for d in node.decorator_list)


def mismatch(source: Source, path: str, expected) -> str | None:
    """Why ``path`` in this source differs from what the adapter hooks (as :func:`compat.mismatch`
    says it of an installed vLLM), or None."""
    try:
        node, _ = _lookup(source, path)
    except LookupError:
        node = _generated_init(source, path)
        if node is None:
            return f"{path} is missing"
    if expected is None:
        return None
    if expected == compat.PROPERTY:
        return None if _is_property(node) else f"{path} is no longer a property"
    params = _parameters(node)
    if params is None:
        return f"{path} has no readable signature"
    alternatives = expected if isinstance(expected, list) else [expected]
    if params not in alternatives:
        return f"{path} takes ({', '.join(params)}), ddtree hooks ({' or '.join(', '.join(a) for a in alternatives)})"
    return None


def check(path: str) -> tuple[list[str], list[str], int]:
    """(the tables' names, every mismatch, the number of names checked) for the source at ``path``."""
    source = Source(path)
    tables = compat.tables(custom_methods=source.has_custom_methods)
    problems = [why for table in tables.values() for name, expected in table.items()
                if (why := mismatch(source, name, expected)) is not None]
    return sorted(tables), problems, sum(len(t) for t in tables.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a vLLM wheel, or the folder holding its vllm package")
    args = parser.parse_args(argv)
    tables, problems, checked = check(args.source)
    for line in problems:
        print(line)
    print(f"{PurePosixPath(args.source).name}: {checked} names in {', '.join(tables)}: "
          f"{'all match' if not problems else f'{len(problems)} do not match'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
