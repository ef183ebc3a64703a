"""The API surface of a TensorRT library, read from its type stubs or from the real bindings, and a spy on it.

Why: the engine runtime only runs on a GPU and datacenter TensorRT does not install here, so the calls the
package makes cannot simply be executed. Instead ``compile/api.py`` (the only module naming library
attributes) is run against a *spy* module built from a surface: every attribute read must exist, be a
method where it is called and a property where it is read, every call must match one overload's
parameters (count, keywords and, where the type is one of the library's classes or a plain Python type,
the argument's type), every assignment must go to a writable attribute, and every method a subclass of a
library interface overrides (``ILogger.log``, ``IStreamWriter.write``) must exist on that interface.

Two sources give a surface:
- ``from_stubs(folder)``: the TensorRT 10 type stubs published on PyPI (``tensorrt-stubs``), parsed with ``ast``;
- ``from_module(module)``: the real pybind11 bindings (``tensorrt_rtx_bindings``), by introspection; a
  pybind11 function carries its signatures in the first lines of its docstring.
"""

from __future__ import annotations

import ast
import enum
import inspect
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


class Kind(str, enum.Enum):
    METHOD = "method"
    PROPERTY = "property"  # read-only unless ``writable``
    ATTRIBUTE = "attribute"  # a plain read-write field
    VALUE = "value"  # an enum member or module constant
    CLASS = "class"


@dataclass(frozen=True)
class Param:
    name: str
    annotation: str | None
    has_default: bool
    variadic: str = ""  # "*" or "**"


@dataclass(frozen=True)
class Overload:
    params: tuple[Param, ...]  # without ``self``
    returns: str | None


@dataclass
class Member:
    kind: Kind
    overloads: list[Overload] = field(default_factory=list)
    type: str | None = None  # a property's, attribute's or value's type
    writable: bool = False
    number: int | None = None  # an enum member's integer value


@dataclass
class ClassSurface:
    name: str  # qualified inside the module: "ILogger.Severity"
    bases: list[str]
    members: dict[str, Member]


@dataclass
class Surface:
    library: str
    classes: dict[str, ClassSurface]
    module: dict[str, Member]  # module-level functions, values and classes

    def find(self, class_name: str, name: str) -> Member | None:
        """A member of a class, looked up through its bases (the library's own inheritance)."""
        seen: set[str] = set()
        queue = [class_name]
        while queue:
            current = queue.pop(0)
            if current in seen or current not in self.classes:
                continue
            seen.add(current)
            cls = self.classes[current]
            if name in cls.members:
                return cls.members[name]
            queue.extend(cls.bases)
        return None

    def class_named(self, annotation: str | None) -> str | None:
        """The library class an annotation names ("tensorrt_rtx.IExecutionContext" → "IExecutionContext")."""
        if not annotation:
            return None
        text = annotation.strip().strip("'\"")
        text = re.sub(r"^(typing\.)?Optional\[(.*)\]$", r"\2", text)
        text = text.split(" | ")[0]
        if "::" in text:  # an unregistered C++ name: "nvonnxparser::IParserError" is the class ParserError
            cpp = text.rsplit("::", 1)[-1]
            return next((n for n in (cpp, cpp[1:]) if n in self.classes), None)
        for candidate in (text, text.split(".", 1)[-1] if "." in text else text):
            parts = candidate.split(".")
            for start in range(len(parts)):
                name = ".".join(parts[start:])
                if name in self.classes:
                    return name
        return None


# --------------------------------------------------------------------------------------------- stubs


def from_stubs(folder: Path) -> Surface:
    """The surface of TensorRT 10 from ``tensorrt-stubs``: ``tensorrt_bindings/tensorrt.pyi`` and the package's __init__."""
    text = (folder / "tensorrt_bindings" / "tensorrt.pyi").read_text()
    tree = _parse_stub(text)
    classes: dict[str, ClassSurface] = {}
    module: dict[str, Member] = {}
    lines = text.splitlines()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            _stub_class(node, "", classes, lines)
            module[node.name] = Member(Kind.CLASS)
        elif isinstance(node, ast.FunctionDef):
            module.setdefault(node.name, Member(Kind.METHOD)).overloads.append(_stub_overload(node, is_method=False))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            module[node.target.id] = Member(Kind.VALUE, type=ast.unparse(node.annotation))
    init = ast.parse((folder / "tensorrt" / "__init__.pyi").read_text())
    for node in init.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "__version__":
            module["__version__"] = Member(Kind.VALUE, type="str")
    return Surface("tensorrt (stubs)", classes, module)


