"""ApproximateTimePairer: message_filters' cases, an exact offline optimum on random streams, edge cases,
thread safety."""

from __future__ import annotations

import random
import threading
import time

import pytest

from rgbt_seg_ros.pipeline.sync import ApproximateTimePairer

S = 1_000_000_000
MS = 1_000_000
BASE = 1_700_000_000 * S


def feed(pairer, events, now=False):
    """events: (stream 0=rgb / 1=thermal, stamp_ns[, arrival_ns]); returns emitted (rgb, thermal) stamps."""
    out = []
    for ev in events:
        add = pairer.add_rgb if ev[0] == 0 else pairer.add_thermal
        out += add(ev[1], ev[1], ev[2] if now else None)
    return [(p.rgb_stamp_ns, p.thermal_stamp_ns) for p in out]


# ----------------------------------------------------------------------------- message_filters' cases
def test_scrambled_sequences_pair_like_message_filters():
    """ROS message_filters test_approxsync: one stream scrambled, then the other scrambled; all pair."""
    rng = random.Random(0)
    for n in range(1, 10):
        p = ApproximateTimePairer(queue_size=n, slop=0.1, reset_jump=60.0)
        stamps = [BASE + t * S for t in range(n)]
        out = feed(p, [(0, s) for s in rng.sample(stamps, n)])
        assert out == []
        out = feed(p, [(1, s) for s in rng.sample(stamps, n)])
        assert sorted(out) == [(s, s) for s in stamps]
        assert p.stats.paired == n and p.stats.queued_rgb == p.stats.queued_thermal == 0


def test_scrambled_within_queue_at_camera_rates():
    """30 Hz streams, both delivered in blocks of 4 in random order: all pairs correct with queue 8."""
    rng = random.Random(1)
    rgb = [BASE + i * 33_333_333 for i in range(60)]
    th = [s + 4 * MS for s in rgb]
    events = []
    for k in range(0, 60, 4):
        block = [(0, s) for s in rgb[k : k + 4]] + [(1, s) for s in th[k : k + 4]]
        rng.shuffle(block)
        events += block
    p = ApproximateTimePairer(queue_size=8, slop=0.015)
    out = feed(p, events) + [(x.rgb_stamp_ns, x.thermal_stamp_ns) for x in p.flush()]
    assert sorted(out) == list(zip(rgb, th))


@pytest.mark.parametrize(
    "name, events, queue, expected",
    [
        # timelines from message_filters' C++ ApproxTimeSync tests (1 s ticks, unbounded slop)
        ("exact", [(0, 0), (1, 0), (0, 3), (1, 3), (0, 6), (1, 6)], 10, [(0, 0), (3, 3), (6, 6)]),
        ("perfect", [(0, 0), (1, 1), (0, 3), (1, 4), (0, 6), (1, 7)], 10, [(0, 1), (3, 4)]),
        ("imperfect", [(0, 0), (1, 1), (0, 2), (0, 3), (1, 5), (0, 6), (1, 7)], 10, [(0, 1), (6, 5)]),
        ("double publish", [(0, 0), (1, 1), (1, 3), (0, 3)], 10, [(0, 1), (3, 3)]),
        (
            "dropped, queue 2",
            [(0, 0), (1, 1), (1, 3), (0, 4), (1, 7), (0, 8), (0, 10), (1, 11), (0, 13), (1, 14)],
            2,
            [(0, 1), (4, 3), (8, 7), (10, 11)],
        ),
    ],
)
def test_message_filters_timelines(name, events, queue, expected):
    p = ApproximateTimePairer(queue_size=queue, slop=100.0, reset_jump=1000.0)
    out = feed(p, [(k, BASE + t * S) for k, t in events])
    assert out == [(BASE + a * S, BASE + b * S) for a, b in expected], name


