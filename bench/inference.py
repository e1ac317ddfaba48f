"""Section 1: inference windows/s per core, int8 TFLite (the agent's runtime) vs Keras vs the MAC floor.

Everything is measured in rounds that interleave in time: each round times one
core's float32 peak (numpy matmul), the agent's TFLite runner (1 thread at the
configured batch and at 256, 2 threads) and, in a worker process started once,
TensorFlow Keras on the float model (eager batched call, ``predict`` batched,
``predict`` on one window). Per-core rates are windows per CPU-second of the
process, so time slices lost to other processes on a shared machine do not
count; ratios are taken within each round, then the median over rounds.

The Keras model is the trainer's float model (``--keras``, default
``build/trainer/train/model.keras``); without it the architecture is built from
``har_edge.trainer.model`` with random weights: speed only, argmax agreement n/a. The
comparison is meaningful only when the int8 model has that architecture: the
MACs per window counted from the ``.tflite`` ops and from the Keras layers are
checked against each other.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from bench.common import ROOT, SCRATCH, Report, fmt, imu_fixture, median, python_worker, spread

if TYPE_CHECKING:
    from har_edge.agent.model import LoadedModel

log = logging.getLogger(__name__)

ROUNDS = 9
WINDOWS = 2048
SINGLE_PER_ROUND = 5


# -- MACs ------------------------------------------------------------------------------------------


def tflite_macs(model_path: Path) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one window, counted from the model's CONV/FC ops (batch 1)."""
    from har_edge.agent.runtime import _import_interpreter

    Interpreter, _ = _import_interpreter()
    interp: Any = Interpreter(model_path=str(model_path), num_threads=1)  # _get_ops_details is private API
    inp = interp.get_input_details()[0]
    if int(inp["shape"][0]) != 1:
        interp.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]], strict=False)
    interp.allocate_tensors()
    shapes = {t["index"]: tuple(int(s) for s in t["shape"]) for t in interp.get_tensor_details()}
    total = 0
    by_op: dict[str, int] = {}
    for op in interp._get_ops_details():
        name = op["op_name"]
        ins = [i for i in op["inputs"] if i >= 0]
        if len(op["outputs"]) == 0 or len(ins) < 2:
            continue
        out = shapes[op["outputs"][0]]
        w = shapes[ins[1]]
        if name == "CONV_2D":  # weights (out_ch, kh, kw, in_ch)
            macs = int(np.prod(out)) * w[1] * w[2] * w[3]
        elif name == "DEPTHWISE_CONV_2D":  # weights (1, kh, kw, channels)
            macs = int(np.prod(out)) * w[1] * w[2]
        elif name == "FULLY_CONNECTED":  # weights (units, in)
            macs = int(np.prod(out)) * w[1]
        elif name == "CONV_3D":
            macs = int(np.prod(out)) * int(np.prod(w[:4]))
        else:
            continue
        total += macs
        by_op[name] = by_op.get(name, 0) + macs
    return total, by_op


# -- the core's peak -----------------------------------------------------------------------------------


class Peak:
    """One core's float32 GFLOP/s from numpy matmul, in this process (BLAS limited to 1 thread)."""

    def __init__(self) -> None:
        self._limits: Callable[..., Any] | None
        self.info: dict[str, Any]
        try:
            from threadpoolctl import threadpool_info, threadpool_limits  # type: ignore[import-untyped]
        except ImportError:
            self._limits = None
            self.info = {}
        else:
            self._limits = threadpool_limits
            pools = [p for p in threadpool_info() if p.get("internal_api") == "openblas"]
            self.info = (
                {"architecture": pools[0].get("architecture"), "version": pools[0].get("version")} if pools else {}
            )
        rng = np.random.default_rng(0)
        self.a = rng.random((512, 512), dtype=np.float32)
        self.b = rng.random((512, 512), dtype=np.float32)
        self.c = np.empty_like(self.a)

    def round(self, repeats: int = 40) -> float | None:
        if self._limits is None:
            return None
        best = 0.0
        with self._limits(limits=1, user_api="blas"):
            for _ in range(repeats):
                t = time.thread_time()
                np.matmul(self.a, self.b, out=self.c)
                dt = time.thread_time() - t
                if dt > 0:
                    best = max(best, 2 * 512**3 / dt / 1e9)
        return best


def subprocess_peak(env_overrides: dict[str, str | None]) -> dict[str, Any]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return python_worker("bench.peak", [], env=env, timeout=120)


# -- windows -------------------------------------------------------------------------------------------