def _parse_stub(text: str) -> ast.Module:
    """Parse a generated stub. A few of its signatures are not Python: a parameter named ``in``
    (renamed ``in_``), or a required parameter after defaulted ones (``add_scale_nd``: the line loses its
    defaults, every parameter required)."""
    lines = text.splitlines()
    for _ in range(100):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as exc:
            index = (exc.lineno or 0) - 1
            if not (0 <= index < len(lines)) or "def " not in lines[index]:
                raise
            line = re.sub(r"([(,] ?)(in|from|lambda|class|def|is|not|and|or|global|import|pass):", r"\1\2_:",
                          lines[index])
            lines[index] = line if line != lines[index] else re.sub(r" = [^,)]+", "", line)
    raise SyntaxError("too many unparsable signatures in the stubs")


def _stub_class(node: ast.ClassDef, prefix: str, classes: dict[str, ClassSurface], lines: list[str]) -> None:
    name = prefix + node.name
    members: dict[str, Member] = {}
    for item in node.body:
        if isinstance(item, ast.ClassDef):
            _stub_class(item, name + ".", classes, lines)
            members[item.name] = Member(Kind.CLASS)
        elif isinstance(item, ast.FunctionDef):
            decorators = [ast.unparse(d) for d in item.decorator_list]
            if "property" in decorators:
                members[item.name] = Member(Kind.PROPERTY, type=_unparse(item.returns))
            elif any(d.endswith(".setter") for d in decorators):
                members[item.name].writable = True
            else:
                static = "staticmethod" in decorators
                members.setdefault(item.name, Member(Kind.METHOD)).overloads.append(
                    _stub_overload(item, is_method=not static))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            annotation = ast.unparse(item.annotation)
            if annotation.startswith(("typing.ClassVar", "ClassVar")):
                # the generator writes an enum member's value in a comment: "# value = <Severity.ERROR: 1>"
                number = re.search(r"# value = <[\w.]+: (-?\d+)>", lines[item.lineno - 1])
                members[item.target.id] = Member(Kind.VALUE, type=annotation, number=int(number[1]) if number else None)
            else:
                members[item.target.id] = Member(Kind.ATTRIBUTE, type=annotation, writable=True)
    bases = [ast.unparse(b) for b in node.bases]
    classes[name] = ClassSurface(name, [b for b in bases if b not in ("object",)], members)


