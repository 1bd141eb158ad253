"""Structured outputs (JSON schema, regex, choice, grammar) on trees: the scheduler's side.

vLLM's scheduler keeps each structured request's grammar. For a chain it validates the drafts as a
sequence (``StructuredOutputManager.validate_tokens``) and builds one bitmask row per draft position,
advancing the grammar along the chain (``grammar_bitmask``); the runner applies the rows to the
logits before sampling. A tree's drafts are not a sequence, so for ddtree engines:

* the runner sends each request's node parents with its drafts (:class:`TreeDraftTokenIds`);
* drafts are not validated as a chain: a node the grammar rejects can never be accepted anyway,
  because its token is masked out of its parent's row (a structured request whose parents did not
  arrive drafts nothing that step);
* the bitmask has a row per node, filled in the grammar state after the node's path: the scheduler
  walks the tree depth first, advancing the grammar down a branch and rolling it back up, as vLLM's
  chain fill advances and rolls back. A node below a token the grammar rejects is unreachable; its
  row allows everything.

The rows sit where vLLM's ``apply_grammar_bitmask`` puts a chain's (the root's row, then one per
scheduled draft, in node order), and the grammar advances by the emitted tokens as for a chain.
Reasoning parsers (grammars that start mid-answer) are not supported with trees: admission refuses
structured requests on such an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.v1.outputs import DraftTokenIds

from vllm_ddtree.adapter import compat, patching
from vllm_ddtree.adapter.config import hook_ddtree_instances


@dataclass
class TreeDraftTokenIds(DraftTokenIds):
    """vLLM's drafts plus each draft's parent (0 = the root, i = the i-th draft). A module-level
    subclass: it crosses from the worker to the engine core pickled, like vLLM's own."""

    parents: list[list[int]] = field(default_factory=list)


def with_parents(draft_token_ids, parents: list[list[int]]) -> TreeDraftTokenIds:
    """``draft_token_ids`` with each request's parents, cut to its drafts."""
    return TreeDraftTokenIds(draft_token_ids.req_ids, draft_token_ids.draft_token_ids,
                             [p[:len(d)] for p, d in zip(parents, draft_token_ids.draft_token_ids)])


def install(scheduler_cls) -> None:
    """The class-level hook on ``scheduler_cls.__init__`` (idempotent); ddtree schedulers get
    per-instance hooks, any other runs vLLM's code untouched."""
    hook_ddtree_instances(scheduler_cls, _hook_instance)


class SchedulerTrees:
    """A ddtree scheduler's tree structure: the parents that came with the last drafts
    (``incoming``, by request id) and, per structured request, those of the drafts it validated
    (``validated``: what the next grammar bitmask fills rows for), kept until the request's next
    drafts or its end."""

    def __init__(self):
        self.incoming: dict[str, list[int]] = {}
        self.validated: dict[str, list[int]] = {}


def _hook_instance(scheduler) -> None:
    manager = scheduler.structured_output_manager
    trees = SchedulerTrees()

    def update_draft_token_ids(update):
        def hooked(draft_token_ids):
            trees.incoming = dict(zip(draft_token_ids.req_ids, getattr(draft_token_ids, "parents", ())))
            for req_id in [r for r in trees.validated if r not in scheduler.requests]:
                del trees.validated[req_id]  # finished requests
            return update(draft_token_ids)

        return hooked

    def check_drafts(check):
        # vLLM's grammar check of a request's drafts as a chain (validate_tokens / trim_spec_tokens):
        # tree drafts pass unchecked, with their parents recorded.
        def hooked(request, spec_tokens):
            if not request.use_structured_output:
                return check(request, spec_tokens)
            parents = trees.incoming.get(request.request_id)
            if parents is None:  # no tree structure: draft nothing this step
                trees.validated[request.request_id] = []
                return []
            trees.validated[request.request_id] = parents
            return spec_tokens

        return hooked

    def grammar_bitmask(_):
        def hooked(requests, structured_output_request_ids, scheduled_spec_decode_tokens):
            return tree_grammar_bitmask(manager, requests, structured_output_request_ids,
                                        scheduled_spec_decode_tokens, trees.validated)

        return hooked

    patching.wrap(scheduler, "update_draft_token_ids", update_draft_token_ids)
    patching.wrap(manager, compat.grammar_check_name(), check_drafts)
    patching.wrap(manager, "grammar_bitmask", grammar_bitmask)


