import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter, chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


# The end-to-end tests' shared models and reference outputs, built once per session. vLLM (through
# tests/tiny_engines.py, which runs the engines) is imported only where a fixture needs it: the core's
# tests also run on a GPU machine that has torch and triton but no vLLM (scripts/gpu_checks.sh).
from tiny_models import write_dflash_drafter, write_target  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return str(write_target(str(root / "target"))), str(write_dflash_drafter(str(root / "drafter")))


@pytest.fixture(scope="session")
def reference(models):
    from tiny_engines import generate

    return generate(models)[0]


@pytest.fixture(scope="session")
def flat(models, tmp_path_factory):
    """A flatter target than ``models``' (same drafter), so that sampling is really random."""
    return str(write_target(str(tmp_path_factory.mktemp("flat") / "target"), head_scale=0.15)), models[1]


@pytest.fixture(scope="session")
def context_pair(tmp_path_factory):
    """A target whose answers depend on the whole context (sharp attention), with a drafter of its
    own: wrong tree positions, masks or KV change its greedy answers, where ``models``' target mostly
    repeats one token whatever came before. Two layers: the emulated GPU engines run its attention
    interpreted."""
    root = tmp_path_factory.mktemp("context")
    return (str(write_target(str(root / "target"), attention_scale=6.0, layers=2)),
            str(write_dflash_drafter(str(root / "drafter"), target_layer_ids=(0, 1), target_layers=2)))


@pytest.fixture(scope="session")
def feature_reference(models, reference):
    from tiny_engines import PROMPTS, feature_params, generate

    names, params = feature_params(models, reference)
    tokens = generate(models, PROMPTS, params)[0]
    for i, name in enumerate(names):  # each feature changes the answer; the other prompts keep theirs
        assert (tokens[i] != reference[i]) == (name is not None), (name, i)
    return tokens


@pytest.fixture(scope="session")
def structured_reference(models, reference):
    from tiny_engines import PROMPTS, STRUCTURED_ENGINE, generate, structured_params

    kinds, params = structured_params()
    tokens = generate(models, PROMPTS, params, **STRUCTURED_ENGINE)[0]
    for i, kind in enumerate(kinds):
        assert (tokens[i] != reference[i]) == (kind is not None), (kind, i)
    return tokens


@pytest.fixture(scope="session")
def moe_target(tmp_path_factory):
    return str(write_target(str(tmp_path_factory.mktemp("moe") / "target"), experts=4))


# The emulated GPU engines (tests/emulated_gpu.py) take minutes, each test file's jobs in a process of
# their own (tests/emulated_jobs.py). Those of the collected files start with the session's first test,
# at a lower CPU priority, so that they run on what the in-process tests leave of the machine; those
# files run last and read their results. Test file -> its fixture, and the function there that starts
# its jobs.
EMULATED = {"test_emulated_gpu": "emulated", "test_v2_runner": "v2_engines", "test_vllm034": "vllm034"}


def pytest_collection_modifyitems(items):
    # The files that read the emulated engines' results run last, in this order: the in-process tests
    # run first, while the engines work beside them.
    order = {module: i + 1 for i, module in enumerate(EMULATED)}

    def rank(item):
        module = getattr(item, "module", None)
        return order.get(module.__name__, 0) if module else 0

    items.sort(key=rank)  # stable: every other test keeps its place


@pytest.fixture(scope="session", autouse=True)
def emulated_engines_start_first(request):
    collected = {item.module.__name__ for item in request.session.items if getattr(item, "module", None)}
    for module, fixture in EMULATED.items():
        if module in collected:
            request.getfixturevalue(fixture)


@pytest.fixture(scope="session")
def emulated(models, flat, tmp_path_factory):
    from test_emulated_gpu import start

    return start({"models": models, "flat": flat}, tmp_path_factory.mktemp("emulated_gpu"))


@pytest.fixture(scope="session")
def v2_engines(flat, context_pair, tmp_path_factory):
    from test_v2_runner import start

    return start({"context": context_pair, "flat": flat}, tmp_path_factory)


@pytest.fixture(scope="session")
def vllm034(flat, context_pair, tmp_path_factory):
    from test_vllm034 import start

    return start({"context": context_pair, "flat": flat}, tmp_path_factory.mktemp("vllm034"))