def _stub_overload(node: ast.FunctionDef, *, is_method: bool) -> Overload:
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [Param(a.arg, _unparse(a.annotation), d is not None) for a, d in zip(positional, defaults)]
    if is_method and params:
        params = params[1:]
    params += [Param(a.arg, _unparse(a.annotation), d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.vararg:
        params.append(Param(args.vararg.arg, None, True, "*"))
    if args.kwarg:
        params.append(Param(args.kwarg.arg, None, True, "**"))
    return Overload(tuple(params), _unparse(node.returns))


def _unparse(node: ast.AST | None) -> str | None:
    return ast.unparse(node) if node is not None else None


# ---------------------------------------------------------------------------------- real bindings


def from_module(module: ModuleType) -> Surface:
    """The surface of imported pybind11 bindings: classes, their members and the signatures in their docstrings."""
    classes: dict[str, ClassSurface] = {}
    members: dict[str, Member] = {}
    for name in dir(module):
        value = getattr(module, name)
        if inspect.isclass(value):
            _bound_class(value, name, classes)
            members[name] = Member(Kind.CLASS)
        elif callable(value):
            members[name] = Member(Kind.METHOD, _doc_overloads(value, name, is_method=False))
        elif not name.startswith("_") or name == "__version__":
            members[name] = Member(Kind.VALUE, type=type(value).__name__)
    return Surface(module.__name__, classes, members)


def _bound_class(cls: type, name: str, classes: dict[str, ClassSurface]) -> None:
    if name in classes:
        return
    members: dict[str, Member] = {}
    for attr in dir(cls):
        if attr.startswith("__") and attr != "__init__":
            continue
        raw = inspect.getattr_static(cls, attr)
        if isinstance(raw, property):
            members[attr] = Member(Kind.PROPERTY, type=_doc_returns(raw.fget), writable=raw.fset is not None)
        elif inspect.isclass(raw):
            _bound_class(raw, f"{name}.{attr}", classes)
            members[attr] = Member(Kind.CLASS)
        elif isinstance(raw, staticmethod):
            members[attr] = Member(Kind.METHOD, _doc_overloads(raw.__func__, attr, is_method=False))
        elif callable(raw):
            members[attr] = Member(Kind.METHOD, _doc_overloads(raw, attr, is_method=True))
        else:
            number = int(raw) if hasattr(raw, "__int__") else None
            members[attr] = Member(Kind.VALUE, type=type(raw).__name__, number=number)
    bases = [b.__name__ for b in cls.__mro__[1:] if b.__module__ == cls.__module__]
    classes[name] = ClassSurface(name, bases, members)


_SIGNATURE = re.compile(r"^(?:\d+\. )?(?P<name>\w+)\((?P<params>.*)\)(?: -> (?P<returns>.+))?$")


def _doc_overloads(function: Any, name: str, *, is_method: bool) -> list[Overload]:
    """pybind11 writes each overload's signature as a docstring line: ``name(self: T, a: int = 1) -> R``."""
    overloads = []
    for line in (getattr(function, "__doc__", None) or "").splitlines():
        match = _SIGNATURE.match(line.strip())
        if match and match["name"] == name:
            params = [_doc_param(p) for p in _split_top_level(match["params"])]
            if is_method and params and params[0].name == "self":
                params = params[1:]
            overloads.append(Overload(tuple(params), match["returns"]))
    if len(overloads) > 1 and all(p.variadic for p in overloads[0].params):
        overloads = overloads[1:]  # "f(*args, **kwargs)\nOverloaded function." heads the real overloads
    if not overloads:  # no signature written: accept anything rather than guess
        overloads.append(Overload((Param("args", None, True, "*"), Param("kwargs", None, True, "**")), None))
    return overloads


def _doc_returns(function: Any) -> str | None:
    for line in (getattr(function, "__doc__", None) or "").splitlines():
        match = re.match(r"^\(self: [^)]*\) -> (.+)$", line.strip())
        if match:
            return match[1]
    return None


def _doc_param(text: str) -> Param:
    text = text.strip()
    variadic = "**" if text.startswith("**") else "*" if text.startswith("*") else ""
    text = text.lstrip("*")
    name, _, rest = text.partition(":")
    annotation, has_default = rest, False
    if "=" in rest:
        annotation, has_default = rest.split("=", 1)[0], True
    return Param(name.strip(), annotation.strip() or None, has_default or bool(variadic), variadic)


def _split_top_level(text: str) -> list[str]:
    """Split a parameter list at commas outside brackets (defaults such as ``<Strategy.STATIC: 0>``)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


# ----------------------------------------------------------------------------------------------- spy


class ConformanceError(AssertionError):
    """A call, read or write that the library's surface does not have."""


@dataclass
class Call:
    target: str  # "ICudaEngine.create_execution_context"
    args: tuple
    kwargs: dict
    instance: Any = None  # the spy object called on, for methods and property reads


class Spy:
    """A stand-in module: classes, values and calls checked against a ``Surface``; every call recorded.

    ``returns`` overrides what a call or a property read gives back, keyed by "Class.member": a value, or a
    function of the call's arguments (by default a spy object of the annotated library class, True for
    bool, 0 for int, "" for str, None otherwise).
    """

    def __init__(self, surface: Surface, version: str = "0.0.0") -> None:
        self.surface = surface
        self.version = version
        self.__name__ = surface.library.split(" ")[0]
        self.calls: list[Call] = []
        self.returns: dict[str, Any] = {}
        self._classes: dict[str, type] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "__version__":
            self._require_module(name)
            return self.version
        member = self._require_module(name)
        if member.kind is Kind.CLASS:
            return self.spy_class(name)
        if member.kind is Kind.METHOD:
            return _SpyMethod(self, "", name, member, None)
        return SpyValue(name, name)

    def _require_module(self, name: str) -> Member:
        member = self.surface.module.get(name)
        if member is None:
            raise ConformanceError(f"{self.surface.library} has no module attribute '{name}'")
        return member

    def spy_class(self, name: str) -> type:
        if name not in self._classes:
            self._classes[name] = _SpyMeta(name.rsplit(".", 1)[-1], (SpyObject,), {"_spy": self, "_spy_class": name})
        return self._classes[name]

    def value_for(self, target: str, annotation: str | None, args: tuple = (), kwargs: dict | None = None) -> Any:
        """What a call or property read of ``target`` returns: an override, else a value of its annotated type."""
        if target in self.returns:
            value = self.returns[target]
            if callable(value) and not isinstance(value, (type, SpyObject)):
                return value(*args, **(kwargs or {}))
            return value
        cls = self.surface.class_named(annotation)
        if cls == "IHostMemory":
            return b""
        if cls is not None:
            return self.spy_class(cls)._spy_make()
        text = (annotation or "").strip()
        if text == "bool":
            return True
        if text in ("int", "typing.SupportsInt"):
            return 0
        if text == "str":
            return ""
        return None


class _SpyMeta(type):
    """Class-level reads (``trt.ILogger.Severity.ERROR``, ``trt.MemoryPoolType.WORKSPACE``) checked too."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_spy") or name.startswith("__"):
            raise AttributeError(name)
        spy: Spy = cls._spy
        owner = cls._spy_class
        member = spy.surface.find(owner, name)
        if member is None:
            raise ConformanceError(f"{spy.surface.library}: {owner} has no attribute '{name}'")
        if member.kind is Kind.CLASS:
            nested = next((f"{c}.{name}" for c in [owner, *spy.surface.classes[owner].bases]
                           if f"{c}.{name}" in spy.surface.classes), name)
            return spy.spy_class(nested)
        if member.kind is Kind.VALUE:
            return SpyValue(owner, name, member.number)
        if member.kind is Kind.METHOD:
            return _SpyMethod(spy, owner, name, member, None)
        raise ConformanceError(f"{spy.surface.library}: {owner}.{name} is a {member.kind.value} of instances, "
                               "read from the class")

    def __dir__(cls) -> list[str]:
        surface: Surface = cls._spy.surface
        names: set[str] = set()
        queue = [cls._spy_class]
        while queue:
            current = surface.classes.get(queue.pop(0))
            if current is not None:
                names.update(current.members)
                queue.extend(current.bases)
        return sorted(names)

    def __init__(cls, name: str, bases: tuple, namespace: dict) -> None:
        super().__init__(name, bases, namespace)
        spy: Spy | None = namespace.get("_spy") or getattr(cls, "_spy", None)
        if "_spy_class" in namespace or spy is None:
            return
        # A Python subclass of a library interface (a logger, a stream writer): what it overrides must exist.
        for attr, value in namespace.items():
            if callable(value) and not attr.startswith("__"):
                member = spy.surface.find(cls._spy_class, attr)
                if member is None or member.kind is not Kind.METHOD:
                    raise ConformanceError(f"{spy.surface.library}: {cls._spy_class} has no method '{attr}' to override")


class SpyObject:
    """An instance of a library class: member reads, calls and writes are checked against the surface."""

    _spy: Spy
    _spy_class: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        member = self._spy.surface.find(self._spy_class, "__init__")
        if member is None:
            raise ConformanceError(f"{self._spy.surface.library}: {self._spy_class} cannot be constructed")
        _check_call(self._spy, f"{self._spy_class}.__init__", member, args, kwargs)
        self._spy.calls.append(Call(f"{self._spy_class}.__init__", args, kwargs, self))
        object.__setattr__(self, "_spy_values", {})

    @classmethod
    def _spy_make(cls) -> SpyObject:
        """An instance the library hands out (no constructor call checked)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "_spy_values", {})
        return obj

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_spy") or name.startswith("__"):
            raise AttributeError(name)
        spy, owner = self._spy, self._spy_class
        member = spy.surface.find(owner, name)
        if member is None:
            raise ConformanceError(f"{spy.surface.library}: {owner} has no attribute '{name}'")
        target = f"{owner}.{name}"
        if member.kind is Kind.METHOD:
            return _SpyMethod(spy, owner, name, member, self)
        if member.kind is Kind.VALUE:
            return SpyValue(owner, name, member.number)
        if name in self._spy_values:
            return self._spy_values[name]
        spy.calls.append(Call(target, (), {}, self))
        return spy.value_for(target, member.type)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_spy_class" not in type(self).__dict__:  # a Python subclass's own field
            object.__setattr__(self, name, value)
            return
        spy, owner = self._spy, self._spy_class
        member = spy.surface.find(owner, name)
        if member is None:
            raise ConformanceError(f"{spy.surface.library}: {owner} has no attribute '{name}' to set")
        if member.kind not in (Kind.ATTRIBUTE, Kind.PROPERTY) or not member.writable:
            raise ConformanceError(f"{spy.surface.library}: {owner}.{name} is a read-only {member.kind.value}")
        if not _type_accepts(spy.surface, member.type, value):
            raise ConformanceError(f"{spy.surface.library}: {owner}.{name} takes {member.type}, given {value!r}")
        spy.calls.append(Call(f"{owner}.{name}=", (value,), {}, self))
        self._spy_values[name] = value


class SpyValue:
    """An enum member or constant: compares, hashes and converts to int like pybind11 enums do."""

    def __init__(self, owner: str, name: str, number: int | None = None) -> None:
        self.owner, self.name, self.number = owner, name, number

    def __int__(self) -> int:
        if self.number is None:
            raise ConformanceError(f"{self.owner}.{self.name} has no integer value in the library's surface")
        return self.number

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpyValue) and (other.owner, other.name) == (self.owner, self.name)

    def __le__(self, other: SpyValue) -> bool:
        return int(self) <= int(other)

    def __hash__(self) -> int:
        return hash((self.owner, self.name))

    def __repr__(self) -> str:
        return f"<{self.owner}.{self.name}>"


