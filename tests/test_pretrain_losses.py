"""Known answers for the MUSE pretraining losses, the EMA teacher and the optimizer pieces."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from muse_jax.pretrain import losses
from muse_jax.pretrain import optim
from muse_jax.pretrain import teacher as teacher_lib


def _entropy(p):
  return -np.sum(p * np.log(p), axis=-1)


def test_dino_identical_teacher_student_gives_teacher_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)  # [Vg, B, K]
  # Same logits on both global views, same temperature, zero center: CE(p, p) = H(p).
  logits[1] = logits[0]
  loss = losses.dino_loss(jnp.asarray(logits), jnp.asarray(logits), jnp.zeros(7), 0.1, 0.1)
  p = jax.nn.softmax(logits[0] / 0.1, -1)
  np.testing.assert_allclose(float(loss), np.mean(_entropy(np.asarray(p))), rtol=1e-5)


def test_dino_pairs_exclude_same_view_and_include_locals():
  rng = np.random.default_rng(1)
  t = rng.normal(size=(2, 2, 5)).astype(np.float32)
  s = rng.normal(size=(4, 2, 5)).astype(np.float32)
  c = rng.normal(size=(5,)).astype(np.float32)
  got = float(losses.dino_loss(t, s, c, 0.04, 0.1))
  pt = np.asarray(jax.nn.softmax((t - c) / 0.04, -1))
  ls = np.asarray(jax.nn.log_softmax(s / 0.1, -1))
  terms = [-(pt[i] * ls[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_dino_gradient_reaches_only_the_student():
  t = jnp.ones((2, 2, 4)) * jnp.arange(4.0)
  s = jnp.zeros((3, 2, 4))
  gt, gs = jax.grad(lambda a, b: losses.dino_loss(a, b, jnp.zeros(4), 0.1, 0.1), argnums=(0, 1))(t, s)
  assert float(jnp.abs(gt).sum()) == 0.0
  assert float(jnp.abs(gs).sum()) > 0.0


def _nulo(t_logits, t_ids, t_mask, s_logits, s_ids, s_mask, k):
  return losses.nulo_loss([jnp.asarray(x) for x in t_logits], [jnp.asarray(x) for x in t_ids],
                          [jnp.asarray(x) for x in t_mask], [jnp.asarray(x) for x in s_logits],
                          [jnp.asarray(x) for x in s_ids], [jnp.asarray(x) for x in s_mask], jnp.zeros(k), 0.1, 0.1)


def test_nulo_matches_by_id_known_answer():
  rng = np.random.default_rng(2)
  k = 6
  # One teacher view (so only student views j != 0 pair with it), one sample.
  t = rng.normal(size=(1, 3, k)).astype(np.float32)
  t_ids = np.array([[5, 7, -1]], np.int32)
  t_m = np.array([[True, True, False]])
  s0 = rng.normal(size=(1, 3, k)).astype(np.float32)  # the same view as the teacher: excluded
  s1 = rng.normal(size=(1, 4, k)).astype(np.float32)
  s1_ids = np.array([[9, 7, 5, -1]], np.int32)
  s1_m = np.array([[True, True, True, False]])
  out = _nulo([t], [t_ids], [t_m], [s0, s1], [t_ids, s1_ids], [t_m, s1_m], k)
  pt = np.asarray(jax.nn.softmax(t / 0.1, -1))[0]
  ls = np.asarray(jax.nn.log_softmax(s1 / 0.1, -1))[0]
  want = np.mean([-(pt[0] * ls[2]).sum(), -(pt[1] * ls[1]).sum()])
  np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-5)
  assert float(out["shared"]) == 2.0
  np.testing.assert_allclose(np.asarray(out["center_sum"]), t[0, 0] + t[0, 1], rtol=1e-6)
  assert float(out["center_count"]) == 2.0


def test_nulo_value_and_gradient_match_a_per_nucleus_loop():
  """The loss gathers the teacher to the student's nuclei (no scatter in the backward pass, issue #23); value and
  gradient equal a plain loop over matched (teacher nucleus, student nucleus) pairs, with padding, different view
  sizes, ids in different orders and a pair that shares nothing."""
  rng = np.random.default_rng(7)
  k, b, tt, st = 5, 2, 0.07, 0.1
  sizes = [6, 6, 4, 3]  # 2 global (teacher) views, 2 local
  ids, masks, logits = [], [], []
  for v, m in enumerate(sizes):
    ids.append(np.stack([rng.permutation(9)[:m] for _ in range(b)]).astype(np.int32))
    masks.append(rng.random((b, m)) < 0.8)
    logits.append(rng.normal(size=(b, m, k)).astype(np.float32))
  ids[3][1] = [20, 21, 22]  # view 3, sample 1 shares no nucleus with any teacher view
  center = rng.normal(size=k).astype(np.float32) * 0.1

  def loss(s_logits):
    return losses.nulo_loss([jnp.asarray(x) for x in logits[:2]], [jnp.asarray(x) for x in ids[:2]],
                            [jnp.asarray(x) for x in masks[:2]], s_logits, [jnp.asarray(x) for x in ids],
                            [jnp.asarray(x) for x in masks], jnp.asarray(center), tt, st)["loss"]

  def reference(s_logits):
    total, n_valid = 0.0, 0
    for i in range(2):
      p_t = jax.nn.softmax((jnp.asarray(logits[i]) - center) / tt, -1)
      for j in range(len(sizes)):
        if j == i:
          continue
        lp = jax.nn.log_softmax(s_logits[j] / st, -1)
        for bi in range(b):
          terms = [-(p_t[bi, a] * lp[bi, c]).sum() for a in range(sizes[i]) for c in range(sizes[j])
                   if masks[i][bi, a] and masks[j][bi, c] and ids[i][bi, a] == ids[j][bi, c]]
          if terms:
            total, n_valid = total + sum(terms) / len(terms), n_valid + 1
    return total / n_valid

  s = [jnp.asarray(x) for x in logits]
  np.testing.assert_allclose(float(loss(s)), float(reference(s)), rtol=1e-5)
  for g, r in zip(jax.grad(loss)(s), jax.grad(reference)(s)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-7)


def test_nulo_identical_views_give_entropy_and_empty_pairs_are_masked():
  rng = np.random.default_rng(3)
  k = 5
  t = rng.normal(size=(2, 3, k)).astype(np.float32)
  ids = np.array([[0, 1, 2], [3, 4, -1]], np.int32)
  m = ids >= 0
  # Student view 1 is an exact copy of the teacher view (same nuclei, same logits) for sample 0 and shares no
  # nucleus with it for sample 1 (that pair is masked, not NaN).
  s1_ids = np.array([[0, 1, 2], [10, 11, 12]], np.int32)
  out = _nulo([t], [ids], [m], [t, t], [ids, s1_ids], [m, s1_ids >= 0], k)
  p = np.asarray(jax.nn.softmax(t[0] / 0.1, -1))
  np.testing.assert_allclose(float(out["loss"]), _entropy(p).mean(), rtol=1e-5)
  assert float(out["valid_frac"]) == 0.5


def test_nulo_no_shared_nuclei_is_zero_not_nan_with_finite_grads():
  k = 4
  t = jnp.ones((1, 2, k))
  ids_t = np.array([[1, 2]], np.int32)
  ids_s = np.array([[3, -1]], np.int32)
  def f(s):
    return _nulo([t], [ids_t], [ids_t >= 0], [t, s], [ids_t, ids_s], [ids_t >= 0, ids_s >= 0], k)["loss"]
  s = jnp.ones((1, 2, k))
  assert float(f(s)) == 0.0
  g = jax.grad(f)(s)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_nulo_gradient_reaches_only_the_student():
  rng = np.random.default_rng(4)
  t = jnp.asarray(rng.normal(size=(1, 2, 3)), jnp.float32)
  s = jnp.asarray(rng.normal(size=(1, 2, 3)), jnp.float32)
  ids = np.array([[0, 1]], np.int32)
  m = ids >= 0
  f = lambda a, b: _nulo([a], [ids], [m], [a, b], [ids, ids], [m, m], 3)["loss"]
  gt, gs = jax.grad(f, argnums=(0, 1))(t, s)
  # The teacher tensor also feeds student view 0, which has no partner: zero gradient either way.
  assert float(jnp.abs(gt).sum()) == 0.0
  assert float(jnp.abs(gs).sum()) > 0.0


def test_center_update_and_teacher_temperature_schedule():
  c = losses.update_center(jnp.ones(3), jnp.zeros(3), 0.9)
  np.testing.assert_allclose(np.asarray(c), 0.9)
  np.testing.assert_allclose(np.asarray(losses.update_center(jnp.ones(3), jnp.zeros(3), 0.9, False)), 1.0)
  sched = losses.teacher_temperature_schedule(0.04, 0.07, 10)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 50)], [0.04, 0.055, 0.07, 0.07], rtol=1e-6)


def test_ema_teacher_matches_hand_written_ema_and_is_untouched_by_grads():
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  mom = optim.warmup_cosine(0.9, 1.0, 5)
  tx = optax.chain(optax.sgd(0.1), teacher_lib.ema_teacher(mom))
  state = tx.init(params)
  teacher = jax.tree.map(np.asarray, params)
  p = params
  for step in range(5):
    grads = {"w": jnp.array([1.0, 3.0]) * (step + 1), "b": jnp.array(-1.0)}
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    m = float(mom(step))
    teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * np.asarray(s), teacher, p)
    assert int(teacher_lib.get_teacher_count(state)) == step + 1  # once per optimizer step
  got = teacher_lib.get_teacher(state)
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), teacher[k], rtol=1e-6)
  # Gradients are computed w.r.t. the student params only; a gradient of the teacher's tree does not exist in
  # the update path: the teacher state changes only through the EMA of the post-update student.
  assert not np.allclose(np.asarray(got["w"]), np.asarray(p["w"]))


def test_ema_teacher_advances_once_per_real_step_under_multisteps():
  params = {"w": jnp.ones(2)}
  tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), teacher_lib.ema_teacher(0.5)), every_k_schedule=2)
  state = tx.init(params)
  for _ in range(4):
    upd, state = tx.update({"w": jnp.ones(2)}, state, params)
    params = optax.apply_updates(params, upd)
  assert int(teacher_lib.get_teacher_count(state.inner_opt_state)) == 2


def _opt_cfg(**kw):
  c = ml_collections.ConfigDict(dict(base_lr=1.0, scale_lr=False, min_lr=0.0, warmup_epochs=0.0, weight_decay=0.04,
                                     weight_decay_end=0.4, b1=0.9, b2=0.999, eps=1e-8, clip_grad=3.0,
                                     freeze_last_layer_epochs=1.0, momentum_teacher=0.996, momentum_teacher_end=1.0,
                                     warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=0.0,
                                     student_temp=0.1, center_momentum=0.9))
  c.update(kw)
  return c


def test_schedules_warmup_cosine_and_wd():
  sch = optim.make_schedules(_opt_cfg(warmup_epochs=1.0), steps_per_epoch=10, total_steps=110, global_batch=256)
  np.testing.assert_allclose(float(sch.lr(0)), 0.0, atol=1e-7)
  np.testing.assert_allclose(float(sch.lr(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sch.lr(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sch.lr(60)), 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(sch.lr(110)), 0.0, atol=1e-6)
  np.testing.assert_allclose([float(sch.wd(0)), float(sch.wd(110))], [0.04, 0.4], rtol=1e-5)
  np.testing.assert_allclose([float(sch.momentum(0)), float(sch.momentum(110))], [0.996, 1.0], rtol=1e-6)


def test_optimizer_masks_no_decay_on_bias_norm_and_freezes_last_layer():
  params = {"backbone": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}},
            "cls_head": {"last_layer": {"weight_v": jnp.ones((2, 3))}}}
  assert optim.decay_mask(params)["backbone"]["dense"] == {"kernel": True, "bias": False}
  assert optim.last_layer_mask(params)["cls_head"]["last_layer"]["weight_v"]
  assert not optim.last_layer_mask(params)["backbone"]["dense"]["kernel"]
  cfg = _opt_cfg(freeze_last_layer_epochs=1.0)
  sch = optim.make_schedules(cfg, steps_per_epoch=2, total_steps=10, global_batch=256)
  tx = optim.build_optimizer(cfg, params, sch, steps_per_epoch=2)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  p = params
  lasts = []
  for _ in range(3):
    upd, state = tx.update(zeros, state, p)
    p = optax.apply_updates(p, upd)
    lasts.append(np.asarray(p["cls_head"]["last_layer"]["weight_v"]).copy())
  # Zero gradients: only weight decay moves params. Frozen for 2 steps (1 epoch), then decayed.
  np.testing.assert_array_equal(lasts[1], 1.0)
  assert lasts[2].max() < 1.0
  np.testing.assert_array_equal(np.asarray(p["backbone"]["dense"]["bias"]), 1.0)  # no decay on biases
  assert float(p["backbone"]["dense"]["kernel"][0, 0]) < 1.0
  teacher = teacher_lib.get_teacher(state)
  assert jax.tree.structure(teacher) == jax.tree.structure(params)
