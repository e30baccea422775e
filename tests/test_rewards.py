"""Rewards for test-time search (var/rewards.py): the classifier reward, the digits reward classifier's training
command and loading, the Inception features / confidence reward (random fixture weights) and the spec errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var import rewards
from var.eval import digits_quality


def test_classifier_reward_is_the_log_probability_of_the_label():
  logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
  reward = rewards.classifier_reward(lambda images: logits)
  logp = jax.nn.log_softmax(logits, -1)
  np.testing.assert_allclose(reward(None, jnp.asarray([2, 1])), [logp[0, 2], logp[1, 1]], rtol=1e-6)
  # the unconditional class id (= num classes) scores the most likely class
  np.testing.assert_allclose(reward(None, jnp.asarray([3, 3])), logp.max(-1), rtol=1e-6)


def test_train_digits_classifier_command_and_loading(tmp_path):
  out = tmp_path / "clf"
  config = str(rewards.pathlib.Path(rewards.__file__).parent.parent / "configs" / "digits_classifier.py")
  assert rewards.main(["train-digits-classifier", "--out", str(out), "--config", config + ":runlocal"]) == 0
  clf = rewards.load_classifier(out)
  assert (clf.resolution, clf.num_classes) == (16, 10) and 0 <= clf.test_accuracy <= 1
  meta = rewards.json.loads((out / rewards.CLASSIFIER_CONFIG).read_text())
  assert meta["seed"] != 0 and meta["steps"] == 20  # the judge trains with seed 0
  assert not isinstance(clf.model, digits_quality.DigitsNet)  # another architecture than the judge
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
  assert clf.tokens(images).shape == (3, 16, 64) and clf.reward(images, jnp.asarray([0, 1, 2])).shape == (3,)
  # the saved parameters round-trip
  again = rewards.load_classifier(out)
  np.testing.assert_allclose(again.logits(images), clf.logits(images), atol=1e-6)


def test_reward_spec_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothing/classifier.json does not exist.*train-digits-classifier"):
    rewards.resolve_reward(f"classifier:{tmp_path / 'nothing'}")
  five = rewards.Classifier(rewards.DigitsCNN(16, num_classes=5, rngs=nnx.Rngs(0)), 16, 5)
  rewards.save_classifier(five, tmp_path / "five")
  with pytest.raises(ValueError, match="has 5 classes but the model has 10"):
    rewards.resolve_reward(f"classifier:{tmp_path / 'five'}", num_classes=10, image_size=16)
  with pytest.raises(ValueError, match="takes 16px images but the model makes 32px"):
    rewards.resolve_reward(f"classifier:{tmp_path / 'five'}", num_classes=5, image_size=32)
  reward, features = rewards.resolve_reward(f"classifier:{tmp_path / 'five'}", num_classes=5, image_size=16)
  assert features(jnp.zeros((1, 16, 16, 3))).shape == (1, 16, 64)
  with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
    rewards.resolve_reward(f"inception:{tmp_path / 'missing.pth'}")
  with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
    rewards.resolve_reward("no_such_module:f")
  with pytest.raises(ValueError, match="has no callable 'nope'"):
    rewards.resolve_reward("var.rewards:nope")
  assert rewards.resolve_reward("var.rewards:classifier_reward")[0] is rewards.classifier_reward
  with pytest.raises(ValueError, match="--reward 'imagereward'"):
    rewards.resolve_reward("imagereward")
  with pytest.raises(ValueError, match="--features classifier uses the reward's classifier"):
    rewards.resolve_features("classifier", None)


def test_inception_tokens_are_pool3_and_the_reward_a_negative_entropy(fid_dir):
  from var.eval.preprocess import preprocess

  scorer = rewards.load_inception_scorer(fid_dir / "inception_random_state_dict.npz")
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  # one jit: XLA shares the trunk between our tokens and the network's own outputs
  tokens, reward, ref = jax.jit(lambda x: (scorer.tokens(x), scorer.reward(x), scorer.model(preprocess(x * 255.0))))(
    images)
  assert tokens.shape == (2, 64, 2048)
  np.testing.assert_allclose(tokens.mean(1), ref["pool3"], atol=1e-4, rtol=1e-4)
  p = jax.nn.softmax(ref["logits_unbiased"], -1)
  np.testing.assert_allclose(reward, jnp.sum(p * jnp.log(p), -1), atol=1e-4)
  assert (np.asarray(reward) <= 0).all()