def real_windows(model: LoadedModel, n: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``n`` windows of a decoded 1 h recording (the agent's own decode and preprocessing): raw and scaled."""
    from har_edge.agent.decode.fit import decode_fit
    from har_edge.agent.preprocess import apply_scaler, recording_windows

    m = model.manifest
    ws = recording_windows(decode_fit(imu_fixture(1)), rate_hz=m.sample_rate_hz, window=m.window, step=m.step)
    raw = np.ascontiguousarray(np.resize(ws.windows, (n, *ws.windows.shape[1:])), np.float32)  # repeated to n
    return raw, np.ascontiguousarray(apply_scaler(raw, m.scaler.mean, m.scaler.scale), np.float32)


def agreement_windows(model: LoadedModel, fallback: NDArray[np.float32]) -> tuple[NDArray[np.float32], str]:
    """Raw windows to compare int8 and float on: the trainer's held-out test split when it is there."""
    prepared = ROOT / "build" / "trainer" / "prepared.npz"
    try:
        with np.load(prepared, allow_pickle=False) as z:
            x = np.ascontiguousarray(z["x_test"], np.float32)
        if x.shape[1:] == fallback.shape[1:]:
            return x, f"{len(x)} held-out test windows ({prepared.relative_to(ROOT)})"
    except (OSError, KeyError, ValueError):
        pass
    return fallback, f"{len(fallback)} windows of the 1 h fixture (no prepared test split found)"


# -- Keras worker ----------------------------------------------------------------------------------------


class KerasWorker:
    def __init__(self, windows_file: Path, keras_path: Path | None, classes: int) -> None:
        cmd = [sys.executable, "-m", "bench.keras_worker", "--windows", str(windows_file),
               "--model", str(keras_path or ""), "--classes", str(classes)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        if self.proc.stdin is None or self.proc.stdout is None or self.proc.stderr is None:  # pragma: no cover
            raise RuntimeError("the Keras worker has no pipes")
        self._stdin, self._stdout, self._stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if not line:
            raise RuntimeError(f"the Keras worker stopped: {self._stderr.read()[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, **cmd: object) -> dict[str, Any]:
        self._stdin.write(json.dumps(cmd) + "\n")
        self._stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self._stdin.write(json.dumps({"op": "quit"}) + "\n")
            self._stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


# -- the section ---------------------------------------------------------------------------------------------


def run(report: Report, *, model_dir: Path | None, keras_path: Path | None, rounds: int = ROUNDS) -> None:
    from bench.keras_worker import default_keras_path
    from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
    from har_edge.agent.preprocess import apply_scaler
    from har_edge.agent.settings import AgentSettings

    S = "1 inference"
    model_dir = Path(model_dir or BUNDLED_MODEL_DIR)
    model = load_model(model_dir)
    m = model.manifest
    agent_batch = AgentSettings().batch
    raw_windows, x = real_windows(model, WINDOWS)
    n = len(x)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    windows_file = SCRATCH / "windows.npy"
    np.save(windows_file, x)

    macs, by_op = tflite_macs(model_dir / "model.tflite")
    keras_file = keras_path if keras_path is not None else default_keras_path()
    keras_local = Path(keras_file) if keras_file is not None and Path(keras_file).is_file() else None
    keras_from_file = keras_local is not None
    if keras_path is not None and not keras_from_file:
        raise FileNotFoundError(f"--keras {keras_path} does not exist")
    log.info(
        "inference: %s (%d MACs/window), Keras from %s",
        m.name,
        macs,
        keras_file if keras_from_file else "trainer.model",
    )
    worker = KerasWorker(windows_file, keras_local, len(m.labels))
    kinfo = worker.info
    same_arch = macs > 0 and abs(kinfo["macs"] - macs) <= 0.05 * max(macs, 1)

    configs = [(1, agent_batch), (1, 256), (2, 256)] if agent_batch != 256 else [(1, 256), (2, 256)]
    # the agent's runtime (TFLiteRunner: quantize, invoke, dequantize) on the windows Keras gets, scaled
    runners = {c: load_model(model_dir, threads=c[0], batch=c[1]).runner for c in configs}
    for r in runners.values():
        r.predict(x[:512])
    keras_batches = [256, 1024]  # Keras is fastest on large batches: the strongest baseline
    for b in keras_batches:
        worker.ask(op="warm", batch=b)
    peak = Peak()
    rows: list[dict[str, Any]] = []
    try:
        for i in range(rounds):
            row: dict[str, Any] = {"peak_gflops": peak.round()}
            for c, runner in runners.items():
                w, cpu = time.perf_counter(), time.process_time()
                runner.predict(x)
                row[f"tflite_{c[0]}t_b{c[1]}"] = {"wall": time.perf_counter() - w, "cpu": time.process_time() - cpu}
            for b in keras_batches:
                row[f"keras_call_b{b}"] = worker.ask(op="call", batch=b)
            row["keras_predict_b256"] = worker.ask(op="predict", batch=256)
            row["keras_single"] = worker.ask(op="single", n=SINGLE_PER_ROUND)
            rows.append(row)
            log.info("inference round %d/%d done", i + 1, rounds)
        agreement: float | None = None
        agree_note = ""
        kp: NDArray[np.float32] | None = None
        eval_scaled: NDArray[np.float32] | None = None
        if keras_from_file and same_arch:
            raw_eval, agree_note = agreement_windows(model, raw_windows)
            scaled_file, probs_file = SCRATCH / "agreement_windows.npy", SCRATCH / "keras_probs.npy"
            eval_scaled = apply_scaler(raw_eval, m.scaler.mean, m.scaler.scale).astype(np.float32)
            np.save(scaled_file, eval_scaled)
            worker.ask(op="probs", out=str(probs_file), windows=str(scaled_file))
            kp = np.load(probs_file)
            tp = load_model(model_dir, batch=agent_batch).predict(raw_eval)  # the agent's whole path, scaler included
            agreement = float((kp.argmax(1) == tp.argmax(1)).mean())
    finally:
        worker.close()

    # -- peers: ONNX Runtime int8/float and LiteRT float on the same model (bench/peers.py) -------------
    from bench.peers import compare

    peer_batch = 256
    report.raw["inference_peers"] = compare(
        report, S, model_dir=model_dir, x=x, agent=runners[(1, peer_batch)].predict,
        float_keras=keras_local if keras_from_file and same_arch else None, batch=peer_batch,
        rounds=max(3, rounds // 2), eval_x=eval_scaled, float_probs=kp,
    )  # fmt: skip

    # -- figures ------------------------------------------------------------------------------------
    def per_cpu(key: str) -> list[float]:
        return [n / r[key]["cpu"] for r in rows]

    def per_wall(key: str) -> list[float]:
        return [n / r[key]["wall"] for r in rows]

    base_key = f"tflite_1t_b{agent_batch}"
    best_key = max((k for k in rows[0] if k.startswith("tflite_1t")), key=lambda k: median(per_cpu(k)))
    call_keys = [k for k in rows[0] if k.startswith("keras_call")]
    keras_call = [max(n / r[k]["cpu"] for k in call_keys) for r in rows]  # the best batch size, each round
    keras_predict = [n / r["keras_predict_b256"]["cpu"] for r in rows]
    peaks = [r["peak_gflops"] for r in rows]
    peak_note = ""
    if peaks[0] is None or os.environ.get("OPENBLAS_CORETYPE"):
        sub = subprocess_peak({})
        alt = subprocess_peak({"OPENBLAS_CORETYPE": None}) if os.environ.get("OPENBLAS_CORETYPE") else sub
        best = max(sub["gflops_best"], alt["gflops_best"])
        if peaks[0] is None:
            peaks = [best] * len(rows)
            peak_note = "peak measured once in a worker (threadpoolctl missing): not interleaved"
        elif best > max(peaks):
            peaks = [max(p, best) for p in peaks]
            peak_note = (
                f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is slower here: peak from a run without it"
            )
        report.raw["inference_peak_workers"] = {"as_set": sub, "unset": alt}
    floors = [p * 1e9 / (2 * macs) if macs else float("nan") for p in peaks]  # windows/s/core at the peak

    raw = {
        "model": f"{m.name} {m.version}", "model_dir": str(model_dir), "macs_tflite": macs, "macs_by_op": by_op,
        "keras": kinfo, "same_architecture": same_arch, "windows": n, "rounds": rows, "agent_batch": agent_batch,
        "peak_gflops": peaks, "agreement": agreement, "openblas": peak.info,
    }  # fmt: skip
    report.raw["inference"] = raw

    t1 = per_cpu(base_key)
    report.add(S, f"int8 TFLite, 1 thread, batch {agent_batch} (agent default)", f"{fmt(median(t1))} w/s/core",
               note=f"{m.name} {m.version}; {fmt(macs / 1e6)} M MACs/window; "
                    f"wall {fmt(median(per_wall(base_key)))} w/s")  # fmt: skip
    if best_key != base_key:
        report.add(S, f"int8 TFLite, 1 thread, batch {best_key.rsplit('_b', 1)[1]}",
                   f"{fmt(median(per_cpu(best_key)))} w/s/core",
                   ratio=f"{median(per_cpu(best_key)) / median(t1):.2f}x b{agent_batch}")  # fmt: skip
    two = next((k for k in rows[0] if k.startswith("tflite_2t")), None)
    if two:
        one_same_batch = two.replace("_2t_", "_1t_")
        speedup = (
            [a / b for a, b in zip(per_wall(two), per_wall(one_same_batch), strict=True)]
            if one_same_batch in rows[0]
            else []
        )
        report.add(S, f"int8 TFLite, 2 threads, batch {two.rsplit('_b', 1)[1]}",
                   f"{fmt(median(per_wall(two)))} w/s (wall)",
                   ratio=f"{median(speedup):.2f}x 1 thread" if speedup else "",
                   note=f"{fmt(median(per_cpu(two)))} w/s per CPU-second")  # fmt: skip
    kb = median(keras_call)
    arch_note = (
        ""
        if same_arch
        else (
            f"n/a: the int8 model ({fmt(macs / 1e6)} M MACs) is not trainer.model's architecture "
            f"({fmt(kinfo['macs'] / 1e6)} M MACs)"
        )
    )
    ratio_keras = [a / b for a, b in zip(per_cpu(best_key), keras_call, strict=True)]
    ratio_predict = [a / b for a, b in zip(per_cpu(best_key), keras_predict, strict=True)]
    report.add(S, "Keras float, batched call model(x), 1 thread", f"{fmt(kb)} w/s/core",
               note=f"best of batch {'/'.join(map(str, keras_batches))}; TF {kinfo['tensorflow']}; "
                    f"{kinfo['origin']}")  # fmt: skip
    report.add(S, "int8 TFLite vs batched Keras call", f"{median(ratio_keras):.2f}x" if same_arch else "n/a",
               baseline=f"{fmt(kb)} w/s/core", ratio=f"{median(ratio_keras):.2f}x" if same_arch else "",
               target=">= 4x", ok=(median(ratio_keras) >= 4) if same_arch else None,
               note=arch_note or f"per round: {spread(ratio_keras)}")  # fmt: skip
    report.add(S, "Keras float, predict(x, batch_size=256), 1 thread", f"{fmt(median(keras_predict))} w/s/core",
               ratio=f"int8 {median(ratio_predict):.2f}x" if same_arch else "",
               note="Keras's compiled predict loop: the strongest Keras baseline")  # fmt: skip
    single_ms = [r["keras_single"]["wall"] / r["keras_single"]["n"] * 1000 for r in rows]
    single_rate = [r["keras_single"]["n"] / r["keras_single"]["cpu"] for r in rows]
    vs_single = median([a / b for a, b in zip(per_cpu(best_key), single_rate, strict=True)])
    report.add(S, "Keras predict() on one window", f"{fmt(median(single_ms))} ms/window",
               ratio=f"int8 batched {vs_single:.0f}x faster" if same_arch else "",
               note=f"{fmt(median(single_rate))} w/s/core")  # fmt: skip
    eff = [a / f for a, f in zip(per_cpu(best_key), floors, strict=True)]
    report.add(S, "MAC floor (MACs/window / one core's matmul peak)", f"{fmt(median(floors))} w/s/core",
               note=f"peak {fmt(median(peaks))} GFLOP/s float32 (numpy matmul, best of 40 per round, OpenBLAS "
                    f"{peak.info.get('architecture', '?')}); {peak_note}".rstrip("; "))  # fmt: skip
    report.add(S, "int8 TFLite vs MAC floor", f"{median(eff) * 100:.0f}%", baseline=f"{fmt(median(floors))} w/s/core",
               target=">= 75%", ok=median(eff) >= 0.75, note=f"batch {best_key.rsplit('_b', 1)[1]}; per round: "
               f"{spread([e * 100 for e in eff])}%")  # fmt: skip
    if agreement is not None:
        report.add(S, "argmax agreement int8 vs Keras float", f"{agreement * 100:.2f}%", note=agree_note)
    else:
        why = (
            "Keras model built from trainer.model with random weights"
            if not keras_from_file
            else "different architectures"
        )
        report.add(S, "argmax agreement int8 vs Keras float", "n/a", note=why)
