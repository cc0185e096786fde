"""Schedules and optimizer defaults."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5xlike import optim


def test_rsqrt_schedule_is_t5():
  schedule = optim.rsqrt_with_warmup(base_learning_rate=1.0, warmup_steps=10_000)
  # count = completed steps; step = count + 1.
  assert float(schedule(0)) == pytest.approx(0.01)
  assert float(schedule(9_999)) == pytest.approx(0.01)
  assert float(schedule(39_999)) == pytest.approx(1 / np.sqrt(40_000))
  linear = optim.rsqrt_with_warmup(1.0, 100, linear_warmup=True)
  assert float(linear(49)) == pytest.approx(0.1 * 0.5)


def test_cosine_and_linear_schedules():
  cos = optim.cosine(peak_learning_rate=1.0, warmup_steps=10, decay_steps=100,
                     end_learning_rate=0.1)
  assert float(cos(0)) == pytest.approx(0.0)
  assert float(cos(10)) == pytest.approx(1.0)
  assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
  assert float(cos(110)) == pytest.approx(0.1)
  lin = optim.linear(peak_learning_rate=2.0, warmup_steps=0, decay_steps=10)
  assert float(lin(5)) == pytest.approx(1.0)
  assert float(optim.constant(3e-4)(123)) == pytest.approx(3e-4)


def test_adafactor_factors_large_matrices_only():
  params = {"big": jnp.ones((256, 512)), "small": jnp.ones((64, 512)), "vec": jnp.ones((512,))}
  state = optim.adafactor(learning_rate=0.01).init(params)
  leaves = {"/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path): x.shape
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
  shapes = set(leaves.values())
  assert (256,) in shapes and (512,) in shapes  # factored row / column moments of "big"
  assert (64, 512) in shapes                    # "small" keeps a full second moment


def test_adafactor_update_clipping_and_parameter_scale():
  # One step from zero state: the update has RMS lr * param_rms (clipped to RMS 1 first).
  params = {"w": jnp.full((4, 4), 2.0)}
  grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}
  opt = optim.adafactor(learning_rate=0.1, min_dim_size_to_factor=128)
  updates, _ = opt.update(grads, opt.init(params), params)
  rms = float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))
  assert rms == pytest.approx(0.1 * 2.0, rel=1e-3)


# -- several steps against float64 references ----------------------------------------------
# Independent references written from the papers (NumPy, float64), run side by side with
# our optax configuration for 6 steps. Step 5's gradients are 40 times the others, so the
# update clipping of Adafactor (and AdamW's global-norm clipping) is active there.

STEPS = 6
BIG_STEP = 5  # 1-based step whose gradients are scaled up


def _gradient_sequence(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for step in range(1, STEPS + 1):
    scale = 40.0 if step == BIG_STEP else 1.0
    out.append({name: scale * rng.normal(size=shape) * (1 + np.arange(shape[-1]) / shape[-1])
                for name, shape in shapes.items()})
  return out


def adafactor_reference(params, gradients, learning_rate, *, decay_exponent=0.8,
                        clipping_threshold=1.0, min_dim_size_to_factor=128, epsilon1=1e-30,
                        epsilon2=1e-3, beta1=None, weight_decay_rate=None):
  """Adafactor (Shazeer & Stern 2018) as T5X's `adafactor.Adafactor` sets it up by default,
  in float64. Returns (parameters after each step, clipping denominators per step).

  Per step t (1-based) and weight matrix X [n, m] with gradient G:
    β2_t = 1 - t^-0.8                                       (§7, decay 0.8)
    R_t = β2_t R + (1 - β2_t) (G² + ε1) 1_m,  C_t = β2_t C + (1 - β2_t) 1_nᵀ (G² + ε1),
    V̂ = R_t C_t / (1_nᵀ R_t)                               (Algorithm 4: factored when
                                                             both dims >= 128, T5X's rule)
    (a vector, or a matrix with a dimension < 128: V_t = β2_t V + (1 - β2_t)(G² + ε1))
    U = G / sqrt(V̂);  Û = U / max(1, RMS(U) / d),  d = 1  (§6, update clipping)
    α_t = ρ_t max(ε2, RMS(X_{t-1}))                         (§8, relative step, ε2 = 1e-3)
    X_t = X_{t-1} - α_t Û                                   (no momentum: β1 = 0)
  T5X's options: momentum m = β1 m + (1 - β1) α_t Û, X_t = X_{t-1} - m; weight decay
  X_t = (1 - w) X_{t-1} - (the step) (not scaled by the learning rate).
  """
  x = {k: np.asarray(v, np.float64) for k, v in params.items()}
  second = {}
  momentum = {k: np.zeros_like(v) for k, v in x.items()}
  history, denominators = [], []
  for t, grads in enumerate(gradients, start=1):
    beta2 = 1.0 - t ** -decay_exponent
    step_denominators = {}
    new = {}
    for name, g in grads.items():
      g = np.asarray(g, np.float64)
      g2 = g * g + epsilon1
      factored = g.ndim == 2 and min(g.shape) >= min_dim_size_to_factor
      if factored:
        rows, cols = second.get(name, (np.zeros(g.shape[0]), np.zeros(g.shape[1])))
        rows = beta2 * rows + (1 - beta2) * g2.sum(axis=1)
        cols = beta2 * cols + (1 - beta2) * g2.sum(axis=0)
        second[name] = (rows, cols)
        v_hat = np.outer(rows, cols) / rows.sum()
      else:
        v = beta2 * second.get(name, np.zeros_like(g)) + (1 - beta2) * g2
        second[name] = v
        v_hat = v
      u = g / np.sqrt(v_hat)
      denominator = 1.0
      if clipping_threshold is not None:
        denominator = max(1.0, np.sqrt(np.mean(u * u)) / clipping_threshold)
      step_denominators[name] = denominator
      u = u / denominator
      alpha = learning_rate(t) * max(epsilon2, np.sqrt(np.mean(x[name] ** 2)))
      step = alpha * u
      if beta1 is not None:
        momentum[name] = beta1 * momentum[name] + (1 - beta1) * step
        step = momentum[name]
      decay = 1.0 - (weight_decay_rate or 0.0)
      new[name] = decay * x[name] - step
    x = new
    history.append({k: v.copy() for k, v in x.items()})
    denominators.append(step_denominators)
  return history, denominators


def adamw_reference(params, gradients, learning_rate, *, b1=0.9, b2=0.999, eps=1e-8,
                    weight_decay=0.0, global_clip_norm=None):
  """AdamW in float64 (Kingma & Ba 2015, Algorithm 1; decoupled weight decay of Loshchilov
  & Hutter 2019, Algorithm 2, with the decay multiplied by the whole learning rate as optax
  and PyTorch do), after global-norm gradient clipping (Pascanu et al. 2013):
    g <- g * min(1, c / ||g||_2 over all parameters)
    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g²,  m̂ = m / (1 - b1^t),  v̂ = v / (1 - b2^t)
    x <- x - η_t (m̂ / (sqrt(v̂) + ε) + λ x)
  Returns (parameters after each step, the clipping factor of each step)."""
  x = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  v = {k: np.zeros_like(val) for k, val in x.items()}
  history, factors = [], []
  for t, grads in enumerate(gradients, start=1):
    g = {k: np.asarray(val, np.float64) for k, val in grads.items()}
    factor = 1.0
    if global_clip_norm:
      norm = np.sqrt(sum(np.sum(val * val) for val in g.values()))
      factor = min(1.0, global_clip_norm / norm)
    factors.append(factor)
    lr = learning_rate(t)
    for name in x:
      grad = g[name] * factor
      m[name] = b1 * m[name] + (1 - b1) * grad
      v[name] = b2 * v[name] + (1 - b2) * grad * grad
      m_hat = m[name] / (1 - b1 ** t)
      v_hat = v[name] / (1 - b2 ** t)
      x[name] = x[name] - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * x[name])
    history.append({k: val.copy() for k, val in x.items()})
  return history, factors


def _run_optax(optimizer, params, gradients):
  """Parameters after each step of `optimizer` (float32, jitted)."""
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  history = []
  for grads in gradients:
    updates, state = update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()},
                            state, params)
    params = optax.apply_updates(params, updates)
    history.append({k: np.asarray(v, np.float64) for k, v in params.items()})
  return history


def _assert_same_steps(ours, reference, start, names=None):
  """Each step's parameter change equal to the reference's, to float32 accuracy."""
  before_ours, before_ref = start, start
  for t, (a, b) in enumerate(zip(ours, reference), start=1):
    for name in names or b:
      step_ours, step_ref = a[name] - before_ours[name], b[name] - before_ref[name]
      np.testing.assert_allclose(step_ours, step_ref, rtol=2e-4,
                                 atol=2e-4 * np.abs(step_ref).max(),
                                 err_msg=f"step {t}, {name}")
    before_ours, before_ref = a, b


ADAFACTOR_SHAPES = {
    "factored": (128, 192),      # both dims >= 128: factored second moments
    "unfactored": (64, 256),     # a dim < 128: full second moments
    "vector": (48,),             # zero-initialised: the parameter scale is ε2 = 1e-3
}


def _adafactor_params():
  rng = np.random.default_rng(1)
  return {"factored": rng.normal(size=(128, 192)) * 0.5,
          "unfactored": rng.normal(size=(64, 256)) * 2.0,
          "vector": np.zeros((48,))}


def _rsqrt(t):
  return 0.1 / np.sqrt(t)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}, {"weight_decay_rate": 1e-2}],
                         ids=["t5x_defaults", "momentum", "weight_decay"])
def test_adafactor_follows_the_reference_over_several_steps(options):
  params, gradients = _adafactor_params(), _gradient_sequence(ADAFACTOR_SHAPES)
  reference, denominators = adafactor_reference(
      params, gradients, _rsqrt, beta1=options.get("momentum"),
      weight_decay_rate=options.get("weight_decay_rate"))
  # A case where clipping matters: it is active at the big step (RMS ~1.9 before it) for
  # every parameter, and at most marginal elsewhere (the factored estimate's RMS is not
  # exactly 1).
  for t, step in enumerate(denominators, start=1):
    for name, denominator in step.items():
      assert (denominator > 1.5) == (t == BIG_STEP) and denominator < 2.0, (t, name)
  # optax's schedules see the completed-step count: count 0 makes step 1.
  schedule = lambda count: 0.1 / jnp.sqrt(count + 1.0)
  ours = _run_optax(optim.adafactor(schedule, **options), params, gradients)
  _assert_same_steps(ours, reference, params)


def test_adafactor_without_clipping_leaves_the_reference():
  """The comparison above notices a missing update clipping (one step from a zero state
  would not: an unfactored update's RMS is exactly 1 there)."""
  params, gradients = _adafactor_params(), _gradient_sequence(ADAFACTOR_SHAPES)
  reference, _ = adafactor_reference(params, gradients, _rsqrt)
  schedule = lambda count: 0.1 / jnp.sqrt(count + 1.0)
  unclipped = _run_optax(optim.adafactor(schedule, clipping_threshold=None), params, gradients)
  _assert_same_steps(unclipped[:BIG_STEP - 1], reference[:BIG_STEP - 1], params,
                     names=("unfactored", "vector"))
  with pytest.raises(AssertionError, match=f"step {BIG_STEP}, unfactored"):
    _assert_same_steps(unclipped, reference, params, names=("unfactored", "vector"))


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clipping", "clipping"])
def test_adamw_follows_the_reference_over_several_steps(clip):
  shapes = {"matrix": (16, 8), "vector": (8,)}
  rng = np.random.default_rng(2)
  params = {name: rng.normal(size=shape) for name, shape in shapes.items()}
  # Gradients of global norm ~0.4 (below the threshold) except at the big step (~16).
  gradients = [{k: 0.035 * v for k, v in g.items()} for g in _gradient_sequence(shapes, 3)]
  lr = lambda t: 1e-2 * min(1.0, t / 3)  # a warmup: the rate differs between steps
  reference, factors = adamw_reference(params, gradients, lr, weight_decay=0.1,
                                       global_clip_norm=clip)
  if clip:
    assert [f < 1.0 for f in factors] == [t == BIG_STEP for t in range(1, STEPS + 1)]
  schedule = lambda count: 1e-2 * jnp.minimum(1.0, (count + 1.0) / 3)
  ours = _run_optax(optim.adamw(schedule, weight_decay=0.1, global_clip_norm=clip), params,
                    gradients)
  _assert_same_steps(ours, reference, params)
  if clip:  # Without the clipping the big step and those after it differ.
    unclipped, _ = adamw_reference(params, gradients, lr, weight_decay=0.1)
    assert not np.allclose(unclipped[BIG_STEP - 1]["matrix"], reference[BIG_STEP - 1]["matrix"],
                           rtol=1e-2)
