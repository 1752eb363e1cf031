"""The package's type stubs (python/shardwire/*.pyi, py.typed).

- `mypy --strict` accepts the README's Python examples against them;
- they declare exactly what the compiled module and the package export,
  with the same parameter names, so they cannot drift from the code;
- the installed package (built as a wheel by tools/setup) carries them.
"""
import ast
import inspect
import os
import re
import subprocess
import sys

import pytest

import shardwire
import shardwire._native as native
from test_readme import README, python_section_blocks

STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "shardwire")
STUB_FILES = ["__init__.pyi", "_native.pyi", "py.typed"]


def readme_modules():
    """The README's Python examples as modules to check: the Python
    section's blocks as one (each continues the one before), every other
    block on its own."""
    text = open(README, encoding="utf-8").read()
    section = python_section_blocks()
    others = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b not in section]
    return {"readme_python_section": "\n".join(section), **{f"readme_block_{i}": b for i, b in enumerate(others)}}


def test_mypy_strict_accepts_the_readme_examples(tmp_path):
    modules = readme_modules()
    assert len(modules) >= 2, "the README lost its examples"
    paths = []
    for name, code in modules.items():
        path = tmp_path / f"{name}.py"
        path.write_text(code, encoding="utf-8")
        paths.append(str(path))
    # The stubs of this checkout, ahead of the installed package's.
    env = dict(os.environ, MYPYPATH=os.path.abspath(STUBS + "/.."))
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), *paths],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert r.returncode == 0, f"mypy --strict:\n{r.stdout}{r.stderr}"


def test_mypy_strict_refuses_a_misuse():
    """The stubs type what they declare: a wrong argument is an error."""
    code = ('from shardwire import TransferEngine\n'
            'e = TransferEngine()\n'
            'e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp")\n'
            'n: str = e.get_rpc_port()\n')
    env = dict(os.environ, MYPYPATH=os.path.abspath(STUBS + "/.."))
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "-c", code],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'Missing positional argument "device_name"' in r.stdout, r.stdout
    assert 'Incompatible types in assignment (expression has type "int"' in r.stdout, r.stdout


class Stub:
    """What a .pyi declares: module-level names, and each class's members
    with their parameter names."""

    def __init__(self, filename):
        tree = ast.parse(open(os.path.join(STUBS, filename), encoding="utf-8").read())
        self.names, self.classes, self.all = set(), {}, None
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                self.names.add(node.name)
                self.classes[node.name] = members(node.body)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.names.add(node.name)
            elif isinstance(node, ast.AnnAssign):
                self.names.add(node.target.id)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    self.names.add(t.id)
                    if t.id == "__all__":
                        self.all = ast.literal_eval(node.value)
            elif isinstance(node, ast.ImportFrom):
                self.names.update(a.asname for a in node.names if a.asname)


def members(body):
    """{name: parameter names (None for an attribute)} of a class body."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            out[node.name] = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs][1:]
        elif isinstance(node, ast.AnnAssign):
            out[node.target.id] = None
    return out


def public(names):
    return {n for n in names if not n.startswith("_")}


def runtime_members(cls, instance=None):
    names = set(vars(cls)) | set(vars(instance) if instance is not None else ())
    return public(names)


def same_parameters(cls, stub_members, where):
    for name, params in stub_members.items():
        if params is None or name.startswith("_") or not callable(getattr(cls, name, None)):
            continue
        real = list(inspect.signature(getattr(cls, name)).parameters)[1:]
        assert params == real, f"{where}.{name}: the stub takes {params}, the code {real}"


def test_the_native_stub_declares_what_the_module_exports():
    stub = Stub("_native.pyi")
    real = public(dir(native)) | {"__version__"}
    declared = public(stub.names) | ({"__version__"} & stub.names)
    assert declared == real, f"missing from the stub: {real - declared}; not in the module: {declared - real}"
    for name in public(n for n in dir(native) if isinstance(getattr(native, n), type)):
        cls = getattr(native, name)
        got = public(stub.classes[name])
        want = runtime_members(cls)
        assert got == want, f"{name}: missing from the stub: {want - got}; not in the class: {got - want}"
        same_parameters(cls, stub.classes[name], name)


def test_the_package_stub_declares_what_the_package_exports():
    stub = Stub("__init__.pyi")
    assert stub.all == shardwire.__all__
    assert set(shardwire.__all__) <= stub.names | set(stub.classes)
    assert "__version__" in stub.names and shardwire.__version__ == native.__version__
    # The Python classes: what they add to the native engine, and the error.
    engine = shardwire.TransferEngine()
    try:
        want = runtime_members(shardwire.TransferEngine, engine)
    finally:
        engine.shutdown()
    got = public(stub.classes["TransferEngine"])
    assert got == want, f"TransferEngine: missing from the stub: {want - got}; not in the class: {got - want}"
    same_parameters(shardwire.TransferEngine, stub.classes["TransferEngine"], "TransferEngine")
    error = shardwire.TransferError(-1, "x")
    assert public(stub.classes["TransferError"]) == runtime_members(shardwire.TransferError, error)


@pytest.mark.parametrize("name", STUB_FILES)
def test_the_installed_package_carries_the_stubs(name):
    """tools/setup installs the package from a wheel maturin builds: the
    stubs must be in it, as they are in this checkout."""
    installed = os.path.join(os.path.dirname(shardwire.__file__), name)
    assert os.path.isfile(installed), f"the installed package lacks {name}"
    with open(installed, encoding="utf-8") as a, open(os.path.join(STUBS, name), encoding="utf-8") as b:
        assert a.read() == b.read(), f"the installed {name} is not this checkout's: rerun tools/setup"
