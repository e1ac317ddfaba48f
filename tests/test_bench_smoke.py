"""Guards for the performance work of the bench issue: the fast paths give what the plain ones give.

And the bench's own pieces work (the MAC count, the table, one quick section).
"""

from __future__ import annotations

import numpy as np
import pytest

from har_edge.agent.decode.fit import profile
from har_edge.agent.decode.fit.container import Offsets
from har_edge.agent.model import BUNDLED_MODEL_DIR
from har_edge.agent.pipeline import _Batcher, release_free_memory
from har_edge.agent.preprocess import WindowSet, _contiguous_windows, sliding_windows


def test_offsets_runs_equal_the_plain_list():
    rng = np.random.default_rng(0)
    for _ in range(300):
        o, ref, x = Offsets(), [], 0
        for _ in range(int(rng.integers(0, 12))):
            if rng.random() < 0.5:
                for _ in range(int(rng.integers(1, 5))):
                    x += int(rng.integers(1, 50))
                    o.append(x)
                    ref.append(x)
            else:
                step, count = int(rng.integers(1, 30)), int(rng.integers(1, 20))
                x += int(rng.integers(1, 50))
                o.add_run(x, step, count)
                ref += [x + step * k for k in range(count)]
                x = ref[-1]
        assert len(o) == len(ref) and list(o) == ref
        for _ in range(5):
            i, n = int(rng.integers(0, len(ref) + 2)), int(rng.integers(0, len(ref) + 2))
            assert o.take(i, n).tolist() == ref[i : i + n]


@pytest.mark.parametrize(
    "n,window,step", [(1000, 200, 100), (199, 200, 100), (200, 200, 100), (1234, 200, 37), (9, 3, 1)]
)
def test_contiguous_windows_equal_the_sliding_view(n, window, step):
    x = np.random.default_rng(1).standard_normal((n, 6)).astype(np.float32)
    got = _contiguous_windows(x, window, step)
    np.testing.assert_array_equal(got, sliding_windows(x, window, step))
    assert got.flags.c_contiguous


def test_batcher_regroups_into_whole_batches_in_order():
    rng = np.random.default_rng(2)
    sizes = [int(s) for s in rng.integers(0, 150, 40)]
    start, sets = 0, []
    for s in sizes:
        sets.append(WindowSet(np.arange(start, start + s, dtype=np.int64), np.zeros((s, 2, 1), np.float32)))
        start += s
    b = _Batcher(64)
    out = [part for ws in [*sets, None] for part in b.add(ws)]
    starts = np.concatenate([s for _, s in out])
    assert starts.tolist() == list(range(start))
    assert all(len(s) % 64 == 0 for _, s in out[:-1])


def test_release_free_memory_is_harmless():
    release_free_memory()
    release_free_memory()


def test_fit_name_tables_are_the_sdks():
    """The fast reader's names (kept to avoid importing the SDK's profile) equal the pinned SDK's."""
    from garmin_fit_sdk.profile import Profile

    assert {k: v["name"] for k, v in Profile["messages"].items()} == profile.MESSAGES
    assert Profile["types"]["manufacturer"] == profile.MANUFACTURERS
    assert Profile["types"]["garmin_product"] == profile.GARMIN_PRODUCTS


def test_tflite_macs_of_the_bundled_model():
    tflite_macs = pytest.importorskip("bench.inference").tflite_macs  # bench/ is importable from the checkout

    macs, by_op = tflite_macs(BUNDLED_MODEL_DIR / "model.tflite")
    assert macs == sum(by_op.values()) > 0


def test_report_table_numbers_its_notes():
    Report = pytest.importorskip("bench.common").Report

    r = Report()
    r.add("s", "a figure", "1 x", target=">= 1", ok=True, note="how")
    r.add("s", "another", "2 y")
    text = r.table()
    assert "a figure [1]" in text and "- [1] how" in text and "| yes |" in text


def test_memory_section_compiles_folders_that_exist(capfd):
    memory = pytest.importorskip("bench.memory")
    memory._compile()  # the real compileall, as the section runs it

    # compileall only prints "Can't list" for a missing folder and exits 0
    out, err = capfd.readouterr()
    assert "Can't list" not in out + err
    assert list((memory.ROOT / "har_edge" / "agent" / "__pycache__").glob("daemon.*.pyc"))


@pytest.mark.slow
def test_swap_section_runs(monkeypatch, tmp_path):
    common = pytest.importorskip("bench.common")
    swap = pytest.importorskip("bench.swap")

    monkeypatch.setattr(common, "SCRATCH", tmp_path)
    monkeypatch.setattr(swap, "SCRATCH", tmp_path)
    report = common.Report()
    swap.run(report, model_dir=None, files=2)
    lost = next(r for r in report.rows if r.figure.startswith("windows lost"))
    assert lost.value == "0" and lost.ok


@pytest.mark.parametrize("wrapped", [False, True])
def test_keras_macs_of_a_tiny_model_counted_by_hand(wrapped):
    keras = pytest.importorskip("keras")
    keras_macs = pytest.importorskip("bench.own_model").keras_macs

    L = keras.layers
    layers = [
        keras.Input((10, 3)),
        L.Conv1D(4, 3),  # 8 steps x 4 filters x 3 taps x 3 channels = 288
        L.Bidirectional(L.LSTM(2, return_sequences=True)),  # 2 x 8 steps x 4 gates x 2 units x (4 + 2) = 768
        L.GRU(3),  # 8 steps x 3 gates x 3 units x (4 + 3) = 504
        L.BatchNormalization(),  # not a matmul: 0
        L.Dense(5),  # 5 x 3 = 15
    ]
    model = keras.Sequential(layers)
    if wrapped:  # a Sequential inside a functional model: its layers are counted
        inp = keras.Input((10, 3))
        model = keras.Model(inp, keras.Sequential(layers[1:])(inp))
    total, by_layer = keras_macs(model)
    assert by_layer == {"Conv1D": 288, "Bidirectional": 768, "GRU": 504, "Dense": 15}
    assert total == 288 + 768 + 504 + 15


def test_bench_refuses_to_publish_figures_of_a_busy_machine():
    from bench.run import busy_reason

    quiet = {"cores_usable": 2, "load_avg_at_start": "0.4 0.8 1.0"}
    assert busy_reason(quiet, [0.4, 1.6, 2.1, 2.4]) == ""  # the bench's own two cores
    assert "at the start" in busy_reason({"cores_usable": 2, "load_avg_at_start": "2.6 1.0 1.0"}, [2.6, 2.0])
    assert "during the run" in busy_reason(quiet, [0.4, 3.5, 4.2, 4.0])
