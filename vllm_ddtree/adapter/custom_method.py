"""``method: "ddtree"`` on vLLM 0.34+, through vLLM's interface for out-of-tree speculative methods
(``register_speculative_method``): the 0.34 counterpart of :mod:`~vllm_ddtree.adapter.config`'s
front door for 0.32/0.33, which widens vLLM's closed method list instead.

"ddtree" is registered as a custom method based on DFlash (:class:`DDTreeSpeculatorConfig`): vLLM
then sets ``method = "dflash"`` and ``custom_method = "ddtree"``, sets the drafter up as DFlash's
(drafter loading, aux hidden states, draft KV cache), and builds the speculator our config names
(:class:`~vllm_ddtree.adapter.v2_drafter.DDTreeSpeculator`). ddtree's own options come through the
interface's ``speculator_options`` (``{"ddtree_budget": ..., "ddtree_step_costs": ...}``), parsed into
the same :class:`~vllm_ddtree.adapter.options.DDTreeOptions` record, with the same checks, as the
top-level keys of 0.32/0.33.

vLLM builds a fresh config instance on every access: the class holds no state; the options record
rides on the speculative config, as on 0.32/0.33 (:func:`~vllm_ddtree.adapter.config.ddtree_options`).
"""

from __future__ import annotations

from vllm.v1.worker.gpu.spec_decode.dflash.config import DFlashSpeculatorConfig

from vllm_ddtree.adapter.options import (POLICIES, DDTreeOptions, check_budget, drafter_depth,
                                         local_drafter_depth_hint)
from vllm_ddtree.adapter.support import check_target, refusal

METHOD = "ddtree"
OPTION_KEYS = ("ddtree_budget", "ddtree_step_costs")


def parse_speculator_options(given) -> tuple[str, object]:
    """``speculator_options`` -> (budget policy, step-cost table); refuses unknown keys and values."""
    options = dict(given or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f'speculative_config method "ddtree" takes speculator_options {list(OPTION_KEYS)}; got '
                         f"{unknown}")
    policy = options.get("ddtree_budget") or "cost-aware"
    if policy not in POLICIES:
        raise ValueError(f'speculative_config speculator_options "ddtree_budget" must be one of {list(POLICIES)}, '
                         f"got {policy!r}")
    return policy, options.get("ddtree_step_costs")


class DDTreeSpeculatorConfig(DFlashSpeculatorConfig):
    speculator_class = "vllm_ddtree.adapter.v2_drafter.DDTreeSpeculator"
    supported_options = frozenset({"speculator_options"})
    supports_watermarking = False

    @classmethod
    def configure(cls, spec) -> None:
        check_budget(spec.num_speculative_tokens)  # before anything loads
        policy, step_costs = parse_speculator_options(spec.speculator_options)
        if getattr(spec, "disable_padded_drafter_batch", False):
            raise refusal("disable_padded_drafter_batch=True (the tree commit addresses the padded batch)",
                          "remove disable_padded_drafter_batch")
        depth_hint = local_drafter_depth_hint(spec.model)
        super().configure(spec)
        target = spec.target_model_config
        depth = drafter_depth(spec.draft_model_config.hf_config, target.get_total_num_hidden_layers(),
                              target.get_hidden_size(), target.get_vocab_size(), depth_hint)
        check_target(target)
        # Validated when made (a bad table fails here, before the engine starts).
        spec.__dict__["ddtree"] = DDTreeOptions(spec.num_speculative_tokens, depth, policy, step_costs)

    def _depth(self) -> int:
        return self.spec_config.__dict__["ddtree"].depth

    @property
    def num_lookahead_tokens(self) -> int:
        # The drafter's pass has a bonus query and D mask queries a request, whatever B is.
        return self._depth() + 1

    def max_num_draft_seqs(self, max_num_batched_tokens: int) -> int:
        return max_num_batched_tokens // self.num_lookahead_tokens

    def hash_factors(self) -> list:
        return [*super().hash_factors(), METHOD, self._depth()]


_REFUSAL = 'speculative_config method "ddtree" cannot run on this vLLM'


class RefusedDDTreeConfig(DFlashSpeculatorConfig):
    """"ddtree" on a vLLM the adapter does not match: refused with the plugin's message."""

    @classmethod
    def configure(cls, spec) -> None:
        raise ValueError(_REFUSAL)


def register_refusal(message: str) -> None:
    """Registers "ddtree" as a method that is refused with ``message`` (set in every process, as the
    plugin runs in each)."""
    global _REFUSAL
    from vllm.v1.worker.gpu.spec_decode.speculator_config import register_speculative_method

    _REFUSAL = message
    register_speculative_method(METHOD, f"{__name__}.{RefusedDDTreeConfig.__qualname__}")


def register() -> None:
    """Registers "ddtree" with vLLM (idempotent: vLLM ignores the same class registered again)."""
    from vllm.v1.worker.gpu.spec_decode.speculator_config import register_speculative_method

    register_speculative_method(METHOD, f"{__name__}.{DDTreeSpeculatorConfig.__qualname__}")