# ----------------------------------------------------------------------------- exact offline optimum
def components(rgb, th, slop):
    """Split the merged stamps where consecutive ones are more than slop apart (independent subproblems)."""
    ev = sorted([(s, 0) for s in rgb] + [(s, 1) for s in th])
    comps, cur = [], []
    for i, e in enumerate(ev):
        if i and e[0] - ev[i - 1][0] > slop:
            comps.append(cur)
            cur = []
        cur.append(e)
    return comps + ([cur] if cur else [])


def optimum(rgb, th, slop):
    """Maximum number of pairs within slop, then minimum total |dt|: an exact DP on the sorted stamps
    (an optimal one-to-one matching on a line can be taken non-crossing)."""
    result = set()
    for comp in components(rgb, th, slop):
        r = [s for s, k in comp if k == 0]
        t = [s for s, k in comp if k == 1]
        n, m = len(r), len(t)
        best = {}
        for i in range(n, -1, -1):  # best[(i, j)]: value and choice for r[i:], t[j:]
            for j in range(m, -1, -1):
                if i == n or j == m:
                    best[i, j] = ((0, 0), None)
                    continue
                if r[i] <= t[j]:
                    val = (best[i + 1, j][0], ("skip r",))
                    k = j
                    while k < m and t[k] - r[i] <= slop:
                        (p, c), _ = best[i + 1, k + 1]
                        cand = (p + 1, c - (t[k] - r[i]))
                        if cand > val[0]:
                            val = (cand, ("match", i, k))
                        k += 1
                else:
                    val = (best[i, j + 1][0], ("skip t",))
                    k = i
                    while k < n and r[k] - t[j] <= slop:
                        (p, c), _ = best[k + 1, j + 1]
                        cand = (p + 1, c - (r[k] - t[j]))
                        if cand > val[0]:
                            val = (cand, ("match", k, j))
                        k += 1
                best[i, j] = val
        i = j = 0
        while i < n and j < m:
            choice = best[i, j][1]
            if choice[0] == "skip r":
                i += 1
            elif choice[0] == "skip t":
                j += 1
            else:
                result.add((r[choice[1]], t[choice[2]]))
                i, j = choice[1] + 1, choice[2] + 1
    return result


def nearest_first(rgb, th, slop):
    """The pairing rule stated offline: candidate pairs by increasing |dt|, each message used once."""
    cands = sorted((abs(t - r), r, t) for r in rgb for t in th if abs(t - r) <= slop)
    used_r, used_t, out = set(), set(), set()
    for _, r, t in cands:
        if r not in used_r and t not in used_t:
            used_r.add(r)
            used_t.add(t)
            out.add((r, t))
    return out


def value(pairs):
    return len(pairs), -sum(abs(t - r) for r, t in pairs)


def random_streams(rng, out_of_order):
    """Two camera streams: rates 8.7-30 Hz, offsets, jitter, drops, bursty delivery, optional reordering."""
    f_rgb = rng.uniform(10, 30)
    f_th = f_rgb if rng.random() < 0.5 else rng.uniform(8.7, 30)
    duration = rng.uniform(2, 5)
    offset, jitter = rng.uniform(0, 1 / f_th), rng.uniform(0, 3e-3)
    slop = rng.choice([0.01, 0.02, 0.03, 0.45 / max(f_rgb, f_th)])
    streams = []
    for f, o in ((f_rgb, 0.0), (f_th, offset)):
        drop, latency, burst = rng.choice([0, 0, 0.05, 0.2]), rng.uniform(0, 0.03), rng.random() < 0.3
        stamps, arrivals = [], []
        for i in range(int(duration * f)):
            if rng.random() < drop:
                continue
            s = o + i / f + rng.gauss(0, jitter)
            a = s + latency + rng.expovariate(1 / 0.003)
            if out_of_order and rng.random() < 0.08:
                a += rng.uniform(1.0, 1.6) / f  # delivered after the next message of its own stream
            stamps.append(BASE + round(s * 1e9))
            arrivals.append(a)
        if burst:  # delivery held and released in windows (in order within the stream)
            w = rng.uniform(0.1, 0.3)
            arrivals = [(int(a / w) + 1) * w + 1e-7 * i for i, a in enumerate(arrivals)]
        streams.append((stamps, arrivals))
    events = sorted([(a, 0, s) for s, a in zip(*streams[0])] + [(a, 1, s) for s, a in zip(*streams[1])])
    return streams[0][0], streams[1][0], [(k, s) for _, k, s in events], slop