class _SpyMethod:
    def __init__(self, spy: Spy, owner: str, name: str, member: Member, instance: SpyObject | None) -> None:
        self.spy, self.owner, self.name, self.member, self.instance = spy, owner, name, member, instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = f"{self.owner}.{self.name}" if self.owner else self.name
        overload = _check_call(self.spy, target, self.member, args, kwargs)
        self.spy.calls.append(Call(target, args, kwargs, self.instance))
        return self.spy.value_for(target, overload.returns, args, kwargs)


def _check_call(spy: Spy, target: str, member: Member, args: tuple, kwargs: dict) -> Overload:
    """The first overload that takes these arguments; a ConformanceError listing the overloads if none does."""
    for overload in member.overloads:
        if _binds(spy.surface, overload, args, kwargs):
            return overload
    shown = "; ".join("(" + ", ".join(f"{p.variadic}{p.name}: {p.annotation}" for p in o.params) + ")"
                      for o in member.overloads)
    given = ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    raise ConformanceError(f"{spy.surface.library}: {target}({given}) matches no overload: {shown}")


def _binds(surface: Surface, overload: Overload, args: tuple, kwargs: dict) -> bool:
    named = [p for p in overload.params if not p.variadic]
    star = any(p.variadic == "*" for p in overload.params)
    starstar = any(p.variadic == "**" for p in overload.params)
    if len(args) > len(named) and not star:
        return False
    bound = dict(zip((p.name for p in named), args))
    for key, value in kwargs.items():
        if key in bound or (key not in {p.name for p in named} and not starstar):
            return False
        bound[key] = value
    for param in named:
        if param.name not in bound:
            if not param.has_default:
                return False
        elif not _type_accepts(surface, param.annotation, bound[param.name]):
            return False
    return True


