"""AKF and HeadMixer: identity at initialisation, the four steps, export."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fxfuse.akf import AKF, HeadMixer, Member, TaskEncoderLayer

# Mixed widths, ranks and layouts; "left" has two members, "right" and "side" one.
MEMBERS = (
    Member("left_cnn", "left", channels=32, channel_dim=1, ndim=4),
    Member("left_vit", "left", channels=24, channel_dim=-1, ndim=3),
    Member("right_mlp", "right", channels=16, channel_dim=-1, ndim=2),
    Member("side_cl", "side", channels=12, channel_dim=-1, ndim=4),
)
TASKS = ("left", "right", "side")


def mixed_values(batch: int) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(batch, 32, 6, 5),
        torch.randn(batch, 7, 24),
        torch.randn(batch, 16),
        torch.randn(batch, 4, 3, 12),
    )


def make_writers_nonzero(akf: AKF) -> None:
    with torch.no_grad():
        for writer in akf.writers:
            writer.weight.normal_(std=0.1)
            writer.bias.normal_(std=0.1)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# AKF: initialisation and the four steps


def test_untrained_akf_returns_its_inputs_exactly():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    values = mixed_values(batch=3)

    outputs = akf(*values)

    assert len(outputs) == len(values)
    for output, value in zip(outputs, values, strict=True):
        assert output.shape == value.shape
        assert torch.equal(output, value)


def test_write_adds_a_term_constant_over_the_pooled_dims():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    make_writers_nonzero(akf)
    values = mixed_values(batch=3)

    cnn, vit, mlp, channel_last = (
        out - value for out, value in zip(akf(*values), values, strict=True)
    )

    # (h + u) - h equals u up to rounding, hence the small tolerance; the update
    # itself varies by far more than that across channels.
    def assert_constant_over_pooled_dims(diff, at_one_position, channel_dim):
        expected = at_one_position.expand_as(diff)
        torch.testing.assert_close(diff, expected, atol=1e-6, rtol=0)
        assert at_one_position.std(dim=channel_dim).amin() > 1e-2

    # Channel-first [B, C, H, W]: one number per (batch, channel), same at every H, W.
    assert_constant_over_pooled_dims(cnn, cnn[:, :, :1, :1], channel_dim=1)
    # Channel-last [B, T, C] and [B, H, W, C]: same at every token / position.
    assert_constant_over_pooled_dims(vit, vit[:, :1, :], channel_dim=-1)
    assert_constant_over_pooled_dims(
        channel_last, channel_last[:, :1, :1, :], channel_dim=-1
    )
    assert mlp.std(dim=1).amin() > 1e-2


def test_at_init_only_the_writers_receive_gradient():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    loss = sum((out**2).sum() for out in akf(*mixed_values(batch=3)))
    loss.backward()

    for name, parameter in akf.named_parameters():
        assert parameter.grad is not None, name
        if name.startswith("writers."):
            assert parameter.grad.abs().amax() > 0, name
        else:
            assert torch.count_nonzero(parameter.grad) == 0, name


def test_gradients_reach_every_parameter_once_writers_are_nonzero():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    make_writers_nonzero(akf)
    loss = sum((out**2).sum() for out in akf(*mixed_values(batch=3)))
    loss.backward()

    for name, parameter in akf.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().amax() > 1e-6, name


def test_single_member_task_has_gate_one_and_passes_its_token_through():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    tokens = akf.read(mixed_values(batch=3))

    task_tokens, gates = akf.intra_task(tokens)

    right = TASKS.index("right")
    assert torch.equal(gates[right], torch.ones(3, 1))
    assert torch.equal(task_tokens[:, right], tokens[2])
    assert len(list(akf.gates[right].parameters())) == 0


def test_multi_member_gate_starts_uniform_and_follows_its_scores():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    tokens = akf.read(mixed_values(batch=3))
    left = TASKS.index("left")

    task_tokens, gates = akf.intra_task(tokens)
    assert torch.equal(gates[left], torch.full((3, 2), 0.5))
    torch.testing.assert_close(task_tokens[:, left], (tokens[0] + tokens[1]) / 2)

    with torch.no_grad():
        akf.gates[left].score.weight.normal_()
    scores = torch.stack([akf.gates[left].score(tokens[i]) for i in (0, 1)], dim=1)
    expected = scores.squeeze(-1).softmax(dim=-1)
    task_tokens, gates = akf.intra_task(tokens)
    torch.testing.assert_close(gates[left], expected)
    torch.testing.assert_close(gates[left].sum(dim=-1), torch.ones(3))
    torch.testing.assert_close(
        task_tokens[:, left],
        expected[:, :1] * tokens[0] + expected[:, 1:] * tokens[1],
    )


def test_read_pools_every_dim_but_batch_and_channel():
    # A [B, 5, 5] value: channel-last pools dim 1, channel-first pools dim 2.
    members = (
        Member("tokens", "t", channels=5, channel_dim=-1, ndim=3),
        Member("signal", "t", channels=5, channel_dim=1, ndim=3),
    )
    akf = AKF(members, ["t"], width=8, heads=2)
    with torch.no_grad():
        akf.readers[1].load_state_dict(akf.readers[0].state_dict())
    value = torch.randn(2, 5, 5)

    channel_last, channel_first = akf.read([value, value])

    norm, reader = akf.read_norms[0], akf.readers[0]
    torch.testing.assert_close(channel_last, norm(reader(value.mean(dim=1))))
    torch.testing.assert_close(channel_first, norm(reader(value.mean(dim=2))))
    assert not torch.allclose(channel_last, channel_first)


def test_task_embeddings_tell_tasks_apart_in_the_inter_task_step():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    same_tokens = torch.randn(3, 1, 16).expand(3, len(TASKS), 16)

    updated = akf.inter_task(same_tokens)

    assert updated.shape == (3, len(TASKS), 16)
    assert not torch.allclose(updated[:, 0], updated[:, 1])


@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
def test_few_token_attention_matches_the_fused_kernel(tokens):
    few = TaskEncoderLayer(width=16, heads=4, ff_mult=2, dropout=0.0, tokens=tokens)
    many = TaskEncoderLayer(width=16, heads=4, ff_mult=2, dropout=0.0)
    many.load_state_dict(few.state_dict())
    x = torch.randn(5, tokens, 16)

    assert few.few_tokens and not many.few_tokens
    torch.testing.assert_close(few(x), many(x), atol=1e-6, rtol=1e-5)
    # Each query mixes the values differently, so the tokens' updates differ.
    if tokens > 1:
        assert not torch.allclose(few.attend(x)[:, 0], few.attend(x)[:, 1])


@pytest.mark.parametrize("n_tasks, few", [(4, True), (5, False)])
def test_akf_uses_few_token_attention_up_to_four_tasks(n_tasks, few):
    tasks = [f"task{i}" for i in range(n_tasks)]
    members = [Member(f"model{i}", task, 8, -1, 2) for i, task in enumerate(tasks)]

    assert AKF(members, tasks, width=8, heads=2).encoder.few_tokens is few


def test_dropout_acts_in_training_only():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4, dropout=0.5)
    make_writers_nonzero(akf)
    values = mixed_values(batch=3)

    akf.eval()
    assert torch.equal(akf(*values)[2], akf(*values)[2])
    akf.train()
    assert not torch.equal(akf(*values)[2], akf(*values)[2])


def test_extra_repr_names_members_tasks_and_width():
    text = repr(AKF(MEMBERS, TASKS, width=16, heads=4))

    assert "left_cnn(left, C=32, 4-D channel-first)" in text
    assert "side_cl(side, C=12, 4-D last)" in text
    assert "tasks=[left, right, side]" in text
    assert "width=16" in text


# AKF: errors


def test_width_not_divisible_by_heads_is_rejected():
    with pytest.raises(ValueError, match="width=30 is not divisible by heads=4"):
        AKF(MEMBERS, TASKS, width=30, heads=4)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (("left", "right"), "'side', which is not among the tasks"),
        (("left", "right", "side", "extra"), "task 'extra' has no member"),
        (("left", "left", "right", "side"), "duplicate"),
    ],
)
def test_members_and_tasks_must_match(tasks, message):
    with pytest.raises(ValueError, match=message):
        AKF(MEMBERS, tasks, width=16, heads=4)


def test_member_rejects_an_unknown_channel_dim():
    with pytest.raises(ValueError, match="channel_dim=2"):
        Member("m", "t", channels=4, channel_dim=2, ndim=4)


def test_forward_rejects_a_value_with_the_wrong_channels():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4)
    values = list(mixed_values(batch=2))
    values[1] = torch.randn(2, 24, 7)  # channel-first instead of channel-last

    with pytest.raises(ValueError, match="'left_vit'.*24 channels in dim -1"):
        akf(*values)


# AKF and HeadMixer under torch.fx


class Calls(nn.Module):
    """Calls `module` with four values, as the fused model calls AKF and mixers: fx
    traces a module through its callers (it cannot trace a ``*values`` forward as
    the root, whatever the module does)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, a, b, c, d):
        return self.module(a, b, c, d)


