"""Test scaffolding, never imported by the package: a GPU engine emulated on vLLM's CPU build.

What a GPU user of ddtree runs inside vLLM (the TRITON_ATTN backend's paged cache, our Triton
tree-attention, KV-commit and tree-build kernels called from a live engine, the engine-start warm-up,
the memory reservation in vLLM's profiling run, the split-K choice per batch) runs here end to end,
slowly, on CPU tensors: our Triton kernels and vLLM's (its V2 runner's, its samplers') go through
Triton's interpreter, but for three of vLLM's, replaced by the same operations in plain torch (below).
What cannot be emulated (CUDA graphs, streams, timing, device properties) stays for a lent GPU.

:func:`install` must run in a fresh process before anything imports vLLM (vLLM decides at import
whether Triton is usable); it applies these patches, each needed (found by removing it):

* ``TRITON_INTERPRET=1``, and a ``"cpu"`` entry in Triton's backend table while vLLM imports
  ``vllm/triton_utils/importing.py``: vLLM's CPU build enables Triton only when Triton has a CPU
  backend. The entry goes once vLLM has decided: torch's inductor, which compiles a few of vLLM's
  sampler ops on CPU, would otherwise take it for Triton's CPU backend and fail;
* ``CpuPlatform.get_attn_backend_cls`` returns TRITON_ATTN where it would return CPU_ATTN (the CPU
  platform offers no other backend), whose own two kernels (paged attention, the cache write) run as
  plain torch: interpreted they were half of an emulated step, and they are vLLM's, not ddtree's (the
  tree steps' attention is ddtree's kernel, interpreted); tests/test_v2_runner.py checks that such
  engines answer as vLLM's CPU backend does;
* ``torch.cuda.get_device_capability`` returns (9, 0): TRITON_ATTN's cache-writing launcher asks it;
* vLLM's top-k/top-p sampling op takes its torch path: its Triton kernel does not run under the
  interpreter (``row_id.to`` on a program id the interpreter gives as an int); V2's grammar-bitmask
  kernel is replaced by the same operation in torch (its mixed scalar/block store mask is refused);
* Triton's interpreter patches ``triton.language`` once per launch instead of at every call of a
  helper function inside it (:func:`_patch_language_once_per_launch`: a fifth of a step's time);
* the CPU worker profiles memory as vLLM's GPU worker always does (``profile_run`` before the KV cache
  is sized, which runs the dummy sampler, where ddtree reserves the tree step's memory); the CPU
  worker does it only for compiled models.

Jobs run in that process: ``python tests/emulated_gpu.py JOBS_JSON OUT_JSON`` (see :func:`run_job`); with
``EMULATED_RUNNER=v2`` on vLLM's V2 runner (whose CPU subclass profiles memory by itself), and with
``EMULATED_ATTENTION=CPU_ATTN`` on vLLM's CPU attention backend (V2 on the CPU build needs Triton,
interpreted, for its own kernels: the runner a CPU user gets from vLLM 0.34 on).
"""

from __future__ import annotations

import os
import sys
import types

import torch  # before vLLM is fine: vLLM decides at its own import whether Triton is usable

