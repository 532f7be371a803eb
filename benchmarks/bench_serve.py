"""Load test of ``torsion serve`` on loopback: 32 concurrent clients against the same requests one at a time,
then 16 staggered clients against a static and a continuous-batching server.

Target: concurrent (batched) serving has at least 2x the throughput of sequential serving of
the same requests, in the same run, on the embedded Qwen model; every concurrent output
equals the output the same request got alone. Requests: 32 distinct pairs of 16 prompts and
4 steering settings (none, flat, dense at an equal applied norm, ablation; random unit
directions), greedy, ``max_tokens`` 16, through the real ``openai`` client.

Staggered scenario: the first 16 of those requests, client ``i`` arriving ``i * gap`` s after
the first, ``gap`` = 1/8 of the median latency of a request served alone (measured above, so
arrivals span about two single-request generations whatever the machine's speed), served by a
static-batching server (a request arriving mid-batch waits for the whole batch) and by a
continuous-batching one (it joins at the next decode step), same model, same run; p50/p95
latency (each request from its own arrival) and throughput (requests over the time from the
first arrival to the last answer) side by side, and every output checked against the same
request alone. Bounded: 99 requests in all (three warm-ups), each with a timeout.
``os.getloadavg()`` is recorded before and after, and the process CPU seconds of each staggered
arm (``time.process_time``; server and clients are one process), since the machine is shared:
under contention wall times measure the neighbours as much as the server.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch
from common import NEUTRAL_PROMPTS, write_result
from openai import OpenAI

from torsion.models import load_model
from torsion.serve import ServerThread, build_state

N_CLIENTS, MAX_TOKENS, MAX_BATCH, WINDOW_MS, SEED, TIMEOUT_S = 32, 16, 32, 20.0, 0, 900
STAGGERED_CLIENTS, GAP_SHARE = 16, 1 / 8
PROMPTS = NEUTRAL_PROMPTS
STEERINGS = [
    None,
    {"method": "flat", "vector": "random", "layers": [10, 12], "strength": 6.0},
    {"method": "dense", "vector": "random", "strength": 2.0, "scale": "applied_norm"},
    {"method": "ablation", "vector": "random", "strength": 1.0},
]


def ask(client: OpenAI, index: int) -> tuple[str, float]:
    """(content, latency s) of request ``index``: prompt ``index % 16``, steering ``(index + index // 16) % 4``."""
    steering = STEERINGS[(index + index // len(PROMPTS)) % len(STEERINGS)]
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], temperature=0,
        max_tokens=MAX_TOKENS, extra_body={"steering": steering} if steering else {})
    return reply.choices[0].message.content, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(latencies, 50), 3), "p95": round(percentile(latencies, 95), 3)}


def serve_state(lm, directions: torch.Tensor, continuous: bool):
    state = build_state(lm, max_batch_size=MAX_BATCH, batch_window_ms=WINDOW_MS, continuous=continuous)
    state.vectors.add("random", directions, source="bench_serve: random unit per block", meta={"seed": SEED})
    return state


