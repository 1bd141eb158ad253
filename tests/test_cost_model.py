"""The cost-aware budget's cost model against the steps the engine runs: its dummy passes, timed on the
engine as engine start times them, predict the engine's real decode steps (a ddtree step: C_step of its
rows plus C_draft of its requests) within a band wide enough for this machine's drift, and the model
ranks the step kinds as they measure (a tree step costs more than a plain step of the same requests),
and what a tree adds over a plain step, which the budget rule weighs, within the same band.
Timings taken here only bound the model; the figures are benchmarks/cost_model_vs_steps.py's."""

import statistics

from tiny_engines import PROMPTS, run

from vllm_ddtree.tools.step_timing import cost_model_now, predicted_seconds, record_decode_steps


def timed_run(models, spec):
    found = {}

    def before(llm):
        found["costs"] = cost_model_now(llm) if spec else None
        found["steps"] = record_decode_steps(llm)

    run(models, spec=spec, before=before, warmup=PROMPTS[:2], max_num_seqs=len(PROMPTS))  # a small cost grid
    full = [s for s in found["steps"] if s.requests == len(PROMPTS)]  # steps with the whole batch
    assert len(full) >= 10, found["steps"]
    return found["costs"], full


def test_cost_model_predicts_the_engines_steps(models):
    costs, tree_steps = timed_run(models, {"method": "ddtree", "num_speculative_tokens": 16})
    _, plain_steps = timed_run(models, None)
    measured_tree = statistics.median(s.seconds for s in tree_steps)
    predicted_tree = statistics.median(predicted_seconds(costs, s, drafted=True) for s in tree_steps)
    measured_plain = statistics.median(s.seconds for s in plain_steps)
    predicted_plain = statistics.median(predicted_seconds(costs, s, drafted=False) for s in plain_steps)
    print(f"tree step {1e3 * measured_tree:.2f} ms, model {1e3 * predicted_tree:.2f}; "
          f"plain step {1e3 * measured_plain:.2f} ms, model {1e3 * predicted_plain:.2f}")
    assert all(s.rows > s.requests for s in tree_steps) and all(s.rows == s.requests for s in plain_steps)
    assert 0.5 < predicted_tree / measured_tree < 2.0
    assert 0.5 < predicted_plain / measured_plain < 2.0
    assert predicted_tree > predicted_plain and measured_tree > measured_plain
    # What the budget rule weighs: a tree's cost over the plain step of the same requests.
    assert 0.5 < (predicted_tree - predicted_plain) / (measured_tree - measured_plain) < 2.0
