"""The judge proxy's shared sqlite file under concurrent writers: several processes (as several
proxy replicas are), each with several threads, writing the same and different keys and usage
counts into one file while a reader polls it."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading
import time

import pytest

from bpo_ray.serving.judge.cache import JudgeCache, cache_key
from bpo_ray.serving.judge.usage import Usage, UsageLedger, UsageStore

PROCESSES, THREADS, SHARED_KEYS, OWN_KEYS = 3, 3, 36, 8


def _answer(writer: str, key: str) -> dict:
    return {"id": f"{writer}/{key}", "choices": [{"message": {"content": f"verdict by {writer} ✓"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2}}


def _writer_process(path: str, proc: int, barrier, out) -> None:
    """One replica: THREADS threads, each putting every shared key (its own value) and its own keys,
    and adding usage; reports what every put returned."""
    cache, store = JudgeCache(path), UsageStore(path)
    returned: dict[str, list] = {}
    lock = threading.Lock()

    def work(t: int) -> None:
        writer, start = f"p{proc}t{t}", (proc * THREADS + t) * SHARED_KEYS // (PROCESSES * THREADS)
        barrier.wait()  # every thread of every process starts writing at once, each at another key
        for n in range(SHARED_KEYS):
            i = (start + n) % SHARED_KEYS
            keys = [f"shared-{i}"] + ([f"own-{writer}-{n}"] if n < OWN_KEYS else [])
            for key in keys:
                stored = cache.put(key, _answer(writer, key))
                with lock:
                    returned.setdefault(key, []).append(stored["id"])
                time.sleep(0.001)  # as replicas do between answers: the others get the write lock too
            store.add({"alice": Usage(requests=1, cache_hits=1, saved_usd=0.25), writer: Usage(errors=1)})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cache.close()
    store.close()
    out.put(returned)


def test_concurrent_writers_keep_one_value_per_key_and_every_count(tmp_path):
    path = str(tmp_path / "judge.sqlite")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(PROCESSES * THREADS + 1), ctx.Queue()
    procs = [ctx.Process(target=_writer_process, args=(path, p, barrier, out)) for p in range(PROCESSES)]
    for p in procs:
        p.start()

    reader = JudgeCache(path)  # polls while they write: a key, once seen, never changes
    seen: dict[str, bytes] = {}
    barrier.wait()
    while any(p.is_alive() for p in procs) and out.qsize() < PROCESSES:
        for i in range(SHARED_KEYS):
            got = reader.get_raw(f"shared-{i}")
            if got is not None:
                assert seen.setdefault(f"shared-{i}", got.body) == got.body
    returned: dict[str, list] = {}
    for _ in procs:
        for key, ids in out.get(timeout=120).items():
            returned.setdefault(key, []).extend(ids)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    writers = PROCESSES * THREADS
    assert len(reader) == SHARED_KEYS + writers * OWN_KEYS
    winners = {reader.get(f"shared-{i}")["id"].split("/")[0] for i in range(SHARED_KEYS)}
    assert len(winners) > 1, "the writers did not overlap"
    for i in range(SHARED_KEYS):
        stored = reader.get(f"shared-{i}")
        assert stored is not None and stored["usage"] == {"prompt_tokens": 10, "completion_tokens": 2}
        # every writer, winner or not, got back the one stored answer
        assert returned[f"shared-{i}"] == [stored["id"]] * writers
        assert seen.get(f"shared-{i}", reader.get_raw(f"shared-{i}").body) == reader.get_raw(f"shared-{i}").body
    assert seen, "the reader saw nothing while they wrote"
    for p in range(PROCESSES):
        for t in range(THREADS):
            for i in range(OWN_KEYS):
                key = f"own-p{p}t{t}-{i}"
                assert reader.get(key)["id"] == f"p{p}t{t}/{key}"
    hit = reader.get_raw("shared-0")
    assert (hit.prompt_tokens, hit.completion_tokens) == (10, 2) and "✓" in hit.body.decode()

    totals = UsageStore(path).totals()
    assert totals["alice"].requests == writers * SHARED_KEYS == totals["alice"].cache_hits
    assert totals["alice"].saved_usd == pytest.approx(0.25 * writers * SHARED_KEYS)
    assert all(totals[f"p{p}t{t}"].errors == SHARED_KEYS for p in range(PROCESSES) for t in range(THREADS))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.close()


def test_first_answer_stored_wins_and_old_cache_files_still_read(tmp_path):
    path = str(tmp_path / "c.sqlite")
    # a file written by the previous proxy (same table, INSERT OR REPLACE, json.dumps default spacing)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, "
                   "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)")
        db.execute("INSERT INTO responses VALUES ('old', '{\"choices\": [], \"usage\": {\"prompt_tokens\": 7}}', "
                   "7, NULL, 0)")
    a, b = JudgeCache(path), JudgeCache(path)
    assert a.get("old") == {"choices": [], "usage": {"prompt_tokens": 7}}
    assert (a.get_raw("old").prompt_tokens, a.get_raw("old").completion_tokens) == (7, 0)
    assert a.put("k", {"n": 1}) == {"n": 1}
    assert b.put("k", {"n": 2}) == {"n": 1}  # the second writer gets the first answer back
    assert b.get("k") == {"n": 1} and b.get_raw("missing") is None
    a.close()
    b.close()
    key = cache_key({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}, "u")
    assert key == cache_key({"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m",
                             "user": "someone"}, "u")


def test_ledger_batches_counts_until_taken(tmp_path):
    store = UsageStore(str(tmp_path / "u.sqlite"))
    ledger = UsageLedger(0.03, 0.06, store)
    ledger.record("alice", Usage(requests=1, prompt_tokens=1000, cost_usd=ledger.price(1000, 0)))
    ledger.record("alice", Usage(requests=1, cache_hits=1))
    assert store.totals() == {}  # nothing written on the request path
    batch = ledger.take_pending()
    store.add(batch)
    ledger.restore({"bob": Usage(errors=1)})  # a failed write keeps its counts pending
    store.add(ledger.take_pending())
    report = ledger.report("alice", store.totals())
    assert report["usage"]["requests"] == 2 and report["usage"]["cache_hits"] == 1
    assert report["usage"]["cost_usd"] == pytest.approx(0.03)
    assert report["total"]["errors"] == 1 and report["total"]["requests"] == 2
    store.close()
