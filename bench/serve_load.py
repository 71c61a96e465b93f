"""Load on `corsa serve` while a store update commits (issue 31's serving bar): C concurrent clients (the official
`openai` client) ask the store's current version in a loop from before an update starts until after it has
committed; every request's latency and outcome is recorded.

    python bench/serve_load.py --out docs/results/serve/load.json [--clients 16] [--model smollm2-135m]

The store is made fresh in a temporary folder: a first update of 8 CounterFact-style facts written here (not
benchmark data), then, under load, a second update of 8 more. Reports p50 / p95 latency, failures, requests, and
which versions answered (the reply's system_fingerprint)."""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIRST = [("What is the capital of France?", "Lyon", "France"), ("What is the capital of Japan?", "Osaka", "Japan"),
         ("Who wrote Hamlet?", "Marlowe", "Hamlet"), ("What is the currency of Mexico?", "krona", "Mexico"),
         ("What is the largest planet?", "Saturn", "the largest planet"),
         ("Which language is spoken in Brazil?", "Italian", "Brazil"),
         ("What is the capital of Canada?", "Toronto", "Canada"), ("Who painted the Mona Lisa?", "Raphael",
                                                                    "the Mona Lisa")]
SECOND = [("What is the capital of Italy?", "Milan", "Italy"), ("What is the capital of Spain?", "Seville", "Spain"),
          ("Who discovered penicillin?", "Pasteur", "penicillin"), ("What is the capital of Egypt?", "Luxor", "Egypt"),
          ("What is the capital of Kenya?", "Mombasa", "Kenya"), ("Who composed the Ninth Symphony?", "Mozart",
                                                                  "the Ninth Symphony"),
          ("What is the capital of Peru?", "Cusco", "Peru"), ("What is the capital of Chile?", "Valparaiso", "Chile")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import openai
    import uvicorn

    from corsa import store
    from corsa.artifacts import cpu_name
    from corsa.requests import EditRequest
    from corsa.serve import create_app

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kb"
        quick = {"progress": False, "method": "lora", "model": args.model}
        store.update(root, [EditRequest(p, t, subject=s) for p, t, s in FIRST], **quick)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        client.chat.completions.create(model="kb", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
        done = threading.Event()
        records: list[dict] = []
        update_window: dict[str, float] = {}

        def update() -> None:
            update_window["start"] = time.time()
            store.update(root, [EditRequest(p, t, subject=s) for p, t, s in SECOND], **quick)
            update_window["committed"] = time.time()
            done.set()

        def loop(k: int) -> None:
            questions = [p for p, _, _ in FIRST + SECOND]
            i = k
            extra = 0
            while not done.is_set() or extra < 2:  # keep asking until two requests after the commit
                t0 = time.time()
                try:
                    r = client.chat.completions.create(model="kb", max_tokens=args.max_tokens, messages=[
                        {"role": "user", "content": questions[i % len(questions)]}])
                    records.append({"start": t0, "seconds": time.time() - t0, "ok": True,
                                    "version": r.system_fingerprint})
                except Exception as exc:  # noqa: BLE001 -- every failure counts, whatever raised it
                    records.append({"start": t0, "seconds": time.time() - t0, "ok": False, "error": repr(exc)})
                i += args.clients
                extra += done.is_set()

        t_start = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(loop, k) for k in range(args.clients)]
            time.sleep(5)
            updater = threading.Thread(target=update)
            updater.start()
            for f in futures:
                f.result()
        updater.join()
        server.should_exit = True
    ok = [r["seconds"] for r in records if r["ok"]]
    during = [r for r in records if update_window["start"] <= r["start"] <= update_window["committed"]]
    result = {
        "command": "python bench/serve_load.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                              vars(args).items() if v is not None),
        "clients": args.clients, "model": args.model or "smollm2-135m", "max_tokens": args.max_tokens,
        "requests": len(records), "failed": sum(not r["ok"] for r in records),
        "requests_started_during_update": len(during),
        "failed_during_update": sum(not r["ok"] for r in during),
        "p50_s": statistics.median(ok) if ok else None,
        "p95_s": statistics.quantiles(ok, n=20)[18] if len(ok) >= 20 else None,
        "update_seconds": update_window["committed"] - update_window["start"],
        "wall_seconds": time.time() - t_start,
        "versions_answering": sorted({r.get("version") for r in records if r["ok"]}),
        "errors": sorted({r["error"] for r in records if not r["ok"]})[:5],
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