def install(v2_runner: bool = False, attention: str = "TRITON_ATTN") -> None:
    """``attention``: "TRITON_ATTN" (a GPU engine), or "CPU_ATTN" (vLLM's CPU backend, for the V2
    runner, which needs Triton on the CPU build too). On vLLM 0.34 (its GPU wheel: V2 only, TRITON_ATTN
    only) :func:`install_vllm034` instead."""
    # Once a process: a process whose sitecustomize installed it (a multi-process engine's workers
    # need the patches from their start) may run this module as a script too.
    installed = sys.modules.setdefault("_emulated_gpu_installed", types.ModuleType("_emulated_gpu_installed"))
    if getattr(installed, "done", False):
        return
    installed.done = True
    if "vllm.triton_utils.importing" in sys.modules:
        raise RuntimeError("tests/emulated_gpu.py must be installed before vLLM is imported")
    import importlib.util

    # 0.34+ has the custom speculative-method interface (read from the files: importing vLLM would
    # decide about Triton too early; the CPU build's distribution is not named vllm).
    vllm_dir = os.path.dirname(importlib.util.find_spec("vllm").origin)
    if os.path.exists(os.path.join(vllm_dir, "v1", "worker", "gpu", "spec_decode", "speculator_config.py")):
        return install_vllm034()
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2_runner else "0"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # a multi-process engine keeps its processes
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from triton.backends import backends

    backends["cpu"] = types.SimpleNamespace(driver=types.SimpleNamespace(is_active=lambda: False))
    import vllm.triton_utils.importing  # noqa: F401  (decides HAS_TRITON now, once)

    del backends["cpu"]  # torch's inductor would take it for Triton's CPU backend (vLLM compiles some ops)

    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    if attention == "TRITON_ATTN":
        _choose_triton_attn()
    elif attention != "CPU_ATTN":
        raise ValueError(f"unknown attention backend {attention!r}")

    from vllm.v1.sample.ops import topk_topp_sampler

    topk_topp_sampler.HAS_TRITON = False

    _grammar_bitmask_in_torch()
    _patch_language_once_per_launch()

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    CPUWorker._should_warm_up_model = lambda self: True
    CPUModelRunner.warming_up_model = lambda self: self.profile_run()
    # An emulated device of a few multiprocessors: at these tiny batches a 132-multiprocessor GPU would
    # always split the keys as far as the context allows; a small one makes the launcher's choice vary.
    from vllm_ddtree.adapter import cuda_only

    cuda_only.STAND_IN_MULTIPROCESSORS = MULTIPROCESSORS


def _choose_triton_attn() -> None:
    """``CpuPlatform.get_attn_backend_cls`` returns TRITON_ATTN where it would return CPU_ATTN (whose
    two kernels then run in torch: :func:`_triton_attn_kernels_in_torch`)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cpu_choice = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, *args, **kwargs):
        path = cpu_choice(cls, *args, **kwargs)
        return AttentionBackendEnum.TRITON_ATTN.get_path() if path == AttentionBackendEnum.CPU_ATTN.get_path() else path

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    _triton_attn_kernels_in_torch()


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` anew at every call of a ``@triton.jit`` helper
    inside a kernel (a walk over the module's members each time, never undone: a fifth of an
    interpreted engine step here). A launch's own patch, made here for both ``triton.language`` and
    ``triton.language.core``, covers every helper it calls: one patch a launch, undone after it."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._patch_lang
    both = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})
    launches = []

    def patch_lang(fn):
        if launches:  # a helper called inside a launch
            return launches[-1]
        scope = original(both)
        restore = scope.restore

        def restore_after_launch():
            launches.remove(scope)
            restore()

        scope.restore = restore_after_launch
        launches.append(scope)
        return scope

    interpreter._patch_lang = patch_lang


class _GrammarBitmaskKernel:
    """V2's grammar-bitmask kernel (``_apply_grammar_bitmask_kernel``) in torch: its masked store mixes
    a scalar and a block mask, which the interpreter refuses ("mask has unsupported dtype")."""

    def __getitem__(self, grid):
        return self.run

    @staticmethod
    def run(logits, logits_stride, logits_indices, cu_num_logits, bitmask, bitmask_stride, vocab_size,
            MASK_STRIDE, BLOCK_SIZE):
        mapping = logits_indices[: bitmask.shape[0]].to(torch.int64)
        request, position = mapping // MASK_STRIDE, mapping % MASK_STRIDE
        cu = cu_num_logits.to(torch.int64)
        active = position < cu[request + 1] - cu[request]
        bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=bitmask.dtype)) & 1).flatten(1)[:, :vocab_size]
        rows = (cu[request] + position)[active]
        logits[rows] = logits[rows].masked_fill(bits[active] == 0, float("-inf"))


def _reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, *rest,
                       **options):
    """vLLM's ``triton_reshape_and_cache_flash`` for an unquantized ``[blocks, block_size, heads, dim]``
    cache view: each token's K/V at its slot (negative slots: none)."""
    if kv_cache_dtype != "auto" or key_cache.ndim != 4 or any(rest) or any(options.values()):
        raise NotImplementedError("the emulated reshape_and_cache writes unquantized 4-D caches only")
    slots = slot_mapping.to(torch.int64)
    tokens = torch.nonzero(slots >= 0).flatten()
    blocks, offsets = slots[tokens] // key_cache.shape[1], slots[tokens] % key_cache.shape[1]
    key_cache[blocks, offsets] = key[tokens].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[tokens].to(value_cache.dtype)