def online(events, slop, queue_size=40):
    p = ApproximateTimePairer(queue_size=queue_size, slop=slop, max_wait=None)
    out = set(feed(p, events)) | {(x.rgb_stamp_ns, x.thermal_stamp_ns) for x in p.flush()}
    return out, p.stats


def test_agreement_with_the_exact_optimum_on_random_streams():
    rng = random.Random(2024)
    totals = {"opt": 0, "common": 0, "streams": 0, "unamb": 0, "unamb_ok": 0, "nf_ok": 0, "in_order": 0}
    for n in range(400):
        out_of_order = n % 4 == 3  # a quarter of the streams have messages delivered out of order
        rgb, th, events, slop = random_streams(rng, out_of_order)
        slop_ns = round(slop * 1e9)
        opt, nf = optimum(rgb, th, slop_ns), nearest_first(rgb, th, slop_ns)
        got, stats = online(events, slop)
        assert stats.paired == len(got) and stats.dropped_overflow_rgb + stats.dropped_overflow_thermal == 0
        assert stats.paired * 2 + stats.dropped == stats.received_rgb + stats.received_thermal
        totals["streams"] += 1
        totals["opt"] += len(opt)
        totals["common"] += len(opt & got)
        if not out_of_order:
            totals["in_order"] += 1
            totals["nf_ok"] += got == nf  # online reaches the offline nearest-first result exactly
            if value(nf) == value(opt):  # the nearest partner is also the optimum's: unambiguous
                totals["unamb"] += 1
                totals["unamb_ok"] += got == opt
    overall = totals["common"] / totals["opt"]
    print(
        f"\npairer vs exact optimum: unambiguous streams {totals['unamb_ok']}/{totals['unamb']} identical; "
        f"overall {totals['common']}/{totals['opt']} optimum pairs found ({100 * overall:.2f} %) over "
        f"{totals['streams']} streams (a quarter delivered out of order); in-order streams equal to offline "
        f"nearest-first: {totals['nf_ok']}/{totals['in_order']}"
    )
    assert totals["unamb"] >= 200
    assert totals["unamb_ok"] == totals["unamb"]
    assert totals["nf_ok"] == totals["in_order"]
    assert overall > 0.95


def test_optimum_reference_is_exact_on_small_cases():
    """Check the DP against brute force over all matchings on tiny random instances."""
    from itertools import permutations

    rng = random.Random(5)
    for _ in range(150):
        rgb = sorted(rng.sample(range(0, 60), rng.randint(1, 5)))
        th = sorted(rng.sample(range(0, 60), rng.randint(1, 5)))
        slop = rng.randint(2, 12)
        best = (0, 0)
        for k in range(min(len(rgb), len(th)) + 1):
            for rs in permutations(rgb, k):
                if list(rs) != sorted(rs):
                    continue
                for ts in permutations(th, k):
                    pairs = list(zip(rs, ts))
                    if all(abs(t - r) <= slop for r, t in pairs):
                        best = max(best, value(pairs))
        assert value(optimum(rgb, th, slop)) == best


# ----------------------------------------------------------------------------- defined edge cases
def test_equal_stamps_are_kept_apart_and_pair_in_arrival_order():
    p = ApproximateTimePairer(queue_size=5, slop=0.01)
    got = p.add_rgb(BASE, "a") + p.add_rgb(BASE, "b")
    got += p.add_thermal(BASE, "x") + p.add_thermal(BASE, "y")
    assert [(x.rgb, x.thermal, x.dt_ns) for x in got] == [("a", "x", 0), ("b", "y", 0)]


