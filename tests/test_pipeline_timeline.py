"""``benchmarks/pipeline_timeline.py`` without processes: the bubble, the trace, the plot and the
ideal-machine run of torch's planned orders, on hand-made timelines.

The script's worker (gloo processes running the trainer's pipeline) is exercised by
``test_pipeline.py``'s runs, which record the same ``instrument`` events; here everything after
the events: what the table, the Chrome trace and the PNG are computed from.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tl():
    spec = importlib.util.spec_from_file_location("pipeline_timeline", ROOT / "benchmarks" / "pipeline_timeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ev(stage, kind, mb, start, end):
    return {"stage": stage, "kind": kind, "mb": mb, "start": start, "end": end}


# 1F1B on 2 ranks, 2 micro-batches, F = 1, B = 2, starting at t = 100 (perf_counter seconds)
HAND = {0: [ev(0, "F", 0, 100, 101), ev(0, "F", 1, 101, 102), ev(0, "B", 0, 104, 106), ev(0, "B", 1, 107, 109)],
        1: [ev(1, "F", 0, 101, 102), ev(1, "B", 0, 102, 104), ev(1, "F", 1, 104, 105), ev(1, "B", 1, 105, 107)]}


def test_measured_bubble_on_a_hand_made_timeline(tl):
    assert tl.window(HAND) == (100, 109)
    b = tl.measured_bubble(HAND)
    assert b[0] == pytest.approx({"span": 9, "busy": 6, "idle": 3, "fraction": 3 / 9})
    assert b[1] == pytest.approx({"span": 9, "busy": 6, "idle": 3, "fraction": 3 / 9})
    # overlapping or nested intervals count once; a rank's idle is measured in the all-rank window
    odd = {0: [ev(0, "F", 0, 0, 4), ev(0, "W", 0, 1, 2), ev(0, "B", 0, 3, 5)], 1: [ev(1, "F", 0, 9, 10)]}
    b = tl.measured_bubble(odd)
    assert (b[0]["busy"], b[0]["idle"], b[1]["busy"], b[1]["idle"]) == (5, 5, 1, 9)
    assert tl.gaps(HAND[0], 100, 109) == [(102, 104), (106, 107)]
    assert tl.gaps(HAND[1], 100, 109) == [(100, 101), (107, 109)]
    assert tl.median_durations(HAND) == {"F": 1, "B": 2}
    with pytest.raises(ValueError, match="no compute events"):
        tl.window({0: [], 1: []})


def test_chrome_trace_schema(tl):
    comm = {0: [(99.5, 100.2), (102, 103.5)], 1: [(100, 101)]}            # one wait starts before the window
    runs = {"1f1b": {"compute": HAND, "comm": comm},
            "dualpipev": {"compute": {0: [ev(0, "F", 0, 5, 6), ev(3, "I", 0, 7, 8), ev(3, "W", 0, 8, 9)],
                                      1: [ev(1, "F", 0, 6, 6.5), ev(2, "B", 0, 6.5, 7)]}, "comm": {}}}
    trace = json.loads(json.dumps(tl.chrome_trace_of(runs)))                # plain JSON
    evs = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms"
    assert {e["ph"] for e in evs} == {"X", "M"}
    names = {e["pid"]: e["args"]["name"] for e in evs if e["name"] == "process_name"}
    assert names == {0: "1f1b rank 0", 1: "1f1b rank 1", 100: "dualpipev rank 0", 101: "dualpipev rank 1"}
    for e in evs:
        if e["ph"] == "X":
            assert {"name", "cat", "pid", "tid", "ts", "dur"} <= e.keys()
            assert e["ts"] >= 0 and e["dur"] > 0
            assert e["pid"] in names
    compute = [e for e in evs if e["ph"] == "X" and e["cat"] in "FBIW"]
    assert len(compute) == 8 + 5
    assert {e["cat"] for e in compute if e["pid"] >= 100} == {"F", "I", "W", "B"}
    assert {(e["tid"], e["name"]) for e in compute if e["pid"] == 100} == {
        (0, "forward mb 0"), (3, "backward (input) mb 0"), (3, "backward (weights) mb 0")}
    # per rank, compute and idle tile the window exactly (µs from the schedule's first action)
    for pid, span in ((0, 9e6), (1, 9e6), (100, 4e6), (101, 4e6)):
        mine = [e for e in evs if e["ph"] == "X" and e["pid"] == pid and e["cat"] != "comm"]
        assert sum(e["dur"] for e in mine) == pytest.approx(span)
        assert max(e["ts"] + e["dur"] for e in mine) == pytest.approx(span)
    waits = [(e["ts"], e["dur"]) for e in evs if e.get("cat") == "comm" and e["pid"] == 0]
    assert waits == [pytest.approx((0, 0.2e6)), pytest.approx((2e6, 1.5e6))]       # clipped to the window
    assert [(e["ts"], e["dur"]) for e in evs if e.get("cat") == "idle" and e["pid"] == 1] == [(0, 1e6), (7e6, 2e6)]


def test_planned_orders_have_the_documented_bubble(tl):
    """torch's planned orders, run on an ideal machine in the formulas' units (F = 1, B = 2,
    W = 1): 1F1B and GPipe idle (pp - 1)(F + B) on every rank, the estimate's formula. The V
    schedules as torch plans them (DualPipeV's overlapped F&B run as F then B) idle (pp - 1) F =
    (pp - 1)(F + B - 2W), zero-bubble 1P's formula, under the estimate's DualPipe-table formula
    (pp - 1)(F&B + B - 3W) = 2 (pp - 1) with F&B = F + B."""
    from nanoseek.estimate.pipeline import get_schedule
    from nanoseek.train.pipeline import build_schedule_order, num_stages, schedule_spec
    for name in ("1f1b", "gpipe", "dualpipev", "zbv"):
        for pp in (2, 3, 4):
            for m in (2 * pp, 3 * pp):
                S = num_stages(pp, schedule_spec(name))
                run = tl.simulate(build_schedule_order(name, pp, m), S, lambda st, k, mb: tl.UNITS[k])
                chunks = S // pp
                assert all(b == pytest.approx(m * chunks * 3) for b in run["busy"].values()), (name, pp, m)
                want = 3 * (pp - 1) if name in ("1f1b", "gpipe") else pp - 1
                assert run["idle"] == pytest.approx({r: want for r in range(pp)}), (name, pp, m, run)
                if name in ("1f1b", "gpipe"):
                    assert get_schedule(name).bubble(pp) == want
    # the formula fraction the table prints
    f = tl.formula("1f1b", 2, 4, {"F": 0.1, "B": 0.2})
    assert (f["units"], f["fraction_units"]) == (3, pytest.approx(3 / 15))
    assert (f["seconds"], f["fraction_measured"]) == (pytest.approx(0.3), pytest.approx(3 / 15))
    f = tl.formula("dualpipev", 2, 4, {"F": 1.0, "I": 1.5, "W": 0.5})     # B = I + W when only split
    assert (f["B"], f["seconds"]) == (2.0, pytest.approx(1 + 2 + 2 - 1.5))


def test_simulate_follows_dependencies_and_uneven_stages(tl):
    """A slow last stage makes the first rank wait; a circular order is refused."""
    order = {0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1B0", "1F1", "1B1"]}
    run = tl.simulate(order, 2, lambda st, k, mb: {"F": 1, "B": 2}[k] * (3 if st == 1 else 1))
    # rank 1: F0 1-4, B0 4-10, F1 10-13, B1 13-19; rank 0: F0 0-1, F1 1-2, B0 10-12, B1 19-21
    assert run["span"] == 21 and run["idle"] == {0: 15, 1: 3}
    # the descriptive 1F1B order of torch 2.13 numbers the last rank's forwards from 1: renumbered
    assert tl.planned_actions({1: ["1F1", "1B0", "1F2", "1B1", "1REDUCE_GRAD"]})[1] == [
        (1, "F", 0), (1, "B", 0), (1, "F", 1), (1, "B", 1)]
    assert tl.planned_actions({0: ["(0F3;3B1)OVERLAP_F_B", "0I2", "0W2"]})[0] == [
        (0, "F", 0), (3, "B", 0), (0, "I", 0), (0, "W", 2)]
    with pytest.raises(ValueError, match="deadlocks"):
        tl.simulate({0: ["0B0", "0F0"], 1: ["1F0", "1B0"]}, 2, lambda st, k, mb: 1)


def test_plot_writes_a_png(tl, tmp_path):
    runs = {"1f1b": {"compute": HAND, "comm": {0: [(102, 104)]}}}
    table = {"1f1b": {"measured": {r: {"fraction": b["fraction"]} for r, b in tl.measured_bubble(HAND).items()},
                      "order_measured": {0: {"fraction": 0.2}, 1: {"fraction": 0.2}},
                      "formula": tl.formula("1f1b", 2, 2, tl.median_durations(HAND))}}
    tl.plot(runs, table, tmp_path / "p.png", "hand-made")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_one_line(tl, capsys):
    assert tl.main(["--pp", "2", "--microbatches", "2", "--schedules", "dualpipev"]) == 2
    assert "with pp = 2 needs micro-batches >= 4, got 2" in capsys.readouterr().err
    assert tl.main(["--schedules", "zero"]) == 2
    assert "schedule = 'zero'" in capsys.readouterr().err
    assert tl.main(["--pp", "4", "--schedules", "dualpipev", "--microbatches", "8"]) == 2
    assert "makes 8 stages, more than --layers 4" in capsys.readouterr().err


@pytest.mark.parametrize("name,pp,m", [("1f1b", 2, 4), ("dualpipev", 2, 4), ("dualpipev", 3, 6), ("zbv", 2, 5)])
def test_analyse_a_timeline_made_by_the_ideal_machine(tl, name, pp, m):
    """Steps whose events come from :func:`simulate` (uneven stages, a different speed per step):
    the measured idle equals the ideal machine's, and the table row says so for every rank."""
    from nanoseek.train.pipeline import build_schedule_order, num_stages, schedule_spec
    order, S = build_schedule_order(name, pp, m), num_stages(pp, schedule_spec(name))
    steps = []
    for speed in (1.0, 1.3, 0.8):
        run = tl.simulate(order, S, lambda st, k, mb, v=speed: v * tl.UNITS[k] * (1 + 0.5 * (st == S - 1)) * 1e-3)
        events = {r: [{**e, "start": e["start"] + 50, "end": e["end"] + 50} for e in evs]
                  for r, evs in run["events"].items()}
        assert tl.measured_bubble(events) == {r: pytest.approx({"span": run["span"], "busy": run["busy"][r],
                                                                "idle": run["idle"][r],
                                                                "fraction": run["idle"][r] / run["span"]})
                                              for r in range(pp)}
        comm = {str(r): [] for r in events}
        comm["0"] = [(40.0, 50.0005), (50.001, 50.0015)]                  # the first wait clipped to the window
        steps.append({"compute": {str(r): v for r, v in events.items()}, "comm": comm})
    shown, row = tl.analyse(json.loads(json.dumps(steps)), name, pp, m)       # as read back from the workers
    assert shown["compute"] == {r: v for r, v in enumerate(steps[0]["compute"].values())}   # median span: speed 1
    for r in range(pp):
        assert row["measured"][r]["fraction"] == pytest.approx(row["order_measured"][r]["fraction"])
        assert row["measured"][r]["spread"] == pytest.approx(0, abs=1e-9)        # same shape at every speed
    assert row["measured"][0]["comm"] == pytest.approx(0.001) and row["measured"][pp - 1]["comm"] == 0
    assert row["same_order"]
    assert row["order_units"]["idle"] == (3 * (pp - 1) if name == "1f1b" else pp - 1)
    assert row["formula"]["formula"].startswith("(P")
    evs = steps[1]["compute"]["0"]                                        # rank 0 runs two actions swapped
    evs[0]["start"], evs[1]["start"] = evs[1]["start"], evs[0]["start"]
    assert not tl.analyse(steps, name, pp, m)[1]["same_order"]


def tl_planned(order):
    spec = importlib.util.spec_from_file_location("pipeline_timeline", ROOT / "benchmarks" / "pipeline_timeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [a for acts in mod.planned_actions(order).values() for a in acts]


@pytest.mark.slow
def test_the_script_end_to_end(tmp_path):
    """Two gloo processes, a tiny model, one recorded step of each schedule: table, trace, PNG."""
    import os
    import subprocess
    import sys
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pipeline_timeline.py"), "--hidden", "64", "--seq", "16",
           "--steps", "1", "--png", str(tmp_path / "t.png"), "--trace", str(tmp_path / "t.trace.json"),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dualpipev: executed order = torch's planned order" in proc.stdout
    assert "1f1b: executed order = torch's planned order" in proc.stdout
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"dualpipev", "1f1b"}
    assert table["1f1b"]["order_units"]["idle"] == 3 and table["dualpipev"]["order_units"]["idle"] == 1
    assert all(0 <= m["fraction"] < 1 for row in table.values() for m in row["measured"].values())
    trace = json.loads((tmp_path / "t.trace.json").read_text())["traceEvents"]
    assert {e["args"]["name"] for e in trace if e["name"] == "process_name"} == {
        "dualpipev rank 0", "dualpipev rank 1", "1f1b rank 0", "1f1b rank 1"}
    from nanoseek.train.pipeline import build_schedule_order
    for i, name in enumerate(("dualpipev", "1f1b")):                          # every planned action, once
        planned = build_schedule_order(name, 2, 4)
        for kind in "FBIW":
            want = sum(1 for a in tl_planned(planned) if a[1] == kind)
            assert sum(e.get("cat") == kind and e["pid"] // 100 == i for e in trace) == want, (name, kind)
    assert (tmp_path / "t.png").stat().st_size > 10_000