_BUFFERS = (bytes, bytearray, memoryview, mmap.mmap)
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "typing.SupportsInt": (int,), "float": (int, float), "typing.SupportsFloat": (int, float),
    "str": (str,), "bool": (bool,),
    "typing_extensions.Buffer": _BUFFERS, "collections.abc.Buffer": _BUFFERS, "buffer": _BUFFERS,
}


def _type_accepts(surface: Surface, annotation: str | None, value: Any) -> bool:
    """Whether a value fits an annotation, where the annotation is a library class or a plain Python type."""
    if annotation is None or value is None:
        return True
    text = annotation.strip()
    cls = surface.class_named(text)
    if cls is not None:
        if isinstance(value, SpyValue):
            return value.owner == cls or surface.find(cls, value.name) is not None
        if isinstance(value, SpyObject):
            return _is_subclass(surface, value._spy_class, cls)
        return False
    if text in _PYTHON_TYPES:
        if isinstance(value, bool) and text not in ("bool", "int", "typing.SupportsInt"):
            return False
        return isinstance(value, _PYTHON_TYPES[text])
    return True


def _is_subclass(surface: Surface, name: str, base: str) -> bool:
    queue, seen = [name], set()
    while queue:
        current = queue.pop(0)
        if current == base:
            return True
        if current in seen or current not in surface.classes:
            continue
        seen.add(current)
        queue.extend(surface.classes[current].bases)
    return False