def test_zero_stamps_are_rejected_with_one_warning():
    warnings = []
    p = ApproximateTimePairer(on_warning=warnings.append)
    assert p.add_rgb(0, "r") == [] and p.add_rgb(0, "r") == [] and p.add_thermal(0, "t") == []
    s = p.stats
    assert (s.rejected_rgb, s.rejected_thermal, s.queued_rgb, s.queued_thermal) == (2, 1, 0, 0)
    assert len(warnings) == 2 and "header stamp 0 ns rejected" in warnings[0]


def test_backwards_jump_resets_instead_of_pairing_across_it():
    warnings = []
    p = ApproximateTimePairer(queue_size=5, slop=0.02, on_warning=warnings.append)
    feed(p, [(0, BASE + 10 * S), (1, BASE + 10 * S + 5 * MS)])  # pending (no later message yet)
    # a bag loop: both streams start over 10 s earlier
    got = p.add_rgb(BASE, "loop")
    assert [(x.rgb_stamp_ns, x.thermal_stamp_ns) for x in got] == [(BASE + 10 * S, BASE + 10 * S + 5 * MS)]
    assert p.stats.resets == 1 and "jumped back 10.000 s" in warnings[0]
    got = p.add_thermal(BASE + 3 * MS, "t")  # the other stream jumps back too: no second reset
    got += p.flush()
    assert [(x.rgb, x.dt_ns) for x in got] == [("loop", 3 * MS)] and p.stats.resets == 1
    # a small backwards step (reordering) is not a reset
    feed(p, [(0, BASE + 500 * MS), (0, BASE + 100 * MS)])
    assert p.stats.resets == 1


def test_a_far_future_stamp_costs_one_reset():
    p = ApproximateTimePairer(queue_size=5, slop=0.02, on_warning=lambda _: None)
    pairs = []
    for i in range(5):
        pairs += feed(p, [(0, BASE + i * 100 * MS), (1, BASE + i * 100 * MS + MS)])
    pairs += feed(p, [(1, BASE + 10**6 * S)])  # a garbage stamp
    for i in range(5, 10):
        pairs += feed(p, [(0, BASE + i * 100 * MS), (1, BASE + i * 100 * MS + MS)])
    pairs += [(x.rgb_stamp_ns, x.thermal_stamp_ns) for x in p.flush()]
    assert p.stats.resets == 1
    assert len(pairs) >= 9 and (BASE + 10**6 * S) not in {t for _, t in pairs}


def test_queue_is_bounded_and_overflow_is_counted():
    p = ApproximateTimePairer(queue_size=3, slop=0.01, max_wait=None)
    for i in range(50):
        p.add_rgb(BASE + i * 33 * MS, i)  # the thermal camera is silent
    s = p.stats
    assert s.queued_rgb == 3 and s.dropped_overflow_rgb == 47 and s.dropped_unmatched_rgb == 0
    p.flush()
    assert p.stats.dropped_unmatched_rgb == 3 and p.stats.queued_rgb == 0


def test_hopeless_messages_count_as_unmatched():
    p = ApproximateTimePairer(queue_size=3, slop=0.01, max_wait=None)
    for i in range(20):  # thermal runs 40 ms late: never within 10 ms
        p.add_rgb(BASE + i * 100 * MS, i)
        p.add_thermal(BASE + i * 100 * MS + 40 * MS, i)
    p.flush()
    s = p.stats
    assert s.paired == 0 and s.dropped_overflow_rgb == 0 and s.dropped_unmatched_rgb == 20
    assert s.dropped_unmatched_thermal == 20


def test_max_wait_emits_on_the_clock_and_no_clock_means_no_timeout():
    p = ApproximateTimePairer(queue_size=5, slop=0.05, max_wait=0.1)
    assert p.add_rgb(BASE, "r", now_ns=BASE) == []
    assert p.add_thermal(BASE + 10 * MS, "t", now_ns=BASE + 10 * MS) == []  # could still improve
    assert p.poll(BASE + 50 * MS) == []
    got = p.poll(BASE + 111 * MS)  # the later member arrived 101 ms ago
    assert [(x.rgb, x.thermal) for x in got] == [("r", "t")]
    q = ApproximateTimePairer(queue_size=5, slop=0.05, max_wait=0.1)
    q.add_rgb(BASE, "r")
    q.add_thermal(BASE + 10 * MS, "t")
    assert q.poll(BASE + 10 * S) == []  # added without a clock: only a later message or flush decides
    assert len(q.flush()) == 1


