"""The demo model's training: the agent phases' shared-prefix step computes the loss over each whole prompt."""

import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from mlx_tui.engine.demo import train


@pytest.mark.parametrize("ends", [1.0, train.ENDS_WEIGHT])
def test_the_shared_prefix_step_gives_the_whole_prompts_loss_and_gradients(ends):
    mx.random.seed(0)
    model = Model(ModelArgs(**train.MODEL_ARGS, vocab_size=64))
    rng = random.Random(0)
    prefix = [rng.randrange(64) for _ in range(200)]
    examples = []
    for _ in range(3):
        prompt = prefix + [rng.randrange(64) for _ in range(rng.randint(5, 30))]
        examples.append((prompt + [rng.randrange(64) for _ in range(rng.randint(12, 20))], len(prompt)))
    assert train.shared_prefix(examples) >= 200
    shared, shared_grads = train.prefixed_loss_and_grad(
        nn.value_and_grad(model, train.prefixed_loss_fn), model, examples, ends
    )
    if ends == 1.0:  # the whole prompts, run without a shared prefix
        whole, whole_grads = train.loss_and_grad(nn.value_and_grad(model, train.loss_fn), model, examples)
        assert shared.item() == pytest.approx(whole.item(), rel=1e-4)
        # backpropagation stops at the prefix: the gradients differ, but point the same way
        a, b = (mx.concatenate([g.flatten() for _, g in tree_flatten(x)]) for x in (shared_grads, whole_grads))
        assert (a @ b / mx.linalg.norm(a) / mx.linalg.norm(b)).item() > 0.5
    else:
        plain, _ = train.prefixed_loss_and_grad(nn.value_and_grad(model, train.prefixed_loss_fn), model, examples)
        assert shared.item() != pytest.approx(plain.item(), rel=1e-3)
