"""A bounded load test of vLLM's OpenAI server with ddtree: concurrent clients, mixed traffic, checks.

The server runs ddtree (the cost-aware budget by default) on the real pair (SmolLM2-135M-Instruct +
the project's drafter, float32 so that greedy answers compare token for token); ``--clients`` concurrent clients send ``--requests``
requests drawn (seeded) from this mix: completions and chat, greedy and sampled, streamed and not,
stop strings, ``max_tokens`` 1..256, requests a speculative engine refuses on arrival (a logit_bias, which
vLLM refuses with any speculative method: a 400 is the right answer; a streamed one gets vLLM's error event with code 400), clients that disconnect after the first streamed chunk, and
clients that abort before the answer is complete. Meanwhile a monitor asks ``/health`` and
``/metrics`` every half second.

Checks (the run fails, exit status 1, if one does not hold): no request fails (every one gets its
answer, its refusal, or the disconnect/abort its client chose); every answered greedy request's text
equals the same request on a server without speculation (replayed afterwards at the same
concurrency); ``/health`` and ``/metrics`` answered throughout; the spec-decode counters add up
(at most B draft tokens per draft, exactly B with ``--policy fixed``; the per-depth accepted counts
sum to the accepted tokens and never grow with depth; at most D accepted per draft). Reported: requests by outcome, failures, throughput
(completion tokens per second of the load's wall time) and p50/p99 latency of answered requests.

Usage: ``python benchmarks/load_serve.py [--requests 256] [--clients 64] [--budget 32] [--policy fixed]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

OUTCOMES = ("answered", "refused", "disconnected", "aborted")


@dataclass
class Request:
    index: int
    kind: str                 # "completion" or "chat"
    prompt: str
    max_tokens: int
    greedy: bool
    stream: bool = False
    stop: list[str] | None = None
    refused: bool = False     # carries a logit_bias: the speculative server must answer 400
    disconnect: bool = False  # streamed; the client leaves after the first chunk
    abort_after: float | None = None  # the client gives up after this many seconds

    def body(self, model: str) -> dict:
        body = {"model": model, "max_tokens": self.max_tokens, "temperature": 0.0 if self.greedy else 1.0,
                "stream": self.stream}
        if not self.greedy:
            body["top_p"] = 0.9
        if self.stop:
            body["stop"] = self.stop
        if self.refused:
            body["logit_bias"] = {"5": 1.0}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


@dataclass
class Result:
    request: Request
    outcome: str              # one of OUTCOMES, or "failed: ..."
    text: str = ""
    tokens: int = 0
    latency: float = 0.0


def plan(prompts: list[str], count: int, max_tokens: int, seed: int = 0) -> list[Request]:
    """``count`` requests of the mix (see the module docstring), reproducible from ``seed``."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        roll = rng.random()
        r = Request(i, rng.choice(["completion", "chat"]), rng.choice(prompts), rng.randint(1, max_tokens),
                    greedy=rng.random() < 0.6, stream=rng.random() < 0.3)
        if roll < 0.08:
            r.refused = True
        elif roll < 0.16:
            r.stream, r.disconnect = True, True
        elif roll < 0.22:
            r.abort_after = rng.uniform(0.05, 0.5)
        elif roll < 0.32:
            r.stop = [rng.choice(["\n\n", ".", " the ", "def ", ","])]
        requests.append(r)
    return requests


async def send(session, url: str, model: str, request: Request) -> Result:
    import aiohttp

    start = time.perf_counter()
    try:
        timeout = aiohttp.ClientTimeout(total=request.abort_after or 3600)
        async with session.post(url + request.path, json=request.body(model), timeout=timeout) as response:
            if response.status == 400:
                detail = await response.text()
                return Result(request, "refused" if request.refused else f"failed: 400 {detail[:200]}")
            if response.status != 200:
                return Result(request, f"failed: HTTP {response.status} {(await response.text())[:200]}")
            if request.refused and not request.stream:
                return Result(request, "failed: a request with a logit_bias was served")
            if not request.stream:
                answer = await response.json()
                choice = answer["choices"][0]
                text = choice["message"]["content"] if request.kind == "chat" else choice["text"]
                return Result(request, "answered", text or "", answer["usage"]["completion_tokens"],
                              time.perf_counter() - start)
            text, tokens = [], 0
            async for line in response.content:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:  # vLLM reports a request it refuses after the stream began in the stream
                    refusal = chunk["error"].get("code") == 400
                    if refusal and request.refused:
                        return Result(request, "refused")
                    return Result(request, f"failed: {str(chunk['error'])[:200]}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content") if request.kind == "chat" else choice.get("text")
                    text.append(piece or "")
                if request.disconnect:
                    response.close()
                    return Result(request, "disconnected")
            if request.refused:
                return Result(request, "failed: a request with a logit_bias was served")
            return Result(request, "answered", "".join(text), tokens, time.perf_counter() - start)
    except asyncio.TimeoutError:
        if request.abort_after is not None:
            return Result(request, "aborted")
        return Result(request, "failed: timeout")
    except Exception as error:  # noqa: BLE001 - any other client-side error is a failure to report
        return Result(request, f"failed: {error!r}")


