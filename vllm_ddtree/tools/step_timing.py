"""An in-process engine's decode steps, timed as they run, beside what the cost-aware budget's cost
model (:mod:`vllm_ddtree.adapter.step_costs`) predicts for them: the check that the model's dummy
passes cost what the engine's real steps do (benchmarks/cost_model_vs_steps.py, tests/test_cost_model.py).
V1 runner only (vLLM 0.32/0.33's CPU build, where the model is checked)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from vllm_ddtree.tools.engine_runs import model_runner


@dataclass
class TimedStep:
    requests: int   # requests in the step
    rows: int       # query rows the target ran (one per request, plus the verified nodes)
    seconds: float  # from the runner's execute_model call to its sample_tokens return


def record_decode_steps(llm) -> list[TimedStep]:
    """From now on, appends a :class:`TimedStep` for every step of ``llm``'s runner that schedules no
    new request (prefill steps left out) to the returned list."""
    runner = model_runner(llm)
    steps: list[TimedStep] = []
    pending: dict[str, tuple[int, int, float]] = {}
    execute, sample = runner.execute_model, runner.sample_tokens

    def execute_model(scheduler_output, *args, **kwargs):
        pending.pop("step", None)
        if not scheduler_output.scheduled_new_reqs and scheduler_output.total_num_scheduled_tokens:
            pending["step"] = (len(scheduler_output.num_scheduled_tokens),
                               scheduler_output.total_num_scheduled_tokens, time.perf_counter())
        return execute(scheduler_output, *args, **kwargs)

    def sample_tokens(*args, **kwargs):
        out = sample(*args, **kwargs)
        if "step" in pending:
            requests, rows, start = pending.pop("step")
            steps.append(TimedStep(requests, rows, time.perf_counter() - start))
        return out

    runner.execute_model, runner.sample_tokens = execute_model, sample_tokens
    return steps


def cost_model_now(llm):
    """The cost model of ``llm``'s ddtree engine, timed now on its runner as engine start times it
    (the same dummy passes, not the disk cache): a host :class:`~vllm_ddtree.budget.StepCosts`."""
    from vllm_ddtree.adapter import step_costs
    from vllm_ddtree.budget import StepCosts

    runner = model_runner(llm)
    sizes = step_costs.table_sizes(runner, runner.ddtree_state)
    return StepCosts.from_samples(*step_costs.measure(runner, runner.ddtree_state, *sizes), *sizes)


def predicted_seconds(costs, step: TimedStep, drafted: bool) -> float:
    """The model's seconds for ``step``: C_step(rows), plus C_draft(requests) where the drafter drafted."""
    rows = min(step.rows, costs.step.shape[0] - 1)
    draft = float(costs.draft[min(step.requests, costs.draft.shape[0] - 1)]) if drafted else 0.0
    return float(costs.step[rows]) + draft
