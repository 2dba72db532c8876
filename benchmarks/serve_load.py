"""Load on the OpenAI-compatible server: 1, 4 and 16 concurrent clients, loopback only.

The server is the product path (``mahalo.serve``: models loaded once, one engine, FastAPI on
uvicorn), started in this process on 127.0.0.1 with a free port. For each concurrency level C in
``--clients`` (default 1,4,16), C client threads send TruthfulQA dev questions through the real
``openai`` client, streaming, one request at a time each, until ``--requests`` requests are done
(default: 2 x C, at least 4) or ``--time-limit`` seconds have passed (no new request starts
after it). Per level it records:

* requests per minute (completed requests / wall time of the level);
* latency p50 / p95 (request sent -> last chunk);
* time to first step p50 / p95 (request sent -> first chunk with text: the first accepted step
  for ``step_best_of_n``);
* completion tokens per second (all clients together).

Outputs (``--out-dir``): ``serve_load.json``, ``serve_load.csv``, ``serve_load.png``.

Smoke run (tiny random models; numbers meaningless)::

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --models tiny --clients 1,2 --requests 2 --max-tokens 16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.table import Table  # noqa: E402

from benchmarks import common  # noqa: E402

log = logging.getLogger("benchmarks.serve_load")

ROW_FIELDS = ["clients", "requests", "wall_s", "requests_per_min", "latency_p50_s", "latency_p95_s",
              "first_step_p50_s", "first_step_p95_s", "completion_tokens_per_s", "errors"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=("embedded", "tiny"), default="embedded")
    p.add_argument("--clients", type=common.int_list, default=[1, 4, 16], help="concurrency levels (default: 1,4,16)")
    p.add_argument("--requests", type=int, default=0, help="requests per level (0: 2 x clients, at least 4)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per level after which no request starts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-candidates", type=int, default=5)
    p.add_argument("--questions", type=Path, default=common.DEFAULT_QUESTIONS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--machine", default="")
    p.add_argument("--out-dir", type=Path, default=common.DEFAULT_OUT_DIR)
    p.add_argument("--tag", default="")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.clients) or args.requests < 0 or args.max_tokens < 1:
        p.error("--clients values and --max-tokens must be >= 1, --requests >= 0")
    return args


class _Running:
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, server: Any) -> None:
        import uvicorn

        from mahalo.app.server import create_app

        self.server = server
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        while not self.uv.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.uv.servers[0].sockets[0].getsockname()[1]}/v1"

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)
        self.server.engine.close()


def launch(args: argparse.Namespace) -> tuple[_Running, float, dict[str, Any]]:
    """Load the models once and start the server, as ``python -m mahalo.serve`` does."""
    from mahalo.serve import build_engine, build_server, compose_serve_config

    cfg = compose_serve_config([f"models={args.models}", "+objective=truth", f"server.max_tokens_cap={args.max_tokens}",
                                f"search.num_candidates={args.num_candidates}"])
    t0 = time.perf_counter()
    engine, objectives = build_engine(cfg)
    load_s = time.perf_counter() - t0
    info = {"models": args.models, "objectives": objectives, "max_prompts": engine.max_prompts,
            "strategy": cfg.search.strategy, "num_candidates": cfg.search.num_candidates,
            "reward": type(engine.controller.rewards["truth"]).__name__}
    return _Running(build_server(cfg, engine, objectives)), load_s, info


def one_request(client: Any, question: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """Send one streamed request; its latency, time to first step and tokens."""
    t0 = time.perf_counter()
    first, tokens, text = None, 0, []
    stream = client.chat.completions.create(model="mahalo", messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, seed=seed, stream=True)
    for chunk in stream:
        choice = chunk.choices[0] if chunk.choices else None
        if choice and choice.delta.content:
            first = first or time.perf_counter() - t0
            text.append(choice.delta.content)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            tokens = usage.completion_tokens
    return {"latency_s": time.perf_counter() - t0, "first_step_s": first, "completion_tokens": tokens,
            "text": "".join(text)}


def run_level(url: str, questions: list[str], clients: int, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    """``clients`` threads, ``requests`` requests in all (or until the time limit)."""
    import openai

    lock = threading.Lock()
    todo = list(range(requests))
    done: list[dict[str, Any]] = []
    errors: list[str] = []
    t0 = time.perf_counter()

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=args.time_limit + 600)
        while True:
            with lock:
                if not todo or time.perf_counter() - t0 > args.time_limit:
                    return
                i = todo.pop(0)
            try:
                r = one_request(client, questions[i % len(questions)], args.max_tokens, seed=i)
            except openai.OpenAIError as err:
                with lock:
                    errors.append(str(err))
                continue
            with lock:
                done.append(r)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency_s"] for r in done]
    first = [r["first_step_s"] for r in done if r["first_step_s"] is not None]
    return {
        "clients": clients, "requests": len(done), "wall_s": wall,
        "requests_per_min": 60 * len(done) / wall if wall else float("nan"),
        "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95),
        "first_step_p50_s": _pct(first, 50), "first_step_p95_s": _pct(first, 95),
        "completion_tokens_per_s": sum(r["completion_tokens"] for r in done) / wall if wall else float("nan"),
        "errors": len(errors), "error_examples": errors[:3],
    }


def _pct(values: list[float], q: int) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="OpenAI-compatible server under load (streaming, loopback)")
    for col in ("clients", "requests", "wall s", "req/min", "latency p50 s", "latency p95 s",
                "first step p50 s", "first step p95 s", "completion tok/s", "errors"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["clients"]), str(r["requests"]), common.fmt(r["wall_s"], 1), common.fmt(r["requests_per_min"]),
                  common.fmt(r["latency_p50_s"]), common.fmt(r["latency_p95_s"]), common.fmt(r["first_step_p50_s"]),
                  common.fmt(r["first_step_p95_s"]), common.fmt(r["completion_tokens_per_s"], 1), str(r["errors"]))
    return t


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["clients"] for r in rows]
    a.plot(xs, [r["requests_per_min"] for r in rows], marker="o")
    a.set_xlabel("concurrent clients")
    a.set_ylabel("requests per minute")
    a.set_xscale("log", base=2)
    b.plot(xs, [r["latency_p50_s"] for r in rows], marker="o", label="latency p50")
    b.plot(xs, [r["latency_p95_s"] for r in rows], marker="o", label="latency p95")
    b.plot(xs, [r["first_step_p50_s"] for r in rows], marker="s", label="first step p50")
    b.set_xlabel("concurrent clients")
    b.set_ylabel("seconds")
    b.set_xscale("log", base=2)
    b.legend()
    fig.tight_layout()
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    common.set_threads(args.threads)
    console = common.console()
    try:
        questions = [q.question for q in common.read_questions(args.questions, max(args.clients) * 4)]
        running, load_s, info = launch(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    machine = common.machine_info("cpu", args.machine)
    console.print(common.machine_line(machine), style="dim", markup=False)
    rows = []
    try:
        warm = run_level(running.url, questions, 1, 1, args)  # unrecorded: first-call costs
        log.info("warm-up: %.2f s", warm["wall_s"])
        for clients in args.clients:
            requests = args.requests or max(4, 2 * clients)
            row = run_level(running.url, questions, clients, requests, args)
            log.info("clients=%d: %d requests in %.1f s", clients, row["requests"], row["wall_s"])
            rows.append(row)
    finally:
        running.stop()
    stem = common.out_stem("serve_load", args.tag)
    meta = {"args": vars(args), "machine": machine, "server": info, "load_s": load_s}
    json_path = common.write_json(args.out_dir / f"{stem}.json", {"meta": meta, "rows": rows})
    csv_path = common.write_csv(args.out_dir / f"{stem}.csv", rows, ROW_FIELDS)
    console.print(table(rows))
    png = None if args.no_plot else plot(rows, args.out_dir / f"{stem}.png")
    console.print(f"wrote {json_path}, {csv_path}" + (f", {png}" if png else ""), markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
