"""A ddtree engine's options as one typed record (:class:`DDTreeOptions`), and the checks of what the
user gives: the budget, the cost table, the drafter checkpoint. Free of vLLM imports."""

from __future__ import annotations

from dataclasses import dataclass

# The tree budget B is `num_speculative_tokens`: the draft tokens the target verifies per step, as for
# every vLLM method. Beyond 1024 the (B+1)-row verify pass and the ancestor bitmask stop paying
# (the paper's best budgets are <= 1024) and the tree build's packed keys run out of bits.
MAX_BUDGET = 1024


def check_budget(budget) -> int:
    if budget is None:
        raise ValueError('speculative_config method "ddtree" needs "num_speculative_tokens": the tree '
                         f"budget B (draft tokens verified per step), an integer in 1..{MAX_BUDGET}, e.g. 32")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f'speculative_config method "ddtree": "num_speculative_tokens" (the tree budget B) '
                         f"must be an integer in 1..{MAX_BUDGET}, got {budget!r}")
    return budget


POLICIES = ("cost-aware", "fixed")


@dataclass(frozen=True)
class DDTreeOptions:
    """What a ddtree engine runs with, validated when made (a bad value fails before anything runs).
    vLLM's speculative config carries it (:func:`vllm_ddtree.adapter.config.ddtree_options`) to every
    process that config is pickled to."""

    budget: int                         # B: nodes a request verifies per step at most (num_speculative_tokens)
    depth: int                          # D: the drafter's block size - 1, the deepest node
    policy: str = "cost-aware"          # "cost-aware": nodes kept while they pay (vllm_ddtree.budget); "fixed": B
    step_costs: str | dict | None = None  # the cost-aware policy's table, a JSON path or dict; None: measured

    def __post_init__(self):
        check_budget(self.budget)
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"the tree depth D (the drafter's block_size - 1) must be an integer >= 1, got "
                             f"{self.depth!r}")
        if self.policy not in POLICIES:
            raise ValueError(f'speculative_config "ddtree_budget" must be one of {list(POLICIES)}, got {self.policy!r}')
        if self.step_costs is not None:
            if self.policy != "cost-aware":
                raise ValueError('speculative_config "ddtree_step_costs" is the cost table of the cost-aware budget; '
                                 'drop it, or drop "ddtree_budget": "fixed"')
            read_table(self.step_costs)


def read_table(table) -> tuple[dict[int, float], dict[int, float]]:
    """A step-cost table (the user's, or the disk cache's): a path to JSON, or ``{"step": {rows:
    seconds}, "draft": {requests: seconds}}``; ``({rows: s}, {requests: s})``."""
    import json

    if isinstance(table, str):
        with open(table) as f:
            table = json.load(f)
    try:
        step = {int(k): float(v) for k, v in table["step"].items()}
        draft = {int(k): float(v) for k, v in table["draft"].items()}
        if min(len(step), len(draft)) < 2 or min(*step, *draft) < 0 or min(*step.values(), *draft.values()) < 0:
            raise ValueError("too few or negative entries")
        return step, draft
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError('"ddtree_step_costs" must be a JSON file or a dict {"step": {rows: seconds, ...}, '
                         f'"draft": {{requests: seconds, ...}}}} with at least two entries each; got {table!r}') \
            from error


def check_dflash_architectures(archs, model) -> None:
    """The one DFlash architecture check, for a drafter's raw config.json and for vLLM's loaded config."""
    if not any("DFlash" in a for a in archs or []):
        raise ValueError(f'speculative_config method "ddtree" needs a DFlash drafter (z-lab checkpoint format, '
                         f'architectures ["DFlashDraftModel"]); {model} has architectures {list(archs or [])}')


def local_drafter_depth_hint(model) -> int | None:
    """Refuses a local non-DFlash checkpoint before vLLM tries (and fails obscurely) to load it as one.

    Returns the tree depth a ``speculators``-format DFlash drafter declares (vLLM converts that format
    itself, renumbering its layer ids, but drops the block size), else None.
    """
    import json
    import os

    if model is None:
        raise ValueError('speculative_config method "ddtree" needs "model": a DFlash drafter checkpoint')
    path = os.path.join(model, "config.json") if isinstance(model, str) else None
    if path is None or not os.path.isfile(path):
        return None  # a hub name: vLLM resolves it, drafter_depth checks what it loaded
    with open(path) as f:
        config = json.load(f)
    kind = config.get("speculators_model_type")
    if kind is None:
        check_dflash_architectures(config.get("architectures"), model)
        return None
    if kind != "dflash":
        raise ValueError(f'speculative_config method "ddtree" needs a DFlash drafter; {model} is a '
                         f'speculators "{kind}" checkpoint')
    layer_config = config.get("transformer_layer_config") or {}
    block_size = config.get("block_size") or layer_config.get("block_size")
    if block_size:
        return int(block_size) - 1
    methods = (config.get("speculators_config") or {}).get("proposal_methods") or [{}]
    return methods[0].get("speculative_tokens")


def drafter_depth(draft_hf_config, target_num_layers: int, target_hidden: int, target_vocab: int,
                  depth_hint: int | None = None) -> int:
    """Checks that the draft checkpoint is a DFlash drafter that fits the target; returns D (from the
    config's ``block_size``, else ``depth_hint``, the depth a speculators-format checkpoint declares)."""
    check_dflash_architectures(getattr(draft_hf_config, "architectures", None), "the draft model")
    block_size = getattr(draft_hf_config, "block_size", None)
    if block_size is None and depth_hint is not None:
        block_size = int(depth_hint) + 1
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f'the DFlash drafter\'s config needs "block_size" >= 2 (tree depth D = block_size - 1), '
                         f"got {block_size!r}")
    dflash = getattr(draft_hf_config, "dflash_config", None) or {}
    layer_ids = dflash.get("target_layer_ids")
    if not layer_ids or any(not 0 <= i < target_num_layers for i in layer_ids):
        raise ValueError(f"the DFlash drafter's dflash_config.target_layer_ids {layer_ids} must name layers of the "
                         f"{target_num_layers}-layer target (0..{target_num_layers - 1}); a drafter in the "
                         "speculators format numbers them one higher: subtract 1")
    if dflash.get("mask_token_id") is None:
        raise ValueError("the DFlash drafter's dflash_config needs mask_token_id")
    hidden = getattr(draft_hf_config, "target_hidden_size", None) or getattr(draft_hf_config, "hidden_size", None)
    if hidden != target_hidden:
        raise ValueError(f"the DFlash drafter reads target hidden states of size {hidden}, "
                         f"but the target's hidden size is {target_hidden}")
    vocab = getattr(draft_hf_config, "vocab_size", None)
    if vocab != target_vocab:
        raise ValueError(f"the DFlash drafter's vocabulary ({vocab}) differs from the target's ({target_vocab})")
    return block_size - 1
