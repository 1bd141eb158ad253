"""The package as a user installs it: a wheel built from the repository ships every module, and a
plugin installed from that wheel (not editable) into a clean environment registers and serves."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from tiny_models import write_dflash_drafter, write_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    REPO], check=True, capture_output=True, timeout=600)
    (path,) = out.glob("vllm_ddtree-*.whl")
    return path


def _source_modules() -> set[str]:
    """Every module of the source tree, as the wheel names it (kernels/ ships as vllm_ddtree/kernels/)."""
    found = set()
    for folder, shipped_as in (("vllm_ddtree", "vllm_ddtree"), ("kernels", "vllm_ddtree/kernels")):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith((".py", ".cpp")):
                    relative = os.path.relpath(os.path.join(root, name), os.path.join(REPO, folder))
                    found.add(f"{shipped_as}/{relative}".replace(os.sep, "/"))
    return found


def test_the_wheel_ships_every_module(wheel):
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = _source_modules()
    assert len(modules) > 30 and "vllm_ddtree/adapter/v1_runner.py" in modules
    assert "vllm_ddtree/kernels/cpu_tree_attention.cpp" in modules
    assert modules - shipped == set()
    entry_points = next(n for n in shipped if n.endswith("entry_points.txt"))
    assert "ddtree = vllm_ddtree.plugin:register" in zipfile.ZipFile(wheel).read(entry_points).decode()


ENGINES = """
import json, sys
import vllm_ddtree
from importlib.metadata import distribution
from vllm import LLM, SamplingParams
target, drafter, site = sys.argv[1], sys.argv[2], sys.argv[3]
assert vllm_ddtree.__file__.startswith(site), vllm_ddtree.__file__  # the wheel's copy, not the checkout
results = {"installed_from": str(distribution("vllm-ddtree").locate_file(""))}
for name, spec in [("none", None), ("ddtree", {"method": "ddtree", "model": drafter, "num_speculative_tokens": 8})]:
    llm = LLM(model=target, dtype="float32", gpu_memory_utilization=0.5, max_model_len=256, enforce_eager=True,
              speculative_config=spec)
    out = llm.generate(["alpha beta"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    results[name] = list(out[0].outputs[0].token_ids)
    llm.llm_engine.engine_core.shutdown()
    del llm
print("RESULTS" + json.dumps(results))
"""


def test_the_plugin_installed_from_the_wheel_registers_and_serves(wheel, tmp_path):
    # A clean environment: a new venv whose only view of this one is a path to its site-packages (vLLM,
    # torch), read without its .pth files, so the checkout's editable install is invisible; the wheel
    # goes into the new venv's own site-packages, ahead of that path.
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    clean_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(clean_site, "outer-environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", clean_site, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    target, drafter = str(write_target(str(tmp_path / "target"))), str(write_dflash_drafter(str(tmp_path / "drafter")))
    script = tmp_path / "engines.py"
    script.write_text(ENGINES)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([python, str(script), target, drafter, clean_site], capture_output=True, text=True,
                         timeout=600, env=env, cwd=str(tmp_path))
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS")]
    assert lines, run.stderr[-3000:]
    results = json.loads(lines[0][len("RESULTS"):])
    assert results["installed_from"].startswith(clean_site)
    assert len(results["none"]) == 12 and results["ddtree"] == results["none"]
    assert "vllm-ddtree supports vLLM" not in run.stderr  # it registered: no refusal


def _imports_between_modules() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside functions (lazy imports
    close a circle just the same)."""
    import ast

    paths = {}
    for folder, package in (("vllm_ddtree", "vllm_ddtree"), ("kernels", "vllm_ddtree.kernels")):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py"):
                    relative = os.path.relpath(os.path.join(root, name), os.path.join(REPO, folder))[:-3]
                    dotted = relative.replace(os.sep, ".").removesuffix("__init__").rstrip(".")
                    paths[f"{package}.{dotted}".rstrip(".")] = os.path.join(root, name)
    graph = {}
    for module, path in paths.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_ddtree"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("vllm_ddtree")}
        graph[module] = {t for t in targets if t in paths and t != module}
    return graph


def test_no_import_circle_in_the_package():
    graph = _imports_between_modules()
    assert "vllm_ddtree.adapter.verifier" in graph and graph["vllm_ddtree.adapter.v1_runner"]
    done, circles = set(), []

    def visit(module, path):
        if module in path:
            circles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert circles == []