_PLAIN_ATTENTION_DEFAULTS = {"alibi_slopes": None, "output_scale": None, "qq_bias": None, "sinks": None,
                             "mm_prefix_range": None, "rswa_prefix_lens": None, "k_scale_cache": None,
                             "v_scale_cache": None}


def _unified_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                       window_size, block_table, softcap, q_descale, k_descale, v_descale, **options):
    """vLLM's ``unified_attention`` (TRITON_ATTN's kernel) in plain torch, for what the tiny models use:
    each request's queries (the last of its ``seqused_k`` keys) over its paged K/V, causal or not
    (a bool or one flag a request), grouped-query heads; anything else is refused."""
    unsupported = [name for name, default in _PLAIN_ATTENTION_DEFAULTS.items() if options.get(name) is not None]
    if unsupported or softcap or q_descale is not None or tuple(window_size or (-1, -1)) != (-1, -1) or \
            getattr(options.get("kv_quant_mode"), "name", "NONE") != "NONE" or options.get("chunk_lookback", -1) != -1:
        raise NotImplementedError(f"the emulated unified_attention computes plain attention only ({unsupported})")
    page, kv_heads = k.shape[1], k.shape[2]
    group = q.shape[1] // kv_heads
    starts, lengths = cu_seqlens_q.tolist(), seqused_k.tolist()
    flags = causal.tolist() if isinstance(causal, torch.Tensor) else [causal] * len(lengths)
    for r, keys_used in enumerate(lengths):
        first, last = starts[r], starts[r + 1]
        if last == first:
            continue
        blocks = block_table[r, : -(-keys_used // page)].to(torch.int64)
        keys = k[blocks].flatten(0, 1)[:keys_used].float().repeat_interleave(group, dim=1)
        values = v[blocks].flatten(0, 1)[:keys_used].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[first:last].float(), keys) * softmax_scale
        if flags[r]:
            rows = torch.arange(last - first).unsqueeze(1) + keys_used - (last - first)
            scores = scores.masked_fill(torch.arange(keys_used).unsqueeze(0) > rows, float("-inf"))
        out[first:last] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(out.dtype)


def _triton_attn_kernels_in_torch() -> None:
    """TRITON_ATTN's own two kernels (vLLM's, not ddtree's) as plain torch: interpreted, they were
    half of an emulated engine step. The tree steps' attention is ddtree's kernel, still interpreted."""
    from vllm.v1.attention.backends import triton_attn

    triton_attn.unified_attention = _unified_attention
    triton_attn.triton_reshape_and_cache_flash = _reshape_and_cache


def _grammar_bitmask_in_torch() -> None:
    from vllm.v1.worker.gpu import structured_outputs

    structured_outputs._apply_grammar_bitmask_kernel = _GrammarBitmaskKernel()


def install_vllm034() -> None:
    """vLLM 0.34.0's GPU wheel (no CPU build of 0.34 is on the registry) as a GPU engine on this CPU
    machine (../shared/notes/gpu-path-on-cpu.md), each patch found necessary by removing it:

    * ``CUDA_VISIBLE_DEVICES`` set and empty: vLLM's Triton check takes its lenient path (x86 CPUs
      otherwise need a Triton CPU backend); ``VLLM_TARGET_DEVICE=cpu``: the CPU platform;
    * the wheel has no CPU ops: the CPU worker's memory-node setup is a no-op, and the two ops DFlash's
      model calls directly (RMS norm, in its grouped per-layer form too, and RoPE) are plain torch;
    * TRITON_ATTN for every layer (CPU_ATTN needs the missing CPU ops); ``get_device_capability``
      (9, 0), the top-k/top-p op's torch path, the grammar bitmask in torch and the interpreter's
      language patch once per launch, as on 0.32.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # a server keeps its engine core process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    import vllm  # noqa: F401
    from vllm import _custom_ops

    torch.ops._C.init_cpu_memory_env = lambda nodes: None
    _custom_ops.rms_norm, _custom_ops.rotary_embedding = _rms_norm, _rotary_embedding
    from vllm.v1.sample.ops import topk_topp_sampler

    topk_topp_sampler.HAS_TRITON = False  # as on 0.32: its Triton kernel does not run interpreted
    _choose_triton_attn()
    _grammar_bitmask_in_torch()
    _patch_language_once_per_launch()
    from vllm_ddtree.adapter import cuda_only

    cuda_only.STAND_IN_MULTIPROCESSORS = MULTIPROCESSORS


def _rms_norm(out, input, weight, epsilon):
    x = input.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    if weight is not None:
        w = weight.float()
        if w.dim() > 1:  # one weight row per leading index (DFlash's norm of every layer's K at once)
            w = w.view(w.shape[0], *([1] * (input.dim() - 2)), w.shape[-1])
        y = y * w
    out.copy_(y.to(out.dtype))


def _rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    rotated = 2 * cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
    for tensor in (query, key):
        if tensor is None:
            continue
        view = tensor.view(tensor.shape[0], -1, head_size)[..., rope_dim_offset:rope_dim_offset + rotated]
        x = view.float()
        x1, x2 = (x[..., : rotated // 2], x[..., rotated // 2:]) if is_neox else (x[..., 0::2], x[..., 1::2])
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        view.copy_((torch.cat([y1, y2], -1) if is_neox else torch.stack([y1, y2], -1).flatten(-2)).to(view.dtype))


MULTIPROCESSORS = 8

# Our kernels, whose launches are recorded with the compile key Triton's CUDA JIT would give them.
KERNELS = {"tree_attention": ("vllm_ddtree.kernels.tree_attention", "tree_attention_kernel"),
           "merge_splits": ("vllm_ddtree.kernels.tree_attention", "merge_splits_kernel"),
           "kv_commit": ("vllm_ddtree.kernels.kv_commit", "move_kv_slots_kernel"),
           "tree_build": ("vllm_ddtree.kernels.tree_build", "tree_build_kernel")}


class Launches:
    """Every launch of our kernels, as ``(kernel, compile key)`` by phase (``"start"`` until the first
    request is generated, then ``"live"``). The key is what Triton's JIT on a CUDA device compiles a
    kernel for: each constexpr's value, and for every other argument Triton's own specialization
    (``native_specialize_impl`` with the CUDA backend: the dtype, an integer's being 1 or a multiple of
    16, a pointer's 16-byte alignment), plus the launch options. A live launch whose key no start-up
    launch had would compile during a request on a GPU."""

    def __init__(self):
        import importlib
        import inspect

        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        self.phase = "start"
        self.keys = {"start": set(), "live": set()}
        for name, (module, attr) in KERNELS.items():
            kernel = getattr(importlib.import_module(module), attr)
            signature = inspect.signature(kernel.fn)
            frozen = set(kernel.kwargs.get("do_not_specialize") or ())
            unaligned = set(kernel.kwargs.get("do_not_specialize_on_alignment") or ())

            def record(*args, _name=name, _signature=signature, _frozen=frozen, _unaligned=unaligned, **kwargs):
                options = tuple(sorted((k, kwargs.pop(k)) for k in list(kwargs) if k not in _signature.parameters))
                bound = _signature.bind(*args, **kwargs)
                bound.apply_defaults()
                key = []
                for arg, value in bound.arguments.items():
                    if "constexpr" in str(_signature.parameters[arg].annotation):
                        key.append((arg, "constexpr", str(value)))
                    else:
                        key.append((arg, *map(str, native_specialize_impl(CUDABackend, value, False, arg not in _frozen,
                                                                          arg not in _unaligned))))
                self.keys[self.phase].add((_name, tuple(key), options))

            kernel.add_pre_run_hook(record)

    def uncompiled(self) -> list:
        """Live keys that no start-up launch had."""
        return [[name, [list(k) for k in key], [list(o) for o in options]]
                for name, key, options in sorted(self.keys["live"] - self.keys["start"])]


def _params(spec):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tiny_engines import STRUCTURED

    spec = dict(spec)
    kind = spec.pop("structured", None)
    if kind is not None:
        spec["structured_outputs"] = StructuredOutputsParams(**STRUCTURED[kind])
    return SamplingParams(**spec)


def patched_hooks() -> dict:
    """Whether the plugin's class-level patches are in place (an incompatible vLLM gets none)."""
    from vllm.config import VllmConfig
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_ddtree.adapter.patching import is_patched

    return {"hooked": [is_patched(f) for f in (GPUModelRunner.__init__, InputProcessor.__init__,
                                               VllmConfig.__post_init__)]}


def check_compatibility() -> dict:
    """The compatibility check of the installed vLLM (the plugin's, before it patches anything)."""
    import vllm

    from vllm_ddtree.adapter import compat

    return {"vllm": vllm.__version__, "tables": sorted(compat.tables()), "problems": compat.incompatibilities()}


def run_job(job: dict, target: str, drafter: str) -> dict:
    """One engine: ``job`` = {"spec": speculative config without the drafter's path, or None,
    "engine": LLM arguments, "prompts": [...], "params": [SamplingParams arguments per prompt] (a
    "structured" key names a tests/tiny_engines.py constraint), optionally "target" and "drafter"}.
    Returns tokens, texts, vLLM's counters, sample and prompt logprobs (where asked), our kernels'
    launches, the memory reservations and the step costs measured at engine start."""
    from vllm_ddtree.adapter import engine_start, step_costs
    from vllm_ddtree.tools.engine_runs import run_engine

    from tiny_engines import ENGINE

    launches = Launches()
    reservations, measured = [], []
    reserve, measure = engine_start.reserve_tree_step_memory, step_costs.measure

    def recording_reserve(*args, **kwargs):
        reservations.append([launches.phase, *reserve(*args, **kwargs)])
        return reservations[-1][1:]

    def recording_measure(*args, **kwargs):
        measured.append(measure(*args, **kwargs))
        return measured[-1]

    engine_start.reserve_tree_step_memory = recording_reserve
    step_costs.measure = recording_measure

    def live(llm):
        launches.phase = "live"

    spec = job.get("spec")
    if spec is not None:
        spec = {"model": job.get("drafter", drafter), **spec}
    try:
        result = run_engine(job.get("target", target), job["prompts"], [_params(p) for p in job["params"]], spec,
                            before=live, **{**ENGINE, **job.get("engine", {})})
    finally:
        engine_start.reserve_tree_step_memory = reserve
        step_costs.measure = measure
    def listed(positions):
        return [sorted((t, lp.logprob) for t, lp in position.items()) if position else [] for position in positions or []]

    logprobs = [[listed(c.logprobs) for c in o.outputs] for o in result.outputs]
    return {"tokens": result.tokens, "prompt_tokens": [len(o.prompt_token_ids) for o in result.outputs],
            "texts": [[c.text for c in o.outputs] for o in result.outputs],
            "finish": [[c.finish_reason for c in o.outputs] for o in result.outputs],
            "prompt_logprobs": [listed(o.prompt_logprobs) for o in result.outputs],
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            "logprobs": logprobs, "uncompiled": launches.uncompiled(),
            "launched": sorted({name for name, _, _ in launches.keys["start"] | launches.keys["live"]}),
            "splits": sorted({int(dict((k[0], k[2]) for k in key)["NUM_SPLITS"])
                              for name, key, _ in launches.keys["live"] if name == "tree_attention"}),
            "reservations": reservations,
            "measured_costs": [[{str(k): v for k, v in table.items()} for table in tables] for tables in measured]}


def main(jobs_path: str, out_path: str) -> None:
    import json
    import time
    import traceback

    with open(jobs_path) as f:
        request = json.load(f)
    # A change to vLLM simulated before the plugin loads (it loads with the first engine's config).
    exec(request.get("simulate", ""), {})
    results = {}
    for name, job in request["jobs"].items():
        start = time.perf_counter()
        try:
            check = {"compatibility": check_compatibility, "hooks": patched_hooks}.get(job.get("check"))
            results[name] = check() if check else run_job(job, request["target"], request["drafter"])
        except Exception:  # one job's failure is its test's, not every other job's
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    install(v2_runner=os.environ.get("EMULATED_RUNNER") == "v2",
            attention=os.environ.get("EMULATED_ATTENTION", "TRITON_ATTN"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1], sys.argv[2])