def tree_grammar_bitmask(manager, requests, structured_output_request_ids, scheduled_spec_decode_tokens,
                         parents_of: dict[str, list[int]]):
    """vLLM's ``grammar_bitmask`` for trees: per structured request, the root's row and one row per
    scheduled node (``parents_of``: each request's node parents), each in the grammar state after the
    node's path."""
    if not structured_output_request_ids:
        return None
    if manager._grammar_bitmask is None:
        rows = manager.vllm_config.scheduler_config.max_num_seqs * (1 + manager.vllm_config.num_speculative_tokens)
        manager._grammar_bitmask = manager.backend.allocate_token_bitmask(rows)
    bitmask = manager._grammar_bitmask
    start = 0
    for req_id in structured_output_request_ids:
        request = requests[req_id]
        scheduled = scheduled_spec_decode_tokens.get(req_id, [])
        block = compat.grammar_rows_per_request(manager.vllm_config, len(scheduled))
        # vLLM schedules -1 placeholders where no draft exists yet (a request's first decode step):
        # their rows go unused (the tree there is empty) and allow everything, as vLLM's padding rows.
        tokens = scheduled[:scheduled.index(-1)] if -1 in scheduled else scheduled
        parents = parents_of.get(req_id, [])[:len(tokens)]
        if len(parents) < len(tokens):  # (cannot happen: drafts without parents are dropped)
            raise RuntimeError(f"ddtree: request {req_id} has {len(tokens)} drafts but {len(parents)} parents")
        fill_tree_rows(manager, request.structured_output_request.grammar, req_id, tokens, parents, start)
        manager._fill_bitmasks(compat.grammar_row(request.structured_output_request.grammar, start + row, False)
                               for row in range(len(tokens) + 1, block))
        start += block
    return bitmask[:start].numpy()


def fill_tree_rows(manager, grammar, req_id: str, tokens: list[int], parents: list[int], start: int) -> None:
    """Rows ``start + i`` for node i = 0 (root) .. len(tokens), depth first; the grammar ends where it
    began."""
    children: list[list[int]] = [[] for _ in range(len(tokens) + 1)]
    for node, parent in enumerate(parents, start=1):
        children[parent].append(node)
    manager._fill_bitmasks((compat.grammar_row(grammar, start, True),))
    path: list[int] = []  # nodes the grammar has accepted, root excluded
    stack = list(reversed(children[0]))
    while stack:
        node = stack.pop()
        parent = parents[node - 1]
        while path and path[-1] != parent:
            path.pop()
            grammar.rollback(1)
        token = tokens[node - 1]
        # validate_tokens first: a backend's accept_tokens logs every rejection as an error, and
        # rejected drafts are routine in a tree (vLLM's chain validates its drafts the same way).
        reachable = grammar.validate_tokens([token]) == [token] and grammar.accept_tokens(req_id, [token])
        if reachable:
            path.append(node)
            manager._fill_bitmasks((compat.grammar_row(grammar, start + node, True),))
            stack.extend(reversed(children[node]))
        else:  # a rejected token: the node and its subtree cannot be reached; no constraint needed
            for unreachable in _subtree(children, node):
                manager._fill_bitmasks((compat.grammar_row(grammar, start + unreachable, False),))
    if path:
        grammar.rollback(len(path))


def _subtree(children: list[list[int]], node: int) -> list[int]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(children[n])
    return out