def test_symbolic_trace_through_akf_keeps_its_values():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4).eval()
    make_writers_nonzero(akf)

    traced = torch.fx.symbolic_trace(Calls(akf))

    values = mixed_values(batch=3)
    for got, want in zip(traced(*values), akf(*values), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(akf(*values)[0], values[0])  # the writers do write


# HeadMixer


def test_symbolic_trace_through_a_per_input_mixer_keeps_its_values():
    mixer = HeadMixer(4, weights=[3, 1, 1, 1], per_input=True, prediction_size=3)
    with torch.no_grad():
        mixer.per_input.weight.normal_()

    traced = torch.fx.symbolic_trace(Calls(mixer))

    predictions = [torch.randn(5, 3) for _ in range(4)]
    assert torch.equal(traced(*predictions), mixer(*predictions))


@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 3)])
def test_untrained_mixer_gives_the_mean(shape):
    predictions = [torch.randn(shape) for _ in range(3)]

    mixed = HeadMixer(3)(*predictions)

    assert mixed.shape == shape
    torch.testing.assert_close(
        mixed, torch.stack(predictions).mean(dim=0), atol=1e-7, rtol=0
    )


def test_single_model_mixer_returns_the_prediction_exactly():
    prediction = torch.randn(5, 3)

    assert torch.equal(HeadMixer(1)(prediction), prediction)