async def run_load(url: str, model: str, requests: list[Request], clients: int) -> tuple[list[Result], float]:
    """All ``requests``, ``clients`` at a time; (results in request order, wall seconds)."""
    import aiohttp

    gate = asyncio.Semaphore(clients)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(request):
            async with gate:
                return await send(session, url, model, request)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        return list(results), time.perf_counter() - start


async def monitor(url: str, stop: asyncio.Event, problems: list[str], period: float = 0.5) -> int:
    """Asks ``/health`` and ``/metrics`` until ``stop``; failures go to ``problems``; returns the polls."""
    import aiohttp

    polls = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            for path in ("/health", "/metrics"):
                try:
                    async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=30)) as response:
                        await response.read()
                        if response.status != 200:
                            problems.append(f"{path}: HTTP {response.status}")
                except Exception as error:  # noqa: BLE001
                    problems.append(f"{path}: {error!r}")
            polls += 1
            try:
                await asyncio.wait_for(stop.wait(), period)
            except asyncio.TimeoutError:
                pass
    return polls


async def load_with_monitor(url, model, requests, clients):
    stop, problems = asyncio.Event(), []
    watcher = asyncio.create_task(monitor(url, stop, problems))
    results, seconds = await run_load(url, model, requests, clients)
    stop.set()
    polls = await watcher
    return results, seconds, problems, polls