def staggered(state, alone: list[tuple[str, float]], gap: float) -> dict:
    """Requests ``0 … STAGGERED_CLIENTS-1``, client ``i`` arriving ``i * gap`` s after the first."""
    results: list[tuple[str, float] | None] = [None] * STAGGERED_CLIENTS
    with ServerThread(state) as server:
        client = OpenAI(base_url=server.url, api_key="none", timeout=TIMEOUT_S, max_retries=0)
        ask(client, 0)  # warm-up
        before = dict(state.engine.stats)
        cpu = time.process_time()
        start = time.perf_counter()

        def client_thread(i: int) -> None:
            time.sleep(max(0.0, start + i * gap - time.perf_counter()))
            results[i] = ask(client, i)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(STAGGERED_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        span = time.perf_counter() - start
        cpu = time.process_time() - cpu
        stats = {k: state.engine.stats[k] - before.get(k, 0) for k in ("batches", "rows", "joined")}
    done = [r for r in results if r is not None]
    return {"batching": state.engine.mode, "wall_s": round(span, 3), "process_cpu_s": round(cpu, 2),
            "requests_per_s": round(len(done) / span, 4), "latency_s": latency_summary([lat for _, lat in done]),
            "prefills": stats["batches"], "rows": stats["rows"], "rows_joined_running_batch": stats["joined"],
            "largest_batch": state.engine.stats["largest_batch"],
            "mismatched_requests": [i for i in range(STAGGERED_CLIENTS)
                                    if results[i] is None or results[i][0] != alone[i][0]]}


def main() -> None:
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    directions = torch.nn.functional.normalize(
        torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(SEED)), dim=1)
    state = serve_state(lm, directions, continuous=True)
    load_before = os.getloadavg()
    with ServerThread(state) as server:
        client = OpenAI(base_url=server.url, api_key="none", timeout=TIMEOUT_S, max_retries=0)
        ask(client, 0)  # warm-up
        start = time.perf_counter()
        alone = [ask(client, i) for i in range(N_CLIENTS)]
        sequential_s = time.perf_counter() - start
        batches_before = dict(state.engine.stats)
        together: list[tuple[str, float] | None] = [None] * N_CLIENTS
        barrier = threading.Barrier(N_CLIENTS)

        def client_thread(i: int) -> None:
            barrier.wait()
            together[i] = ask(client, i)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(N_CLIENTS)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        concurrent_s = time.perf_counter() - start
        stats = {k: state.engine.stats[k] - batches_before.get(k, 0) for k in ("batches", "rows")}
    gap = GAP_SHARE * percentile([latency for _, latency in alone], 50)
    arms = {"static": staggered(serve_state(lm, directions, continuous=False), alone, gap),
            "continuous": staggered(serve_state(lm, directions, continuous=True), alone, gap)}
    load_after = os.getloadavg()
    mismatched = [i for i in range(N_CLIENTS) if together[i] is None or together[i][0] != alone[i][0]]
    seq_lat = [latency for _, latency in alone]
    con_lat = [latency for _, latency in together if _ is not None]
    write_result("serve", {
        "model": lm.model_id, "clients": N_CLIENTS, "requests_per_arm": N_CLIENTS, "max_tokens": MAX_TOKENS,
        "decoding": "greedy", "steering_settings": STEERINGS, "direction": "random unit per block",
        "seed": SEED, "max_batch_size": MAX_BATCH, "batch_window_ms": WINDOW_MS,
        "batching": f"{state.engine.mode} batching: finished rows leave the batch and its KV cache"
                    + (", newcomers join at the next decode step" if state.engine.mode == "continuous" else ""),
        "concurrent_batches": stats["batches"], "concurrent_rows": stats["rows"],
        "sequential_s": round(sequential_s, 3), "concurrent_s": round(concurrent_s, 3),
        "sequential_requests_per_s": round(N_CLIENTS / sequential_s, 4),
        "concurrent_requests_per_s": round(N_CLIENTS / concurrent_s, 4),
        "throughput_ratio": round(sequential_s / concurrent_s, 3), "target_ratio": 2.0,
        "sequential_latency_s": latency_summary(seq_lat), "concurrent_latency_s": latency_summary(con_lat),
        "outputs_equal_alone": len(mismatched) == 0, "mismatched_requests": mismatched,
        "distinct_outputs": len({text for text, _ in alone}),
        "staggered": {
            "clients": STAGGERED_CLIENTS, "arrival_interval_s": round(gap, 3),
            "arrival_interval": "1/8 of the median sequential latency", "requests": "the first 16 above",
            "max_tokens": MAX_TOKENS, "max_batch_size": MAX_BATCH, "batch_window_ms": WINDOW_MS, **arms,
            "continuous_over_static_throughput": round(arms["continuous"]["requests_per_s"]
                                                       / arms["static"]["requests_per_s"], 3),
            "continuous_over_static_p50_latency": round(arms["continuous"]["latency_s"]["p50"]
                                                        / arms["static"]["latency_s"]["p50"], 3),
            "outputs_equal_alone": not arms["static"]["mismatched_requests"]
            and not arms["continuous"]["mismatched_requests"]},
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
    })


if __name__ == "__main__":
    main()