def test_mixer_starts_from_the_given_weights():
    first, second = torch.randn(5, 2), torch.randn(5, 2)

    mixed = HeadMixer(2, weights=[3, 1])(first, second)

    torch.testing.assert_close(mixed, 0.75 * first + 0.25 * second)


@pytest.mark.parametrize("shape", [(4,), (4, 1), (4, 3)])
def test_context_correction_is_zero_at_init_and_per_input_once_trained(shape):
    mixer = HeadMixer(2, weights=[3, 1], context_width=6)
    first, second = torch.randn(shape), torch.randn(shape)
    context = torch.randn(4, 6)

    torch.testing.assert_close(
        mixer(first, second, context=context), 0.75 * first + 0.25 * second
    )

    with torch.no_grad():
        mixer.context_correction.weight.normal_()
    weights = (mixer.logits + mixer.context_correction(context)).softmax(dim=-1)
    per_input = [w.reshape(4, *[1] * (len(shape) - 1)) for w in weights.unbind(-1)]
    torch.testing.assert_close(
        mixer(first, second, context=context),
        per_input[0] * first + per_input[1] * second,
    )


def test_mixer_requires_context_exactly_when_configured():
    prediction = torch.randn(4)
    with pytest.raises(ValueError, match="context"):
        HeadMixer(1, context_width=3)(prediction)
    with pytest.raises(ValueError, match="context"):
        HeadMixer(1)(prediction, context=torch.randn(4, 3))


def test_mixer_rejects_nonpositive_weights():
    with pytest.raises(ValueError, match="positive"):
        HeadMixer(2, weights=[1, 0])


# Export


def test_torch_export_with_a_dynamic_batch_matches_eager():
    akf = AKF(MEMBERS, TASKS, width=16, heads=4).eval()
    make_writers_nonzero(akf)
    values = mixed_values(batch=3)
    batch = torch.export.Dim("batch")

    # forward takes *values: one spec per value, wrapped once for the var-positional.
    program = torch.export.export(
        akf,
        values,
        dynamic_shapes=(tuple({0: batch} for _ in values),),
        strict=False,
    )

    other_batch = mixed_values(batch=5)
    for exported, eager in zip(
        program.module()(*other_batch), akf(*other_batch), strict=True
    ):
        assert exported.shape[0] == 5
        torch.testing.assert_close(exported, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_like_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    members = (
        Member("a_cnn", "a", channels=8, channel_dim=1, ndim=4),
        Member("a_mlp", "a", channels=6, channel_dim=-1, ndim=2),
        Member("b_vit", "b", channels=10, channel_dim=-1, ndim=3),
    )
    akf = AKF(members, ["a", "b"], width=8, heads=2).eval()
    make_writers_nonzero(akf)
    values = (torch.randn(3, 8, 4, 4), torch.randn(3, 6), torch.randn(3, 5, 10))
    batch = torch.export.Dim("batch")
    path = tmp_path / "akf.onnx"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names
        torch.onnx.export(
            akf,
            values,
            str(path),
            dynamo=True,
            dynamic_shapes=(tuple({0: batch} for _ in values),),
            input_names=[member.name for member in members],
            verbose=False,
        )

    other_batch = (torch.randn(7, 8, 4, 4), torch.randn(7, 6), torch.randn(7, 5, 10))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {m.name: v.numpy() for m, v in zip(members, other_batch, strict=True)}
    with torch.no_grad():
        eager = akf(*other_batch)
    for onnx_output, eager_output in zip(session.run(None, feeds), eager, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(onnx_output), eager_output, atol=1e-5, rtol=1e-5
        )


def test_akf_parameter_count_matches_its_parts():
    # 4 members of widths 16/8/16/8 in two tasks, width 64: the size the CLI reports.
    members = [
        Member(f"m{i}", task, channels, channel_dim=-1, ndim=2)
        for i, (task, channels) in enumerate(
            [("income", 16), ("income", 8), ("marital", 16), ("marital", 8)]
        )
    ]
    akf = AKF(members, ["income", "marital"], width=64)

    read = sum(c * 64 + 64 for c in (16, 8, 16, 8)) + 4 * 2 * 64
    gates = 2 * 64
    embeddings = 2 * 64
    encoder = (
        2 * (2 * 64) + 64 * 192 + (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    )
    write = sum(64 * c + c for c in (16, 8, 16, 8))
    assert sum(p.numel() for p in akf.parameters()) == read + gates + embeddings + (
        encoder + write
    )
    assert isinstance(akf.encoder.feed_forward[1], nn.GELU)