def test_next_message_on_the_other_stream_decides():
    p = ApproximateTimePairer(queue_size=5, slop=0.05, max_wait=None)
    assert p.add_rgb(BASE, "r0") == []
    assert p.add_thermal(BASE + 8 * MS, "t0") == []  # a later RGB could be closer to t0
    got = p.add_rgb(BASE + 100 * MS, "r1")  # no: r1 is further from t0 than r0 is
    assert [(x.rgb, x.thermal) for x in got] == [("r0", "t0")]


def test_exact_mode_pairs_identical_stamps_only():
    p = ApproximateTimePairer(queue_size=5, slop=0.5, exact=True)
    assert feed(p, [(0, BASE), (1, BASE + 1), (1, BASE), (0, BASE + 5 * MS), (1, BASE + 5 * MS)]) == [
        (BASE, BASE),
        (BASE + 5 * MS, BASE + 5 * MS),
    ]


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="queue_size"):
        ApproximateTimePairer(queue_size=0)
    with pytest.raises(ValueError, match="slop"):
        ApproximateTimePairer(slop=-1)
    with pytest.raises(ValueError, match="reset_jump"):
        ApproximateTimePairer(slop=2.0, reset_jump=1.0)


def test_deterministic_for_an_arrival_order():
    rng = random.Random(9)
    _, _, events, slop = random_streams(rng, out_of_order=True)
    a, b = online(events, slop), online(events, slop)
    assert a[0] == b[0] and a[1].dt_ns == b[1].dt_ns


# ----------------------------------------------------------------------------- threads and callbacks
def test_warning_callback_runs_without_the_lock():
    seen = []
    p = None

    def on_warning(text):
        seen.append(p.stats.rejected_rgb)  # re-enters the pairer: deadlocks if the lock were held

    p = ApproximateTimePairer(on_warning=on_warning)
    done = threading.Event()
    threading.Thread(target=lambda: (p.add_rgb(0, None), done.set()), daemon=True).start()
    assert done.wait(5.0), "on_warning ran under the pairer's lock"
    assert seen == [1]


def test_concurrent_producers_keep_counts_consistent():
    p = ApproximateTimePairer(queue_size=10, slop=0.01)
    n = 3000
    results = []

    def produce(stream, offset):
        add = p.add_rgb if stream == 0 else p.add_thermal
        local = []
        for i in range(n):
            local += add(BASE + i * 20 * MS + offset, (stream, i))
        results.append(local)

    threads = [threading.Thread(target=produce, args=(0, 0)), threading.Thread(target=produce, args=(1, 2 * MS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    emitted = [x for r in results for x in r] + p.flush()
    s = p.stats
    assert s.paired == len(emitted) and s.paired * 2 + s.dropped == 2 * n
    assert len({x.rgb for x in emitted}) == len(emitted) == len({x.thermal for x in emitted})  # used once
    assert all(x.rgb[1] == x.thermal[1] for x in emitted)  # the right partners
    assert s.paired > 0  # how many depends on how the threads were scheduled; the invariants above must not


def test_throughput():
    p = ApproximateTimePairer(queue_size=5, slop=0.015, max_wait=0.1)
    n = 50_000
    t0 = time.perf_counter()
    for i in range(n):
        s = BASE + i * 33_333_333
        p.add_rgb(s, None, s)
        p.add_thermal(s + 4 * MS, None, s + 4 * MS)
    rate = 2 * n / (time.perf_counter() - t0)
    print(f"\npairer throughput: {rate:,.0f} stamps/s")
    assert p.stats.paired >= n - 1
    assert rate > 20_000
