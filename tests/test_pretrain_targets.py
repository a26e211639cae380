"""Sinkhorn-Knopp teacher targets and the KoLeo regulariser (issue #21 levers against partial collapse)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.pretrain import losses


def _sk_reference(logits, temp, iters):
  """SwAV / DINOv2 Sinkhorn-Knopp written out in NumPy (float64), all rows real."""
  q = np.exp(logits / temp).T  # [K, N]
  k, n = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(1, keepdims=True)
    q /= k
    q /= q.sum(0, keepdims=True)
    q /= n
  return (q * n).T


def test_sinkhorn_matches_the_reference_and_balances_prototypes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 10)) * 0.3
  got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.1, n_iters=3))
  np.testing.assert_allclose(got, _sk_reference(logits, 0.1, 3), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
  # Many iterations: every prototype gets N / K of the mass; a plain softmax would not balance them.
  many = np.asarray(losses.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.1, n_iters=50))
  np.testing.assert_allclose(many.sum(0), 64 / 10, rtol=1e-3)
  soft = np.asarray(jax.nn.softmax(logits / 0.1, -1))
  assert np.ptp(soft.sum(0)) > 10 * np.ptp(many.sum(0))


def test_sinkhorn_spreads_a_batch_that_centering_leaves_on_one_prototype():
  # Every sample prefers prototype 0 by a margin far above the temperature: the softmax target puts (almost) the
  # whole batch on it, Sinkhorn-Knopp assigns the samples to different prototypes by their small differences.
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(32, 8)) * 0.05
  logits[:, 0] += 1.0
  soft = np.asarray(jax.nn.softmax(logits / 0.04, -1))
  sk = np.asarray(losses.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.04, n_iters=3))
  assert (soft.argmax(1) == 0).all()
  assert len(set(sk.argmax(1))) >= 6


def test_sinkhorn_padding_rows_take_no_mass_and_do_not_change_real_rows():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(20, 6)).astype(np.float32)
  pad = rng.normal(size=(7, 6)).astype(np.float32) * 50  # huge logits in padding must not matter
  w = np.array([1] * 20 + [0] * 7, np.float32)
  got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(np.concatenate([real, pad])), 0.1, jnp.asarray(w)))
  ref = np.asarray(losses.sinkhorn_knopp(jnp.asarray(real), 0.1))
  np.testing.assert_allclose(got[:20], ref, rtol=1e-5, atol=1e-7)
  assert np.all(got[20:] == 0)
  assert np.all(np.isfinite(got))


def test_koleo_known_answer_and_padding():
  # Four unit vectors on a circle at 0, 90, 180 and 200 degrees: nearest-neighbour distances are known.
  ang = np.deg2rad([0.0, 90.0, 180.0, 200.0])
  x = np.stack([np.cos(ang), np.sin(ang)], 1) * np.array([[3.0], [1.0], [0.5], [2.0]])  # norms do not matter
  chord = lambda d: 2 * np.sin(np.deg2rad(d) / 2)
  nn = [chord(90), chord(90), chord(20), chord(20)]
  want = -np.mean(np.log(nn))
  got = float(losses.koleo_loss(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # A padding row sitting on top of row 0 is neither a query nor a neighbour.
  xp = np.concatenate([x, x[:1] * 1.01])
  got_p = float(losses.koleo_loss(jnp.asarray(xp, jnp.float32), jnp.asarray([1, 1, 1, 1, 0], jnp.float32)))
  np.testing.assert_allclose(got_p, want, rtol=1e-4)


def test_koleo_gradient_pushes_nearest_neighbours_apart_and_is_finite():
  x = jnp.asarray([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0]], jnp.float32)
  w = jnp.asarray([1.0, 1.0, 0.0])
  g = jax.grad(lambda v: losses.koleo_loss(v, w))(x)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.allclose(np.asarray(g[2]), 0.0)  # padding gets no gradient
  step = x - 0.1 * g
  d0 = np.linalg.norm(np.asarray(x[0] / jnp.linalg.norm(x[0]) - x[1] / jnp.linalg.norm(x[1])))
  d1 = np.linalg.norm(np.asarray(step[0] / jnp.linalg.norm(step[0]) - step[1] / jnp.linalg.norm(step[1])))
  assert d1 > d0
  assert float(losses.koleo_loss(jnp.ones((1, 3)))) == 0.0  # a single row has no neighbour


@pytest.mark.parametrize("targets", ["center", "sinkhorn"])
def test_nulo_and_dino_accept_explicit_targets(targets):
  rng = np.random.default_rng(3)
  t = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  s = jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)
  c = jnp.zeros(5)
  p = (losses.teacher_probs(t, c, 0.1) if targets == "center"
       else losses.sinkhorn_knopp(t.reshape(6, 5), 0.1).reshape(2, 3, 5))
  got = float(losses.dino_loss(t, s, c, 0.1, 0.1, teacher_targets=p))
  if targets == "center":
    np.testing.assert_allclose(got, float(losses.dino_loss(t, s, c, 0.1, 0.1)), rtol=1e-6)
  lp = np.asarray(jax.nn.log_softmax(s / 0.1, -1))
  want = np.mean([-(np.asarray(p)[i] * lp[j]).sum(-1).mean() for i in range(2) for j in range(3) if i != j])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pretraining_step_with_sinkhorn_targets_and_koleo_runs_and_logs(tmp_path):
  from test_pretrain_train import small_config  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  c = small_config(total_steps=2)
  c.loss.image_targets = "sinkhorn"
  c.loss.nu_targets = "sinkhorn"
  c.loss.w_koleo_nu = 0.1
  out = train.run(c, tmp_path, devices=jax.devices()[:1])
  m = out["last_metrics"]
  assert out["step"] == 2
  for k in ("loss", "loss_image", "loss_nu", "loss_koleo_nu"):
    assert np.isfinite(m[k]), k
  # With sinkhorn targets the nucleus loss is a cross-entropy against balanced targets: at init it is close to the
  # uniform student's log K (not near 0, as a collapsed sharp target would give).
  assert m["loss_nu"] > 0.5 * np.log(c.heads.nu_out_dim)
