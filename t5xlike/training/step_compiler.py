"""Ahead-of-time compilation of the train step and the initialisation, in the background.

`StepCompiler` keeps the AOT-compiled train step per batch shapes and the
compiled init per batch shapes. `start` traces and lowers both in the
calling thread (Python, ~1 s) and has XLA compile them in two background
threads while the caller starts the data pipeline: XLA compiles without the
Python lock, so on a multi-core host the compilation overlaps the pipeline's
imports and first batch (tracing in a thread of its own would compete with
them for the lock). The first request for those shapes waits for the thread;
other shapes compile as usual. Errors in the background are not raised
there: the caller's own request compiles again and raises them. `cancel`
stops what has not started (an XLA compilation in progress cannot be
interrupted), now and for later `start` calls.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger(__name__)

#: Per platform, XLA options of the init computation. On CPU, LLVM's -O2 spends
#: ~4 CPU-s on t5x_tiny's init (threefry bits for every parameter: ~50 ms of
#: codegen per parameter) for a program that runs once in 0.01 s; at level 0
#: it compiles in ~2.5 CPU-s and runs in 0.04 s. The samples are the same up
#: to rounding (-O2 contracts multiply-adds into FMAs: ~5% of the values
#: differ in their last bit; tests/test_trainer.py).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}

#: Lowers the step or init for batches of the shapes named by a key.
Lower = Callable[[tuple], Any]


class StepCompiler:
  """Compiled train steps and inits, keyed by batch shapes (`state_plan.shape_key`).

  Args:
    lower_step: shape key -> the lowered train step (`jax.jit(...).lower(...)`).
    lower_init: shape key -> the lowered init (rng -> TrainState).
  """

  def __init__(self, lower_step: Lower, lower_init: Lower):
    self._lower_step, self._lower_init = lower_step, lower_init
    self._steps: dict[tuple, Any] = {}  # shape key -> compiled step
    self._inits: dict[tuple, Any] = {}  # shape key -> compiled init
    self._pending_steps: dict[tuple, concurrent.futures.Future] = {}
    self._pending_inits: dict[tuple, concurrent.futures.Future] = {}
    self._lock = threading.Lock()  # the background threads write the dicts
    self._cancelled = threading.Event()
    #: 'init' / 'train_step': seconds of the last compilation of each.
    self.seconds: dict[str, float] = {}

  def start(self, key: tuple, init: bool = True) -> concurrent.futures.Future:
    """Lowers the step (and init) of these shapes here and compiles them in background
    threads; returns the Future of the compiled step (None when cancelled or failed)."""
    try:
      lowered_step = self._lower_step(key)
      lowered_init = self._lower_init(key) if init else None
    except Exception as error:  # noqa: BLE001  (the caller's own request raises it again)
      log.debug("no background compilation (%s)", error)
      future: concurrent.futures.Future = concurrent.futures.Future()
      future.set_result(None)
      return future

    def step() -> Any:
      return None if self._cancelled.is_set() else self._compile_step(key, lowered_step)

    def compile_init() -> Any:
      if self._cancelled.is_set():
        raise concurrent.futures.CancelledError()
      return self._compile_init(key, lowered_init)

    executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="t5xlike-compile")
    future = executor.submit(step)
    with self._lock:
      self._pending_steps[key] = future
      if init:
        self._pending_inits[key] = executor.submit(compile_init)
    executor.shutdown(wait=False)
    return future

  def cancel(self) -> None:
    """Stops background compilation that has not started, now and in later `start` calls."""
    self._cancelled.set()

  def step(self, key: tuple) -> Any:
    """The compiled step of these shapes: kept, or `start`'s (waited for), or compiled now."""
    compiled = self._steps.get(key)
    if compiled is None:
      compiled = self._wait(self._pending_steps, key)
    return compiled if compiled is not None else self._compile_step(key, self._lower_step(key))

  def available_step(self, key: tuple) -> Any | None:
    """The compiled step of these shapes when there is one or `start` is making it (waits
    for it, compiling now if it failed); None otherwise (the caller runs its jitted step)."""
    with self._lock:
      pending = key in self._pending_steps
    return self.step(key) if pending or key in self._steps else None

  def forget_step(self, key: tuple) -> None:
    """Drops the compiled step of these shapes (it refused its arguments)."""
    self._steps.pop(key, None)

  def init(self, key: tuple) -> Any:
    """The compiled init of these shapes (XLA:CPU without LLVM optimisation,
    `INIT_COMPILER_OPTIONS`), `start`'s when it made one."""
    compiled = self._inits.get(key)
    if compiled is None:
      compiled = self._wait(self._pending_inits, key)
    return compiled if compiled is not None else self._compile_init(key, self._lower_init(key))

  def _wait(self, pending: dict[tuple, concurrent.futures.Future], key: tuple) -> Any | None:
    with self._lock:
      future = pending.pop(key, None)
    if future is None:
      return None
    try:
      return future.result()
    except Exception as error:  # noqa: BLE001  (compiled again by the caller: raises there)
      log.debug("background compilation failed (%s): compiling again", error)
      return None

  def _compile_step(self, key: tuple, lowered: Any) -> Any:
    start = time.perf_counter()
    compiled = lowered.compile()
    self.seconds["train_step"] = time.perf_counter() - start
    self._steps[key] = compiled
    return compiled

  def _compile_init(self, key: tuple, lowered: Any) -> Any:
    start = time.perf_counter()
    compiled = lowered.compile(INIT_COMPILER_OPTIONS.get(jax.default_backend()))
    self.seconds["init"] = time.perf_counter() - start
    self._inits[key] = compiled
    return compiled
