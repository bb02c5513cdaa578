"""`draw` pictures a model's stages and cut points, in DOT, SVG or PNG."""

import logging
import re
import shutil

import pytest
import torch
import torchvision
from torch import nn

import fxfuse
from fxfuse.draw import CHOSEN_CUT_COLOUR, CUT_COLOUR, draw, to_graphviz
from fxfuse.errors import InputError

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="graphviz's `dot` is not installed"
)


@pytest.fixture(scope="module")
def resnet18_report():
    model = torchvision.models.resnet18(num_classes=10).eval()
    return fxfuse.inspect(model, (torch.randn(2, 3, 64, 64),))


def _nodes_filled_with(dot_text: str, colour: str) -> set[str]:
    pattern = rf'^\s*"?([^\s"\[]+)"? \[[^\n]*fillcolor="{colour}"'
    return set(re.findall(pattern, dot_text, re.MULTILINE))


def _stage_labels(dot_text: str) -> list[tuple[int, float]]:
    found = re.findall(r"stage \d+: (\d+) nodes?, ([\d.]+)% FLOPs", dot_text)
    return [(int(n), float(share)) for n, share in found]


def test_dot_text_has_one_cluster_per_stage(resnet18_report, tmp_path):
    written = draw(resnet18_report, tmp_path / "resnet18.dot")

    text = written.read_text()
    assert written == tmp_path / "resnet18.dot"
    assert text.count("subgraph cluster_") == len(resnet18_report.stages) == 4


def test_only_the_chosen_cuts_are_drawn_in_the_chosen_colour(resnet18_report, tmp_path):
    text = draw(resnet18_report, tmp_path / "resnet18.dot").read_text()

    chosen = {c.node for c in resnet18_report.chosen}
    others = {c.node for c in resnet18_report.cut_points} - chosen
    assert chosen == {"layer1_1_relu_1", "layer2_1_relu_1", "layer3_1_relu_1"}
    assert _nodes_filled_with(text, CHOSEN_CUT_COLOUR) == chosen
    assert _nodes_filled_with(text, CUT_COLOUR) == others


def test_stage_labels_count_every_node_and_all_flops_once(resnet18_report, tmp_path):
    text = draw(resnet18_report, tmp_path / "resnet18.dot").read_text()

    labels = _stage_labels(text)
    computing = [
        n
        for n in resnet18_report.analysis.graph_module.graph.nodes
        if n.op not in ("placeholder", "output", "get_attr")
    ]
    assert sum(n for n, _ in labels) == len(computing)
    assert sum(share for _, share in labels) == pytest.approx(100.0, abs=0.5)
    assert labels[0][1] == pytest.approx(
        100 * resnet18_report.chosen[0].flops_fraction, abs=0.1
    )


def test_nodes_show_shapes_and_module_paths(resnet18_report, tmp_path):
    text = draw(resnet18_report, tmp_path / "resnet18.dot").read_text()

    assert 'label="layer1_1_relu_1\\n2x64x16x16"' in text
    assert 'tooltip="module: layer2.0.downsample.0' in text
    assert 'label="output\\n2x10"' in text


@needs_dot
@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_rendering_writes_the_picture_and_nothing_else(
    resnet18_report, tmp_path, suffix
):
    written = draw(resnet18_report, tmp_path / f"resnet18{suffix}")

    head = written.read_bytes()[:64]
    if suffix == ".svg":
        assert head.lstrip().startswith((b"<?xml", b"<svg"))
    else:
        assert head.startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == [f"resnet18{suffix}"]


def test_without_dot_the_dot_text_is_written_instead(
    resnet18_report, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("dot") is None

    with caplog.at_level(logging.WARNING, logger="fxfuse"):
        written = draw(resnet18_report, tmp_path / "resnet18.svg")

    assert written == tmp_path / "resnet18.dot"
    assert written.read_text().startswith("digraph")
    assert not (tmp_path / "resnet18.svg").exists()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "`dot`" in message and "apt-get install graphviz" in message
    assert str(written) in message and "\n" not in message


def test_an_unknown_suffix_is_refused_before_anything_is_written(
    resnet18_report, tmp_path
):
    with pytest.raises(InputError, match=r"'\.pdf'.*\.dot, \.svg, \.png"):
        draw(resnet18_report, tmp_path / "resnet18.pdf")
    assert list(tmp_path.iterdir()) == []


def test_a_graph_over_the_box_limit_is_collapsed_by_module(resnet18_report):
    text = to_graphviz(resnet18_report, max_boxes=12).source

    assert "collapsed by module" in text
    boxes = re.findall(r"^\t+(\S+) \[label=", text, re.MULTILINE)
    assert len(boxes) <= 12
    assert text.count("subgraph cluster_") == 4
    chosen = {c.node for c in resnet18_report.chosen}
    assert _nodes_filled_with(text, CHOSEN_CUT_COLOUR) == chosen


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.scale.exp()


def test_constants_are_folded_into_the_nodes_that_read_them(tmp_path):
    report = fxfuse.inspect(_Scaled().eval(), (torch.randn(2, 4),), levels=1)

    text = draw(report, tmp_path / "scaled.dot").read_text()

    assert "scale [" not in text and "exp [" not in text
    assert re.search(r'mul \[label=.*tooltip="[^"]*reads: exp \(from scale\)', text)
    assert "-> mul" in text and "scale ->" not in text


class _Dense(nn.Module):
    """Every layer reads the concatenation of all earlier outputs, as in DenseNet."""

    def __init__(self, layers: int = 40, width: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(width * (i + 1), width) for i in range(layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(torch.relu(layer(torch.cat(features, 1))))
        return features[-1]


def test_many_long_edges_collapse_the_graph_even_under_the_box_limit():
    report = fxfuse.inspect(_Dense().eval(), (torch.randn(2, 2),), levels=1)
    nodes = len(report.analysis.graph_module.graph.nodes)

    text = to_graphviz(report).source

    boxes = re.findall(r"^\t+(\S+) \[label=", text, re.MULTILINE)
    assert nodes < 1500
    assert "collapsed by module" in text
    assert '"stage0/layers"' in boxes and len(boxes) < nodes


class _Chain(nn.Module):
    """Residual blocks ``x + relu(fc(x))``, ten to a group: three nodes a block."""

    def __init__(self, blocks: int):
        super().__init__()
        self.groups = nn.Sequential(
            *(
                nn.Sequential(*(_Residual() for _ in range(10)))
                for _ in range(blocks // 10)
            )
        )

    def forward(self, x):
        return self.groups(x)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


@pytest.mark.slow
@needs_dot
def test_a_graph_of_thousands_of_nodes_renders_collapsed(tmp_path):
    report = fxfuse.inspect(_Chain(700).eval(), (torch.randn(2, 2),))
    assert len(report.analysis.graph_module.graph.nodes) > 2000

    written = draw(report, tmp_path / "chain.svg")

    text = written.read_text()
    assert "collapsed by module" in text
    assert text.count('class="node"') <= 1500