def spec_counters(url: str) -> dict[str, float]:
    """vLLM's spec-decode counters from ``/metrics`` (``..._per_pos`` by position)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    counters = {"per_pos": {}}
    for line in text.splitlines():
        if not line.startswith("vllm:spec_decode_num_") or "_created" in line.split(" ")[0]:
            continue
        name, value = line.rsplit(" ", 1)
        if "per_pos" in name:
            position = int(name.split('position="')[1].split('"')[0])
            counters["per_pos"][position] = counters["per_pos"].get(position, 0) + float(value)
        else:
            key = name.split("{")[0].removeprefix("vllm:spec_decode_num_").removesuffix("_total")
            counters[key] = counters.get(key, 0) + float(value)
    return counters


def counter_problems(counters: dict, budget: int, depth: int, fixed: bool) -> list[str]:
    drafts, draft_tokens, accepted = counters["drafts"], counters["draft_tokens"], counters["accepted_tokens"]
    per_pos = [counters["per_pos"].get(p, 0) for p in range(depth)]
    problems = []
    if drafts <= 0 and fixed:  # the cost-aware budget may find that no tree pays here
        problems.append("no speculative step ran")
    if draft_tokens > budget * drafts or (fixed and draft_tokens != budget * drafts):
        problems.append(f"draft tokens {draft_tokens} {'!=' if fixed else '>'} B x drafts = {budget} x {drafts}")
    if sum(per_pos) != accepted:
        problems.append(f"per-depth accepted counts sum to {sum(per_pos)}, accepted tokens are {accepted}")
    if any(a < b for a, b in zip(per_pos, per_pos[1:])):
        problems.append(f"per-depth accepted counts grow with depth: {per_pos}")
    if accepted > depth * drafts:
        problems.append(f"accepted {accepted} > D x drafts = {depth} x {drafts}")
    return problems


@dataclass
class LoadReport:
    results: list[Result]
    seconds: float
    problems: list[str] = field(default_factory=list)  # every failed check, readable
    polls: int = 0
    counters: dict = field(default_factory=dict)
    compared: int = 0         # greedy answers checked against the server without speculation

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome not in OUTCOMES]

    @property
    def latencies(self) -> list[float]:
        return sorted(r.latency for r in self.results if r.outcome == "answered")

    def summary(self) -> str:
        lat = self.latencies
        p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else float("nan")
        tokens = sum(r.tokens for r in self.results if r.outcome == "answered")
        return (f"{len(self.results)} requests: " + ", ".join(f"{self.count(o)} {o}" for o in OUTCOMES)
                + f", {len(self.failures)} failed; {tokens} completion tokens in {self.seconds:.1f} s = "
                f"{tokens / self.seconds:.1f} tok/s; latency p50 {statistics.median(lat) if lat else float('nan'):.2f} s"
                f", p99 {p99:.2f} s; {self.compared} greedy answers equal to no speculation; "
                f"/health and /metrics answered {self.polls} polls")


def load_test(model: str, drafter: str, prompts: list[str], requests: int, clients: int, budget: int, depth: int,
              max_tokens: int, server_args=(), env=None, policy: str = "cost-aware",
              plain_url: str | None = None) -> LoadReport:
    """The whole test: ddtree server under load, then the no-speculation server for the greedy replay
    (``plain_url``: one already running with the same arguments; else one started here)."""
    from vllm_ddtree.tools.engine_runs import openai_server

    planned = plan(prompts, requests, max_tokens)
    spec = {"method": "ddtree", "model": drafter, "num_speculative_tokens": budget, "ddtree_budget": policy}
    with openai_server(model, spec, server_args, env) as server:
        results, seconds, problems, polls = asyncio.run(load_with_monitor(server.url, model, planned, clients))
        report = LoadReport(results, seconds, problems, polls)
        if server.process.poll() is not None:
            report.problems.append("the ddtree server exited during the load")
        report.counters = spec_counters(server.url)
        report.problems += counter_problems(report.counters, budget, depth, policy == "fixed")
    report.problems += [f"request {r.request.index}: {r.outcome}" for r in report.failures]
    greedy = [r for r in results if r.outcome == "answered" and r.request.greedy]
    replay = [Request(r.request.index, r.request.kind, r.request.prompt, r.request.max_tokens, True,
                      stop=r.request.stop) for r in greedy]
    if plain_url is None:
        with openai_server(model, None, server_args, env) as plain:
            expected, _ = asyncio.run(run_load(plain.url, model, replay, clients))
    else:
        expected, _ = asyncio.run(run_load(plain_url, model, replay, clients))
    for got, want in zip(greedy, expected):
        if want.outcome != "answered":
            report.problems.append(f"replay of request {got.request.index} on the plain server: {want.outcome}")
        elif got.text != want.text:
            report.problems.append(f"request {got.request.index}: greedy text differs from no speculation: "
                                   f"{got.text[:80]!r} vs {want.text[:80]!r}")
        else:
            report.compared += 1
    return report


def main() -> int:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_acceptance import humaneval_prompts, mtbench_prompts
    from harness import print_header

    from vllm_ddtree.tools.demo import DEFAULT_DRAFTER
    from vllm_ddtree.tools.targets import smollm2_folder

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--policy", choices=["cost-aware", "fixed"], default="cost-aware")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    args = parser.parse_args()
    with open(f"{args.drafter}/config.json") as f:
        depth = json.load(f)["block_size"] - 1
    print_header()
    prompts = [p[:1500] for p in humaneval_prompts()[:40] + mtbench_prompts()[:40]]
    report = load_test(smollm2_folder(), args.drafter, prompts, args.requests, args.clients, args.budget, depth,
                       args.max_tokens, server_args=["--dtype", "float32", "--max-model-len", "2048"],
                       env={"VLLM_CPU_KVCACHE_SPACE": "4"}, policy=args.policy)
    print(f"ddtree B = {args.budget} ({args.policy}), {args.clients} concurrent clients: {report.summary()}")
    c = report.counters
    print(f"spec-decode counters: drafts {c['drafts']:.0f}, draft tokens {c['draft_tokens']:.0f}, "
          f"accepted {c['accepted_tokens']:.0f} (tau {1 + c['accepted_tokens'] / max(c['drafts'], 1):.2f})")
    for problem in report.problems:
        print("PROBLEM:", problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
